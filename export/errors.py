"""Typed errors of `sodiff-export`. Each message is one line a user can act on; the CLI prints
it without a traceback and exits non-zero."""
from __future__ import annotations

from dataclasses import dataclass


class ExportError(Exception):
    """Base class: an export that cannot go on. `exit_code` is what the CLI returns."""

    exit_code = 1


class OptionError(ExportError, ValueError):
    """An option, or a combination of options, that makes no sense; the message says why."""

    exit_code = 2


class MissingCheckpointError(ExportError, FileNotFoundError):
    """No --checkpoint was given and the bundled default checkpoint is absent."""


class PrerequisiteError(ExportError):
    """The target needs software or hardware this machine lacks (TensorRT, a CUDA GPU)."""


class OutputDirError(ExportError):
    """The output directory cannot be used (holds foreign files, is a file, ...)."""


class CalibrationError(ExportError):
    """The calibration folder is missing, empty or holds unreadable images."""


class ComponentExportError(ExportError):
    """Exporting, cleaning up or building one component failed."""

    def __init__(self, component: str, stage: str, cause: str):
        super().__init__(f"{component}: {stage} failed: {cause}")
        self.component, self.stage, self.cause = component, stage, cause


@dataclass(frozen=True)
class LintProblem:
    """One reason TensorRT would reject (or silently change) a graph."""

    component: str   # which graph
    node: str        # node name (or tensor name for graph-level problems)
    op: str          # the node's op type ("" for graph-level problems)
    rule: str        # short rule id: "unsupported-op", "needs-initializer", "int64-overflow", ...
    message: str     # what is wrong and what to do

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.op else self.node
        return f"{self.component}: {where}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"component": self.component, "node": self.node, "op": self.op,
                "rule": self.rule, "message": self.message}


class LintError(ExportError):
    """TensorRT lint problems in graphs meant for `--target trt`."""

    def __init__(self, problems: list[LintProblem]):
        lines = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"TensorRT lint found {len(problems)} problem(s): {lines}{more}")
        self.problems = list(problems)


@dataclass(frozen=True)
class ParityMismatch:
    """An exported output that differs from the PyTorch wrapper's by more than the tolerance."""

    component: str
    output: str
    samples: str       # which sample batch ("random", "real")
    max_abs: float
    tolerance: float
    checked_with: str = "onnxruntime-cpu"  # the runtime that ran it (or "tensorrt")

    def __str__(self) -> str:
        return (f"{self.component}.{self.output} on {self.samples} inputs ({self.checked_with})"
                f": max abs difference {self.max_abs:.3g} > tolerance {self.tolerance:.3g}")


@dataclass(frozen=True)
class RuntimeFailure:
    """onnxruntime (or TensorRT) could not load or run a component's graph (or engine)."""

    component: str
    cause: str

    def __str__(self) -> str:
        return f"{self.component}: running it failed: {self.cause}"


class ParityError(ExportError):
    """Every parity failure of an export, collected before reporting."""

    def __init__(self, failures: list[ParityMismatch | RuntimeFailure]):
        super().__init__(f"parity check failed for {len(failures)} output(s): "
                         + "; ".join(str(f) for f in failures))
        self.failures = list(failures)
