"""Every hint in the code that tells the user to run one of the CLIs with a flag names a flag
that CLI really has (a hint once said `sodiff-export --trt`, which never existed)."""
from __future__ import annotations

import importlib
import re
import tomllib

from conftest import REPO

HINT = re.compile(r"(sodiff-(?:export|run|demo|batch|serve))((?:[ \t]+[^\s'\"]+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
SOURCES = ("runtime", "export", "demo", "benchmarks", "scale", "training", "sodiff")


def cli_flags() -> dict[str, set[str]]:
    """Each console script's option names, from its click command."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    flags = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        flags[name] = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return flags


def hints() -> list[tuple[str, str, str]]:
    """(file:line, CLI, flag) for each flag that follows a CLI's name in the sources."""
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                for m in HINT.finditer(line):
                    for flag in FLAG.findall(m.group(2)):
                        found.append((f"{path.relative_to(REPO)}:{i}", m.group(1), flag))
    return found


def test_every_hinted_flag_exists():
    flags = cli_flags()
    seen = hints()
    assert len(seen) >= 5  # the scan finds the hints there are
    wrong = [(where, cli, flag) for where, cli, flag in seen
             if cli in flags and flag not in flags[cli] | {"--help", "-h"}]
    assert wrong == []
