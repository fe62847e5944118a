"""Only the build step pyproject.toml cannot express: ship the bundled checkpoint in wheels.

`weights/tiny` sits outside every package, so `build_py` copies it to `sodiff/_bundled/tiny`
in the build tree; `sodiff.bundled.checkpoint_dir` finds it there. Editable installs skip the
copy and read the checkout's `weights/` directly.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("tiny",)  # checkpoint folders under weights/ that wheels carry (as sodiff.bundled)


class BuildPyWithWeights(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in BUNDLED:
            folder = ROOT / "weights" / name
            if not (folder / "sodiff.json").is_file():
                raise SystemExit(f"error: {folder}/sodiff.json is missing; wheels ship the "
                                 f"bundled checkpoint, so restore weights/{name} first")
            for src in sorted(p for p in folder.iterdir()
                              if p.is_file() and not p.name.startswith(".")):
                dst = Path(self.build_lib) / "sodiff" / "_bundled" / name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithWeights})
