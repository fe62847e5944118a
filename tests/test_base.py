import pytest
import torch

from sodiff import checkpoint
from sodiff.base import BaseModelError, load_base
from sodiff.checkpoint import CheckpointError
from sodiff.config import TINY
from sodiff.model import SODiff


@pytest.fixture
def base_dir(tmp_path):
    """A local diffusers folder in the SD2.1-base layout, holding the tiny UNet and VAE."""
    torch.manual_seed(0)
    model = SODiff(TINY.replace(lora=None))
    model.unet.save_pretrained(tmp_path / "base" / "unet")
    model.vae.save_pretrained(tmp_path / "base" / "vae")
    return tmp_path / "base"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist; pass --base"):
        load_base(tmp_path / "sd21")


@pytest.mark.parametrize("remove, needle", [
    ("vae", "no 'vae/' subfolder"),
    ("unet/config.json", "missing .*config.json"),
    ("unet/diffusion_pytorch_model.safetensors", "no weights in"),
])
def test_incomplete_folder_names_the_missing_part(base_dir, remove, needle):
    import shutil
    target = base_dir / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(BaseModelError, match=needle):
        load_base(base_dir)


def test_from_base_uses_the_folder_weights(base_dir):
    from diffusers import UNet2DConditionModel

    model = SODiff.from_base(TINY, base_dir)
    mine = dict(model.unet.named_parameters())
    saved = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    for name, p in saved.named_parameters():
        # peft wraps LoRA targets, moving their weights under `.base_layer`.
        stem, _, leaf = name.rpartition(".")
        assert torch.equal(mine.get(name, mine.get(f"{stem}.base_layer.{leaf}")), p), name
    assert model.base_dir == base_dir


def test_external_checkpoint_needs_and_checks_its_base(base_dir, tmp_path):
    model = SODiff.from_base(TINY, base_dir)
    ck = checkpoint.save(model, tmp_path / "ck")
    from safetensors.torch import load_file
    keys = load_file(ck / "model.safetensors").keys()
    assert not any(k.startswith("vae.") for k in keys)
    assert not any(k.startswith("unet.") and "lora_" not in k for k in keys)
    with pytest.raises(CheckpointError, match="pass --base"):
        checkpoint.load(ck)
    again = checkpoint.load(ck, base_dir=base_dir)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.eval()(x).restored, again.eval()(x).restored)
    # A base whose UNet differs from the one trained on is refused, naming the key.
    import json
    cfg_file = base_dir / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["norm_eps"] = 1e-3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="norm_eps"):
        checkpoint.load(ck, base_dir=base_dir)
