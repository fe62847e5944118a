"""The Python API's rough edges (issue 16, item 10): PIL images in and out, restore_file with
the CLI's EXIF/ICC handling, qf= refused without timestep="header", RestoreOptions documented,
dir(runtime) without duplicates."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageCms

import runtime
from fixtures.runtime_engines import identity_engine
from runtime import Restorer, RestoreOptions
from tolerance import assert_pixels_close


@pytest.fixture(scope="module")
def restorer(tmp_path_factory):
    with Restorer(identity_engine(tmp_path_factory.mktemp("api") / "engine")) as r:
        yield r


def _rgb(h=24, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_pil_in_pil_out(restorer, mode):
    im = Image.fromarray(_rgb()).convert(mode)
    out = restorer.restore(im)
    assert isinstance(out, Image.Image) and out.size == im.size
    want = {"P": "RGB"}.get(mode, mode)
    assert out.mode == want
    ref = restorer.restore(np.asarray(im.convert(want)))
    assert_pixels_close(out, ref)


def test_restore_file_keeps_exif_and_icc_like_the_cli(restorer, tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription
    src, dst = tmp_path / "in.jpg", tmp_path / "out.png"
    Image.fromarray(_rgb(32, 32)).save(src, quality=30, icc_profile=icc, exif=exif.tobytes())
    info = restorer.restore_file(src, dst)
    assert info["ok"] and info["error"] is None and info["output"] == str(dst)
    with Image.open(dst) as out:
        assert out.info.get("icc_profile") == icc
        assert out.getexif().get(0x010E) == "a description"
    with pytest.raises(runtime.ImageError, match="exists"):
        restorer.restore_file(src, dst)  # never replaced without overwrite=True
    assert restorer.restore_file(src, dst, overwrite=True)["ok"]


def test_qf_without_header_mode_is_refused(restorer):
    with pytest.raises(ValueError, match="timestep='header'"):
        restorer.restore(_rgb(), qf=30)


def test_restore_options_docstring_lists_every_field():
    doc = RestoreOptions.__doc__ or ""
    assert not doc.startswith("RestoreOptions(")  # not dataclass's generated signature
    missing = [f.name for f in dataclasses.fields(RestoreOptions) if f"{f.name}:" not in doc]
    assert missing == []


def test_dir_lists_each_name_once():
    runtime.Restorer  # noqa: B018 - loaded lazily: it then sits in the module's globals too
    names = dir(runtime)
    assert len(names) == len(set(names)) and "Restorer" in names
