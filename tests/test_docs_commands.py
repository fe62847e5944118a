"""Every command in the README's and docs' code blocks parses (issue 32): flags exist,
required options are given, values convert, `make` targets exist."""
from __future__ import annotations

import importlib
import re
import tomllib

import click

from conftest import REPO

# Click parses without running anything: `make_context` once as is (unknown flags, a flag
# without its value), once resiliently (placeholders such as DIR or $SD21 pass), then the
# checks below. Commands that are not the project's (pip, git, curl, ray, ...) are skipped;
# `make` targets must exist, `bash X.sh` flags must be in the script.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PROJECT_MODULES = ("training", "export", "runtime", "scale", "demo", "benchmarks", "sodiff")
WRAPPERS = {"nice": {"-n"}, "time": {"-v", "-p"}, "/usr/bin/time": {"-v", "-p"}, "env": set(),
            "timeout": set()}
# Scripts whose argparse parser is built inside main(argv), which runs the work: not parsed.
UNPARSED = {"benchmarks/ort_smoke.py": "argparse inside main(argv): runs the smoke test",
            "benchmarks/wheel_parts.py": "argparse inside main(argv): splits or joins a wheel"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|[$<>{}*~]|\.\.\.")
REDIRECT = re.compile(r"\d*>>?&?\s*\S+|<\s*\S+")
SUBST = re.compile(r"\$\([^()]*\)|`[^`]*`")


def _code_lines(text: str):
    """(line number, line) of shell-like code: fenced blocks in a shell language (or none)
    and indented blocks, continuations joined."""
    lang, picked, blank, indented = None, [], True, False
    for n, line in enumerate(text.splitlines(), 1):
        if m := re.match(r"^\s*```\s*(\w*)", line):
            lang = m.group(1).lower() if lang is None else None
            blank, indented = lang is None, False  # a closed fence is no paragraph
            continue
        # an indented block starts after a blank line (never inside a paragraph) and goes on
        # through indented and blank lines
        indented = lang is None and line.startswith("    ") and (blank or indented)
        if (lang is not None and lang in SHELL_LANGS) or indented:
            picked.append((n, line.strip()))
        else:
            picked.append((n, ""))
        blank = not line.strip()
    joined, buf, start = [], "", 0
    for n, line in picked:
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        if buf or line:
            joined.append((start, buf + line))
        buf = ""
    return joined


def _segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: substitutions become a placeholder, redirections
    and comments go, and `|`, `||`, `&&`, `;`, `&` split."""
    import shlex

    line = REDIRECT.sub(" ", SUBST.sub("$SUBST", line))
    lex = shlex.shlex(line, posix=True, punctuation_chars="|&;()")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote: not a shell line
        return []
    out, cur = [], []
    for t in tokens:
        if t and set(t) <= set("|&;()"):
            out, cur = out + [cur], []
        else:
            cur.append(t)
    return [c for c in out + [cur] if c]


def _unwrap(words: list[str]) -> list[str]:
    """Drop `VAR=value` prefixes and wrappers such as `nice -n 5` or `/usr/bin/time -v`."""
    while words:
        if re.match(r"^\w+=", words[0]):
            words = words[1:]
        elif words[0] in WRAPPERS:
            flags, words = WRAPPERS[words[0]], words[1:]
            while words and (words[0] in flags or words[0].lstrip("-").isdigit()):
                words = words[1:]
        else:
            return words
    return words


def _click_main(module_name: str) -> click.Command | None:
    """A module's click entry point: its `main`, else the one group (or command) it defines;
    for a package, its `cli` module's (`python -m demo`)."""
    for name in (module_name, f"{module_name}.cli"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        main = getattr(module, "main", None)
        if isinstance(main, click.Command):
            return main
        own = [v for v in vars(module).values() if isinstance(v, click.Command)
               and getattr(v.callback, "__module__", None) == name]
        groups = [c for c in own if isinstance(c, click.Group)]
        if len(groups) == 1 or len(own) == 1:
            return (groups or own)[0]
    return None


def _resolve(words: list[str], scripts: dict[str, str]):
    """(kind, target, args) of a command: ("click", command, args), ("make", None, targets),
    ("sh", path, args), ("skip", reason, []) for what is not the project's."""
    words = _unwrap(words)
    if not words:
        return "skip", "assignment", []
    head, rest = words[0], words[1:]
    if head in scripts:
        module, _, attr = scripts[head].partition(":")
        return "click", getattr(importlib.import_module(module), attr), rest
    if head == "accelerate" and "-m" in rest:
        head, rest = "python", rest[rest.index("-m"):]
    if re.search(r"(^|/)python3?$|^\$\{?PY", head):
        if rest[:1] == ["-m"] and len(rest) > 1:
            module, rest = rest[1], rest[2:]
            if module.split(".")[0] not in PROJECT_MODULES:
                return "skip", f"-m {module}", []
            return "click", _click_main(module) or f"no click main in {module}", rest
        if rest and rest[0].endswith(".py"):
            path = rest[0]
            if path in UNPARSED:
                return "skip", UNPARSED[path], []
            if not (REPO / path).is_file():
                return "click", f"no such script {path}", []
            module = path[:-3].replace("/", ".")
            return "click", _click_main(module) or f"no click main in {path}", rest[1:]
        return "skip", "python without a module or script", []
    if head in ("bash", "sh") and rest and rest[0].endswith(".sh"):
        return "sh", rest[0], rest[1:]
    if head == "make":
        return "make", None, [w for w in rest if not re.match(r"^\w+=", w) and w[0] != "-"]
    return "skip", head, []


def _value_problems(command: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
    """Given option values that do not convert (placeholders and paths are let through)."""
    by_opt = {o: p for p in command.params if isinstance(p, click.Option) and not p.is_flag
              for o in p.opts + p.secondary_opts}
    out = []
    for i, arg in enumerate(args):
        opt, _, value = arg.partition("=")
        p = by_opt.get(opt)
        if p is None or (not value and i + 1 >= len(args)):
            continue
        value = value or args[i + 1]
        if PLACEHOLDER.search(value) or isinstance(p.type, (click.Path, click.File)):
            continue
        try:
            p.type.convert(value, p, ctx)
        except click.BadParameter as e:
            out.append(f"{opt} {value}: {e.format_message()}")
    return out


def _parse_problems(command: click.Command, name: str, args: list[str],
                    parent: click.Context | None = None) -> list[str]:
    """What click refuses in `name args`, without running it; [] when it parses."""
    if {"-h", "--help", "--version"} & set(args):
        return []
    try:  # what the parser refuses (unknown flags, a flag without its value) comes first
        command.make_context(name, list(args), parent=parent)
    except (click.NoSuchOption, click.BadOptionUsage) as e:
        return [e.format_message()]
    except click.UsageError:  # missing or placeholder values: judged below
        pass
    try:
        ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=True)
    except click.UsageError as e:
        return [e.format_message()]
    source = click.core.ParameterSource
    problems = [f"missing {p.get_error_hint(ctx)}" for p in command.params
                if p.required and ctx.get_parameter_source(p.name) not in
                (source.COMMANDLINE, source.ENVIRONMENT)]
    problems += _value_problems(command, ctx, args)
    if isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return problems + ["no subcommand"]
        try:
            sub_name, sub, sub_args = command.resolve_command(ctx, rest)
        except click.UsageError as e:
            return problems + [e.format_message()]
        if sub is None:  # resilient parsing answers an unknown subcommand with None
            return problems + [f"no such command {rest[0]!r}"]
        return problems + _parse_problems(sub, sub_name, sub_args, ctx)
    if ctx.args and not command.allow_extra_args:
        problems.append(f"unexpected extra arguments {ctx.args}")
    return problems


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))


