"""Backends: onnxruntime provider choice, and the native TensorRT backend's lifecycle (buffers
allocated once, one stream, CUDA-graph replay for static shapes) against stand-ins for
`tensorrt` and the CUDA runtime bindings, plus the real thing where a GPU has TensorRT."""
import ctypes
import json
import sys
import types

import numpy as np
import pytest

from fixtures.runtime_engines import identity_engine
from runtime import BackendError, Restorer
from runtime.backends import Component, ort
from runtime.backends import trt as trt_backend
from runtime.manifest import ComponentSpec, TensorSpec


# -- stand-ins -------------------------------------------------------------------------------
class FakeCuda(types.SimpleNamespace):
    """The cuda-python runtime calls the backend uses: memory is host memory, copies are
    memmove, a captured graph is the list of enqueued executions."""

    def __init__(self):
        super().__init__(
            cudaDeviceAttr=types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor="maj",
                                                 cudaDevAttrComputeCapabilityMinor="min"),
            cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="h2d",
                                                 cudaMemcpyDeviceToHost="d2h"),
            cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="tl"),
            cudaStreamNonBlocking=1)
        self.live, self.counts, self.capture, self.copies = {}, {}, None, []

    def _count(self, what):
        self.counts[what] = self.counts.get(what, 0) + 1

    def cudaDeviceGetAttribute(self, attr, device):
        return 0, {"maj": 9, "min": 0}[attr]

    def cudaStreamCreateWithFlags(self, flags):
        self._count("stream")
        return 0, 1234

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaStreamDestroy(self, s):
        self._count("stream_destroy")
        return (0,)

    def _alloc(self, n, what):
        self._count(what)
        buf = ctypes.create_string_buffer(n)
        self.live[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaMalloc(self, n):
        return self._alloc(n, "malloc")

    def cudaMallocHost(self, n):
        return self._alloc(n, "malloc_host")

    def cudaFree(self, p):
        self._count("free")
        del self.live[p]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.copies.append(kind)
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capture = self.capture, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        self._count("instantiate")
        return 0, graph

    def cudaGraphLaunch(self, graph, stream):
        self._count("launch")
        for run in graph:
            run()
        return (0,)

    def cudaGraphExecDestroy(self, g):
        self._count("graph_destroy")
        return (0,)

    cudaGraphDestroy = cudaGraphExecDestroy


class FakeEngine:
    """A 'plan' is JSON: inputs {name: [min, max] shapes}, outputs {name: [op, source, shape]};
    ops: copy (output = input), mean (per-sample mean * 100 + 500), const (zeros)."""

    def __init__(self, plan, cuda):
        self.plan, self.cuda = plan, cuda
        self.names = list(plan["inputs"]) + list(plan["outputs"])
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return "in" if n in self.plan["inputs"] else "out"

    def get_tensor_dtype(self, n):
        return "f32"

    def get_tensor_shape(self, n):
        if n in self.plan["inputs"]:
            lo, hi = self.plan["inputs"][n]
            if self.plan.get("dynamic_axes"):  # a graph with dynamic axes, whatever the profile
                return tuple(-1 if i >= 2 else a for i, a in enumerate(lo))
            return tuple(a if a == b else -1 for a, b in zip(lo, hi))
        op, src, shape = self.plan["outputs"][n]
        return tuple(shape) if shape else self.get_tensor_shape(src)

    def get_tensor_profile_shape(self, n, profile):
        lo, hi = self.plan["inputs"][n]
        return [lo, lo, hi]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.e, self.shapes, self.addr, self.executions = engine, {}, {}, 0

    def set_input_shape(self, n, shape):
        lo, hi = self.e.plan["inputs"][n]
        ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi)) and len(shape) == len(lo)
        if ok:
            self.shapes[n] = tuple(shape)
        return ok

    def get_tensor_shape(self, n):
        if n in self.shapes:
            return self.shapes[n]
        op, src, shape = self.e.plan["outputs"][n]
        return tuple(shape) if shape else self.shapes[src]

    def set_tensor_address(self, n, ptr):
        self.addr[n] = ptr

    def _view(self, n):
        shape = self.get_tensor_shape(n)
        count = int(np.prod(shape))
        raw = (ctypes.c_float * count).from_address(self.addr[n])
        return np.frombuffer(raw, np.float32, count).reshape(shape)

    def _execute(self):
        self.executions += 1
        for n, (op, src, shape) in self.e.plan["outputs"].items():
            out = self._view(n)
            if op == "copy":
                out[...] = self._view(src)
            elif op == "mean":
                out[...] = self._view(src).reshape(out.shape[0], -1).mean(1) * 100 + 500
            else:
                out[...] = 0

    def execute_async_v3(self, stream):
        if self.e.cuda.capture is not None:
            self.e.cuda.capture.append(self._execute)
        else:
            self._execute()
        return True


