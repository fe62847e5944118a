"""The sodiff version, standard library only (scripts that run without click use it too)."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DIST = "sodiff"  # the distribution name in pyproject.toml
_INIT = Path(__file__).resolve().parents[1] / "sodiff" / "__init__.py"  # the one version source


def package_version() -> str:
    """The installed sodiff's version; from a bare checkout (nothing installed), the version
    in sodiff/__init__.py, read as text so the runtime never imports `sodiff`."""
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        pass
    try:
        found = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(), re.M)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def version_line(prog: str) -> str:
    """What `--version` prints, e.g. `sodiff-run (sodiff) 0.1.0`."""
    return f"{prog} ({DIST}) {package_version()}"