def _doc_commands(docs):
    """(where, kind, target, args, words) of every command in the docs' code blocks."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for doc in docs:
        text = doc.read_text() if hasattr(doc, "read_text") else doc[1]
        label = doc.relative_to(REPO) if hasattr(doc, "relative_to") else doc[0]
        for n, line in _code_lines(text):
            for words in _segments(line):
                kind, target, args = _resolve(words, scripts)
                yield f"{label}:{n}", kind, target, args, words


def _command_problems(docs) -> tuple[list[str], int]:
    problems, parsed, targets = [], 0, _make_targets()
    for where, kind, target, args, words in _doc_commands(docs):
        shown = " ".join(words)
        if kind == "click":
            parsed += 1
            found = ([target] if isinstance(target, str)
                     else _parse_problems(target, words[0], args))
        elif kind == "make":
            parsed += 1
            found = [f"no make target {t!r}" for t in args if t not in targets]
        elif kind == "sh":
            parsed += 1
            script = REPO / target
            found = ([f"no such script {target}"] if not script.is_file() else
                     [f"{a} is not an option of {target}" for a in args
                      if a.startswith("-") and a not in script.read_text()])
        else:
            continue
        problems += [f"{where}: `{shown}`: {p}" for p in found]
    return problems, parsed


def test_every_documented_command_parses():
    problems, parsed = _command_problems(DOCS)
    assert parsed >= 50, parsed  # the scan sees the docs' commands
    assert problems == [], "\n".join(problems)


def test_the_command_check_sees_wrong_commands():
    doc = ("x.md", "```bash\n"
                   "sodiff-run photo.jpg               # --engine is required\n"
                   "sodiff-export --out e --no-such-flag\n"
                   "nice -n 5 python -m training.stage2 --init a \\\n"
                   "    --perceptual none --out o --lr fast\n"
                   "FOO=1 python benchmarks/quality.py --jpeg-only | tee log  # parses\n"
                   "python -m training.dists nonsense\n"
                   "make tests\n"
                   "bash benchmarks/gpu_check.sh --dry-run --wet-run\n"
                   "pip install '.[runtime]'\n"
                   "```\n    sodiff-run --engine DIR --tile many a.jpg\n")
    problems, parsed = _command_problems([doc])
    assert parsed == 8
    found = "\n".join(problems)
    assert "x.md:2" in found and "--engine" in found
    assert "x.md:3" in found and "--no-such-flag" in found
    assert "x.md:4" in found and "--lr fast" in found
    assert "x.md:6" not in found
    assert "x.md:7" in found and "nonsense" in found
    assert "no make target 'tests'" in found
    assert "--wet-run" in found and "--dry-run is not" not in found
    assert "x.md:12" in found and "--tile many" in found
    assert len(problems) == 7, found
