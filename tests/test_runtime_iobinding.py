"""The onnxruntime IO-binding path: on the CPU provider it equals the plain session.run path;
with the CUDA provider (a fake that runs the real CPU sessions but keeps CUDA's rules) the
latents, prompt and tau stay on the device, and static dirs capture one CUDA graph per shape
set and replay it from the same addresses."""
import sys
import types

import numpy as np
import onnxruntime as real_ort
import pytest

from fixtures.runtime_engines import batched_tiny_engine, edit_manifest, identity_engine
from runtime import Restorer
from runtime.backends import BackendError, Component, ort
from runtime.manifest import ComponentSpec, TensorSpec
from tolerance import LAYER, PIPELINE, assert_close

CUDA, CPU, TRT = ort.CUDA, ort.CPU, ort.TRT


def rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- a CUDA onnxruntime on the CPU ---------------------------------------------------------------
class FakeValue:
    """An OrtValue "on the GPU": a real CPU OrtValue plus where it came from."""

    def __init__(self, log, real, device, origin):
        self.log, self.real, self.device, self.origin = log, real, device, origin

    @classmethod
    def factory(cls, log):
        class OrtValue:
            @staticmethod
            def ortvalue_from_numpy(x, device="cpu", device_id=0):
                log["uploads"].append(x.shape)  # CUDA copies the host array
                log["upload_dtypes"].append(x.dtype)
                return cls(log, real_ort.OrtValue.ortvalue_from_numpy(np.array(x, copy=True)),
                           device, "host")

            @staticmethod
            def ortvalue_from_shape_and_type(shape, dtype, device="cpu", device_id=0):
                log["allocs"].append(tuple(shape))
                return cls(log, real_ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, dtype, "cpu", 0), device, "allocated")
        return OrtValue

    def numpy(self):
        self.log["downloads"].append(self.origin)
        return self.real.numpy()

    def update_inplace(self, x):
        self.log["uploads"].append(x.shape)
        self.log["upload_dtypes"].append(x.dtype)
        self.real.update_inplace(x)

    def data_ptr(self):
        return self.real.data_ptr()

    def shape(self):
        return self.real.shape()


class FakeBinding:
    def __init__(self, session):
        self.s, self.real = session, session.real.io_binding()
        self.bound, self.allocating = {}, False

    def _device(self, what, value):
        if value.device != "cuda":
            raise RuntimeError(f"{what}: a {value.device} OrtValue bound to a CUDA session")

    def bind_ortvalue_input(self, name, value):
        self._device(name, value)
        self.s.log["feeds"].append((self.s.name, name, value.origin))
        self.bound[name] = value
        self.real.bind_ortvalue_input(name, value.real)

    def bind_ortvalue_output(self, name, value):
        self._device(name, value)
        self.bound[name] = value
        self.real.bind_ortvalue_output(name, value.real)

    def bind_output(self, name, device_type="cpu", device_id=0):
        if device_type != "cuda":
            raise RuntimeError(f"{name}: outputs of a CUDA session bound to {device_type}")
        self.allocating = True
        self.real.bind_output(name, "cpu")

    def get_outputs(self):
        names = [o.name for o in self.s.real.get_outputs()]
        return [FakeValue(self.s.log, v, "cuda", f"{self.s.name}.{n}")
                for n, v in zip(names, self.real.get_outputs())]


class FakeSession:
    """The real CPU session behind CUDA's rules: bound device values only; with
    enable_cuda_graph, every input and output pre-bound and each gpu_graph_id (>= 1) replayed
    with the shapes and addresses it was captured with."""

    def __init__(self, log, path, so, providers):
        self.log, self.name = log, path.rsplit("/", 1)[-1].split(".")[0]
        log["providers"][self.name] = providers
        self.graph = ort.captures_graphs(providers)
        if self.graph and self.name in log["refuse_graph"]:
            raise RuntimeError("This session cannot use the graph capture feature as requested "
                               "by the user as all compute graph nodes have not been "
                               "partitioned to the CUDA execution provider")
        self.real = real_ort.InferenceSession(path, so, providers=[CPU])
        self.graphs = {}

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def run(self, names, feeds):
        if self.graph:
            raise RuntimeError("a CUDA-graph session without IO binding")
        self.log["host_runs"].append(self.name)
        return self.real.run(names, feeds)

    def io_binding(self):
        return FakeBinding(self)

    def run_with_iobinding(self, binding, run_options=None):
        if self.graph:
            gid = int(run_options.get_run_config_entry(ort.GRAPH_ID)) if run_options else 0
            if gid < 1 or binding.allocating:
                raise RuntimeError("graph capture needs a gpu_graph_id >= 1 and bound outputs")
            sig = {n: (v.data_ptr(), tuple(v.shape())) for n, v in binding.bound.items()}
            if self.graphs.setdefault(gid, sig) != sig:
                raise RuntimeError(f"graph {gid} replayed from other addresses or shapes")
            self.log["replays"].append((self.name, gid))
        self.real.run_with_iobinding(binding.real, run_options)


