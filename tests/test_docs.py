"""The README and docs/ against the code: every flag they give a CLI exists in that CLI, every
relative link points at a file, no doc names a file the repo lacks or a path outside it, the
TensorRT op facts of docs/architecture.md are the lint's, and the README stays short (issues
16 and 32). That every command in their code blocks parses: tests/test_docs_commands.py."""
from __future__ import annotations

import importlib
import re
import tomllib

import click
import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A command: a console script, `-m training.X` (python or accelerate launch), or a benchmark.
COMMAND = re.compile(r"(sodiff-(?:export|run|demo|batch|serve)\b|-m (?:training|scale)\.\w+|"
                     r"benchmarks/\w+\.py)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
STOP = re.compile(r"[`|;#]|&&")  # a command's flags end at code-span ends, pipes, comments
TABLE_FLAG = re.compile(r"^\|\s*`(?:-\w, )?(--[a-z][a-z0-9-]*)")
README_MAX_LINES = 350


def _commands() -> dict[str, click.Command]:
    """Every CLI the docs may name -> its click command (argparse scripts are left out)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    found = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        found[name] = getattr(importlib.import_module(module), attr)
    for folder, key in (("training", "-m training.{}"), ("scale", "-m scale.{}"),
                        ("benchmarks", "benchmarks/{}.py")):
        for path in sorted((REPO / folder).glob("*.py")):
            module = importlib.import_module(f"{folder}.{path.stem}")
            clis = [v for k, v in vars(module).items() if isinstance(v, click.Command)
                    and getattr(v, "callback", None) is not None
                    and v.callback.__module__ == module.__name__]
            main = getattr(module, "main", None)
            main = main if isinstance(main, click.Command) else next(
                (c for c in clis if isinstance(c, click.Group)), None)
            if main is not None:
                found[key.format(path.stem)] = main
    return found


def _flags(command: click.Command) -> set[str]:
    names = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for sub in getattr(command, "commands", {}).values():  # groups: any subcommand's flags
        names |= _flags(sub)
    return names | {"--help", "--version"}


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with shell continuations (a trailing backslash) joined."""
    out, buf, start = [], "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = i
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def _named_flags():
    """(where, cli, flag): flags that follow a CLI's name on one line, and table rows of
    flags under a heading that names a CLI."""
    for doc in DOCS:
        heading_cli = None
        for n, line in _logical_lines(doc.read_text()):
            if line.startswith("#") and (m := COMMAND.search(line.replace("python -m", "-m"))):
                heading_cli = m.group(1)
            elif line.startswith("#"):
                heading_cli = heading_cli if line.startswith("####") else None
            where = f"{doc.relative_to(REPO)}:{n}"
            if (t := TABLE_FLAG.match(line)) and heading_cli:
                yield where, heading_cli, t.group(1)
            for m in COMMAND.finditer(line):
                rest = line[m.end():]
                rest = rest[:s.start()] if (s := STOP.search(rest)) else rest
                nxt = COMMAND.search(rest)
                rest = rest[:nxt.start()] if nxt else rest
                for flag in FLAG.findall(rest):
                    yield where, m.group(1), flag


def test_every_flag_the_docs_name_exists():
    commands = _commands()
    named = list(_named_flags())
    assert len(named) > 50  # the scan sees the docs' commands
    unknown = sorted({cli for _, cli, _ in named if cli not in commands})
    wrong = [(w, c, f) for w, c, f in named if c in commands and f not in _flags(commands[c])]
    assert wrong == [], wrong
    assert set(unknown) <= {"benchmarks/wheel_parts.py", "benchmarks/ort_smoke.py"}, unknown


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [link for link in links if "://" not in link
               and not (doc.parent / link).exists()]
    assert missing == []


def test_readme_is_short_and_starts_with_the_quickstart():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES
    first = [line for line in lines if line.startswith("## ")][0]
    assert first == "## Quickstart"
    quick = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    assert [c.split("#")[0].strip() for c in quick.strip().splitlines()[1:]] == \
        ["make demo", "make test"]
    assert re.search(r"!\[[^\]]*\]\(docs/images/[\w.-]+\.png\)", text)


def test_user_docs_name_no_paths_outside_the_repository():
    bad = [f"{d.name}:{i}" for d in DOCS for i, line in enumerate(d.read_text().splitlines(), 1)
           if "../shared" in line or "/work/" in line]
    assert bad == []


def test_every_results_file_has_an_index_line():
    """benchmarks/results/README.md names every file (or folder) there."""
    results = REPO / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    stems = {p.name.split(".")[0] for p in results.iterdir() if p.name != "README.md"}
    assert "quality_tiny" in stems
    missing = sorted(s for s in stems if f"`{s}" not in index and f"`{s}/" not in index)
    assert missing == [], f"benchmarks/results/README.md lacks a line for {missing}"


_TOP = ("benchmarks/", "docs/", "export/", "runtime/", "scale/", "sodiff/", "training/",
        "tests/", "weights/", "demo/", ".ci/")
_RESULT_PREFIXES = ("quality_", "evaluate_", "latency_", "gate_", "memory-", "scale-",
                    "quantized_", "vae_roundtrip", "fuzz-")


def _expand(token: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [x for alt in m.group(1).split(",")
            for x in _expand(token[:m.start()] + alt + token[m.end():])]


def _named_files(text: str) -> set[str]:
    found = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;)")
        for t in _expand(token):
            if t.startswith(_TOP) and "*" not in t and "$" not in t:
                found.add(t.split("#")[0].split(":")[0])
            elif "/" not in t and t.startswith(_RESULT_PREFIXES) and \
                    t.endswith((".json", ".md", ".png")):
                found.add(f"benchmarks/results/**/{t}")
    return found


def test_no_doc_names_a_file_the_repo_lacks():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = sorted(f"{d.relative_to(REPO)}: {f}" for d in docs
                     for f in _named_files(d.read_text())
                     if not ((REPO / f).exists() or "**" in f and any(REPO.glob(f))))
    assert "benchmarks/results/**/quality_tiny.md" in _named_files(
        "`quality_tiny.{md,json}`")  # braces expand, bare result names resolve
    assert missing == []


def test_architecture_op_lists_are_the_lints():
    """docs/architecture.md states the TensorRT op facts that export/trt_ops.py encodes."""
    from export import trt_ops

    text = (REPO / "docs" / "architecture.md").read_text()

    def listed(title: str) -> set[str]:
        return set(re.search(rf"^{title}:(.*?)\n\n", text, re.S | re.M).group(1).split())

    assert listed(r"Accepted \(TensorRT 8\.5\+\)") == trt_ops.ACCEPTED
    assert listed("Not accepted") == trt_ops.REJECTED
    later = {m.group(1): ((int(m.group(2)), int(m.group(3))), int(m.group(4))) for m in
             re.finditer(r"^\| (\w+) \| (\d+)\.(\d+) \| (\d+) \|", text, re.M)}
    assert later == {op: v[:2] for op, v in trt_ops.ADDED_LATER.items()}
    for op, inputs in trt_ops.NEEDS_INITIALIZER.items():
        assert op in text and all(what in text for _, what in inputs)
