"""Images a hostile run found (issue 15, items 7-12 and 14): truncated data, decoder noise,
folder scans, neutral grey photos stored as RGB, outputs their format cannot hold, and write
errors that name the output."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, TiffImagePlugin

from fixtures.runtime_engines import identity_engine
from runtime import Restorer
from runtime.batch import BatchOptions, Job, collect_inputs, process
from runtime.cli import main
from runtime.errors import ImageError
from runtime.imageio import decode_image, read_image, readable_suffixes, write_image


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return identity_engine(tmp_path_factory.mktemp("images") / "engine")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def short_png(width: int, height: int, rows: int, interlace: int = 0) -> bytes:
    """A grey PNG whose header declares `height` rows but whose (complete) zlib stream holds
    `rows` of them."""
    raw = b"".join(b"\0" + bytes([100]) * width for _ in range(rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _png(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **kw)
    return buf.getvalue()


# -- item 7: truncated data --------------------------------------------------------------------
def test_png_with_fewer_rows_than_its_header_is_refused(tmp_path):
    data = short_png(64, 1_048_576, 10)  # a few KB that Pillow decodes as 64 Mpx of black
    with pytest.raises(ImageError, match=r"x\.png: truncated PNG: its data holds 650 of"):
        decode_image(data, "x.png")
    path = tmp_path / "short.png"
    path.write_bytes(short_png(40, 50, 49))  # one row short
    with pytest.raises(ImageError, match="truncated PNG"):
        read_image(path)


@pytest.mark.parametrize("interlace", [0, 1])
def test_complete_pngs_still_decode(interlace):
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 13), (33, 64, 3), (5, 9, 4)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        got = decode_image(_png(a, optimize=True) if not interlace else
                           _interlaced(a), "ok.png").array
        assert np.array_equal(got, a)
    a16 = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    assert np.array_equal(decode_image(_png(a16), "16.png").array, a16)


def _interlaced(a: np.ndarray) -> bytes:
    """An Adam7 PNG of a grey/RGB/RGBA uint8 array, built by hand (Pillow writes none)."""
    h, w = a.shape[:2]
    ch = 1 if a.ndim == 2 else a.shape[2]
    x = a.reshape(h, w, ch)
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = x[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    colour = {1: 0, 3: 2, 4: 6}[ch]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_interlaced_png_missing_its_last_pass_is_refused():
    data = _interlaced(np.full((16, 16), 7, np.uint8))
    full = zlib.decompress(data[33 + 8:data.index(b"IEND") - 8])
    cut = (b"\x89PNG\r\n\x1a\n" + data[8:33] + _chunk(b"IDAT", zlib.compress(full[:-17]))
           + _chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_image(cut, "i.png")


def test_corrupt_tiff_is_named_by_libtiffs_own_words_and_stderr_stays_quiet(capfd):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    offset = TiffImagePlugin.TiffImageFile(io.BytesIO(bytes(data))).tag_v2[273][0]
    data[offset + 40:offset + 4000] = b"\0" * 3960  # garbage inside the LZW strip
    capfd.readouterr()
    with pytest.raises(ImageError, match=r"t\.tif: truncated or corrupt TIFF data \(libtiff: "
                                         r"LZWDecode: "):
        decode_image(bytes(data), "t.tif")
    assert capfd.readouterr().err == ""  # libtiff's C-level message was caught, not printed


def _sof_width(data: bytes, width: int) -> bytes:
    """The JPEG with its SOF0 width field set to `width`."""
    i = data.index(b"\xff\xc0")
    return data[:i + 7] + struct.pack(">H", width) + data[i + 9:]


def test_jpeg_data_too_short_for_its_declared_size_is_refused():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=40)
    wide = _sof_width(buf.getvalue(), 39224)
    im = Image.open(io.BytesIO(wide))
    im.load()  # what libjpeg does alone: pads 1.5 Mpx from a few KB, no error
    assert im.size == (39224, 40)
    with pytest.raises(ImageError, match=r"j\.jpg: truncated JPEG: .* bytes cannot hold the "
                                         r"39224x40 pixels"):
        decode_image(wide, "j.jpg")
    for optimize in (False, True):  # flat images compress to little but stay above the floor
        buf = io.BytesIO()
        Image.fromarray(np.full((1024, 2048, 3), 128, np.uint8)).save(
            buf, "JPEG", quality=5, optimize=optimize, progressive=optimize)
        assert decode_image(buf.getvalue(), "flat.jpg").array.shape == (1024, 2048, 3)


# -- item 9: decoder noise ---------------------------------------------------------------------
def _tiff_with_bad_tag() -> bytes:
    """A TIFF that decodes fine, with a tag whose data lies past the end of the file (Pillow
    warns) and an unknown tag (libtiff warns)."""
    buf = io.BytesIO()
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[65000] = "unknown private tag"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "TIFF", tiffinfo=info,
                                                             compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd:ifd + 2])[0]
    for i in range(count):  # point the unknown tag's data far past the end
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 65000:
            data[entry + 8:entry + 12] = struct.pack("<I", 10 ** 8)
    return bytes(data)


def test_decoder_warnings_are_caught_and_reported_once(engine, tmp_path, capfd):
    data = _tiff_with_bad_tag()
    img = decode_image(data, "w.tif")
    assert img.warnings and img.array.shape == (16, 16, 3)
    assert "UserWarning" in img.warnings[0] or "libtiff" in img.warnings[0]
    src = tmp_path / "w.tif"
    src.write_bytes(data)
    capfd.readouterr()
    res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o",
                                    str(tmp_path / "out.png"), "--report"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.splitlines()[-1])
    assert line["ok"] and line["warnings"] == list(img.warnings)
    said = [x for x in res.stderr.splitlines() if "w.tif" in x]
    assert len(said) == 1 and said[0].startswith("warning: ")
    leaked = capfd.readouterr()  # nothing written around Python's streams either
    assert "Warning" not in leaked.err and "TiffImagePlugin" not in leaked.err


def test_pillows_own_log_messages_stay_off_stderr():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 277:  # SamplesPerPixel
            data[entry + 8:entry + 10] = struct.pack("<H", 52736)
    with pytest.raises(ImageError, match="s.tif: "):
        decode_image(bytes(data), "s.tif")
    # Without pytest's log capture, as sodiff-run runs: Pillow's logger.error went to stderr.
    code = ("import sys; from runtime.imageio import decode_image\n"
            "try: decode_image(sys.stdin.buffer.read(), 's.tif')\n"
            "except ValueError as e: print(e)")
    res = subprocess.run([sys.executable, "-c", code], input=bytes(data), capture_output=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.startswith(b"s.tif: ") and res.stderr == b"", res.stderr


# -- item 10: folder scans ---------------------------------------------------------------------
def test_folder_scan_takes_every_readable_format_and_counts_the_rest(engine, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(a).save(src / "a.gif")
    Image.fromarray(a).save(src / "b.tga")
    Image.fromarray(a).save(src / "c.png")
    (src / "notes.txt").write_text("not an image")
    (src / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    assert {".gif", ".tga", ".ppm", ".ico", ".jpg", ".tif"} <= readable_suffixes()
    assert not {".h5", ".txt", ".mpg"} & readable_suffixes()
    skipped = []
    found, _ = collect_inputs([str(src)], skipped)
    assert sorted(f.name for f, _ in found) == ["a.gif", "b.tga", "c.png"]
    assert sorted(f.name for f in skipped) == ["data.h5", "notes.txt"]
    res = CliRunner().invoke(main, ["--engine", str(engine), str(src), "-o",
                                    str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "3 restored, 0 failed, 2 skipped (not images)" in res.stderr
    assert (tmp_path / "out" / "a.png").is_file()


# -- item 11: neutral grey stored as RGB -------------------------------------------------------
def _tinted_engine(root: Path) -> Path:
    """The identity engine with a decoder that tints: +0.1 on red, -0.1 on blue, so colour
    restored from a grey photo shows."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    engine = identity_engine(root)
    path = engine / "vae_decoder.onnx"
    model = onnx.load(str(path))
    tint = numpy_helper.from_array(np.array([0.1, 0.0, -0.1], np.float32).reshape(1, 3, 1, 1),
                                   "tint")
    g = model.graph
    del g.node[:]
    g.node.extend([helper.make_node("Add", ["clean_latent", "tint"], ["image"])])
    g.initializer.extend([tint])
    onnx.save(model, str(path))
    data = json.loads((engine / "manifest.json").read_text())
    data["components"]["vae_decoder"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                             bytes=path.stat().st_size)
    (engine / "manifest.json").write_text(json.dumps(data))
    return engine


