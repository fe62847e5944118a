"""Inference backends behind one small interface with an explicit lifecycle.

`load()` once (read the model, build the session or deserialize the engine), `allocate(shapes)`
when the input shapes change (TensorRT: device buffers sized once for the largest shape, then
reused), `infer(feeds)` any number of times, `close()` to free everything. `Component` wraps a
backend with the manifest's dtypes, so callers always pass and get float32 numpy arrays.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod

import numpy as np

from ..config import RestoreOptions
from ..errors import BackendError, EngineDirError
from ..manifest import ComponentSpec, Manifest

GPU_EXTRA = "pip install 'sodiff[gpu]' (never together with the runtime extra)"


class Backend(ABC):
    """One component's model on one execution engine."""

    name = "backend"

    def __init__(self, spec: ComponentSpec):
        self.spec = spec

    @abstractmethod
    def load(self) -> None:
        """Read the model file and prepare to run it."""

    @abstractmethod
    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Prepare buffers for inputs of these shapes (called when the shapes change)."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; `feeds` already have the component's dtypes. Returns host arrays."""

    @abstractmethod
    def close(self) -> None:
        """Free sessions, engines and buffers; the backend is unusable afterwards."""


class Component:
    """A loaded component: casts float32 <-> the manifest's dtypes and tracks input shapes."""

    def __init__(self, spec: ComponentSpec, backend: Backend):
        self.spec, self.backend = spec, backend
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        shapes = {k: v.shape for k, v in arrays.items()}
        if shapes != self._shapes:
            self.backend.allocate(shapes)
            self._shapes = shapes
        out = self.backend.infer(arrays)
        return {k: v.astype(np.float32, copy=False) for k, v in out.items()}

    def close(self) -> None:
        self.backend.close()


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(manifest: Manifest, opts: RestoreOptions) -> str:
    """`ort` or `trt` for this dir, refusing a choice its files cannot serve."""
    kinds = {c.backend for c in manifest.components.values()}
    if len(kinds) > 1:
        raise EngineDirError(f"engine dir {manifest.root}: it mixes ONNX and TensorRT components; "
                             f"re-export it with one backend for every component")
    kind = "trt" if kinds == {"trt"} else "ort"
    if kind == "trt" and opts.device != "auto":
        raise ValueError(f"--device {opts.device} picks an onnxruntime provider, but engine dir "
                         f"{manifest.root} holds TensorRT engines (they run on the GPU); drop "
                         f"--device")
    if opts.backend not in ("auto", kind):
        holds = "TensorRT engines" if kind == "trt" else "ONNX graphs"
        fix = ("use --backend ort, or export ONNX graphs" if kind == "trt" else
               "use --backend ort, or build engines with sodiff-export --trt")
        raise EngineDirError(f"engine dir {manifest.root} holds {holds}, which --backend "
                             f"{opts.backend} cannot run; {fix}")
    return kind


def check_machine(manifest: Manifest, kind: str) -> None:
    """Refuse a dir this machine cannot run: missing backend, TensorRT version or GPU."""
    root = manifest.root
    if kind == "ort":
        if not installed("onnxruntime"):
            raise EngineDirError(f"engine dir {root} holds ONNX graphs but onnxruntime is not "
                                 f"installed; pip install 'sodiff[runtime]' (CPU) or {GPU_EXTRA}")
        return
    from . import trt
    trt.check_machine(manifest)


class Engines:
    """The loaded components of one dir, plus what they share (a CUDA stream); closes all."""

    def __init__(self, kind: str, components: dict[str, Component], shared: list):
        self.kind, self.components, self._shared = kind, components, shared

    def __getitem__(self, name: str) -> Component:
        return self.components[name]

    def __contains__(self, name: str) -> bool:
        return name in self.components

    def close(self) -> None:
        for comp in self.components.values():
            comp.close()
        for resource in self._shared:  # after the components that use them
            resource.close()
        self.components, self._shared = {}, []


def open_engines(manifest: Manifest, opts: RestoreOptions) -> Engines:
    """Check the machine, then load every component of `manifest` on one backend."""
    kind = resolve_backend(manifest, opts)
    check_machine(manifest, kind)
    if kind == "trt":
        from .trt import TrtBackend, TrtStream
        stream = TrtStream()
        shared, make = [stream], lambda spec: TrtBackend(spec, stream)
    else:
        from .ort import OrtBackend, providers_for
        providers = providers_for(opts.device)
        shared, make = [], lambda spec: OrtBackend(spec, providers, opts.threads)
    engines = Engines(kind, {}, shared)
    try:
        for name, spec in manifest.components.items():
            backend = make(spec)
            backend.load()
            engines.components[name] = Component(spec, backend)
    except BaseException:
        engines.close()
        raise
    return engines


__all__ = ["Backend", "BackendError", "Component", "Engines", "check_machine", "installed",
           "open_engines", "resolve_backend"]
