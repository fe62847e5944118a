"""Fuzz the runtime's image intake: mutated image files through decode and preprocess,
in-process, from a fixed seed (issue 15's acceptance run; not part of the test suite).

    python benchmarks/fuzz_images.py                    # 100,000 inputs, seed 0
    python benchmarks/fuzz_images.py --count 2000 --seed 3

Seeds are small images Pillow writes in every format and mode the runtime reads (PNG, JPEG,
GIF, BMP, TIFF with several compressions, WebP, TGA, PPM, ICO); each input is one seed with a
mutation: bit flips, byte overwrites, truncation, a repeated or removed span, junk appended,
or a header size field (PNG IHDR with its CRC fixed, else a random early offset) set to a
large value. Each goes through `runtime.imageio.decode_image` and the Restorer's preprocessing
(alpha split, neutral-grey test, float rows, SAIPE's resize to 512x512, the first tile block).
Expected failures are the runtime's one-line errors (ImageError, ValueError); anything else is
counted as unexpected. Per input: wall time (over 5 s counted; 60 s stops it) and peak RSS
(VmHWM, reset before each input; over 1 GiB counted). Writes benchmarks/results/fuzz-images.json.
"""
from __future__ import annotations

import io
import json
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import click
import numpy as np

from runtime.cliopts import CONTEXT_SETTINGS, version_option

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fuzz-images.json"
SLOW_S, STOP_S = 5.0, 60       # an input over SLOW_S is counted; one over STOP_S is stopped
RSS_LIMIT_MB = 1024            # an input whose peak RSS passes this is counted
SAIPE_SIDE = 512               # the bundled model's SAIPE input side
TILE = (128, 128)              # the first tile block read, like a 128 px engine's


class _Timeout(Exception):
    pass


