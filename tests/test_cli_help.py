"""Every CLI answers `-h` and `--version` (the package version), with one help setup: the
console scripts, every `python -m training.X` / `scale.X` with a `__main__` block, and the
benchmark scripts. The list is discovered from pyproject.toml and the source, so a new CLI
is checked without editing this file."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import sodiff
from runtime.cliopts import CONTEXT_SETTINGS
from runtime.version import package_version

REPO = Path(__file__).resolve().parents[1]
CLI_FOLDERS = ("sodiff", "training", "export", "runtime", "demo", "scale", "benchmarks")
_MAIN_CALL = re.compile(r'^if __name__ == "__main__":\n(?:[ \t]+.*\n)*?[ \t]+(?:sys\.exit\()?'
                        r'(\w+)\(', re.M)


def _scripts() -> dict[str, str]:
    """pyproject.toml's console scripts: name -> "module:function"."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _module_clis() -> dict[str, str]:
    """Every module with a `__main__` block -> the function that block calls."""
    found = {}
    for folder in CLI_FOLDERS:
        for path in sorted((REPO / folder).glob("*.py")):
            if (m := _MAIN_CALL.search(path.read_text())):
                found[f"{folder}.{path.stem}"] = m.group(1)
    return found


def _all_clis() -> dict[str, tuple[str, str]]:
    """name -> (module, function), console scripts under their own names."""
    clis = {f"python -m {mod}": (mod, fn) for mod, fn in _module_clis().items()}
    for name, target in _scripts().items():
        mod, fn = target.split(":")
        clis[name] = (mod, fn)
    return clis


CLIS = _all_clis()


def test_discovery_sees_every_kind_of_cli():
    """The lists the checks below run on are not empty or partial by accident."""
    scripts = {"sodiff-export", "sodiff-run", "sodiff-demo", "sodiff-batch", "sodiff-serve"}
    assert scripts <= set(CLIS)
    for mod in ("training.stage1", "training.stage2", "training.vae", "training.predictor",
                "training.denoiser", "benchmarks.latency", "benchmarks.wheel_parts"):
        assert f"python -m {mod}" in CLIS


def _entry(name: str):
    mod, fn = CLIS[name]
    return getattr(importlib.import_module(mod), fn)


def _run(entry, args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stdout of one CLI call: click commands through CliRunner, the
    argparse ones (standard library only) through their `main(argv)`."""
    if isinstance(entry, click.Command):
        result = CliRunner().invoke(entry, args, prog_name="prog")
        return result.exit_code, result.output
    with pytest.raises(SystemExit) as e:
        entry(args)
    return e.value.code, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_version(name, capsys):
    code, out = _run(_entry(name), ["--version"], capsys)
    assert code == 0, out
    assert out.strip().endswith(f"(sodiff) {sodiff.__version__}"), out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_short_help(name, capsys):
    code, out = _run(_entry(name), ["-h"], capsys)
    assert code == 0, out
    assert out.lower().startswith("usage:") and "--version" in out, out


@pytest.mark.parametrize("name", sorted(n for n in CLIS if isinstance(_entry(n), click.Command)))
def test_one_help_setup(name):
    """Every click CLI uses the shared context settings, subcommands included."""
    entry = _entry(name)
    assert entry.context_settings == CONTEXT_SETTINGS
    for sub in getattr(entry, "commands", {}).values():
        result = CliRunner().invoke(entry, [sub.name, "-h"])
        assert result.exit_code == 0 and "Usage:" in result.output, result.output


def test_version_is_the_package_version():
    """The runtime's version (read without importing sodiff) is sodiff's."""
    assert package_version() == sodiff.__version__


def test_module_form_answers(tmp_path):
    """`python -m training.stage1 --version` as users type it, from outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "training.stage1", "--version"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"python -m training.stage1 (sodiff) {sodiff.__version__}"
