"""Packaging: a wheel built from the checkout, installed into a fresh venv, works outside the
checkout (bundled checkpoint included, nothing written into site-packages); a runtime-only
install's export and demo CLIs name the extra to install instead of a traceback."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from runtime.cliopts import EXTRA_MODULES, needs_extra

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "weights" / "tiny"
SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _packages() -> list[str]:
    """The top-level package folders pyproject.toml's find includes (`sodiff*` -> sodiff)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in cfg["tool"]["setuptools"]["packages"]["find"]["include"]]


def _copy_source(dst: Path) -> Path:
    """What an sdist holds, copied so the build writes nothing into the shared checkout."""
    dst.mkdir()
    for f in SOURCE_FILES:
        shutil.copy2(REPO / f, dst / f)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in _packages():
        shutil.copytree(REPO / pkg, dst / pkg, ignore=skip)
    shutil.copytree(BUNDLED, dst / "weights" / "tiny", ignore=shutil.ignore_patterns(".*"))
    return dst


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300
         ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel (no network: the project venv's setuptools) and install it into a fresh
    venv that sees the project venv's packages (torch, onnx...) but not the checkout."""
    root = tmp_path_factory.mktemp("pkg")
    src = _copy_source(root / "src")
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(root / "dist"), str(src)], cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("sodiff-*.whl")
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], cwd=root).stdout.strip())
    # A path line in a .pth adds the project venv's site-packages but not its own .pth files,
    # so the project's editable install (which maps `sodiff` to the checkout) stays out.
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                 "--no-deps", "--no-index", str(wheel)], cwd=root)
    assert inst.returncode == 0, inst.stderr
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(root / "cache"), OMP_NUM_THREADS="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "work": work,
            "env": env, "root": root}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _site_files(site: Path) -> set[Path]:
    return {p for p in site.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_ships_the_bundled_checkpoint_byte_for_byte(installed):
    packaged = installed["site"] / "sodiff" / "_bundled" / "tiny"
    for f in BUNDLED.iterdir():
        if f.is_file() and not f.name.startswith("."):
            assert _sha(packaged / f.name) == _sha(f), f.name


def test_wheel_ships_the_serve_page(installed):
    """sodiff-serve's page (scale/static/, package data) is in the wheel, byte for byte, and
    the installed scale.page reads it from there."""
    from scale.page import FILES
    names = sorted(name for name, _ in FILES.values())
    assert sorted(p.name for p in (REPO / "scale" / "static").iterdir()) == names
    for name in names:
        packaged = installed["site"] / "scale" / "static" / name
        assert _sha(packaged) == _sha(REPO / "scale" / "static" / name), name
    probe = ("import scale.page as p; print(p.__file__); "
             "print(sum(len(b) for b, _ in p.load_page().values()))")
    out = _run([str(installed["python"]), "-c", probe], installed["work"], installed["env"])
    assert out.returncode == 0, out.stderr
    module, size = out.stdout.split()
    assert Path(module).is_relative_to(installed["site"])
    assert int(size) == sum((REPO / "scale" / "static" / n).stat().st_size for n in names)


def test_installed_copy_is_used_outside_the_checkout(installed):
    probe = ("import sodiff, export, demo, runtime; from sodiff.bundled import checkpoint_dir; "
             "print(sodiff.__file__); print(checkpoint_dir())")
    out = _run([str(installed["python"]), "-c", probe], installed["work"], installed["env"])
    assert out.returncode == 0, out.stderr
    module, checkpoint = out.stdout.split()
    assert Path(module).is_relative_to(installed["site"])
    assert Path(checkpoint) == installed["site"] / "sodiff" / "_bundled" / "tiny"


def test_installed_demo_help_and_version(installed):
    demo = str(installed["venv"] / "bin" / "sodiff-demo")
    helped = _run([demo, "-h"], installed["work"], installed["env"])
    assert helped.returncode == 0, helped.stderr
    assert "--out" in helped.stdout and str(installed["root"] / "cache" / "sodiff") in \
        helped.stdout.replace("\n", "").replace(" ", "")
    assert "site-packages" not in helped.stdout
    version = _run([demo, "--version"], installed["work"], installed["env"])
    import sodiff
    assert version.returncode == 0 and version.stdout.split()[-1] == sodiff.__version__


def test_installed_export_defaults_to_the_packaged_checkpoint(installed):
    """`sodiff-export` with no --checkpoint, run from a folder outside the checkout."""
    before = _site_files(installed["site"])
    export = str(installed["venv"] / "bin" / "sodiff-export")
    out = _run([export, "--out", "eng", "--components", "predictor", "--samples", "1"],
               installed["work"], installed["env"])
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((installed["work"] / "eng" / "manifest.json").read_text())
    packaged = installed["site"] / "sodiff" / "_bundled" / "tiny"
    assert Path(manifest["checkpoint"]["path"]) == packaged
    from export.manifest import sha256_files
    assert manifest["checkpoint"]["sha256"] == sha256_files(
        [BUNDLED / "sodiff.json", BUNDLED / "model.safetensors"])
    assert (installed["work"] / "eng" / "predictor.onnx").is_file()
    assert _site_files(installed["site"]) == before  # nothing written into site-packages


@pytest.mark.slow
def test_installed_demo_writes_into_the_current_folder(installed):
    """The acceptance run: the demo from the wheel, images in the cwd, engines in the cache."""
    before = _site_files(installed["site"])
    demo = str(installed["venv"] / "bin" / "sodiff-demo")
    work = installed["work"] / "demo"
    work.mkdir()
    out = _run([demo, "--image", "chelsea"], work, installed["env"], timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == [
        "chelsea_q10.jpg", "chelsea_q10_comparison.png", "chelsea_q10_sodiff.png"]
    assert (installed["root"] / "cache" / "sodiff" / "engines" / "tiny" / "manifest.json"
            ).is_file()
    assert _site_files(installed["site"]) == before


# Prepended to `python -c`: the packages a runtime-only install lacks raise the
# ModuleNotFoundError a missing module raises, named, so the CLIs see what users would.
BLOCK_EXPORT = """
import sys, importlib.abc
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""
RUNTIME_ONLY_MISSING = ("torch", "diffusers", "peft", "safetensors", "onnx", "onnxscript",
                        "polygraphy", "onnx_graphsurgeon", "transformers", "accelerate")


@pytest.mark.parametrize("tool,module,args", [
    ("sodiff-export", "export.cli", ["--out", "engine"]),
    ("sodiff-demo", "demo.cli", ["--image", "chelsea"]),
])
def test_runtime_only_install_names_the_extra(tmp_path, tool, module, args):
    script = BLOCK_EXPORT.format(blocked=RUNTIME_ONLY_MISSING) + (
        f"sys.argv = [{tool!r}, *{args!r}]\nfrom {module} import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = _run([sys.executable, "-c", script], tmp_path, env, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == (f"error: {tool} needs the 'export' extra (onnx is not installed): "
                        f"pip install '.[export]' from the sodiff checkout")
    assert list(tmp_path.iterdir()) == []  # nothing written: not the engine, not the images


def test_extra_hint_covers_only_its_modules():
    """A missing module outside the extra is a real bug: it propagates, not a hint."""
    with pytest.raises(ModuleNotFoundError):
        with needs_extra("sodiff-export", "export"):
            raise ModuleNotFoundError("No module named 'sodiff.nope'", name="sodiff.nope")
    with pytest.raises(SystemExit) as e:
        with needs_extra("sodiff-export", "export"):
            raise ModuleNotFoundError("No module named 'onnx.helper'", name="onnx.helper")
    assert e.value.code == 1


def test_extra_modules_are_the_extras_dependencies():
    """Each module the hint knows comes from a package its extra (or a nested one) lists."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        out = set()
        for req in cfg[extra]:
            name = req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0]
            if name.startswith("sodiff"):
                out |= set().union(*(names(e) for e in req.split("[")[1].rstrip("]").split(",")))
            else:
                out.add(name.strip().lower().replace("-", "_"))
        return out

    for extra, modules in EXTRA_MODULES.items():
        assert set(modules) <= names(extra), set(modules) - names(extra)


def test_demo_writes_to_the_cwd_and_caches_engines_by_xdg(tmp_path, monkeypatch):
    """The demo's defaults point at the user's folders, never into the installed package."""
    from demo.core import DemoOptions, cache_dir, engine_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sodiff"
    opts = DemoOptions()
    assert opts.out == Path(".")
    assert engine_dir(opts) == tmp_path / "xdg" / "sodiff" / "engines" / "tiny"
    for unusable in ("", "relative/cache"):  # the XDG rule: both mean ~/.cache
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert cache_dir() == Path.home() / ".cache" / "sodiff"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mine = engine_dir(DemoOptions(checkpoint=tmp_path / "a" / "ckpt"))
    other = engine_dir(DemoOptions(checkpoint=tmp_path / "b" / "ckpt"))
    assert mine.parent == other.parent == tmp_path / "xdg" / "sodiff" / "engines"
    assert mine != other and mine.name.startswith("ckpt-")
    assert engine_dir(DemoOptions(engine=tmp_path / "e")) == tmp_path / "e"
