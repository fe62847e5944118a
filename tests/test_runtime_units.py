"""The runtime's numpy building blocks against their PyTorch/sodiff counterparts."""
import ast
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from runtime import jpegqf
from runtime.config import RestoreOptions, validate_options
from runtime.pipeline import pad_bottom_right
from runtime.resize import resize, resize_rows
from runtime.tiling import axis_weights, crop_starts, tile_starts
from tolerance import LAYER, PIPELINE, assert_close

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("h,w,size", [(100, 77, (64, 64)), (64, 64, (64, 64)), (7, 13, (64, 64)),
                                      (1, 1, (16, 16)), (1000, 333, (512, 512)),
                                      (600, 900, (64, 64)), (5, 300, (16, 16)),
                                      (33, 47, (40, 20))])
def test_resize_matches_torch_antialiased_bilinear(h, w, size):
    x = np.random.default_rng(h * w).uniform(-1, 1, (3, h, w)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear",
                        align_corners=False, antialias=True)[0].numpy()
    # numpy against torch's kernel: other tap weights, another order of sums over many taps.
    assert_close(resize(x, size), ref, PIPELINE)


def test_resize_reads_rows_in_chunks_without_changing_the_result():
    x = np.random.default_rng(0).uniform(-1, 1, (301, 97, 3)).astype(np.float32)
    calls = []

    def read(a, b):
        calls.append((a, b))
        return x[a:b]

    chunked = resize_rows(read, 301, 97, (32, 32), rows=50)
    assert len(calls) == 7 and max(b - a for a, b in calls) == 50
    assert np.array_equal(chunked, resize_rows(lambda a, b: x[a:b], 301, 97, (32, 32), rows=301))


@pytest.mark.parametrize("h,w,ph,pw", [(10, 12, 3, 5), (10, 12, 0, 11), (4, 9, 4, 2),
                                       (1, 1, 7, 7), (7, 13, 1, 3), (5, 5, 0, 0)])
def test_padding_follows_sodiff_pad_reflect(h, w, ph, pw):
    from sodiff.model import pad_reflect
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
    ref = pad_reflect(torch.from_numpy(x), ph, pw).numpy()
    assert np.array_equal(pad_bottom_right(x, ph, pw), ref)


@pytest.mark.parametrize("length,tile,overlap,align", [(1000, 128, 32, 8), (129, 128, 16, 8),
                                                       (4096, 512, 128, 8), (777, 64, 0, 8),
                                                       (300, 96, 40, 16), (64, 64, 16, 8)])
def test_tile_starts_cover_align_and_overlap(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    assert starts[0] == 0 and all(s % align == 0 for s in starts)
    assert 0 <= starts[-1] + tile - length < align  # covers the end, pads less than the grid
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (tile - gaps >= overlap).all()


@pytest.mark.parametrize("length,tile,overlap", [(1000, 128, 32), (129, 128, 16), (50, 64, 16),
                                                 (777, 64, 0), (300, 96, 48)])
def test_blend_weights_are_a_feathered_partition_of_unity(length, tile, overlap):
    starts = tile_starts(length, tile, overlap, 8)
    weights = axis_weights(starts, tile, length)
    total = np.zeros(length)
    for s, w in zip(starts, weights):
        assert w.size == min(tile, length - s) and (w > 0).all() and (w <= 1).all()
        total[s:s + w.size] += w
    assert_close(total, np.ones(length), LAYER, dtype="float32")  # sums of float32 weights
    if len(starts) > 1 and overlap:
        first = weights[0]
        assert first[0] == 1 and first[-1] < 0.5  # feathered towards its neighbour
        assert (np.diff(first[tile - overlap:]) <= 0).all()
    if len(starts) == 1:
        assert (weights[0] == 1).all()


@pytest.mark.parametrize("length,window", [(1000, 128), (128, 128), (50, 128), (129, 64),
                                           (4096, 512)])
def test_predictor_crops_stay_inside_on_the_jpeg_grid(length, window):
    starts = crop_starts(length, window, 8)
    covered = np.zeros(length, bool)
    for s in starts:
        assert s % 8 == 0 and s + min(window, length) <= length
        covered[s:s + window] = True
    assert covered[:length - 7].all()


def test_jpeg_tables_and_estimates_agree_with_sodiff():
    from sodiff import jpeg
    for q in range(1, 101):
        assert jpegqf.scale_table(jpegqf.IJG_LUMA, q) == jpeg.quality_tables(q)[0]
        assert jpegqf.scale_table(jpegqf.IJG_CHROMA, q) == jpeg.quality_tables(q)[1]
    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for q in (1, 7, 30, 50, 75, 95, 100):
        _, data = jpeg.compress(arr, q)
        with Image.open(io.BytesIO(data)) as im:
            assert jpegqf.estimate_quality(im) == q == jpeg.estimate_quality(data)


def test_jpeg_estimate_is_none_for_custom_tables_and_pngs():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", qtables=[[3] * 64, [4] * 64])
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert jpegqf.estimate_quality(im) is None
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert jpegqf.estimate_quality(im) is None


@pytest.mark.parametrize("field,value", [("backend", "cuda"), ("device", "gpu"),
                                         ("timestep", "fixed"), ("tile", 0), ("tile", 12.5),
                                         ("overlap", -1), ("threads", -2),
                                         ("keep_colour", "yes")])
def test_bad_options_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        validate_options(RestoreOptions(**{field: value}))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_runtime_sources_never_import_torch_sodiff_or_export():
    files = sorted((REPO / "runtime").rglob("*.py"))
    assert len(files) >= 10
    for f in files:
        assert not _imports(f) & {"torch", "sodiff", "export", "diffusers", "training"}, f


def test_import_runtime_is_cheap():
    code = ("import sys, runtime; heavy = {'torch', 'onnxruntime', 'numpy', 'PIL'} & "
            "set(sys.modules); print(sorted(heavy)); runtime.RestoreOptions; "
            "print('onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "False"