def test_neutral_rgb_is_restored_as_grey_and_written_neutral(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)
    neutral = np.repeat(grey[..., None], 3, axis=2)
    with Restorer(_tinted_engine(tmp_path / "tinted")) as r:
        out, info = r.restore_info(neutral)
        assert out.shape == neutral.shape and out.dtype == np.uint8
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1],
                                                                            out[..., 2])
        assert np.array_equal(out[..., 0], r.restore(grey)) and info["neutral"]
        coloured = neutral.copy()
        coloured[0, 0, 2] ^= 1  # one pixel off grey: a colour image, restored as colour
        out, info = r.restore_info(coloured)
        assert not info["neutral"] and (out[..., 0] != out[..., 2]).any()
        rgba = np.dstack([neutral, np.full(grey.shape, 200, np.uint8)])
        out = r.restore(rgba)
        assert np.array_equal(out[..., 3], rgba[..., 3])
        assert np.array_equal(out[..., 0], out[..., 2])


# -- item 12: outputs too large for their format -----------------------------------------------
class _Refusing:
    """A restorer that must never be called."""

    def restore_info(self, *a, **k):
        raise AssertionError("restored although the output cannot be written")


def test_output_too_large_for_jpeg_is_refused_before_restoring(tmp_path):
    src = tmp_path / "long.png"
    Image.fromarray(np.zeros((1, 70_000), np.uint8)).save(src)
    job = Job(src, tmp_path / "long.jpg")
    with pytest.raises(ImageError, match=r"long\.jpg: a 70000x1 image is too large for JPEG "
                                         r"\(at most 65,535 px a side\); write \.png"):
        process(_Refusing(), job, BatchOptions())
    with pytest.raises(ImageError, match="too large for WEBP"):
        process(_Refusing(), Job(src, tmp_path / "long.webp"), BatchOptions())
    assert not list(tmp_path.glob("long.jpg*")) and not list(tmp_path.glob(".long*"))


