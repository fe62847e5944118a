"""Data shorter than its header declares, in the formats Pillow decodes without noticing (issue
15, item 7): uncompressed TIFF strips that cover too few rows or lie past the file's end, and
GIF frames too large for their LZW data or far smaller than their screen. Every image Pillow
writes in those formats still decodes."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from runtime import datacheck
from runtime.errors import ImageError
from runtime.imageio import decode_image

TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits")
SHAPES = ((1, 1), (1, 700), (700, 1), (37, 53), (300, 300))


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _set_tag(data: bytes, tag: int, value: int) -> bytes:
    """The little-endian TIFF with the first value of `tag` in its first IFD set to `value`
    (the value or, for several, the first of the array it points to)."""
    d = bytearray(data)
    ifd = struct.unpack("<I", d[4:8])[0]
    for i in range(struct.unpack("<H", d[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * i
        t, typ, count = struct.unpack("<HHI", d[e:e + 8])
        if t == tag:
            fmt = "<I" if typ == 4 else "<H"
            inline = count * struct.calcsize(fmt) <= 4
            at = e + 8 if inline else struct.unpack("<I", d[e + 8:e + 12])[0]
            d[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
            return bytes(d)
    raise KeyError(tag)


# -- TIFF ----------------------------------------------------------------------------------------
def test_raw_tiff_taller_than_its_strips_is_refused():
    """The fuzzer's 6,860-byte file that Pillow decodes as 56x294440, all but 40 rows black."""
    data = _set_tag(_saved(Image.fromarray(_rgb(40, 56)), "TIFF"), 257, 294_440)
    with pytest.raises(ImageError, match=r"^t\.tif: truncated TIFF: it has 1 of the 7,361 strips "
                                         r"the 56x294440 pixels its header declares need$"):
        decode_image(data, "t.tif")


def test_raw_tiff_whose_strips_hold_fewer_bytes_than_its_rows_is_refused():
    """Pillow's raw decoder reads on past a strip's declared bytes; libtiff, which decodes the
    compressed ones, calls that not enough data."""
    data = _set_tag(_saved(Image.fromarray(_rgb(40, 56)), "TIFF"), 279, 100)
    with pytest.raises(ImageError, match=r"^t\.tif: truncated TIFF: 100 of the 6,720 bytes of "
                                         r"pixels its header declares$"):
        decode_image(data, "t.tif")


@pytest.mark.parametrize("compression", TIFF_COMPRESSIONS)
def test_tiff_strip_past_the_end_of_the_file_is_refused(compression):
    data = _saved(Image.fromarray(_rgb(40, 56)), "TIFF", compression=compression)
    longer = _set_tag(data, 279, 10 ** 6)  # StripByteCounts: a strip past the end
    with pytest.raises(ImageError, match=r"^t\.tif: truncated "):
        decode_image(longer, "t.tif")


@pytest.mark.parametrize("compression", TIFF_COMPRESSIONS)
def test_tiffs_pillow_writes_still_decode(compression):
    for h, w in SHAPES:
        a = _rgb(h, w)
        for im, want in ((Image.fromarray(a), a), (Image.fromarray(a[..., 0]), a[..., 0]),
                         (Image.fromarray(np.dstack([a, a[..., :1]])), None),
                         (Image.fromarray(a[..., 0] > 127), None)):
            got = decode_image(_saved(im, "TIFF", compression=compression), "ok.tif").array
            assert got.shape[:2] == (h, w)
            if want is not None:
                assert np.array_equal(got, want)
    a16 = np.random.default_rng(1).integers(0, 65536, (9, 11), dtype=np.uint16)
    got = decode_image(_saved(Image.fromarray(a16), "TIFF", compression=compression), "16.tif")
    assert np.array_equal(got.array, a16)


# -- GIF -----------------------------------------------------------------------------------------
def _gif_screen(data: bytes, width: int, height: int) -> bytes:
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def test_gif_screen_far_larger_than_its_first_frame_is_refused():
    """The fuzzer's 3,702-byte GIFs whose logical screen was enlarged decoded as 45728x40."""
    data = _saved(Image.fromarray(_rgb(40, 56)).convert("P"), "GIF")
    with pytest.raises(ImageError, match=r"^g\.gif: truncated GIF: its first frame covers 56x40 "
                                         r"of the 45728x40 screen its header declares"):
        decode_image(_gif_screen(data, 45_728, 40), "g.gif")
    with pytest.raises(ImageError, match="56x40 of the 56x27773 screen"):
        decode_image(_gif_screen(data, 56, 27_773), "g.gif")
    no_table = bytearray(_gif_screen(data, 56, 55_848))
    no_table[10] &= 0x7F  # no global colour table flag: Pillow skips the table's bytes as junk
    with pytest.raises(ImageError, match="56x40 of the 56x55848 screen"):
        decode_image(bytes(no_table), "g.gif")
    assert decode_image(_gif_screen(data, 112, 80), "g.gif").array.shape == (80, 112, 3)


def _gif_frame(width: int, height: int, lzw: bytes, min_code: int = 8) -> bytes:
    """A GIF without colour tables: a width x height frame on a screen of its size, with `lzw`
    as its image data."""
    blocks = b"".join(bytes([len(lzw[i:i + 255])]) + lzw[i:i + 255]
                      for i in range(0, len(lzw), 255))
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b","
            + struct.pack("<HHHHB", 0, 0, width, height, 0) + bytes([min_code]) + blocks
            + b"\0;")


def test_gif_frame_larger_than_its_lzw_data_can_hold_is_refused():
    small = _gif_frame(4000, 4000, b"\x55" * 100)  # 100 bytes: at most 88 codes, 3,916 pixels
    assert datacheck.lzw_max_pixels(100, 8) == 88 * 89 // 2
    assert datacheck.gif_shortfall(io.BytesIO(small), 4000, 4000) == (
        "its first frame declares 4000x4000 pixels, and its 100 bytes of LZW data hold at "
        "most 3,916")
    with pytest.raises(ImageError, match=r"^f\.gif: truncated"):
        decode_image(small, "f.gif")


def test_lzw_bound_holds_for_the_most_compressible_gifs():
    """One colour is LZW's best case (each code one pixel longer than the last): the bound
    must still be above what Pillow's encoder achieves, at every size."""
    for h, w in ((1, 1), (1, 5000), (5000, 1), (2000, 2000), (64, 65_535)):
        data = _saved(Image.new("P", (w, h), 3), "GIF")
        fw, fh, min_code, lzw = datacheck._first_frame(io.BytesIO(data))
        assert (fw, fh) == (w, h)
        assert w * h <= datacheck.lzw_max_pixels(lzw, min_code)
        assert decode_image(data, "flat.gif").array.shape == (h, w, 3)


def test_gifs_pillow_writes_still_decode():
    for h, w in SHAPES:
        a = _rgb(h, w)
        for im in (Image.fromarray(a).convert("P"), Image.fromarray(a[..., 0]),
                   Image.fromarray(a[..., 0] > 127)):
            got = decode_image(_saved(im, "GIF"), "ok.gif").array
            assert got.shape[:2] == (h, w)
        frames = [Image.fromarray(_rgb(h, w, s)).convert("P") for s in range(3)]
        data = _saved(frames[0], "GIF", save_all=True, append_images=frames[1:],
                      optimize=True)
        assert decode_image(data, "anim.gif").array.shape[:2] == (h, w)
