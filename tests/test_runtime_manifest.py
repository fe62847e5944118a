"""Engine dirs the runtime must refuse, each with the reason and the fix."""
import os
import shutil

import pytest

from fixtures.runtime_engines import edit_manifest, identity_engine
from runtime import EngineDirError, Restorer
from runtime.backends import trt as trt_backend
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return identity_engine(tmp_path_factory.mktemp("pristine") / "engine")


@pytest.fixture
def engine(pristine, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(pristine, dst)
    return dst


def refused(path, *patterns, **opts):
    with pytest.raises(EngineDirError) as e:
        Restorer(path, **opts)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_a_pristine_dir_is_accepted(engine):
    with Restorer(engine) as r:
        assert r.backend == "ort" and set(r.engines.components) == {
            "saipe", "predictor", "vae_encoder", "unet", "vae_decoder"}


def test_missing_dir_and_missing_manifest(engine, tmp_path):
    refused(tmp_path / "nowhere", "does not exist")
    (engine / "manifest.json").unlink()
    refused(engine, "no manifest.json", "run sodiff-export again")


@pytest.mark.parametrize("text,reason", [("{not json", "not valid JSON"),
                                         ("[1, 2]", "not a JSON object"),
                                         ("", "not valid JSON")])
def test_unreadable_manifest(engine, text, reason):
    (engine / "manifest.json").write_text(text)
    refused(engine, reason, "re-export")


@pytest.mark.parametrize("change,reason,fix", [
    (lambda m: m.update(format="other"), "format 'other'", "sodiff-export"),
    (lambda m: m.update(format_version=2), "format_version 2 is not supported",
     "upgrade sodiff-run"),
    (lambda m: m["components"].pop("unet"), "['unet'] are missing", "re-export"),
    (lambda m: m["image"].pop("pad_multiple"), "pad_multiple", "re-export"),
    (lambda m: m["shapes"].update(min=[128, 128]), "exceeds shapes.max", "re-export"),
    (lambda m: m["components"]["unet"]["inputs"].pop(1), "expected ['latent', 'timestep'",
     "re-export"),
    (lambda m: m["components"]["saipe"].update(backend="tflite"), "must be onnx or trt",
     "re-export"),
    (lambda m: m["timestep"].update(mode="sometimes"), "timestep.mode='sometimes'", "re-export"),
])
def test_mismatched_manifest_fields(engine, change, reason, fix):
    edit_manifest(engine, change)
    refused(engine, reason, fix)


def test_missing_model_file(engine):
    (engine / "unet.onnx").unlink()
    refused(engine, "unet's file unet.onnx is missing", "copy the complete dir")


def test_tampered_model_file(engine):
    with open(engine / "vae_decoder.onnx", "ab") as f:
        f.write(b"\0")
    refused(engine, "vae_decoder.onnx does not match its sha256", "copy the file again")


def test_swapped_model_files(engine):
    os.replace(engine / "vae_encoder.onnx", engine / "tmp")
    os.replace(engine / "vae_decoder.onnx", engine / "vae_encoder.onnx")
    os.replace(engine / "tmp", engine / "vae_decoder.onnx")
    refused(engine, "does not match its sha256")


def test_hash_check_can_be_skipped_but_io_is_still_checked(engine):
    # Same names and hashes re-recorded, but the graph's output is renamed: the backend's own
    # check of the loaded graph against the manifest still refuses it.
    import onnx
    m = onnx.load(str(engine / "vae_decoder.onnx"))
    m.graph.node[0].output[0] = "pixels"
    m.graph.output[0].name = "pixels"
    onnx.save(m, str(engine / "vae_decoder.onnx"))
    refused(engine, "does not match its sha256")
    refused(engine, "vae_decoder.onnx has", "bytes", verify_hashes=False)  # the size differs
    size = (engine / "vae_decoder.onnx").stat().st_size
    edit_manifest(engine, lambda d: d["components"]["vae_decoder"].update(bytes=size))
    refused(engine, "outputs ['pixels']", "but the manifest says", verify_hashes=False)


@pytest.mark.parametrize("name", ["../unet.onnx", "/etc/passwd", "sub/../../x.onnx",
                                  "..\\unet.onnx", "~/unet.onnx"])
def test_paths_leaving_the_dir_are_refused(engine, name):
    edit_manifest(engine, lambda m: m["components"]["unet"].update(file=name))
    refused(engine, "unet.file=", "leaves the engine dir" if "\\" not in name
            else "not a plain relative file name")


def test_a_link_pointing_out_of_the_dir_is_refused(engine, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(engine / "unet.onnx", outside)
    (engine / "unet.onnx").unlink()
    (engine / "unet.onnx").symlink_to(outside)
    refused(engine, "is a link to", "outside the engine dir")


def test_external_data_is_hashed_and_confined(engine):
    (engine / "unet.onnx.data").write_bytes(b"weights")
    edit_manifest(engine, lambda m: m["components"]["unet"].update(
        external_data={"file": "unet.onnx.data", "sha256": "0" * 64}))
    refused(engine, "unet.onnx.data does not match its sha256")
    edit_manifest(engine, lambda m: m["components"]["unet"].update(
        external_data={"file": "../unet.onnx.data", "sha256": "0" * 64}))
    refused(engine, "external_data.file=", "leaves the engine dir")


def test_backend_choice_must_fit_the_files(engine):
    refused(engine, "holds ONNX graphs, which --backend trt cannot run", "--backend ort",
            backend="trt")


def _as_trt(engine, version="10.3.0", cc="9.0"):
    def change(m):
        for c in m["components"].values():
            c["backend"] = "trt"
            c["trt"] = {"version": version, "compute_capability": cc, "profiles": {}}
    edit_manifest(engine, change)


def test_engines_need_tensorrt_installed(engine, monkeypatch):
    _as_trt(engine)
    monkeypatch.setattr(trt_backend, "installed", lambda name: False)
    refused(engine, "holds TensorRT engines but tensorrt and cuda is not installed",
            "sodiff[gpu]")
    refused(engine, "--backend ort cannot run", backend="ort")


@pytest.mark.parametrize("machine,reason,fix", [
    (("10.4.1.9", "9.0"), "built with TensorRT 10.3.0, this machine has 10.4.1.9",
     "rebuild the engines here"),
    (("10.3.0.26", "8.9"), "built for compute capability 9.0, this GPU is 8.9",
     "rebuild the engines on this GPU"),
])
def test_engines_for_another_tensorrt_or_gpu_are_refused(engine, monkeypatch, machine, reason,
                                                          fix):
    _as_trt(engine)
    monkeypatch.setattr(trt_backend, "installed", lambda name: True)
    monkeypatch.setattr(trt_backend, "machine_info", lambda: machine)
    refused(engine, reason, fix)


def test_mixed_backends_are_refused(engine):
    edit_manifest(engine, lambda m: m["components"]["unet"].update(
        backend="trt", trt={"version": "10.3.0", "compute_capability": "9.0"}))
    refused(engine, "mixes ONNX and TensorRT")


def test_parsed_manifest_carries_the_geometry(engine):
    m = read_manifest(engine)
    assert (m.pad_multiple, m.vae_factor, m.saipe_size, m.latent_channels) == (8, 1, 16, 3)
    assert m.min_shape == (8, 8) and m.max_shape == (64, 64) and not m.static
    assert m.qf_table == ((10.0, 50.0, 90.0), (700.0, 400.0, 100.0))


def test_device_is_an_onnxruntime_choice(engine, monkeypatch):
    _as_trt(engine)
    monkeypatch.setattr(trt_backend, "installed", lambda name: True)
    with pytest.raises(ValueError, match="--device cpu picks an onnxruntime provider"):
        Restorer(engine, device="cpu")