# -- item 14: write errors name the output -----------------------------------------------------
def test_parent_that_is_a_file_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "sub" / "x.png"
    with pytest.raises(ImageError, match=f"{target}: cannot create it, {blocker} is not a "
                                         f"folder"):
        write_image(target, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="is not a folder"):
        process(_Refusing(), Job(tmp_path / "missing.png", target), BatchOptions())
    if Path("/dev/full").exists():
        with pytest.raises(ImageError, match="/dev/full is not a folder"):
            write_image("/dev/full/x.png", np.zeros((4, 4, 3), np.uint8))


def test_unwritable_folder_names_the_output_not_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, dir=None, **k):  # what a read-only folder does (root ignores chmod)
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".x.png.1.ab.tmp"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = tmp_path / "x.png"
    with pytest.raises(ImageError) as e:
        write_image(target, np.zeros((4, 4, 3), np.uint8))
    assert str(e.value) == f"{target}: cannot write it (Permission denied in {tmp_path})"
    if os.geteuid() != 0:
        monkeypatch.undo()
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ImageError, match=r"ro/y\.png: cannot write it \(Permission denied"):
            write_image(ro / "y.png", np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_the_umask_gives_new_files(tmp_path, umask, mode):
    """Not the temporary file's 0600: a web server or another user must read the output as
    they would any file the user makes (issue 29)."""
    old = os.umask(umask)
    try:
        write_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
        (tmp_path / "plain").write_bytes(b"")  # what open() makes under this umask
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain").stat().st_mode & 0o777 == mode