@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"
    trt.Logger = type("Logger", (), {"ERROR": 0, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in")
    trt.nptype = lambda t: np.float32
    trt.Runtime = type("Runtime", (), {
        "__init__": lambda self, logger: None,
        "deserialize_cuda_engine": lambda self, data: (
            FakeEngine(json.loads(data), cuda) if data.startswith(b"{") else None)})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "installed", lambda name: True)
    return cuda


def _spec(tmp_path, plan, name="vae_decoder", ins=("clean_latent",), outs=("image",)):
    path = tmp_path / f"{name}.plan"
    path.write_text(json.dumps(plan))
    t = lambda n: TensorSpec(n, "float32", ())  # noqa: E731
    return ComponentSpec(name, path, "", None, "trt", "fp32", tuple(map(t, ins)),
                         tuple(map(t, outs)), {"version": "10.3.0", "compute_capability": "9.0"})


def _copy_plan(lo, hi):
    return {"inputs": {"clean_latent": [lo, hi]}, "outputs": {"image": ["copy", "clean_latent",
                                                                         None]}}


@pytest.mark.parametrize("dynamic_axes", [False, True])
def test_static_engine_allocates_once_and_replays_a_cuda_graph(fakes, tmp_path, dynamic_axes):
    # Static: fixed in the graph, or a graph with dynamic axes built with min == max.
    stream = trt_backend.TrtStream()
    plan = {**_copy_plan([1, 3, 8, 8], [1, 3, 8, 8]), "dynamic_axes": dynamic_axes}
    backend = trt_backend.TrtBackend(_spec(tmp_path, plan), stream)
    backend.load()
    comp = Component(backend.spec, backend)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        assert np.array_equal(comp(clean_latent=x)["image"], x)
    assert fakes.counts["malloc"] == fakes.counts["malloc_host"] == 2  # one per tensor, once
    assert fakes.counts["instantiate"] == 1 and fakes.counts["launch"] == 3
    assert backend.context.executions == 4  # the warm-up before capture, then 3 replays
    comp.close()
    stream.close()
    assert not fakes.live and fakes.counts["graph_destroy"] == 2
    assert fakes.counts["stream_destroy"] == 1


def test_dynamic_engine_reuses_max_size_buffers_for_every_shape(fakes, tmp_path):
    stream = trt_backend.TrtStream()
    backend = trt_backend.TrtBackend(_spec(tmp_path, _copy_plan([1, 3, 8, 8], [1, 3, 32, 32])),
                                     stream)
    backend.load()
    comp = Component(backend.spec, backend)
    for side in (8, 32, 16, 8):
        x = np.full((1, 3, side, side), side, np.float32)
        assert np.array_equal(comp(clean_latent=x)["image"], x)
    assert fakes.counts["malloc"] == 2 and "instantiate" not in fakes.counts
    assert fakes.copies.count("h2d") == fakes.copies.count("d2h") == 4
    with pytest.raises(BackendError, match="outside the engine's profile"):
        comp(clean_latent=np.zeros((1, 3, 40, 40), np.float32))
    comp.close()
    stream.close()
    assert not fakes.live


def test_unreadable_plan_and_wrong_tensor_names_are_refused(fakes, tmp_path):
    from runtime import EngineDirError
    stream = trt_backend.TrtStream()
    spec = _spec(tmp_path, _copy_plan([1, 3, 8, 8], [1, 3, 8, 8]))
    spec.path.write_bytes(b"\x00not a plan")
    with pytest.raises(EngineDirError, match="cannot deserialize"):
        trt_backend.TrtBackend(spec, stream).load()
    wrong = {"inputs": {"latent": [[1, 3, 8, 8]] * 2}, "outputs": {"image": ["copy", "latent",
                                                                          None]}}
    with pytest.raises(EngineDirError, match="which its manifest entry does not list"):
        trt_backend.TrtBackend(_spec(tmp_path, wrong), stream).load()


def _trt_dir(tmp_path, static):
    """An engine dir of fake TensorRT 'plans' with the identity pipeline (VAE factor 1)."""
    root = identity_engine(tmp_path / "trt_engine", static=static)
    manifest = json.loads((root / "manifest.json").read_text())
    lo, hi = ([64, 64], [64, 64]) if static else ([8, 8], [64, 64])
    plans = {
        "saipe": {"inputs": {"image": [[1, 3, 16, 16]] * 2},
                  "outputs": {"prompt": ["const", "image", [1, 77, 8]]}},
        "predictor": {"inputs": {"image": [[1, 3, *lo], [1, 3, *hi]]},
                      "outputs": {"timestep": ["mean", "image", [1]],
                                  "qf": ["mean", "image", [1]]}},
        "vae_encoder": {"inputs": {"image": [[1, 3, *lo], [1, 3, *hi]]},
                        "outputs": {"latent": ["copy", "image", None]}},
        "unet": {"inputs": {"latent": [[1, 3, *lo], [1, 3, *hi]], "timestep": [[1], [1]],
                            "prompt": [[1, 77, 8]] * 2},
                 "outputs": {"clean_latent": ["copy", "latent", None]}},
        "vae_decoder": {"inputs": {"clean_latent": [[1, 3, *lo], [1, 3, *hi]]},
                        "outputs": {"image": ["copy", "clean_latent", None]}},
    }
    import hashlib
    for name, plan in plans.items():
        file = f"{name}.trt10.3.0.sm90.plan"
        (root / file).write_text(json.dumps(plan))
        c = manifest["components"][name]
        c.update(file=file, backend="trt", sha256=hashlib.sha256(
            (root / file).read_bytes()).hexdigest(),
            trt={"version": "10.3.0", "compute_capability": "9.0", "profiles": {}})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("static", [True, False])
def test_restorer_runs_a_tensorrt_dir_end_to_end(fakes, tmp_path, static):
    image = np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    with Restorer(_trt_dir(tmp_path, static), backend="auto") as r:
        assert r.backend == "trt"
        out, info = r.restore_info(image)
        assert np.array_equal(out, image) and info["tiles"]["count"] == 4
    assert not fakes.live and fakes.counts["stream"] == fakes.counts["stream_destroy"] == 1
    # Static engines replay CUDA graphs; SAIPE's input is always static.
    assert fakes.counts["instantiate"] == (5 if static else 1)


def test_onnxruntime_device_choice_refuses_missing_providers(monkeypatch):
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort.providers_for("auto") == ["CPUExecutionProvider"]
    assert ort.providers_for("cpu") == ["CPUExecutionProvider"]
    for device in ("cuda", "tensorrt"):
        with pytest.raises(BackendError, match="sodiff\\[gpu\\]"):
            ort.providers_for(device)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort.providers_for("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    first = ort.providers_for("tensorrt")[0]
    assert first[0] == "TensorrtExecutionProvider" and first[1]["trt_engine_cache_enable"]


def _real_trt():
    try:
        import tensorrt  # noqa: F401
        trt_backend.machine_info()
    except Exception:  # noqa: BLE001 - any reason at all: no TensorRT, no GPU
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _real_trt(), reason="needs TensorRT, cuda-python and an NVIDIA GPU")
def test_real_tensorrt_engine_round_trip(tmp_path):
    import onnx
    import tensorrt as trt
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["clean_latent"], ["image"])], "g",
                          [helper.make_tensor_value_info("clean_latent", TensorProto.FLOAT,
                                                         [1, 3, "h", "w"])],
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                         [1, 3, "h", "w"])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("clean_latent", (1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 32, 32))
    config.add_optimization_profile(profile)
    spec = _spec(tmp_path, {})
    spec.path.write_bytes(bytes(builder.build_serialized_network(network, config)))
    stream = trt_backend.TrtStream()
    backend = trt_backend.TrtBackend(spec, stream)
    backend.load()
    comp = Component(spec, backend)
    for side in (8, 32, 16):
        x = np.random.default_rng(side).standard_normal((1, 3, side, side)).astype(np.float32)
        assert np.array_equal(comp(clean_latent=x)["image"], x)
    comp.close()
    stream.close()
