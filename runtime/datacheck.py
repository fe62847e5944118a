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
