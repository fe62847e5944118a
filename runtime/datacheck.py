"""Whether a file's image data can hold what its header declares. Pillow decodes a PNG whose
complete zlib stream ends early without an error, leaving the missing rows black, and libjpeg
pads a JPEG whose data ends early with grey (a warning Pillow does not pass on): a few KB can
pass for a 1,048,576-row image."""
from __future__ import annotations

import zlib

INFLATE_PIECE = 1 << 20          # most inflated bytes held at once while counting
READ_PIECE = 1 << 16             # compressed bytes read at a time

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))                          # (x0, y0, dx, dy) of the interlace passes


def _png_raw_bytes(w: int, h: int, depth: int, colour: int, interlace: int) -> int:
    """Bytes of the filtered scanlines a PNG header declares (one filter byte a row)."""
    bits = _PNG_CHANNELS.get(colour, 4) * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if pw > 0 and ph > 0:
            total += ph * (1 + -(-pw * bits // 8))
    return total


def png_shortfall(f) -> str | None:
    """None when the first image's IDAT stream inflates to every byte its header declares,
    else what is missing, in words. Streams: memory does not grow with the image."""
    f.seek(8)  # after the signature, which Pillow has checked
    expected, got, inflate = None, 0, zlib.decompressobj()
    while True:
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"IHDR":
            data = f.read(length)
            w, h = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
            expected = _png_raw_bytes(w, h, data[8], data[9], data[12])
        elif kind == b"IDAT":
            for start in range(0, length, READ_PIECE):
                got += _inflated(inflate, f.read(min(READ_PIECE, length - start)))
                if expected is not None and got >= expected:
                    return None
        elif got or kind == b"IEND":
            break  # the IDAT chunks are consecutive: the stream is over
        else:
            f.seek(length, 1)
        f.seek(4, 1)  # CRC
    if expected is None or got >= expected:
        return None
    return f"{got:,} of the {expected:,} bytes of rows its header declares"


def _inflated(inflate, data: bytes) -> int:
    """Bytes `data` adds to the inflated stream, counted a bounded piece at a time."""
    n, piece = 0, INFLATE_PIECE
    try:
        while not inflate.eof:
            out = inflate.decompress(data, piece)
            n, data = n + len(out), inflate.unconsumed_tail
            if not data and len(out) < piece:  # input used up and no output pending
                break
    except zlib.error:
        pass  # corrupt data: what Pillow decoded stands, the count stays short
    return n


# JPEG: every 8x8 block of the first component costs at least one bit in any Huffman-coded
# scan (baseline: a DC code and an end-of-block code; progressive: the DC scan's code), so
# fewer bytes than blocks / 8 cannot hold the image. Arithmetic coding has no such floor.
_SOF_ARITHMETIC = frozenset(range(0xC9, 0xD0)) - {0xCC}
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_shortfall(f, size: int, width: int, height: int) -> str | None:
    """None when a Huffman-coded JPEG of `size` bytes can hold width x height, else why not."""
    if _coding(f) != "huffman":
        return None
    blocks = -(-width // 8) * -(-height // 8)
    if size * 8 >= blocks:
        return None
    return (f"{size:,} bytes cannot hold the {width}x{height} pixels its header declares "
            f"(at least {-(-blocks // 8):,})")


def _coding(f) -> str | None:
    """"huffman" or "arithmetic" from the first SOF marker; None when it cannot be found."""
    f.seek(2)
    while True:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker, length = head[1], int.from_bytes(head[2:4], "big")
        if marker in _SOF_ALL:
            return "arithmetic" if marker in _SOF_ARITHMETIC else "huffman"
        if marker == 0xDA or length < 2:
            return None
        f.seek(length - 2, 1)


# -- TIFF --------------------------------------------------------------------------------------
# Pillow decodes an uncompressed TIFF's strips itself and leaves rows no strip covers black, so a
# raw TIFF whose height was enlarged passes for a huge image; libtiff (the compressed ones)
# reports its own short strips. Checked from the first IFD's tags, as Pillow read them.
_STRIPS = (273, 279)             # StripOffsets, StripByteCounts
_TILES = (324, 325)              # TileOffsets, TileByteCounts
_UNCOMPRESSED, _YCBCR = 1, 6     # Compression and PhotometricInterpretation values


def tiff_shortfall(tags, size: int, width: int, height: int) -> str | None:
    """None when the first image's strips (or tiles) lie inside the `size`-byte file, cover
    width x height, and, uncompressed, hold every byte of it; else what is wrong, in words.
    `tags`: Pillow's `tag_v2` of the first frame."""
    tiled = _TILES[0] in tags
    offsets, counts = (tuple(tags.get(t) or ()) for t in (_TILES if tiled else _STRIPS))
    if not offsets:
        return None  # nothing to locate: Pillow or libtiff has refused it already
    past = [o + c for o, c in zip(offsets, counts) if c and o + c > size]
    if past:
        return (f"its data runs to byte {max(past):,} of a {size:,}-byte file "
                f"({len(past)} of {len(offsets)} {'tiles' if tiled else 'strips'})")
    units, cell, bits_px, planes = _tiff_layout(tags, width, height, tiled)
    if len(offsets) < units:
        return (f"it has {len(offsets)} of the {units:,} {'tiles' if tiled else 'strips'} "
                f"the {width}x{height} pixels its header declares need")
    if tags.get(259, _UNCOMPRESSED) != _UNCOMPRESSED or tags.get(262) == _YCBCR:
        return None  # compressed: libtiff checks the data; YCbCr may be subsampled
    need = _raw_bytes(cell, bits_px, width, height, tiled) * planes
    if len(counts) == len(offsets) and sum(counts) < need:
        return f"{sum(counts):,} of the {need:,} bytes of pixels its header declares"
    return None


def _tiff_layout(tags, width: int, height: int, tiled: bool):
    """(strips or tiles needed, (tile width, rows per strip or tile), bits per pixel of a
    plane, planes) of a TIFF's first image."""
    spp = int(tags.get(277, 1) or 1)
    bps = tuple(tags.get(258) or (1,))
    if len(bps) < spp:
        bps = bps[:1] * spp
    planes = spp if tags.get(284, 1) == 2 else 1  # PlanarConfiguration 2: a plane per sample
    bits_px = bps[0] if planes > 1 else sum(bps[:spp])
    if tiled:
        tw, tl = int(tags.get(322) or width), int(tags.get(323) or height)
        units = -(-width // max(tw, 1)) * -(-height // max(tl, 1))
        return units * planes, (tw, tl), bits_px, planes
    rows = min(int(tags.get(278) or height), height) or 1  # RowsPerStrip; default: all rows
    return -(-height // rows) * planes, (width, rows), bits_px, planes


def _raw_bytes(cell, bits_px: int, width: int, height: int, tiled: bool) -> int:
    """Bytes of one plane of an uncompressed image: whole tiles, or rows (padded to a byte)."""
    tw, tl = cell
    if tiled:
        return -(-width // tw) * -(-height // tl) * tl * -(-tw * bits_px // 8)
    return height * -(-width * bits_px // 8)


# -- GIF ---------------------------------------------------------------------------------------
# An LZW code emits one string of the code table: after a clear code the table holds only
# single pixels, and each code adds one entry one pixel longer than a string already there, so
# the k-th code since the last clear emits at most k pixels, and no string is longer than the
# table has entries (LZW_TABLE). Every code is at least min_code_size + 1 bits wide. So D bytes
# of LZW data hold at most C = 8 D // (min_code_size + 1) codes, and at most
# sum_{k=1..C} min(k, LZW_TABLE) pixels: a clear code restarts k, which only lowers the sum.
# That bound is reached by nothing real (one colour compresses about as well), so no valid GIF
# is refused; a frame larger than it cannot be what its data holds.
LZW_TABLE = 4096                 # entries of GIF's LZW table (12-bit codes)
GIF_SCREEN_PER_FRAME = 64        # most screen pixels per pixel of the first frame: Pillow fills
#                                  the rest with background, and every encoder (Pillow's too)
#                                  writes a first frame that covers the screen


def lzw_max_pixels(data_bytes: int, min_code_size: int) -> int:
    """The most pixels `data_bytes` of GIF LZW data can decode to (see above)."""
    codes = 8 * data_bytes // (min_code_size + 1)
    ramp = min(codes, LZW_TABLE)
    return ramp * (ramp + 1) // 2 + (codes - ramp) * LZW_TABLE


def gif_shortfall(f, width: int, height: int) -> str | None:
    """None when the first frame's LZW data can hold the frame and the frame covers enough of
    the width x height image Pillow made of it (the logical screen); else why not."""
    frame = _first_frame(f)
    if frame is None:
        return None  # not found: Pillow decoded something else; nothing to compare
    fw, fh, min_code, data = frame
    most = lzw_max_pixels(data, min_code)
    if fw * fh > most:
        return (f"its first frame declares {fw}x{fh} pixels, and its {data:,} bytes of LZW "
                f"data hold at most {most:,}")
    if width * height > GIF_SCREEN_PER_FRAME * max(fw * fh, 1):
        return (f"its first frame covers {fw}x{fh} of the {width}x{height} screen its header "
                f"declares; the rest would be background")
    return None


def _first_frame(f) -> tuple[int, int, int, int] | None:
    """(width, height, LZW minimum code size, LZW data bytes) of a GIF's first image."""
    f.seek(10)
    flags = f.read(3)[:1]
    if not flags:
        return None
    if flags[0] & 0x80:
        f.seek(3 << ((flags[0] & 7) + 1), 1)  # global colour table
    while True:
        kind = f.read(1)
        if kind == b"!":  # extension: its label, then sub-blocks
            f.seek(1, 1)
            _sub_blocks(f)
        elif kind == b",":
            desc = f.read(9)
            if len(desc) < 9:
                return None
            fw, fh = int.from_bytes(desc[4:6], "little"), int.from_bytes(desc[6:8], "little")
            if desc[8] & 0x80:
                f.seek(3 << ((desc[8] & 7) + 1), 1)  # local colour table
            code = f.read(1)
            return (fw, fh, code[0], _sub_blocks(f)) if code else None
        elif kind in (b"", b";"):
            return None  # the end, or the trailer: no frame
        # else junk between blocks: Pillow skips it a byte at a time, and so does this


def _sub_blocks(f) -> int:
    """Skip a run of GIF sub-blocks; the data bytes they hold (those present in the file)."""
    total = 0
    while True:
        n = f.read(1)
        if not n or n[0] == 0:
            return total
        got = len(f.read(n[0]))
        total += got
        if got < n[0]:
            return total
