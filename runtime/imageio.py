"""Reading and writing the image files real users have, with one clear error line per problem.

Read: EXIF orientation applied; greyscale (8/16-bit), palette, grey+alpha, RGBA (alpha kept
apart and passed through), CMYK (to sRGB through its ICC profile when it has one) and 16-bit
inputs; the ICC profile and EXIF (orientation reset) are kept for the output; Pillow's
decompression-bomb guard with a caller-chosen limit. Write: format from the extension,
atomically (temp file + rename/link in the same folder), never replacing a file unless asked.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile as PILImageFile, ImageOps, UnidentifiedImageError

from .config import (DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, FORMAT_MAX_SIDE, OUTPUT_FORMATS,
                     TEMP_PATTERN)
from . import datacheck, decodelog
from .errors import ImageError
from .jpegcoef import jpeg_of
from .jpegqcs import JpegTables
from .jpegqf import estimate_quality

EXIF_ORIENTATION = 0x0112


class PixelLimitError(ImageError):
    """An image over the decompression-bomb guard's pixel limit (a server answers 413)."""


_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class ImageFile:
    array: np.ndarray             # uint8/uint16: HxW, HxWx2 (grey+alpha), HxWx3, HxWx4
    qf: int | None                # IJG quality of a JPEG's tables (None: unknown / not JPEG)
    icc: bytes | None             # ICC profile to write back (None when the colours changed)
    exif: bytes | None            # EXIF with the orientation reset (already applied)
    mode: str                     # Pillow's mode of the file, for reports
    format: str | None            # Pillow's format name of the file
    warnings: tuple[str, ...] = ()  # what the decoders warned about, one line each
    jpeg: JpegTables | None = None  # a JPEG's tables, coefficients and EXIF orientation, when
    #                                 its pixels are the decoder's: the quantization constraint


