"""Where the bundled checkpoint (the tiny model every CLI defaults to) lives.

One place decides: an installed wheel carries a copy under `sodiff/_bundled/` (setup.py's
build step puts it there); a checkout, editable install included, uses the repository's
`weights/` folder. Torch-free, so CLIs can name the default before loading anything.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED = PACKAGE_DIR / "_bundled"            # filled by setup.py's build_py, in wheels only
CHECKOUT = PACKAGE_DIR.parent / "weights"      # the repository's weights/ folder
TINY = "tiny"                                  # the bundled checkpoint's folder name
MARKER = "sodiff.json"                         # a checkpoint folder holds it


def checkpoint_dir(name: str = TINY) -> Path:
    """The bundled checkpoint folder `name`: the packaged copy when installed from a wheel,
    else the checkout's `weights/<name>` (which may be missing; loaders say so)."""
    packaged = PACKAGED / name
    if (packaged / MARKER).is_file():
        return packaged
    return CHECKOUT / name
