"""onnxruntime backend: CPU, and the CUDA / TensorRT execution providers of onnxruntime-gpu."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BackendError, EngineDirError
from ..manifest import ComponentSpec
from . import GPU_EXTRA, Backend

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sodiff" / "ort-tensorrt"


def providers_for(device: str) -> list:
    """onnxruntime providers for `device` (auto, cpu, cuda, tensorrt), refusing missing ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu" or (device == "auto" and CUDA not in available):
        return [CPU]
    if device in ("auto", "cuda"):
        if CUDA not in available:
            raise BackendError(f"--device cuda: this onnxruntime has no CUDA provider (it has "
                               f"{', '.join(available)}); {GPU_EXTRA}")
        return [CUDA, CPU]
    if TRT not in available:
        raise BackendError(f"--device tensorrt: this onnxruntime has no TensorRT provider (it has "
                           f"{', '.join(available)}); {GPU_EXTRA}")
    # onnxruntime builds TensorRT engines when a session opens; the cache makes that once.
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(_cache_dir()),
               "trt_fp16_enable": True}
    return [(TRT, options), CUDA, CPU]


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, spec: ComponentSpec, providers: list, threads: int = 0):
        super().__init__(spec)
        self.providers, self.threads = providers, threads
        self.session = None
        self._outputs: list[str] = []

    def load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
        try:
            self.session = ort.InferenceSession(str(self.spec.path), so,
                                                providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise BackendError(f"onnxruntime cannot load {self.spec.path}: "
                               f"{str(e).splitlines()[0]}") from None
        self._check_io()

    def _check_io(self) -> None:
        graph = ({i.name for i in self.session.get_inputs()},
                 {o.name for o in self.session.get_outputs()})
        spec = ({t.name for t in self.spec.inputs}, {t.name for t in self.spec.outputs})
        if graph != spec:
            raise EngineDirError(
                f"engine dir {self.spec.path.parent}: {self.spec.path.name} has inputs "
                f"{sorted(graph[0])} and outputs {sorted(graph[1])}, but the manifest says "
                f"{sorted(spec[0])} and {sorted(spec[1])}; re-export the dir with sodiff-export")
        self._outputs = [t.name for t in self.spec.outputs]

    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        # onnxruntime allocates per run from its arena, which keeps the largest blocks seen:
        # with fixed-size tiles its size no longer grows after the first tile.
        if self.session is None:
            raise BackendError(f"{self.spec.name}: allocate() before load()")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            out = self.session.run(self._outputs, feeds)
        except Exception as e:
            raise BackendError(f"onnxruntime failed running {self.spec.name} on "
                               f"{ {k: v.shape for k, v in feeds.items()} }: "
                               f"{str(e).splitlines()[0]}") from None
        return dict(zip(self._outputs, out))

    def close(self) -> None:
        self.session = None
