"""The main job (`make demo` / `sodiff-demo`): crops, the comparison sheet, options, and the
bundled checkpoint restoring a real photo end to end through the ONNX runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from demo import figure
from demo.cli import main
from demo.core import DemoOptions, run_demo, summary, validate_options

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "weights" / "tiny"


def test_worst_crops_find_the_damage_without_overlap():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    jpeg = original.copy()
    jpeg[40:56, 72:88] = 0     # the worst damage
    jpeg[8:16, 8:16] = 255 - jpeg[8:16, 8:16]  # milder, elsewhere
    crops = figure.worst_crops(jpeg, original, n=2, side=16)
    assert crops[0] == (40, 72)
    y, x = crops[1]  # any 16 px window holding the whole 8x8 patch scores the same
    assert y <= 8 <= y + 8 and x <= 8 <= x + 8
    assert all(y % 8 == 0 and x % 8 == 0 for y, x in crops)


def test_comparison_sheet_layout():
    img = np.zeros((100, 200, 3), np.uint8)
    sheet = figure.comparison([("a", img), ("b", img + 50), ("c", img + 100)], [(0, 0), (0, 100)])
    panel_h = round(100 * figure.PANEL / 200)
    assert sheet.size == (3 * figure.PANEL,
                          figure.LABEL_H + panel_h + 2 * figure.CROP * figure.ZOOM)
    # the second crop row of column b is b's pixels, zoomed
    y = figure.LABEL_H + panel_h + figure.CROP * figure.ZOOM + 10
    assert sheet.getpixel((figure.PANEL + 10, y)) == (50, 50, 50)


@pytest.mark.parametrize("kw, needle", [(dict(qf=0), "qf=0"), (dict(image="nope"), "nope")])
def test_bad_options_are_named(kw, needle):
    with pytest.raises(ValueError, match=needle):
        validate_options(DemoOptions(**kw))


def test_cli_error_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["--image", str(tmp_path / "missing.png"),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "missing.png" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


needs_bundled = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(),
                                   reason="the bundled checkpoint weights/tiny is absent")


@needs_bundled
def test_bundled_checkpoint_is_small_and_self_contained():
    from sodiff import checkpoint

    meta = checkpoint.read_meta(BUNDLED)
    assert meta["base"] == "embedded" and meta["config"]["name"] == "tiny-full"
    assert sum(f.stat().st_size for f in BUNDLED.iterdir()) <= 20 * 2**20
    model = checkpoint.load(BUNDLED)  # no --base: everything is in the folder
    assert model.cfg.lora is None and model.cfg.vae_class == "AutoencoderTiny"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("skimage")
    tmp_path = tmp_path_factory.mktemp("demo")
    result = run_demo(DemoOptions(image="chelsea", qf=10, out=tmp_path / "out",
                                  engine=tmp_path / "engine", threads=2), log=lambda m: None)
    return result, tmp_path / "engine"


@needs_bundled
def test_bundled_model_restores_a_real_photo(demo_run):
    result = demo_run[0]
    j, r = result.metrics["jpeg"], result.metrics["restored"]
    assert r["psnr"] > j["psnr"] and r["psnr_b"] > j["psnr_b"], result.metrics
    restored = np.asarray(Image.open(result.files["restored"]))
    assert restored.shape == (300, 451, 3)
    with Image.open(result.files["jpeg"]) as im:
        assert im.format == "JPEG" and im.size == (451, 300)
    with Image.open(result.files["comparison"]) as im:
        assert im.width == 3 * figure.PANEL
    text = summary(result)
    assert "PSNR-B" in text and "unet" in text and str(result.files["comparison"]) in text


@needs_bundled
@pytest.mark.parametrize("qf", [80, 90, 95])
def test_the_bundled_gate_never_makes_a_high_quality_jpeg_worse(demo_run, qf):
    import io

    from skimage import data

    from runtime import Restorer
    from runtime.imageio import decode_image
    from sodiff.metrics import psnr
    clean = data.coffee()[100:228, 200:392].copy()  # not a training or gate-fitting image
    buf = io.BytesIO()
    Image.fromarray(clean).save(buf, "JPEG", quality=qf)
    img = decode_image(buf.getvalue(), "coffee.jpg")
    with Restorer(demo_run[1], threads=2) as r:
        assert r.manifest.gate is not None  # carried from weights/tiny/gate.json
        out, info = r.restore_info(img.array, img.qf, jpeg=img.jpeg)
    assert info["gate"]["qf_source"] == "tables" and info["gate"]["qf"] == qf
    assert info["gate"]["weight"] == r.manifest.gate.weight_at(qf)
    assert psnr(out, clean) >= psnr(img.array, clean)


def test_foreign_engine_folder_is_refused_and_kept(tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["--image", "chelsea", "--engine", str(engine),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not from sodiff-export" in result.output
    assert [p.name for p in engine.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "o").exists()


def test_import_demo_never_imports_ray():
    """Ray stays the `ray` extra's: only `sodiff-demo --serve` loads it, when it starts."""
    import subprocess
    import sys
    code = ("import sys, demo, demo.cli, demo.serve\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray')\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_serve_exports_then_runs_sodiff_serve_on_loopback(tmp_path, monkeypatch):
    """--serve: the demo's export, then sodiff-serve (in this process) on 127.0.0.1."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from demo import serve as demo_serve
    from scale import serve_cli

    calls = []
    monkeypatch.setattr(demo_serve, "export_engine", lambda opts, log: calls.append(opts))
    monkeypatch.setattr(serve_cli.main, "main", lambda args, prog_name: calls.append(args))
    helped = CliRunner().invoke(main, ["-h"])
    assert "--serve" in helped.output and "--port" in helped.output
    result = CliRunner().invoke(main, ["--serve", "--engine", str(tmp_path / "e"), "--port",
                                       "8123", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert calls[0].engine == tmp_path / "e"
    assert calls[1] == ["--engine", str(tmp_path / "e"), "--host", "127.0.0.1", "--port",
                        "8123", "--threads", "1", "--replicas", "1"]
    assert "http://127.0.0.1:8123/" in result.output


@needs_bundled
@pytest.mark.slow
def test_serve_starts_the_bundled_model_behind_the_page(tmp_path):
    """The real `sodiff-demo --serve`: its page at GET /, a restore, a clean Ctrl-C."""
    import io
    import signal
    import urllib.request

    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from fixtures.serve_proc import post, start_server

    url, proc, log = start_server(tmp_path / "engine", tmp_path, "--serve", module="demo",
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert r.status == 200 and b"page.js" in r.read()
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, "JPEG", quality=10)
        assert post(url, buf.getvalue())[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert f"sodiff-serve: {url}/" in log.read_text()
