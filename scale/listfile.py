"""What a list file (.txt/.lst/.csv) names: shared by local lists (sources.py) and lists on
other file systems (storage.py), so that both read them by the same rules."""
from __future__ import annotations

import csv

from .config import CSV_PATH_COLUMN


def parse_list(text: str, name: str) -> list[str]:
    """The paths of a list file's text: a .csv's `path` column (or its first column), else
    one per line; blank lines and lines starting with # are skipped."""
    if not name.lower().endswith(".csv"):
        return [line.strip() for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    column = 0
    if rows and CSV_PATH_COLUMN in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index(CSV_PATH_COLUMN)
        rows = rows[1:]
    return [r[column].strip() for r in rows
            if len(r) > column and r[column].strip() and not r[0].lstrip().startswith("#")]
