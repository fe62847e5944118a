"""Merge latency result files of one machine into one report (JSON + markdown).

    python benchmarks/report.py parts/eager.json parts/compiled.json --out DIR --name NAME

gpu_check.sh times each backend group in its own process (a slow compile cannot take the
others down with it) and merges them here; speed-ups are then against the eager fp32 numbers
of the same script run. Also re-renders the markdown of a single file.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from runtime.cliopts import CONTEXT_SETTINGS, version_option  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from benchmarks._report import enrich, merge, render  # noqa: E402


def load(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "sodiff-latency":
        raise ValueError(f"{path} is not a latency result of benchmarks/latency.py")
    return doc


def merge_files(paths: list[Path], out: Path, name: str, command: str = "") -> dict:
    """Merge `paths`, recompute throughput/FLOP figures with the merged FLOP counts, write
    `<out>/<name>.json` and `.md`; returns the merged document."""
    doc = merge([load(p) for p in paths], command)
    for rec in doc["measurements"]:
        size_key = f"{rec['size'][0]}x{rec['size'][1]}"
        enrich(rec, doc["flops"].get(size_key, {}).get(rec["module"]), doc["machine"])
    C.write_json(out / f"{name}.json", doc)
    C.write_text(out / f"{name}.md", render(doc))
    return doc


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=C.RESULTS_DIR,
              show_default=True)
@click.option("--name", required=True, help="File stem of the merged JSON and markdown.")
def main(files: tuple[Path, ...], out: Path, name: str) -> None:
    """Merge latency JSON files from one machine; write JSON + markdown."""
    command = "python benchmarks/report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        doc = merge_files(list(files), out, name, command)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(render(doc))


if __name__ == "__main__":
    main()