@contextlib.contextmanager
def _bomb_guard(max_pixels: int):
    """Pillow's guard with our limit (0: none); its over-the-limit warning becomes an error."""
    old, truncated = Image.MAX_IMAGE_PIXELS, PILImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    PILImageFile.LOAD_TRUNCATED_IMAGES = False  # whoever set it: truncation is an error here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, PILImageFile.LOAD_TRUNCATED_IMAGES = old, truncated


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """Decode `path` for restoration; ImageError with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    return _decode(path, str(path), lambda: path.stat().st_size, max_pixels,
                   lambda: open(path, "rb"), path)


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """`read_image` for a file already in memory (an HTTP body, an object store's file);
    `name` starts its error messages."""
    return _decode(io.BytesIO(data), name, lambda: len(data), max_pixels,
                   lambda: io.BytesIO(data), data)


def _decode(source, name: str, size, max_pixels: int, reopen, raw) -> ImageFile:
    """Decode `source` (a path or a binary file object); `size()` gives its length in bytes,
    `reopen()` a fresh binary file object of it (for the completeness checks), `raw` its path
    or bytes (for the JPEG coefficient reader)."""
    log = decodelog.DecodeLog()  # filled by capture(); named here for the error paths
    try:
        with decodelog.capture(log), _bomb_guard(max_pixels), Image.open(source) as im:
            fmt, qf, mode = im.format, estimate_quality(im), im.mode
            im.load()  # decode now: truncation and corruption surface here
            _check_complete(im, reopen, size(), log)
            jpeg = jpeg_of(im, raw)
            ImageOps.exif_transpose(im, in_place=True)  # no second full-size copy
            array, icc = _to_array(im, im.info.get("icc_profile"))
            exif = _exif_bytes(im)
    except UnidentifiedImageError:
        n = size()
        raise ImageError(f"{name}: not an image Pillow can read ({n} bytes"
                         f"{', empty file' if n == 0 else ''})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PixelLimitError(f"{name}: {_bomb_message(e, max_pixels)}") from None
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    except MemoryError:
        raise ImageError(f"{name}: too large to decode in the available memory") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on bad data
        if log.errors:  # libtiff said why; Pillow only says "decoder error -2"
            raise ImageError(f"{name}: truncated or corrupt TIFF data ({log.errors[0]})"
                             ) from None
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return ImageFile(array, qf, icc, exif, mode, fmt, tuple(log.warnings), jpeg)


def _check_complete(im: Image.Image, reopen, size: int, log: decodelog.DecodeLog) -> None:
    """Refuse a decode that filled missing data in: libtiff's errors (short or corrupt strips
    it reported and went past), PNG data that ends before the rows its header declares
    (Pillow fills the rest with zeros), JPEG data too short for its declared size, TIFF
    strips that lie past the file's end or cover too few rows, and GIF frames too large for
    their LZW data or too small for their screen (runtime/datacheck.py)."""
    if log.errors:
        raise ImageError(f"truncated or corrupt TIFF data ({log.errors[0]})")
    if im.format == "PNG":
        with reopen() as f:
            short = datacheck.png_shortfall(f)
        if short:
            raise ImageError(f"truncated PNG: its data holds {short}")
    if im.format == "JPEG":
        with reopen() as f:
            short = datacheck.jpeg_shortfall(f, size, im.width, im.height)
        if short:
            raise ImageError(f"truncated JPEG: {short}")
    if im.format == "TIFF":
        short = datacheck.tiff_shortfall(im.tag_v2, size, im.width, im.height)
        if short:
            raise ImageError(f"truncated TIFF: {short}")
    if im.format == "GIF":
        with reopen() as f:
            short = datacheck.gif_shortfall(f, im.width, im.height)
        if short:
            raise ImageError(f"truncated GIF: {short}")


# Formats Pillow identifies but cannot decode pixels of (or only with a program not bundled).
_NO_PIXELS = frozenset({"MPEG"})


@functools.lru_cache(maxsize=None)
def readable_suffixes() -> frozenset[str]:
    """Every file name suffix whose format this Pillow decodes (what a folder scan takes): its
    registered openers, less stub formats (BUFR, GRIB, HDF5, WMF need a handler of their own),
    identify-only ones, and EPS without Ghostscript."""
    from PIL import EpsImagePlugin

    Image.init()
    found = set()
    for ext, fmt in Image.registered_extensions().items():
        opener = Image.OPEN.get(fmt)
        if opener is None or fmt in _NO_PIXELS or (fmt == "EPS" and
                                                   not EpsImagePlugin.has_ghostscript()):
            continue
        if isinstance(opener[0], type) and issubclass(opener[0], PILImageFile.StubImageFile):
            continue
        found.add(ext.lower())
    return frozenset(found)


def _bomb_message(e: Exception, max_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)):,} pixels" if found else "its declared size"
    return (f"declares {size}, over the decompression-bomb guard's limit of {max_pixels:,}; "
            f"if the file is trusted, raise it with --max-pixels")


def _exif_bytes(im: Image.Image) -> bytes | None:
    exif = im.getexif()
    if not exif:
        return None
    exif.pop(EXIF_ORIENTATION, None)  # applied to the pixels already
    return exif.tobytes()


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """CMYK (and other non-RGB colour spaces) to RGB, through the ICC profile when possible."""
    if icc and im.mode == "CMYK":
        try:
            from PIL import ImageCms
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to Pillow's formula
            pass
    return im.convert("RGB")


def _to_array(im: Image.Image, icc: bytes | None) -> tuple[np.ndarray, bytes | None]:
    mode = im.mode
    if mode in _SIXTEEN:
        return np.asarray(im).astype(np.uint16), icc
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError("32-bit integer pixels outside 0..65535 are not supported")
        return a.astype(np.uint16), icc
    if mode == "F":
        raise ImageError("floating-point images are not supported; save it as 8 or 16 bits")
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if transparent else "RGB")), icc
    keep = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBA": "RGBA",
            "RGBa": "RGBA", "RGBX": "RGB"}
    if mode in keep:
        return np.asarray(im.convert(keep[mode]) if keep[mode] != mode else im), icc
    return np.asarray(_to_srgb(im, icc)), None  # CMYK, YCbCr, LAB, HSV: colours changed


def from_pil(im: Image.Image) -> np.ndarray:
    """A PIL image as the array the Restorer takes: the modes `read_image` accepts, converted
    the same way (palette to RGB/RGBA, CMYK and other spaces to sRGB, 16-bit kept)."""
    return _to_array(im, im.info.get("icc_profile"))[0]


def to_pil(array: np.ndarray, like: Image.Image) -> Image.Image:
    """A restored array as a PIL image, carrying `like`'s ICC profile and EXIF in its info."""
    out = _to_pil(array, "PNG")
    out.info.update({k: like.info[k] for k in ("icc_profile", "exif") if k in like.info})
    return out


