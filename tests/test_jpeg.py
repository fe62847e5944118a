import ast
import importlib
import io

import numpy as np
import pytest
from PIL import Image

from sodiff import jpeg


def _rgb(h=16, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pillow_jpeg(arr, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(16, 24, 3), (16, 24), (13, 9, 3), (13, 9)])
def test_compress_shape_dtype_and_bytes(shape):
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded, data = jpeg.compress(arr, 50)
    assert decoded.shape == arr.shape and decoded.dtype == np.uint8
    assert data[:2] == b"\xff\xd8"  # SOI marker
    assert jpeg.estimate_quality(data) == 50


def test_compress_matches_pillow_and_subsampling_is_used():
    arr = _rgb(32, 32)
    for sub in ("4:2:0", "4:2:2", "4:4:4"):
        _, data = jpeg.compress(arr, 30, sub)
        assert data == _pillow_jpeg(arr, quality=30, subsampling=sub)
    assert jpeg.compress(arr, 30, "4:2:0")[1] != jpeg.compress(arr, 30, "4:4:4")[1]


def test_compress_quality_100_is_near_lossless_and_low_quality_is_not():
    arr = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    hi, _ = jpeg.compress(arr, 100)
    lo, _ = jpeg.compress(arr, 5)
    err = lambda d: np.abs(d.astype(int) - arr).max()
    assert err(hi) <= 2 < err(lo)


@pytest.mark.parametrize("quality", [0, 101, -5, 50.0, "50", True, None])
def test_compress_rejects_bad_quality(quality):
    with pytest.raises(ValueError, match="quality"):
        jpeg.compress(_rgb(), quality)


@pytest.mark.parametrize("image", [
    np.zeros((16, 16, 3), np.float32),
    np.zeros((16, 16, 4), np.uint8),
    np.zeros((16, 16, 1), np.uint8),
    np.zeros((16,), np.uint8),
    np.zeros((0, 16, 3), np.uint8),
    [[0, 1], [2, 3]],
])
def test_compress_rejects_bad_image(image):
    with pytest.raises(ValueError, match="image"):
        jpeg.compress(image, 50)


def test_compress_rejects_unknown_subsampling():
    with pytest.raises(ValueError, match="4:1:1"):
        jpeg.compress(_rgb(), 50, "4:1:1")


def test_luma_tables_are_distinct_for_every_quality():
    # Why estimate_quality is never ambiguous: all 100 luma tables differ. Chroma alone is
    # ambiguous only for Q = 1, 2, 3 (every entry clamps to 255).
    luma = {q: jpeg.quality_tables(q)[0] for q in range(1, 101)}
    chroma = {q: jpeg.quality_tables(q)[1] for q in range(1, 101)}
    assert len(set(luma.values())) == 100
    assert chroma[1] == chroma[2] == chroma[3] == (255,) * 64
    assert len(set(chroma.values())) == 98
    assert jpeg.quality_tables(100)[0] == (1,) * 64
    assert jpeg.quality_tables(50)[0] == jpeg.IJG_LUMA


@pytest.mark.parametrize("subsampling", [0, 2])  # Pillow: 0 = 4:4:4, 2 = 4:2:0
def test_estimate_quality_exact_for_every_pillow_quality(subsampling):
    arr = _rgb()
    for q in range(1, 101):
        data = _pillow_jpeg(arr, quality=q, subsampling=subsampling)
        assert jpeg.estimate_quality(data) == q


def test_estimate_quality_grey_every_quality():
    arr = _rgb()[..., 0]
    for q in range(1, 101):
        data = _pillow_jpeg(arr, quality=q)
        with Image.open(io.BytesIO(data)) as im:
            assert len(im.quantization) == 1  # only the luma table
            assert jpeg.estimate_quality(im) == q


def test_estimate_quality_accepts_path_bytes_and_image(tmp_path):
    data = jpeg.compress(_rgb(), 37)[1]
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    assert jpeg.estimate_quality(path) == 37
    assert jpeg.estimate_quality(str(path)) == 37
    assert jpeg.estimate_quality(bytearray(data)) == 37
    with Image.open(path) as im:
        assert jpeg.estimate_quality(im) == 37


def test_estimate_quality_none_for_custom_tables():
    arr = _rgb()
    luma = list(jpeg.quality_tables(50)[0])
    chroma = list(jpeg.quality_tables(50)[1])
    luma_custom = luma.copy()
    luma_custom[63] += 1  # one entry off the IJG Q50 table
    chroma_custom = chroma.copy()
    chroma_custom[0] += 1
    assert jpeg.estimate_quality(_pillow_jpeg(arr, qtables=[luma_custom, chroma])) is None
    # Luma is Q50's, chroma is not: still unknown, not 50.
    assert jpeg.estimate_quality(_pillow_jpeg(arr, qtables=[luma, chroma_custom])) is None
    assert jpeg.estimate_quality(_pillow_jpeg(arr, qtables=[[7] * 64, [9] * 64])) is None
    # Control: the unmodified tables passed explicitly are recognised.
    assert jpeg.estimate_quality(_pillow_jpeg(arr, qtables=[luma, chroma])) == 50


def test_estimate_quality_none_for_non_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="PNG")
    assert jpeg.estimate_quality(buf.getvalue()) is None
    assert jpeg.estimate_quality(b"not an image at all") is None
    assert jpeg.estimate_quality(b"") is None
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert jpeg.estimate_quality(im) is None
    with pytest.raises(FileNotFoundError):
        jpeg.estimate_quality(tmp_path / "missing.jpg")


def test_quality_from_tables_edge_cases():
    assert jpeg.quality_from_tables({}) is None
    assert jpeg.quality_from_tables({1: list(jpeg.IJG_CHROMA)}) is None  # no luma slot
    assert jpeg.quality_from_tables({0: [16] * 10}) is None  # wrong length
    assert jpeg.quality_from_tables({0: list(jpeg.quality_tables(80)[0])}) == 80
    assert jpeg.quality_from_tables(dict(jpeg.quality_tables(1))) == 1


def test_zigzag_is_a_permutation():
    assert sorted(jpeg.ZIGZAG) == list(range(64))


def test_zigzag_tables_from_old_pillow_are_normalised(monkeypatch):
    # Old Pillow releases reported `im.quantization` in zigzag order; the probe decides which.
    monkeypatch.setattr(jpeg, "_pillow_tables_are_zigzag", lambda: True)
    tables = jpeg.quality_tables(42)
    zigzag = {slot: [t[i] for i in jpeg.ZIGZAG] for slot, t in tables.items()}
    assert jpeg.quality_from_tables(zigzag) == 42
    assert jpeg.quality_from_tables({s: list(t) for s, t in tables.items()}) is None


def test_modules_do_not_import_torch():
    # The torch-free runtime shares jpeg.py and metrics.py.
    for module in (jpeg, importlib.import_module("sodiff.metrics")):
        tree = ast.parse(open(module.__file__).read())
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" not in names, module.__name__
