"""`sodiff-run` on real files: a bad-input corpus, image formats and modes, outputs that never
clobber anything, reports. The identity engine makes every correct output predictable."""
import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms

from fixtures.runtime_engines import identity_engine
from conftest import BLOCK_TORCH
from runtime.cli import main
from runtime.jpegqf import estimate_quality

REPO = Path(__file__).resolve().parents[1]
# Pillow's exif_transpose applies these for orientations 2..8; storing the inverse makes the
# displayed image the same for every orientation.
INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return identity_engine(tmp_path_factory.mktemp("cli") / "engine")


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(width, height, bit_depth, colour_type, raw=b""):
    """A PNG written by hand, for what Pillow will not write (48-bit, lying headers)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def displayed():
    """An asymmetric image: any wrong orientation changes it."""
    return rgb(12, 20, seed=5)


def make_corpus(folder: Path) -> dict[str, str | None]:
    """Write the corpus; returns {file name: expected output mode, or None for an error}."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(rgb(40, 56))
    expect = {}

    def save(name, im, mode, **kw):
        im.save(folder / name, **kw)
        expect[name] = mode

    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = None
    full = io.BytesIO()
    base.save(full, "JPEG", quality=50)
    (folder / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    expect["truncated.jpg"] = None
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    expect["text.jpg"] = None
    (folder / "huge.png").write_bytes(png_bytes(100_000, 100_000, 8, 2))
    expect["huge.png"] = None
    save("one.png", Image.fromarray(rgb(1, 1)), "RGB")
    save("odd.png", Image.fromarray(rgb(7, 13)), "RGB")
    save("cmyk.jpg", base.convert("CMYK"), "RGB", quality=90)
    save("sixteen.png", Image.fromarray(
        np.random.default_rng(1).integers(0, 65536, (30, 20)).astype(np.uint16)), "I;16")
    rgb48 = np.random.default_rng(2).integers(0, 65536, (9, 11, 3)).astype(">u2")
    (folder / "rgb48.png").write_bytes(png_bytes(
        11, 9, 16, 2, b"".join(b"\0" + row.tobytes() for row in rgb48)))
    expect["rgb48.png"] = "RGB"
    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE), "RGB")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette_alpha.png", pal, "RGBA", transparency=0)
    save("rgba.png", base.convert("RGBA"), "RGBA")
    save("progressive.jpg", base, "RGB", quality=40, progressive=True)
    save("grey.jpg", base.convert("L"), "L", quality=30)
    for o in range(1, 9):
        im = Image.fromarray(displayed())
        stored = im if o == 1 else im.transpose(INVERSE[o])
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"orient{o}.png", stored, "RGB", exif=exif.tobytes())
    return expect


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_bad_input_corpus_through_the_installed_command(engine, tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    expect = make_corpus(corpus)
    before = digests(corpus)
    cmd = [str(Path(sys.executable).with_name("sodiff-run")), "--engine", str(engine),
           str(corpus), "-o", str(out), "--report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert digests(corpus) == before  # inputs unchanged
    reports = {Path(r["input"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(reports) == set(expect)
    bad = sorted(n for n, mode in expect.items() if mode is None)
    for name, mode in expect.items():
        if mode is None:
            assert not reports[name]["ok"] and not (out / name).with_suffix(".png").exists()
            errors = [line for line in proc.stderr.splitlines()
                      if line.startswith(f"error: {corpus / name}")]
            assert len(errors) == 1, (name, proc.stderr)
            continue
        assert reports[name]["ok"], reports[name]
        with Image.open(out / Path(name).with_suffix(".png")) as im:
            assert im.mode == mode, name
            assert im.size == Image.open(corpus / name).size or name.startswith("orient")
    assert f"{len(expect) - len(bad)} restored, {len(bad)} failed" in proc.stderr
    failed = proc.stderr.split("failed:\n")[1].splitlines()
    assert sorted(Path(l.split(":")[0].strip()).name for l in failed) == bad
    assert not [p for p in out.rglob(".*")]  # no temp files left behind


def test_bad_input_errors_say_what_is_wrong(engine, tmp_path):
    make_corpus(tmp_path / "c")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "c"), "-o",
                                    str(tmp_path / "o")])
    err = res.output
    assert "zero.jpg: not an image Pillow can read (0 bytes, empty file)" in err
    assert "truncated.jpg: truncated or corrupt image" in err
    assert "text.jpg: not an image Pillow can read (19 bytes)" in err
    assert ("huge.png: declares 10,000,000,000 pixels, over the decompression-bomb guard's "
            "limit of 89,478,485") in err
    assert "--max-pixels" in err


def test_every_exif_orientation_is_applied(engine, tmp_path):
    make_corpus(tmp_path / "c")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "c" / "orient*.png"),
                                    "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    for o in range(1, 9):
        with Image.open(tmp_path / "o" / f"orient{o}.png") as im:
            assert np.array_equal(np.asarray(im), displayed()), o
            assert im.getexif().get(0x0112) is None  # already applied: not applied twice


def test_pixels_survive_for_16_bit_palette_and_alpha(engine, tmp_path):
    make_corpus(tmp_path / "c")
    CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "c"), "-o",
                              str(tmp_path / "o")])
    for name in ("sixteen.png", "rgba.png", "palette_alpha.png", "odd.png", "one.png"):
        with Image.open(tmp_path / "c" / name) as a, Image.open(tmp_path / "o" / name) as b:
            src = a.convert("RGBA") if a.mode == "P" else a
            assert np.array_equal(np.asarray(src), np.asarray(b)), name