def output_format(path: Path) -> str:
    """Pillow's format name for the output's extension; ImageError for unknown ones."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: cannot write {path.suffix or 'extension-less'} files; use "
                         f"one of {', '.join(sorted(OUTPUT_FORMATS))}")
    return fmt


def check_output_size(path, height: int, width: int) -> None:
    """Refuse, before any restoring, an output its format cannot hold (JPEG: 65,535 px a side,
    WebP: 16,383)."""
    fmt = output_format(path)
    most = FORMAT_MAX_SIDE[fmt]
    if max(height, width) > most:
        others = [e for e, f in OUTPUT_FORMATS.items() if FORMAT_MAX_SIDE[f] >= max(height, width)]
        raise ImageError(f"{path}: a {width}x{height} image is too large for {fmt} (at most "
                         f"{most:,} px a side); write {' or '.join(sorted(set(others)))}")


def check_parent(path: Path) -> None:
    """Refuse an output whose folder cannot exist: some ancestor is a file, not a folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ImageError(f"{path}: cannot create it, {parent} is not a folder")
            return


def _to_pil(array: np.ndarray, fmt: str) -> Image.Image:
    a = array
    if a.dtype == np.uint16 and (a.ndim == 3 or fmt != "PNG"):
        a = np.rint(a / 257.0).astype(np.uint8)  # 16-bit colour / non-PNG: 8 bits per channel
    if a.ndim == 3 and a.shape[2] == 2:
        if fmt == "JPEG":
            raise ImageError("JPEG cannot store the alpha channel; write .png or .webp")
        a = a if fmt == "PNG" else a[..., [0, 0, 0, 1]]  # WebP has no grey: grey as RGB
        return Image.fromarray(a, "LA" if a.shape[2] == 2 else "RGBA")
    if a.ndim == 3 and a.shape[2] == 4 and fmt == "JPEG":
        raise ImageError("JPEG cannot store the alpha channel; write .png or .webp")
    if a.ndim == 2 and a.dtype == np.uint16:
        return Image.fromarray(np.ascontiguousarray(a, "<u2"))  # mode I;16
    if a.ndim == 2 and fmt == "WEBP":
        return Image.fromarray(a, "L").convert("RGB")
    return Image.fromarray(a)


def encode_image(f, array: np.ndarray, fmt: str, icc: bytes | None = None,
                 exif: bytes | None = None, quality: int = DEFAULT_QUALITY) -> None:
    """Encode `array` as Pillow format `fmt` (one of OUTPUT_FORMATS' values) into the binary
    file object `f`, exactly as `write_image` would."""
    _save(_to_pil(array, fmt), f, fmt, icc, exif, quality)


def _save(im: Image.Image, f, fmt: str, icc: bytes | None, exif: bytes | None,
          quality: int) -> None:
    kw: dict = {k: v for k, v in (("icc_profile", icc), ("exif", exif)) if v}
    if fmt in ("JPEG", "WEBP"):
        kw["quality"] = quality
    if fmt == "JPEG":
        kw["subsampling"] = 0  # 4:4:4: keep the restored chroma
    im.save(f, format=fmt, **kw)


def write_image(path: str | Path, array: np.ndarray, icc: bytes | None = None,
                exif: bytes | None = None, quality: int = DEFAULT_QUALITY,
                overwrite: bool = False) -> None:
    """Encode `array` to `path` (format from the extension) atomically; an existing file is
    replaced only with `overwrite`."""
    path = Path(path)
    fmt = output_format(path)
    check_output_size(path, array.shape[0], array.shape[1])
    im = _to_pil(array, fmt)
    check_parent(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets a later run tell a dead writer's leftovers (stale_temps).
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other readers
        with os.fdopen(fd, "wb") as f:
            _save(im, f, fmt, icc, exif, quality)
            f.flush()
            os.fsync(f.fileno())
        _publish(Path(tmp), path, overwrite)
    except OSError as e:  # name the output, never the hidden temporary file
        detail = (f"{e.strerror} in {path.parent}" if e.strerror else
                  str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ImageError(f"{path}: cannot write it ({detail})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (/proc), since
    os.umask(x) changes it for every thread at once while it is read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def stale_temps(folder: Path) -> list[Path]:
    """This tool's temporary files in `folder` (`.NAME.PID.XXXXXXXX.tmp`) whose writer is gone:
    its process no longer runs, or it started after the file was last written (a reused pid)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = TEMP_PATTERN.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and _writer_gone(p, int(m.group(1))):
            found.append(p)
    return found


def _writer_gone(path: Path, pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's: leave it
    started = _start_time(pid)  # alive: a process started after the file's last write
    try:                        # did not write it
        return started is not None and started > path.stat().st_mtime + 1
    except OSError:
        return False


def _start_time(pid: int) -> float | None:
    """When process `pid` started, in epoch seconds (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text()
                    .splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and refuses to replace an existing file
    except FileExistsError:
        raise ImageError(f"{path} exists; pass --overwrite to replace it") from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise ImageError(f"{path} exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