@pytest.fixture
def fake_cuda(monkeypatch):
    log = {k: [] for k in ("uploads", "upload_dtypes", "allocs", "downloads", "feeds",
                           "host_runs", "replays")}
    log.update(providers={}, refuse_graph=set())
    fake = types.ModuleType("onnxruntime")
    fake.__spec__ = real_ort.__spec__
    fake.get_available_providers = lambda: [CUDA, CPU]
    fake.SessionOptions, fake.RunOptions = real_ort.SessionOptions, real_ort.RunOptions
    fake.InferenceSession = lambda path, so, providers: FakeSession(log, path, so, providers)
    fake.OrtValue = FakeValue.factory(log)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    return log


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("iobinding")
    out = {"dyn": identity_engine(base / "dyn"), "static": identity_engine(
        base / "static", dtype="float16", static=True)}
    edit_manifest(out["dyn"], lambda m: m["shapes"].update(batch={"min": 1, "opt": 2, "max": 2}))
    edit_manifest(out["static"], lambda m: m["shapes"].update(
        batch={"min": 1, "opt": 2, "max": 2}))
    return out


# -- CUDA-only decisions -------------------------------------------------------------------------
def test_cuda_graphs_only_for_fixed_shapes_on_the_cuda_provider():
    cuda = ort.session_providers([CUDA, CPU], fixed_io=True)
    assert cuda == [(CUDA, {"enable_cuda_graph": "1"}), CPU] and ort.captures_graphs(cuda)
    assert ort.session_providers([CUDA, CPU], fixed_io=False) == [CUDA, CPU]
    assert ort.session_providers([CPU], fixed_io=True) == [CPU]
    trt = [(TRT, {"trt_fp16_enable": True}), CUDA, CPU]
    assert ort.session_providers(trt, fixed_io=True) == trt  # TensorRT engines: not CUDA-EP graphs
    keeps = ort.session_providers([(CUDA, {"device_id": 0}), CPU], fixed_io=True)
    assert keeps[0] == (CUDA, {"device_id": 0, "enable_cuda_graph": "1"})
    assert [ort.bind_device(p) for p in ([CPU], [CUDA, CPU], trt)] == ["cpu", "cuda", "cuda"]


def test_cuda_dynamic_dir_keeps_latents_prompt_and_tau_on_the_device(fake_cuda, dirs):
    image = rand((70, 100, 3))  # 32-px tiles: 12, in 6 batches of 2
    with Restorer(dirs["dyn"], device="cuda", tile=32, overlap=8) as r:
        out, info = r.restore_info(image)
        assert not any(c.backend.cuda_graph for c in r.engines.components.values())
        hops = sum(c.hops for c in r.engines.components.values())
    batches = info["tiles"]["batches"]
    assert np.array_equal(out, image) and batches == 6 and hops == 0
    assert fake_cuda["providers"]["unet"] == [CUDA, CPU]  # no graphs for dynamic shapes
    # In: one image batch per call, the prompt and tau once; out: the restored tiles only.
    assert fake_cuda["uploads"] == [(2, 3, 32, 32)] + [(2, 77, 8), (2,)] + \
        [(2, 3, 32, 32)] * (batches - 1)
    assert fake_cuda["downloads"] == ["vae_decoder.image"] * batches
    feeds = {(c, n): o for c, n, o in fake_cuda["feeds"]}
    assert feeds[("unet", "latent")] == "vae_encoder.latent"
    assert feeds[("vae_decoder", "clean_latent")] == "unet.clean_latent"


def test_cuda_static_dir_replays_one_graph_per_shape_set(fake_cuda, dirs):
    images = [rand((150, 99, 3), 1), rand((150, 99, 3), 2), rand((20, 20, 3), 3)]
    with Restorer(dirs["static"], device="cuda") as r:
        outs = [r.restore(im) for im in images]
        assert all(c.backend.cuda_graph for c in r.engines.components.values())
        sets = {n: c.backend.captured for n, c in r.engines.components.items()}
    assert all(np.array_equal(o, i) for o, i in zip(outs, images))
    assert fake_cuda["providers"]["unet"][0] == (CUDA, {"enable_cuda_graph": "1"})
    # 6 tiles of 64 px in batches of 2, twice, then one tile: two shape sets per tile
    # component; SAIPE and the predictor (numpy callers) run bound too, as a graph session must.
    assert sets == {"saipe": 1, "predictor": 1, "vae_encoder": 2, "unet": 2, "vae_decoder": 2}
    assert not fake_cuda["host_runs"]
    unet = [gid for name, gid in fake_cuda["replays"] if name == "unet"]
    assert unet == [1] * 6 + [2]
    # Buffers of a set are allocated once: the encoder's staged input and its output, the
    # UNet's and the decoder's outputs.
    assert fake_cuda["allocs"].count((2, 3, 64, 64)) == 4
    # An fp16 dir: images and prompts are cast on the host before the upload (tau is float32).
    dtypes = {(len(shape), str(dt)) for shape, dt in zip(fake_cuda["uploads"],
                                                         fake_cuda["upload_dtypes"])}
    assert dtypes == {(4, "float16"), (3, "float16"), (1, "float32")}


