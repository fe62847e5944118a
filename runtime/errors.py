"""The runtime's errors: each message is one line that says what is wrong and what to do."""
from __future__ import annotations


class EngineDirError(ValueError):
    """An engine dir this runtime refuses (missing, tampered, or made for another machine)."""


class BackendError(RuntimeError):
    """A backend that is not installed, or that failed to load or run a component."""


class ImageError(ValueError):
    """An input that cannot be read as an image, or an output that cannot be written."""
