"""Shared fixtures: tiny models, and the test-image folder (docs/data.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The evaluation images (docs/data.md): $SODIFF_DATA, else a `shared/data` folder beside the
# repository. The one place the tests name it; benchmarks/_common.py is the benchmarks' one.
DATA_ENV = "SODIFF_DATA"
SHARED_DATA = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")


def shared_data(sub: str = "") -> Path:
    """`SHARED_DATA/<sub>`, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (the test images: docs/data.md; set {DATA_ENV})")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `last_in_module` tear down what their module shares (a running server):
    they stay last in their module in any order (pytest-randomly shuffles before this hook)."""
    for item in [i for i in items if i.get_closest_marker("last_in_module")]:
        items.remove(item)
        module = item.module
        same = [j for j, other in enumerate(items) if getattr(other, "module", None) is module]
        items.insert(same[-1] + 1 if same else len(items), item)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box: one thread is faster than two fighting threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def logged(monkeypatch):
    """Every training step's logged scalars."""
    from training import common

    rows = []
    original = common.Run.log

    def log(self, step, scalars):
        rows.append(dict(scalars))
        return original(self, step, scalars)

    monkeypatch.setattr(common.Run, "log", log)
    return rows


# Prepended to `python -c` scripts: makes torch (and what pulls it in) unimportable, so a test
# proves the runtime works without it.
BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'sodiff', 'export', 'diffusers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture
def tiny_model():
    """A tiny SODiff with seeded random weights and a LoRA that changes the output."""
    import torch
    from sodiff.config import TINY
    from sodiff.model import SODiff

    torch.manual_seed(0)
    model = SODiff(TINY).eval()
    randomize_lora(model)
    return model


def randomize_lora(model) -> None:
    """LoRA B starts at zero (a no-op); give it weights so merge/save tests can see it."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
