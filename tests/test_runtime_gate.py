"""runtime/gate.py and export/gate.py: the high-QF gate, parsed from the manifest, honoured by
the Restorer at the quality the file's tables say, measured at export and written there."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fixtures.runtime_engines import edit_manifest, identity_engine
from runtime import Restorer
from runtime.errors import EngineDirError
from runtime.gate import Gate, blend, settle
from runtime.imageio import decode_image
from runtime.jpegqcs import constrain

GATE = {"form": "blend", "qf": [10, 90], "weight": [1.0, 0.0], "source": None}


@pytest.mark.parametrize("bad,match", [
    ({**GATE, "form": "sigmoid"}, "form"),
    ({**GATE, "qf": [90, 10]}, "ascending"),
    ({**GATE, "weight": [1.5, 0.0]}, r"\[0, 1\]"),
    ({**GATE, "weight": [1.0]}, "same number"),
    ({**GATE, "qf": ["high", 90]}, "lists of numbers"),
])
def test_a_malformed_gate_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        Gate.from_dict(bad)


def test_weights_are_linear_between_qualities_and_flat_beyond():
    g = Gate.from_dict(GATE)
    assert [g.weight_at(q) for q in (5, 10, 50, 90, 95)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert Gate.from_dict(g.to_dict()) == g


def test_blend_and_settle():
    out = np.full((3, 4), 200, np.uint8)
    lq = np.full((3, 4), 100, np.uint8)
    half = out.copy()
    blend(half, lq, 0.25)
    assert (half == 125).all()
    back = out.copy()
    settle(back, lq, None, 0.0)
    assert np.array_equal(back, lq)


@pytest.fixture()
def engine(tmp_path):
    return identity_engine(tmp_path / "gated")


def _blurred(r):
    from test_runtime_jpegqcs import _blur_decoder  # a restoration that differs from its input
    _blur_decoder(r)
    return r


def _jpeg(quality):
    rng = np.random.default_rng(quality)
    photo = np.clip(rng.normal(128, 30, (40, 56, 3)).cumsum(1) / 8 % 256, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue(), f"q{quality}.jpg")


def test_the_manifests_gate_is_honoured_at_the_files_quality(engine):
    edit_manifest(engine, lambda m: m.update(gate=GATE))
    for quality, weight in ((90, 0.0), (50, 0.5), (10, 1.0)):
        img = _jpeg(quality)
        with _blurred(Restorer(engine, gate=False, jpeg_constraint=False)) as r:
            raw = r.restore(img.array)
        with _blurred(Restorer(engine)) as r:
            out, info = r.restore_info(img.array, img.qf, jpeg=img.jpeg)
        assert info["gate"] == {"weight": weight, "qf": quality, "qf_source": "tables"}
        want = raw.copy()
        if weight == 0:
            want = img.array  # the JPEG's own decode, bit for bit
        else:
            blend(want, img.array, weight)
            constrain(want, img.array, img.jpeg)
        assert np.array_equal(out, want), quality
        assert weight == 1.0 or not np.array_equal(out, raw)


def test_gate_off_without_a_gate_and_from_the_predictor(engine):
    img = _jpeg(90)
    with _blurred(Restorer(engine)) as r:  # no gate in the manifest
        assert r.restore_info(img.array, jpeg=img.jpeg)[1]["gate"] is None
    edit_manifest(engine, lambda m: m.update(gate=GATE))
    with _blurred(Restorer(engine, gate=False)) as r:
        assert r.restore_info(img.array, jpeg=img.jpeg)[1]["gate"] is None
    with _blurred(Restorer(engine)) as r:  # an array alone: the predictor's QF
        info = r.restore_info(img.array)[1]
    assert info["gate"]["qf_source"] == "predictor"
    assert info["gate"]["qf"] == round(info["qf_predicted"], 2)


def test_a_malformed_gate_in_a_manifest_is_refused(engine):
    edit_manifest(engine, lambda m: m.update(gate={**GATE, "weight": [2, 0]}))
    with pytest.raises(EngineDirError, match="malformed.*gate weights"):
        Restorer(engine)


def test_choose_keeps_the_best_weight_that_loses_nothing_and_falls_with_qf():
    from export.gate import WEIGHTS, choose
    w = np.array(WEIGHTS)
    low = np.stack([1 + w, 0.5 + w])            # always helps: weight 1
    mid = np.stack([w * (1 - w), w * (0.3 - w)])  # the best mean loses on image 2 past 0.3
    high = np.stack([-w, 0.1 * w])              # hurts image 1 at any weight: 0
    assert choose({10: low, 60: mid, 90: high}) == [1.0, 0.3, 0.0]
    assert choose({10: high, 90: low}) == [0.0, 0.0]  # never more at a higher QF


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures.runtime_engines import tiny_engine
    return tiny_engine(tmp_path_factory.mktemp("tiny-gate"))


def test_export_measures_the_gate_or_carries_the_checkpoints(tiny, tmp_path):
    from export.gate import GATE_FILE, GRID_QF
    from export.options import ExportOptions
    from export.pipeline import run_export
    from fixtures.runtime_engines import TINY_SHAPES
    engine, ckpt = tiny
    images = tmp_path / "clean"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / "a.png")
    out = tmp_path / "engine"
    shutil.copytree(engine, out)  # unchanged components are reused: only the gate is new
    logs = []
    run_export(ExportOptions(out=out, checkpoint=ckpt, dynamic=TINY_SHAPES, samples=1,
                             gate_images=images), log=logs.append)
    gate = json.loads((out / "manifest.json").read_text())["gate"]
    assert gate["qf"] == list(GRID_QF) and gate["source"]["images"] == 1
    assert all(0 <= w <= 1 for w in gate["weight"])
    assert gate["weight"] == sorted(gate["weight"], reverse=True)
    assert any("[gate] QF 95" in m for m in logs)
    assert Restorer(out).manifest.gate == Gate.from_dict(gate)

    carried = tmp_path / "ckpt"
    shutil.copytree(ckpt, carried)
    (carried / GATE_FILE).write_text(json.dumps(GATE))
    run_export(ExportOptions(out=out, checkpoint=carried, dynamic=TINY_SHAPES, samples=1),
               log=logs.append)
    gate = json.loads((out / "manifest.json").read_text())["gate"]
    assert (gate["qf"], gate["weight"], gate["source"]) == ([10, 90], [1.0, 0.0],
                                                            {"file": GATE_FILE})
