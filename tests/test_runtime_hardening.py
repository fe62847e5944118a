"""Engine dirs a hostile run found (issue 15, items 1-6): each is refused by read_manifest with
an EngineDirError naming the dir and the fix, and by `sodiff-run` with exit 2, no traceback and
before any image is read."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fixtures.runtime_engines import edit_manifest, identity_engine
from runtime.cli import main
from runtime.errors import EngineDirError
from runtime.manifest import read_manifest


@pytest.fixture
def engine(tmp_path):
    return identity_engine(tmp_path / "engine")


def _refused(engine, tmp_path, match: str):
    """read_manifest refuses with `match`; the CLI exits 2 without a traceback, reading no
    image (the input does not even exist) and writing nothing."""
    with pytest.raises(EngineDirError, match=match):
        read_manifest(engine)
    out = tmp_path / "never"
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "missing.png"),
                                    "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.exception is None or \
        isinstance(res.exception, SystemExit)
    assert not out.exists()


def _setter(field: str, value):
    """A manifest edit that sets the dotted `field` to `value`."""
    def change(d):
        keys = field.split(".")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


def test_symlink_loop_in_the_dir_is_refused(engine, tmp_path):
    (engine / "unet.onnx").unlink()
    os.symlink("unet.onnx", engine / "unet.onnx")
    _refused(engine, tmp_path, "unet.onnx")


def test_deeply_nested_manifest_is_refused_naming_the_file(engine, tmp_path):
    data = json.loads((engine / "manifest.json").read_text())
    (engine / "manifest.json").write_text(json.dumps(data)[:-1] + ', "x": '
                                          + "[" * 200_000 + "]" * 200_000 + "}")
    _refused(engine, tmp_path, "manifest.json.*nest")


def test_huge_number_is_refused_naming_the_file(engine, tmp_path):
    text = (engine / "manifest.json").read_text()
    (engine / "manifest.json").write_text(text.replace('"format_version": 1',
                                                       '"format_version": ' + "9" * 5001))
    _refused(engine, tmp_path, "manifest.json")


def test_oversized_manifest_is_refused(engine, tmp_path):
    edit_manifest(engine, lambda d: d.update(padding="x" * (5 * 2 ** 20)))
    _refused(engine, tmp_path, "manifest.json.*MiB")


@pytest.mark.parametrize("field,value", [("format_version", True),
                                         ("image.saipe_size", True),
                                         ("shapes.batch.max", 1.5)])
def test_bool_is_not_int(engine, tmp_path, field, value):
    edit_manifest(engine, _setter(field, value))
    _refused(engine, tmp_path, field.split(".")[-1])


def test_manifest_symlinked_from_outside_is_refused(engine, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text((engine / "manifest.json").read_text())
    (engine / "manifest.json").unlink()
    os.symlink(outside, engine / "manifest.json")
    _refused(engine, tmp_path, "outside the engine dir")


@pytest.mark.parametrize("field,value", [("shapes.max", [2 ** 20, 64]),
                                         ("shapes.batch.max", 100_000)])
def test_absurd_sizes_are_refused(engine, tmp_path, field, value):
    edit_manifest(engine, _setter(field, value))
    _refused(engine, tmp_path, field.split(".")[-1])


def test_components_must_agree_with_the_image_fields(engine, tmp_path):
    edit_manifest(engine, lambda d: d["image"].update(latent_channels=5))
    _refused(engine, tmp_path, "latent_channels")


def test_saipe_input_must_match_saipe_size(engine, tmp_path):
    edit_manifest(engine, lambda d: d["image"].update(saipe_size=24))
    _refused(engine, tmp_path, "saipe_size")


def test_no_verify_still_compares_sizes_and_warns(engine, tmp_path):
    with open(engine / "unet.onnx", "ab") as f:
        f.write(b"\0" * 10)  # damaged: one of the size checks must see it
    with pytest.raises(EngineDirError, match="bytes"):
        read_manifest(engine, verify_hashes=False)
    fresh = identity_engine(tmp_path / "fresh")
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src)
    res = CliRunner().invoke(main, ["--engine", str(fresh), str(src), "-o",
                                    str(tmp_path / "out.png"), "--no-verify"])
    assert res.exit_code == 0, res.output
    assert sum("not checked" in line for line in res.output.splitlines()) == 1
