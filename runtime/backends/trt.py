"""Native TensorRT backend: tensorrt + the CUDA Python bindings (cuda-python).

Device buffers (and pinned host staging buffers) are allocated once per component, sized for
the largest shape its optimization profile accepts, and reused for every call; all copies and
kernels go asynchronously on one stream shared by the components; engines whose shapes are all
static replay a CUDA graph captured on their first call.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np

from ..errors import BackendError, EngineDirError
from ..manifest import ComponentSpec, Manifest
from .base import GPU_EXTRA, Backend, installed


def cudart():
    """The CUDA runtime bindings: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older
    `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(result, what: str):
    """cuda-python returns `(error, *values)`: raise on an error, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # cudaSuccess
        raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _release(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:3])  # "10.3.0.26" and "10.3.0" are one release


def machine_info() -> tuple[str, str]:
    """(TensorRT version, compute capability "major.minor" of GPU 0)."""
    import tensorrt as trt

    rt = cudart()
    attr = rt.cudaDeviceAttr
    major = cuda_call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0),
                      "reading the GPU's compute capability")
    minor = cuda_call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0),
                      "reading the GPU's compute capability")
    return trt.__version__, f"{major}.{minor}"


def check_machine(manifest: Manifest) -> None:
    """Refuse engines this machine cannot run, naming the mismatch and the fix."""
    root = manifest.root
    missing = [m for m in ("tensorrt", "cuda") if not installed(m)]
    if missing:
        raise EngineDirError(f"engine dir {root} holds TensorRT engines but {' and '.join(missing)}"
                             f" is not installed; {GPU_EXTRA}, or export ONNX graphs for "
                             f"--backend ort")
    try:
        version, cc = machine_info()
    except BackendError as e:
        raise EngineDirError(f"engine dir {root} holds TensorRT engines but no GPU is usable "
                             f"({e}); run on a machine with an NVIDIA GPU") from None
    for comp in manifest.components.values():
        info = comp.trt or {}
        want_v, want_cc = info.get("version"), info.get("compute_capability")
        if want_v is None or want_cc is None:
            raise EngineDirError(f"engine dir {root}: components.{comp.name}.trt lacks the "
                                 f"TensorRT version or compute capability; re-export the dir")
        if _release(want_v) != _release(version):
            raise EngineDirError(f"engine dir {root}: {comp.path.name} was built with TensorRT "
                                 f"{want_v}, this machine has {version}; rebuild the engines "
                                 f"here with sodiff-export --target trt, or install TensorRT "
                                 f"{want_v}")
        if str(want_cc) != cc:
            raise EngineDirError(f"engine dir {root}: {comp.path.name} was built for compute "
                                 f"capability {want_cc}, this GPU is {cc}; rebuild the engines "
                                 f"on this GPU with sodiff-export --target trt")


class TrtStream:
    """One CUDA stream shared by every component of a Restorer."""

    def __init__(self):
        rt = cudart()
        flags = getattr(rt, "cudaStreamNonBlocking", 1)
        self.handle = cuda_call(rt.cudaStreamCreateWithFlags(flags), "stream creation")

    def synchronize(self) -> None:
        cuda_call(cudart().cudaStreamSynchronize(self.handle), "stream synchronize")

    def close(self) -> None:
        if self.handle is not None:
            cuda_call(cudart().cudaStreamDestroy(self.handle), "stream destroy")
            self.handle = None


class _Buffer:
    """A device buffer and a pinned host buffer of the same size, for one tensor."""

    def __init__(self, nbytes: int, dtype: np.dtype):
        rt = cudart()
        self.nbytes, self.dtype = nbytes, dtype
        self.device = cuda_call(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
        self.host = cuda_call(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")

    def host_view(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        raw = (ctypes.c_byte * (count * self.dtype.itemsize)).from_address(int(self.host))
        return np.frombuffer(raw, dtype=self.dtype, count=count).reshape(shape)

    def free(self) -> None:
        rt = cudart()
        cuda_call(rt.cudaFree(self.device), "cudaFree")
        cuda_call(rt.cudaFreeHost(self.host), "cudaFreeHost")


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, spec: ComponentSpec, stream: TrtStream):
        super().__init__(spec)
        self.stream = stream
        self.engine = self.context = None
        self._buffers: dict[str, _Buffer] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._graph = self._graph_exec = None
        self._graph_failed = False

    def load(self) -> None:
        import tensorrt as trt

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.spec.path.read_bytes())
        if self.engine is None:
            raise EngineDirError(f"TensorRT cannot deserialize {self.spec.path} (built by another "
                                 f"TensorRT or for another GPU); rebuild it with "
                                 f"sodiff-export --target trt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.inputs = [n for n in names if is_in(n)]
        self.outputs = [n for n in names if not is_in(n)]
        spec = (sorted(t.name for t in self.spec.inputs), sorted(t.name for t in self.spec.outputs))
        if (sorted(self.inputs), sorted(self.outputs)) != spec:
            raise EngineDirError(f"{self.spec.path} has inputs {self.inputs} and outputs "
                                 f"{self.outputs}, which its manifest entry does not list; "
                                 f"re-export the dir with sodiff-export")
        self.static = all(self._fixed(n) for n in self.inputs)

    def graph_io(self) -> dict[str, tuple[str, tuple]]:
        """The engine's own tensor dtypes and shapes (None: a dim its profile leaves free)."""
        found = {}
        for name in (*self.inputs, *self.outputs):
            dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))).name
            shape = tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(name))
            found[name] = (dtype, shape)
        return found

    def _fixed(self, name: str) -> bool:
        """An input whose shape cannot change: fixed in the graph, or min == max in the
        profile (what a --shape export builds from a graph with dynamic axes)."""
        if -1 not in tuple(self.engine.get_tensor_shape(name)):
            return True
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(lo) == tuple(hi)

    def _max_input_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.engine.get_tensor_shape(name))
        if -1 not in shape:
            return shape
        return tuple(self.engine.get_tensor_profile_shape(name, 0)[2])

    def _set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise BackendError(f"{self.spec.name}: input {name} of shape {tuple(shape)} is "
                                   f"outside the engine's profile (max "
                                   f"{self._max_input_shape(name)}); use a smaller --tile")
        return {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs}

    def _allocate_once(self) -> None:
        # Size every buffer for the profile's largest shapes, so no later call reallocates.
        max_in = {n: self._max_input_shape(n) for n in self.inputs}
        max_out = self._set_shapes(max_in)
        for name, shape in {**max_in, **max_out}.items():
            dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = _Buffer(max(1, math.prod(shape)) * dtype.itemsize, dtype)
            self._buffers[name] = buf
            self.context.set_tensor_address(name, int(buf.device))

    def allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if self.context is None:
            raise BackendError(f"{self.spec.name}: allocate() before load()")
        if not self._buffers:
            self._allocate_once()
        self._shapes = {**shapes, **self._set_shapes(shapes)}

    def _run(self) -> None:
        rt, stream = cudart(), self.stream.handle
        if not self.static or self._graph_failed:
            if not self.context.execute_async_v3(int(stream)):
                raise BackendError(f"TensorRT failed running {self.spec.name}")
            return
        if self._graph_exec is None:
            self._capture()
            if self._graph_exec is None:
                return  # capture failed; the warm-up run has computed this call's output
        cuda_call(rt.cudaGraphLaunch(self._graph_exec, stream), "graph launch")

    def _capture(self) -> None:
        rt, stream = cudart(), self.stream.handle
        # One plain run first: TensorRT does its shape-dependent setup outside the capture.
        if not self.context.execute_async_v3(int(stream)):
            raise BackendError(f"TensorRT failed running {self.spec.name}")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            cuda_call(rt.cudaStreamBeginCapture(stream, mode), "graph capture")
            ok = self.context.execute_async_v3(int(stream))
            self._graph = cuda_call(rt.cudaStreamEndCapture(stream), "graph capture")
            if not ok:
                raise BackendError("enqueue during capture failed")
            self._graph_exec = cuda_call(rt.cudaGraphInstantiate(self._graph, 0),
                                         "graph instantiate")
        except BackendError:
            self._graph_failed = True  # some engines cannot be captured; run them plainly

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt, stream = cudart(), self.stream.handle
        kind = rt.cudaMemcpyKind
        h2d, d2h = kind.cudaMemcpyHostToDevice, kind.cudaMemcpyDeviceToHost
        for name, array in feeds.items():
            buf = self._buffers[name]
            view = buf.host_view(array.shape)  # the engine's dtype; copyto casts if it differs
            np.copyto(view, array, casting="same_kind")
            cuda_call(rt.cudaMemcpyAsync(buf.device, buf.host, view.nbytes, h2d, stream), "H2D")
        self._run()
        views = {}
        for name in self.outputs:
            buf, shape = self._buffers[name], self._shapes[name]
            nbytes = math.prod(shape) * buf.dtype.itemsize
            cuda_call(rt.cudaMemcpyAsync(buf.host, buf.device, nbytes, d2h, stream), "D2H")
            views[name] = buf.host_view(shape)
        self.stream.synchronize()
        return {name: view.copy() for name, view in views.items()}

    def close(self) -> None:
        rt = cudart() if (self._buffers or self._graph is not None) else None
        if self._graph_exec is not None:
            cuda_call(rt.cudaGraphExecDestroy(self._graph_exec), "graph destroy")
        if self._graph is not None:
            cuda_call(rt.cudaGraphDestroy(self._graph), "graph destroy")
        for buf in self._buffers.values():
            buf.free()
        self._buffers, self._graph, self._graph_exec = {}, None, None
        self.context = self.engine = None