def test_max_pixels_override(engine, tmp_path):
    Image.fromarray(rgb(20, 20)).save(tmp_path / "a.png")
    args = ["--engine", str(engine), str(tmp_path / "a.png"), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, args + ["--max-pixels", "100"])
    assert res.exit_code == 1 and "400 pixels, over the decompression-bomb" in res.output
    assert CliRunner().invoke(main, args + ["--max-pixels", "400"]).exit_code == 0


def test_output_format_quality_icc_and_exif(engine, tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    src = tmp_path / "in.png"
    Image.fromarray(rgb(24, 32)).save(src, icc_profile=icc, exif=exif.tobytes())
    for name, fmt in (("x.jpg", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")):
        res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o",
                                        str(tmp_path / name), "--quality", "77"])
        assert res.exit_code == 0, res.output
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.info.get("icc_profile") == icc
            assert im.getexif().get(0x010F) == "TestCam"
            if fmt == "JPEG":
                assert estimate_quality(im) == 77
    res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o",
                                    str(tmp_path / "x.gif")])
    assert res.exit_code == 1 and "cannot write .gif files" in res.output


def test_jpeg_cannot_hold_alpha(engine, tmp_path):
    Image.fromarray(rgb(8, 8)).convert("RGBA").save(tmp_path / "a.png")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.png"), "-o",
                                    str(tmp_path / "a.jpg")])
    assert res.exit_code == 1 and "JPEG cannot store the alpha channel" in res.output
    assert not (tmp_path / "a.jpg").exists()


def test_outputs_never_replace_inputs_or_existing_files(engine, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(rgb(16, 16)).save(src)
    before = src.read_bytes()
    run = lambda *a: CliRunner().invoke(main, ["--engine", str(engine), *a])  # noqa: E731
    res = run(str(src), "-o", str(src), "--overwrite")
    assert res.exit_code == 1 and "would replace an input" in res.output
    assert src.read_bytes() == before
    assert run(str(src)).exit_code == 0  # default: beside the input, a new name
    out = tmp_path / "a_sodiff.png"
    out.write_bytes(b"keep me")
    res = run(str(src))
    assert res.exit_code == 1 and "exists; pass --overwrite" in res.output
    assert out.read_bytes() == b"keep me"
    assert run(str(src), "--overwrite").exit_code == 0
    assert out.read_bytes() != b"keep me" and Image.open(out).size == (16, 16)
    assert src.read_bytes() == before


def test_collisions_and_one_file_output_for_many_inputs(engine, tmp_path):
    for name in ("a.png", "a.jpg"):
        Image.fromarray(rgb(16, 16)).save(tmp_path / name)
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.png"),
                                    str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "is also the output of" in res.output
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path), "-o",
                                    str(tmp_path / "one.png")])
    assert res.exit_code == 2 and "names one file" in res.output