def test_cuda_graph_refused_by_onnxruntime_still_runs_bound(fake_cuda, dirs):
    fake_cuda["refuse_graph"].add("unet")
    image = rand((150, 99, 3))
    with Restorer(dirs["static"], device="cuda") as r:
        out = r.restore(image)
        report = r.engines.io_report()
    assert not report["unet"]["cuda_graph"] and "partitioned" in report["unet"]["graph_note"]
    assert report["vae_encoder"] == {"resident": True, "device": "cuda", "cuda_graph": True,
                                     "graph_note": None, "hops": 0}
    assert np.array_equal(out, image)


def test_a_feed_at_another_address_than_its_graph_is_refused(fake_cuda, dirs):
    with Restorer(dirs["static"], device="cuda") as r:
        r.restore(rand((40, 40, 3)))
        dec = r.engines["vae_decoder"]
        other = r.engines["unet"].backend._new((1, 3, 64, 64), np.dtype(np.float16))
        with pytest.raises(BackendError, match="another device address than its CUDA graph"):
            dec.run(clean_latent=other)


def test_cpu_io_binding_equals_the_plain_path_on_identity_dirs(dirs):
    for name in ("dyn", "static"):
        image = rand((150, 99, 3), 5)
        with Restorer(dirs[name], io_binding=False, tile_batch=1) as r:
            ref = r.restore(image)
        with Restorer(dirs[name]) as r:
            assert all(c.resident for c in r.engines.components.values())
            out = r.restore(image)
        assert np.array_equal(out, ref) and np.array_equal(out, image)


# -- the real CPU provider on the tiny model ----------------------------------------------------
@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    return batched_tiny_engine(tmp_path_factory.mktemp("tiny-bound"))


def test_cpu_binding_chain_equals_plain_component_calls(batched):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 3, 64, 96)).astype(np.float32)
    with Restorer(batched, threads=1) as r:
        e = r.engines
        prompt = e["saipe"](image=rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
        prompt = np.repeat(prompt["prompt"], 3, axis=0)
        tau = np.array([100.0, 499.5, 900.0], np.float32)
        latent = e["vae_encoder"](image=x)["latent"]
        clean = e["unet"](latent=latent, timestep=tau, prompt=prompt)["clean_latent"]
        plain = e["vae_decoder"](clean_latent=clean)["image"]
        enc, unet, dec = e["vae_encoder"], e["unet"], e["vae_decoder"]
        lat = enc.run(image=enc.put("image", x))["latent"]
        assert not lat.on_host and lat.shape == latent.shape
        cl = unet.run(latent=lat, timestep=unet.put("timestep", tau),
                      prompt=unet.put("prompt", prompt))["clean_latent"]
        bound = dec.fetch(dec.run(clean_latent=cl)["image"])
        hops = enc.hops + unet.hops + dec.hops
    assert hops == 0 and bound.dtype == np.float32
    assert_close(bound, plain, PIPELINE)
    assert_close(Component.fetch(cl), clean, PIPELINE)


def test_fixed_io_sizes_outputs_from_the_vae_factor(tmp_path):
    """A static dir's pre-allocated outputs: the latent side is the image side / vae_factor."""
    from onnx import TensorProto, helper, save

    g = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["latent"], kernel_shape=[2, 2],
                          strides=[2, 2])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", 3, "h", "w"])])
    path = tmp_path / "vae_encoder.onnx"
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    spec = ComponentSpec("vae_encoder", path, "", None, "onnx", "fp32",
                         (TensorSpec("image", "float32", ("B", 3, "H", "W")),),
                         (TensorSpec("latent", "float32", ("B", 3, "h", "w")),), None)
    backend = ort.OrtBackend(spec, ort.OrtConfig(providers=(CPU,), fixed_io=True, vae_factor=2))
    backend.load()
    comp = Component(spec, backend)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 12)).astype(np.float32)
    first = comp.run(image=comp.put("image", x))["latent"]
    want = x.reshape(2, 3, 4, 2, 6, 2).mean(axis=(3, 5))
    assert first.shape == (2, 3, 4, 6) and first.stable
    assert_close(comp.fetch(first), want, LAYER)
    again = comp.run(image=comp.put("image", -x))["latent"]
    assert again.value is first.value and backend.captured == 1  # the same buffer, refilled
    assert_close(comp.fetch(again), -want, LAYER)
    assert_close(comp(image=x)["latent"], want, LAYER)  # numpy callers too
    comp.close()
