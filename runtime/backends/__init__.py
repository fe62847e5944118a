"""Inference backends behind one small interface with an explicit lifecycle.

`load()` once (read the model, build the session or deserialize the engine), `allocate(shapes)`
when the input shapes change (TensorRT: device buffers sized once for the largest shape, then
reused), `infer(feeds)` any number of times, `close()` to free everything. `Component` wraps a
backend with the manifest's dtypes, so callers always pass and get float32 numpy arrays.

The device-resident path (`Component.put`, `run`, `fetch`) passes `Tensor`s instead: on a
backend that binds (onnxruntime IO binding) they are OrtValues on the backend's device, so one
component's output feeds the next without visiting the host; elsewhere they are host arrays in
the component's dtype and the path is `infer` underneath.
"""
from __future__ import annotations

import numpy as np

from ..config import RestoreOptions
from ..errors import BackendError, EngineDirError
from ..manifest import ComponentSpec, Manifest
from .base import GPU_EXTRA, Backend, Tensor, host_tensor, installed  # noqa: F401 - the API


class Component:
    """A loaded component: casts float32 <-> the manifest's dtypes and tracks input shapes.

    `comp(**arrays)` is the float32 numpy contract. `put`/`run`/`fetch` is the device-resident
    path the pipeline chains; `resident=False` (or a backend that cannot bind) runs it through
    the host with the same results.
    """

    def __init__(self, spec: ComponentSpec, backend: Backend, resident: bool = True):
        self.spec, self.backend = spec, backend
        self.resident = resident and backend.binds
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.hops = 0  # inputs that had to go through the host (another dtype or device)

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        out = self._infer(arrays)
        return {k: v.astype(np.float32, copy=False) for k, v in out.items()}

    def _infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {k: v.shape for k, v in arrays.items()}
        if shapes != self._shapes:
            self.backend.allocate(shapes)
            self._shapes = shapes
        return self.backend.infer(arrays)

    def put(self, name: str, array: np.ndarray) -> Tensor:
        """Input `name` from host data: cast to its dtype here, then uploaded (once)."""
        a = np.ascontiguousarray(array, dtype=self._dtypes[name])
        return self.backend.upload(name, a) if self.resident else host_tensor(a)

    def run(self, **feeds: Tensor) -> dict[str, Tensor]:
        """Run on tensors from `put` or another component's `run`; outputs stay where they
        were made. A tensor of another dtype, or from the other side of the bus, is converted
        through the host (counted in `hops`)."""
        feeds = {k: self._adopt(k, t) for k, t in feeds.items()}
        if self.resident:
            return self.backend.run_bound(feeds)
        out = self._infer({k: t.value for k, t in feeds.items()})
        return {k: host_tensor(v) for k, v in out.items()}

    def _adopt(self, name: str, t: Tensor) -> Tensor:
        if t.dtype == self._dtypes[name] and t.on_host != self.resident:
            return t
        if t.dtype != self._dtypes[name] or not t.on_host:
            self.hops += 1
        return self.put(name, t.to_host())

    @staticmethod
    def fetch(t: Tensor) -> np.ndarray:
        """A float32 host copy of a tensor from `run`."""
        return t.to_host().astype(np.float32, copy=False)

    def close(self) -> None:
        self.backend.close()


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
               "use --backend ort, or build engines with sodiff-export --target trt")
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

    def io_report(self) -> dict[str, dict]:
        """Per component: whether it runs device-resident, where its tensors live, whether it
        captures CUDA graphs (and why not, when onnxruntime refused), and its host hops."""
        return {name: {"resident": c.resident,
                       "device": getattr(c.backend, "device", "host"),
                       "cuda_graph": bool(getattr(c.backend, "cuda_graph", False)),
                       "graph_note": getattr(c.backend, "graph_note", None), "hops": c.hops}
                for name, c in self.components.items()}

    def close(self) -> None:
        for comp in self.components.values():
            comp.close()
        for resource in self._shared:  # after the components that use them
            resource.close()
        self.components, self._shared = {}, []


def _dim_ranges(manifest: Manifest) -> dict[str, tuple[int, int]]:
    """The (least, most) value of each symbolic dim the manifest's shapes fields allow."""
    (h0, w0), (h1, w1), f = manifest.min_shape, manifest.max_shape, manifest.vae_factor
    return {"B": manifest.batch, "H": (h0, h1), "W": (w0, w1), "h": (h0 // f, h1 // f),
            "w": (w0 // f, w1 // f)}


def check_graph_io(manifest: Manifest, spec: ComponentSpec, graph: dict) -> None:
    """Refuse a component whose model disagrees with its manifest entry on an input's or
    output's dtype or rank, or on a dim that both fix (or that the model fixes where the
    manifest lets it vary): such a dir would fail every image one by one."""
    ranges, problems = _dim_ranges(manifest), []
    for t in (*spec.inputs, *spec.outputs):
        if t.name not in graph:
            continue  # names are each backend's own check, made at load
        dtype, shape = graph[t.name]
        if dtype != t.dtype:
            problems.append(f"{t.name} is {dtype} in the model, {t.dtype} in the manifest")
        if shape is None:
            continue
        if len(shape) != len(t.shape):
            problems.append(f"{t.name} has {len(shape)} dims in the model, {len(t.shape)} "
                            f"({list(t.shape)}) in the manifest")
            continue
        for axis, (got, want) in enumerate(zip(shape, t.shape)):
            if got is None:
                continue
            span = (want, want) if isinstance(want, int) else ranges.get(want, (got, got))
            if span != (got, got):
                allowed = want if isinstance(want, int) else f"{want} in {span[0]}..{span[1]}"
                problems.append(f"{t.name} dim {axis} is fixed to {got} in the model, the "
                                f"manifest says {allowed}")
    if problems:
        raise EngineDirError(f"engine dir {manifest.root}: {spec.path.name} does not match its "
                             f"manifest entry ({'; '.join(problems)}); re-export the dir with "
                             f"sodiff-export")


def open_engines(manifest: Manifest, opts: RestoreOptions) -> Engines:
    """Check the machine, then load every component of `manifest` on one backend."""
    kind = resolve_backend(manifest, opts)
    check_machine(manifest, kind)
    if kind == "trt":
        from .trt import TrtBackend, TrtStream
        stream = TrtStream()
        shared, make = [stream], lambda spec: TrtBackend(spec, stream)
    else:
        from .ort import OrtBackend, OrtConfig, providers_for
        # Static dirs bind pre-allocated buffers (and capture CUDA graphs on CUDA); only with
        # IO binding, since a graph replays bound addresses.
        config = OrtConfig(providers=tuple(providers_for(opts.device)), threads=opts.threads,
                           fixed_io=manifest.static and opts.io_binding,
                           vae_factor=manifest.vae_factor)
        shared, make = [], lambda spec: OrtBackend(spec, config)
    engines = Engines(kind, {}, shared)
    try:
        for name, spec in manifest.components.items():
            backend = make(spec)
            backend.load()
            # Registered first, so that a refusal below closes it with the others.
            engines.components[name] = Component(spec, backend, resident=opts.io_binding)
            check_graph_io(manifest, spec, backend.graph_io())
    except BaseException:
        engines.close()
        raise
    return engines


__all__ = ["Backend", "BackendError", "Component", "Engines", "Tensor", "check_machine",
           "installed", "open_engines", "resolve_backend"]
