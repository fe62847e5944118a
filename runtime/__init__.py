"""Torch-free runtime: restore images from an engine directory; see README "Runtime".

    from runtime import Restorer
    with Restorer("engines/tiny") as r:
        restored = r.restore(array)          # uint8/uint16 HxW, HxWx3 or HxWx4 -> same

Imports nothing heavy until used: `import runtime` loads neither numpy's users nor onnxruntime,
and nothing here ever imports torch, `sodiff` or `export`.
"""
from __future__ import annotations

__all__ = ["Restorer", "RestoreOptions", "JpegTables", "EngineDirError", "BackendError",
           "ImageError"]

_LAZY = {
    "Restorer": ("pipeline", "Restorer"),
    "RestoreOptions": ("config", "RestoreOptions"),
    "JpegTables": ("jpegqcs", "JpegTables"),
    "EngineDirError": ("errors", "EngineDirError"),
    "BackendError": ("errors", "BackendError"),
    "ImageError": ("errors", "ImageError"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # a loaded lazy name is in both