def seeds() -> list[tuple[str, bytes]]:
    """(name, bytes) of small images in the formats and modes the runtime reads."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    grey, rgba = base[..., 0], np.dstack([base, base[..., 1]])
    out = []

    def add(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append((name, buf.getvalue()))
    rgb_im, grey_im = Image.fromarray(base), Image.fromarray(grey)
    add("rgb.png", rgb_im, "PNG")
    add("grey.png", grey_im, "PNG")
    add("rgba.png", Image.fromarray(rgba), "PNG")
    add("pal.png", rgb_im.convert("P"), "PNG")
    add("g16.png", Image.fromarray((grey.astype(np.uint16) * 257)), "PNG")
    add("rgb.jpg", rgb_im, "JPEG", quality=40)
    add("prog.jpg", rgb_im, "JPEG", quality=70, progressive=True)
    add("grey.jpg", grey_im, "JPEG", quality=30)
    add("cmyk.jpg", rgb_im.convert("CMYK"), "JPEG")
    add("a.gif", rgb_im.convert("P"), "GIF")
    add("a.bmp", rgb_im, "BMP")
    for comp in ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg"):
        add(f"{comp}.tif", rgb_im, "TIFF", compression=comp)
    add("a.webp", rgb_im, "WEBP", quality=50)
    add("a.tga", rgb_im, "TGA")
    add("a.ppm", rgb_im, "PPM")
    add("a.ico", rgb_im, "ICO")
    return out


def _png_size(data: bytearray, rng) -> bytearray:
    """A PNG whose IHDR width or height is set large, its CRC fixed."""
    if data[12:16] != b"IHDR":
        return data
    field = 16 + 4 * int(rng.integers(0, 2))
    data[field:field + 4] = struct.pack(">I", int(rng.choice([1 << 16, 1 << 20, 1 << 24,
                                                              2 ** 31 - 1, 0])))
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return data


def mutate(data: bytes, rng) -> bytes:
    d = bytearray(data)
    kind = int(rng.integers(0, 7))
    n = len(d)
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, n))
            d[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # byte overwrites
        for _ in range(int(rng.integers(1, 17))):
            d[int(rng.integers(0, n))] = int(rng.integers(0, 256))
    elif kind == 2:  # truncation
        d = d[:int(rng.integers(0, n))]
    elif kind == 3:  # a span repeated
        a = int(rng.integers(0, n))
        b = min(n, a + int(rng.integers(1, 512)))
        d = d[:b] + d[a:b] * int(rng.integers(1, 8)) + d[b:]
    elif kind == 4:  # a span removed
        a = int(rng.integers(0, n))
        d = d[:a] + d[min(n, a + int(rng.integers(1, 256))):]
    elif kind == 5:  # junk appended
        d += rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    else:  # a size field set large
        if d[:8] == b"\x89PNG\r\n\x1a\n":
            d = _png_size(d, rng)
        else:
            i = int(rng.integers(0, min(n, 64)))
            d[i:i + 2] = struct.pack(">H", int(rng.integers(1 << 14, 1 << 16)))
    return bytes(d)


def preprocess(array: np.ndarray) -> None:
    """What the Restorer does with a decoded array before any engine runs."""
    from runtime.tiles import is_neutral, split_alpha
    from runtime.resize import resize_rows
    from runtime.tiles import Source

    colour, _ = split_alpha(array)
    src = Source(colour[..., 0] if is_neutral(colour) else colour)
    resize_rows(src.rows, src.h, src.w, (SAIPE_SIDE, SAIPE_SIDE))
    src.block(0, 0, *TILE)


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _alarm(signum, frame):
    raise _Timeout


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--count", default=100_000, show_default=True, help="Mutated inputs to run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=OUT, show_default=True)
def main(count, seed, out):
    """Fuzz decode + preprocess; print and write the counts."""
    from runtime.errors import ImageError
    from runtime.imageio import decode_image

    signal.signal(signal.SIGALRM, _alarm)
    rng = np.random.default_rng(seed)
    corpus = seeds()
    outcomes, unexpected, slow, heavy = Counter(), Counter(), [], []
    big_from_small, slowest = [], (0.0, None)
    start = time.perf_counter()
    for k in range(count):
        name, data = corpus[k % len(corpus)]
        x = mutate(data, rng)
        _reset_hwm()
        t = time.perf_counter()
        signal.alarm(STOP_S)
        try:
            img = decode_image(x, name)
            preprocess(img.array)
            outcomes["decoded"] += 1
            if len(x) <= 12_000 and img.array.shape[0] * img.array.shape[1] > 1 << 20:
                big_from_small.append({"input": k, "seed": name, "bytes": len(x),
                                       "size": list(img.array.shape[:2]), "format": img.format})
        except _Timeout:
            outcomes["stopped at 60 s"] += 1
        except (ImageError, ValueError) as e:
            outcomes[type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001 - what this run is looking for
            unexpected[f"{type(e).__name__}: {str(e)[:80]}"] += 1
        finally:
            signal.alarm(0)
        dt, mb = time.perf_counter() - t, _hwm_mb()
        if dt > slowest[0]:
            slowest = (dt, f"#{k} {name}")
        if dt > SLOW_S:
            slow.append({"input": k, "seed": name, "seconds": round(dt, 1)})
        if mb > RSS_LIMIT_MB:
            heavy.append({"input": k, "seed": name, "peak_rss_mb": round(mb)})
        if (k + 1) % 10_000 == 0:
            click.echo(f"{k + 1} inputs, {time.perf_counter() - start:.0f} s, "
                       f"{sum(unexpected.values())} unexpected", err=True)
    result = {
        "what": "mutated images through runtime.imageio.decode_image and the Restorer's "
                "preprocessing, in-process (benchmarks/fuzz_images.py)",
        "inputs": count, "seed": seed, "seeds": [n for n, _ in corpus],
        "seconds": round(time.perf_counter() - start, 1),
        "outcomes": dict(outcomes),
        "unexpected_exceptions": sum(unexpected.values()), "unexpected": dict(unexpected),
        "over_5_s": len(slow), "slow": slow[:20],
        "over_1_gib_peak_rss": len(heavy), "heavy": heavy[:20],
        "slowest_s": round(slowest[0], 3), "slowest_input": slowest[1],
        "decoded_over_1_mpx_from_12_kb_or_less": len(big_from_small),
        "big_from_small": big_from_small[:20],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps({k: result[k] for k in ("inputs", "seconds", "outcomes",
                                                  "unexpected_exceptions", "over_5_s",
                                                  "over_1_gib_peak_rss", "slowest_s",
                                                  "decoded_over_1_mpx_from_12_kb_or_less")}))
    sys.exit(1 if unexpected or slow or heavy else 0)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    main()
