"""sodiff.pipeline.SODiffPipeline: the bundled checkpoint and a LoRA one load, round-trip
through save_pretrained / from_pretrained in diffusers' layout, and restore PIL images equal to
SODiff.restore's (at most 1 grey level)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sodiff import bundled, checkpoint
from sodiff.jpeg import compress
from sodiff.pipeline import PredictorModel, SAIPEModel, SODiffPipeline
from tolerance import assert_pixels_close

COMPONENTS = ("predictor", "saipe", "unet", "vae")


def _jpeg(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random photo-like image, JPEG-compressed at QF 10 (blocking to remove)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return compress(np.asarray(coarse.resize((w, h), Image.BICUBIC)), 10)[0]


def _reference(model, image: np.ndarray, mode=None, keep_colour=True) -> np.ndarray:
    """SODiff.restore on a uint8 image, back to uint8 as training's to_uint8 rounds."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = model.restore(x, mode, keep_colour)[0].clamp(-1, 1).add(1).mul(127.5).round()
    return out.to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    # Sizes off the pad multiple and unequal, so padding, cropping and the list path all run.
    return [_jpeg(52, 70, 0), _jpeg(40, 33, 1)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bundled checkpoint as a pipeline, saved in diffusers' layout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    folder = tmp_path_factory.mktemp("pipe") / "sodiff-tiny"
    pipe = SODiffPipeline.from_checkpoint()
    pipe.save_pretrained(folder)
    yield pipe, folder
    torch.set_num_threads(threads)


def test_saved_folder_is_diffusers_layout(saved):
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "SODiffPipeline"
    assert {k: tuple(index[k]) for k in COMPONENTS} == {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderTiny"),
        "saipe": ("sodiff.pipeline", "SAIPEModel"),
        "predictor": ("sodiff.pipeline", "PredictorModel")}
    for part in COMPONENTS:
        assert (folder / part / "config.json").is_file()
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    assert not any("lora" in name for name, _ in unet.named_parameters())


def test_round_trip_restores_as_sodiff(saved, images):
    pipe, folder = saved
    loaded = SODiffPipeline.from_pretrained(folder)
    assert isinstance(loaded.saipe, SAIPEModel) and isinstance(loaded.predictor, PredictorModel)
    ref = checkpoint.load(bundled.checkpoint_dir()).eval()
    pils = [Image.fromarray(im) for im in images]
    for p in (pipe, loaded):
        out = p(pils)
        assert [im.size for im in out.images] == [im.size for im in pils]
        for got, im in zip(out.images, images):
            assert got.mode == "RGB"
            assert_pixels_close(got, _reference(ref, im), 1)  # the last rounding to uint8
        assert len(out.timesteps) == 2 and len(out.qf) == 2
    single = loaded(pils[0], timestep=300)  # a fixed timestep, one image
    assert single.timesteps == [300.0] and single.qf is None
    assert_pixels_close(single.images[0], _reference(ref, images[0], 300.0), 1)
    plain = loaded(pils[0], keep_colour=False).images[0]
    assert_pixels_close(plain, _reference(ref, images[0], keep_colour=False), 1)
    assert not np.array_equal(plain, _reference(ref, images[0]))  # the colour step did something


def test_lora_checkpoint_is_merged_into_a_plain_unet(tmp_path, tiny_model, images):
    checkpoint.save(tiny_model, tmp_path / "ckpt")
    pipe = SODiffPipeline.from_checkpoint(tmp_path / "ckpt")
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SODiffPipeline.from_pretrained(tmp_path / "pipe")
    got = loaded(Image.fromarray(images[0])).images[0]
    assert_pixels_close(got, _reference(tiny_model, images[0]), 1)  # LoRA unmerged there


def test_output_types_agree(saved, images):
    pipe, _ = saved
    im = Image.fromarray(images[1])
    pil = np.asarray(pipe(im).images[0])
    arr = pipe(im, output_type="np").images[0]
    ten = pipe(im, output_type="pt").images[0]
    assert arr.shape == (40, 33, 3) and arr.dtype == np.float32 and tuple(ten.shape) == (3, 40, 33)
    assert 0 <= arr.min() and arr.max() <= 1
    assert_pixels_close(np.round(arr * 255), pil, 1)
    torch.testing.assert_close(ten.permute(1, 2, 0), torch.from_numpy(arr), rtol=0, atol=0)
    (tupled,) = pipe(im, return_dict=False)
    assert_pixels_close(tupled[0], pil)


@pytest.mark.parametrize("kwargs,named", [
    ({"image": np.zeros((8, 8, 3), np.uint8)}, "image must be a PIL image"),
    ({"image": []}, "image must be a PIL image"),
    ({"timestep": 1000}, "timestep=1000"),
    ({"timestep": -1}, "timestep=-1"),
    ({"timestep": "fixed:5"}, "timestep='fixed:5'"),
    ({"output_type": "latent"}, "output_type='latent'"),
    ({"keep_colour": "yes"}, "keep_colour='yes'"),
])
def test_bad_arguments_are_named(saved, kwargs, named):
    pipe, _ = saved
    kwargs = {"image": Image.new("RGB", (16, 16)), **kwargs}
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        pipe(**kwargs)


def test_from_pretrained_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json.*nothing is downloaded"):
        SODiffPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no model_index.json"):
        SODiffPipeline.from_pretrained("some-user/some-hub-repo")