def test_folders_globs_and_naming(engine, tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    for rel in ("x.png", "deep/y.jpg", "deep/notes.txt"):
        p = tmp_path / "in" / rel
        p.write_text("text") if rel.endswith("txt") else Image.fromarray(rgb(10, 10)).save(p)
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "in"), "-o",
                                    str(tmp_path / "out"), "--format", "webp"])
    assert res.exit_code == 0, res.output
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.*")
                  ) == ["deep/y.webp", "x.webp"]
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "in" / "**" /
                                                                  "*.jpg")])
    assert res.exit_code == 0 and (tmp_path / "in" / "deep" / "y_sodiff.png").exists()
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "in"),
                                    "--overwrite"])
    assert res.exit_code == 0 and "2 restored" in res.output  # y_sodiff.png is not an input
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "none*.png"),
                                    str(tmp_path / "missing.png")])
    assert res.exit_code == 1 and "no file matches this pattern" in res.output
    assert "missing.png: no such file or folder" in res.output


def test_unusable_engine_dir_is_one_line_and_exit_2(engine, tmp_path):
    Image.fromarray(rgb(8, 8)).save(tmp_path / "a.png")
    res = CliRunner().invoke(main, ["--engine", str(tmp_path / "nope"), str(tmp_path / "a.png")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert res.output.startswith("error: engine dir") and res.exception.__class__ is SystemExit
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.png"),
                                    "--tile", "60"])
    assert res.exit_code == 2 and "--tile 60 must be a multiple of 8" in res.output


def test_report_and_header_timestep(engine, tmp_path):
    Image.fromarray(rgb(16, 24)).save(tmp_path / "a.jpg", quality=50)
    Image.fromarray(rgb(16, 24)).save(tmp_path / "b.png")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.jpg"),
                                    str(tmp_path / "b.png"), "--timestep", "header", "--report",
                                    "-o", str(tmp_path / "o")])
    lines = [json.loads(l) for l in res.output.splitlines() if l.startswith("{")]
    a, b = lines
    assert a["ok"] and a["qf_header"] == 50 and a["tau"] == pytest.approx(400.0)
    assert a["tau_source"] == "header" and a["size"] == [24, 16]
    assert set(a["ms"]) >= {"read", "saipe", "vae_encoder", "unet", "vae_decoder", "write",
                            "total"}
    assert not b["ok"] and "no IJG quantization tables" in b["error"]
    assert res.exit_code == 1


@pytest.mark.parametrize("flags,constrained", [([], True), (["--no-jpeg-constraint"], False),
                                               (["--no-keep-colour"], True)])
def test_jpeg_inputs_are_constrained_unless_asked_not_to(engine, tmp_path, flags, constrained):
    Image.fromarray(rgb(16, 24)).save(tmp_path / "a.jpg", quality=30)
    Image.fromarray(rgb(16, 24)).save(tmp_path / "b.png")
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.jpg"),
                                    str(tmp_path / "b.png"), "--report", "-o",
                                    str(tmp_path / "o"), *flags])
    a, b = [json.loads(l) for l in res.output.splitlines() if l.startswith("{")]
    assert res.exit_code == 0 and a["jpeg_constraint"] is constrained
    assert b["jpeg_constraint"] is False  # a PNG has no tables to be consistent with


def test_a_failed_write_leaves_nothing_behind(engine, tmp_path, monkeypatch):
    Image.fromarray(rgb(8, 8)).save(tmp_path / "a.png")

    def broken(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    res = CliRunner().invoke(main, ["--engine", str(engine), str(tmp_path / "a.png"), "-o",
                                    str(tmp_path / "o")])
    assert res.exit_code == 1 and "disk full" in res.output
    assert list((tmp_path / "o").iterdir()) == []


def test_runtime_works_with_torch_unimportable(engine, tmp_path):
    Image.fromarray(rgb(20, 30)).save(tmp_path / "a.png")
    code = BLOCK_TORCH + f"""
import sys
import numpy as np
from runtime import Restorer
from runtime.cli import main
with Restorer({str(engine)!r}) as r:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    assert np.array_equal(r.restore(a), a)
try:
    main(['--engine', {str(engine)!r}, {str(tmp_path / 'a.png')!r}])
except SystemExit as e:
    assert e.code in (0, None), e.code
assert not any(m.split('.')[0] in ('torch', 'sodiff', 'export') for m in sys.modules)
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
    assert (tmp_path / "a_sodiff.png").exists()
