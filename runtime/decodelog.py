"""What decoders say while they read a file, caught instead of printed: Python warnings
(Pillow's UserWarnings about EXIF, tags and the like), Pillow's logger messages, and libtiff's
C-level warning and error messages, which libtiff otherwise writes straight to stderr, image
after image.

libtiff's handlers are process-wide; they are replaced once (through ctypes, on the libtiff that
Pillow's own extension loaded) and route each message to the collector of the thread that is
decoding, or to stderr as before when no collector is active.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field

MESSAGE_BYTES = 1024             # longest libtiff message kept (longer ones are cut)


@dataclass
class DecodeLog:
    """The messages of one decode."""

    warnings: list[str] = field(default_factory=list)  # one line each: "libtiff: ..." or
    #                                                     Python's category and message
    errors: list[str] = field(default_factory=list)    # libtiff errors: the data is corrupt


_local = threading.local()
_installed: list = []            # the ctypes callbacks, kept alive; empty: not installed


def _libtiff_path() -> str | None:
    """The libtiff mapped into this process by Pillow's _imaging (Linux only)."""
    from PIL import Image  # noqa: F401 - loads _imaging and the libtiff it links
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "/libtiff" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def _route(level: str):
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                               ctypes.c_void_p)

    def handler(module, fmt, ap):
        buf = ctypes.create_string_buffer(MESSAGE_BYTES)
        libc.vsnprintf(buf, MESSAGE_BYTES, fmt, ap)
        text = buf.value.decode("utf-8", "replace").strip()
        if module:
            text = f"{module.decode('utf-8', 'replace')}: {text}"
        log = getattr(_local, "log", None)
        if log is None:
            sys.stderr.write(text + "\n")
        elif level == "error":
            log.errors.append(f"libtiff: {text}")
        else:
            log.warnings.append(f"libtiff: {text}")
    return handler


class _PillowLog(logging.Handler):
    """Pillow's logger messages (warning and up): into the decoding thread's collector, or to
    stderr as Python's last-resort handler would print them."""

    def emit(self, record: logging.LogRecord) -> None:
        log = getattr(_local, "log", None)
        if log is None:
            sys.stderr.write(record.getMessage() + "\n")
        else:
            log.warnings.append(f"Pillow: {record.getMessage().splitlines()[0]}")


def _install() -> None:
    if _installed:
        return
    _installed.append(None)  # tried: never again, whatever happens below
    logging.getLogger("PIL").addHandler(_PillowLog(logging.WARNING))
    path = _libtiff_path()
    if path is None:
        return
    try:
        lib = ctypes.CDLL(path)
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
        for level, setter in (("warning", lib.TIFFSetWarningHandler),
                              ("error", lib.TIFFSetErrorHandler)):
            callback = proto(_route(level))
            setter.restype, setter.argtypes = ctypes.c_void_p, (proto,)
            setter(callback)
            _installed.append(callback)
    except (OSError, AttributeError):  # another libtiff build: its messages stay on stderr
        pass


@contextlib.contextmanager
def capture(log: DecodeLog | None = None):
    """Collect the warnings of the decode in this block into `log` (a new one when None),
    which it yields; Python's warnings are added when the block ends."""
    _install()
    log = DecodeLog() if log is None else log
    outer = getattr(_local, "log", None)
    _local.log = log
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield log
    finally:
        _local.log = outer
    log.warnings += [f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
                     for w in caught]
