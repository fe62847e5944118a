"""The export plan: options resolved once, and the stages after it never see raw options."""
from __future__ import annotations

import sys
from pathlib import Path

from export import targets
from export.options import ExportOptions
from export.pipeline import run_export

# Where raw options may still be read: the entry point and the resolution itself.
RESOLVING = {"run_export", "resolve_plan", "_check_source", "_check_timestep",
             "_check_components", "_check_precision", "_check_bounds", "_check_shapes"}


def test_an_export_looks_up_its_target_once_and_stages_take_the_plan(tmp_path):
    lookups, raw = [], set()

    def watch(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code is targets.get_target.__code__:
            lookups.append(frame.f_locals.get("name"))
        if "/export/" in code.co_filename and code.co_name not in RESOLVING and \
                not code.co_name.startswith("<") and any(
                isinstance(v, ExportOptions) for v in frame.f_locals.values()):
            raw.add(f"{Path(code.co_filename).name}:{code.co_name}")

    opts = ExportOptions(out=tmp_path / "eng", target="ort", preset="tiny", random_weights=True,
                         timestep="fixed:300", shape=(32, 32), components=("vae_decoder",),
                         samples=1)
    sys.setprofile(watch)
    try:
        run_export(opts, log=lambda m: None)
    finally:
        sys.setprofile(None)
    assert lookups == ["ort"]
    assert not raw, f"stages given the raw ExportOptions instead of the plan: {sorted(raw)}"
    assert (tmp_path / "eng" / "manifest.json").is_file()
