"""Session 24: every command, flag, path and API name the documentation shows actually works
(issues #3, #4).

The commands are read out of the Markdown (fenced code blocks and inline code spans), split the
way a shell splits them, and checked against the ``argparse`` parser objects of the ``bbb``
command (its subcommands, ``bbb bench`` and ``bbb sweep``): every subcommand and option must
exist, and a value written for an option with listed choices must be one of them. Nothing long
is run: the commands are parsed, not executed. The README's Python snippets are executed on
tiny data.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "docs/RELIABILITY.md",
    "docs/PERFORMANCE.md",
    "docs/RESULTS.md",
    "examples/README.md",
    "experiments/uci/README.md",
]

# ---------------------------------------------------------------------------------------------
# reading code out of Markdown


@dataclass(frozen=True)
class Snippet:
    """A piece of code in a Markdown file: a fenced block (``lang`` its info string) or an
    inline code span (``lang`` ``"inline"``); ``line`` is the 1-based line it starts on."""

    doc: str
    line: int
    lang: str
    text: str


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def snippets(doc: str) -> list[Snippet]:
    """Every fenced code block and every inline code span of ``doc`` (relative to the root)."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    prose: list[tuple[int, str]] = []  # (line number, text) outside fences
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            fence, lang, start = m.group(2), m.group(3), i + 1
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            out.append(Snippet(doc, start, lang or "", "\n".join(body)))
        else:
            prose.append((i + 1, lines[i]))
        i += 1
    # inline spans may run over a line break within a paragraph: scan the prose as one text,
    # each character mapped back to its line
    text = "\n".join(t for _, t in prose)
    starts = []
    pos = 0
    for lineno, t in prose:
        starts.append((pos, lineno))
        pos += len(t) + 1
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.S):
        if "\n\n" in m.group(2):  # a span never crosses a paragraph
            continue
        lineno = max(ln for p, ln in starts if p <= m.start())
        # a line break inside a span is rendered as a space
        out.append(Snippet(doc, lineno, "inline", " ".join(m.group(2).split())))
    return out


# ---------------------------------------------------------------------------------------------
# reading commands out of code


@dataclass(frozen=True)
class Command:
    snippet: Snippet
    argv: tuple[str, ...]  # after the program: `bbb train --x` -> ("train", "--x")
    program: str  # "bbb", or a script path for `python path.py ...`, or "make"

    def where(self) -> str:
        return f"{self.snippet.doc}:{self.snippet.line}: {' '.join((self.program, *self.argv))}"


def _shell_lines(text: str) -> Iterator[str]:
    """The logical lines of a shell text: continuations joined (a trailing backslash, or an
    indented line of options in a usage synopsis), prompts dropped; output lines of a
    ``$ ``-prompted transcript are skipped."""
    prompted = any(ln.lstrip().startswith("$ ") for ln in text.splitlines())
    joined = re.sub(r"\\\n\s*", " ", text)
    # a usage synopsis continues on an indented line of options, without a backslash
    joined = re.sub(r"\n[ \t]+(?=\[?-)", " ", joined)
    for ln in joined.splitlines():
        s = ln.strip()
        if prompted:
            if not s.startswith("$ "):
                continue
            s = s[2:]
        yield s


def _split_commands(line: str) -> Iterator[list[str]]:
    # `|` is not a punctuation character here: `--sampler auto|grid` lists choices; a pipe is
    # written with spaces around it, a token of its own
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: prose, not a command
        return
    cmd: list[str] = []
    for t in tokens:
        if t and (set(t) <= set(";&") or t in ("|", "||")):
            if cmd:
                yield cmd
            cmd = []
        else:
            cmd.append(t)
    if cmd:
        yield cmd


SCRIPT_DIRS = ("examples/", "experiments/", "benchmarks/")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def commands(snip: Snippet) -> Iterator[Command]:
    """The ``bbb``, ``python -m bbb``, ``torchrun ... -m bbb``, ``python SCRIPT.py`` and
    ``make`` commands in a snippet."""
    if snip.lang not in ("", "sh", "bash", "shell", "console", "inline"):
        return
    cwd = ""  # a block's `cd DIR` applies to the script paths after it
    for line in _shell_lines(snip.text):
        for toks in _split_commands(line):
            while toks and _ENV.match(toks[0]):
                toks = toks[1:]
            if not toks:
                continue
            if toks[0] == "cd" and len(toks) == 2:
                cwd = toks[1].rstrip("/") + "/"
                continue
            prog = toks[0].rsplit("/", 1)[-1]
            if snip.lang == "inline" and len(toks) > 1 and toks[1].startswith("-"):
                # a subcommand quoted without its program: `train --resume`, `table1 --jobs N`
                if toks[0] in _bbb_subcommands():
                    yield Command(snip, tuple(toks), "bbb")
                    continue
                if toks[0] in ("table1", "table2", "extras", "report"):
                    yield Command(snip, tuple(toks), "experiments/mnist/run.py")
                    continue
            if prog == "bbb":
                yield Command(snip, tuple(toks[1:]), "bbb")
            elif prog in ("python", "python3", "torchrun"):
                if "-m" in toks:
                    k = toks.index("-m")
                    if toks[k + 1 : k + 2] == ["bbb"]:
                        yield Command(snip, tuple(toks[k + 2 :]), "bbb")
                elif prog != "torchrun" and len(toks) > 1 and toks[1].endswith(".py"):
                    yield Command(snip, tuple(toks[2:]), cwd + toks[1])
            elif toks[0].endswith(".py") and toks[0].startswith(SCRIPT_DIRS):
                # a script named alone: `experiments/mnist/run.py table2`
                yield Command(snip, tuple(toks[1:]), cwd + toks[0])
            elif prog == "make" and len(toks) > 1:
                yield Command(snip, tuple(toks[1:]), "make")


def _bbb_subcommands() -> set[str]:
    from bbb.cli import build_parser

    return set(_subparsers(build_parser()))


def all_commands(program: str | None = None) -> list[Command]:
    out = [c for doc in DOCS for s in snippets(doc) for c in commands(s)]
    return [c for c in out if program is None or c.program == program]


# ---------------------------------------------------------------------------------------------
# the parsers


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def bbb_parser(argv: tuple[str, ...]) -> tuple[str, argparse.ArgumentParser, tuple[str, ...]]:
    """(name, parser, remaining argv) of a ``bbb`` command line; KeyError for an unknown
    subcommand."""
    from bbb.bench import build_parser as bench_parser
    from bbb.cli import build_parser
    from bbb.sweep.cli import _parsers as sweep_parsers

    top = build_parser()
    if not argv or argv[0].startswith("-"):
        return "bbb", top, argv
    name, rest = argv[0], argv[1:]
    if name == "bench":
        return "bbb bench", bench_parser(), rest
    if name == "sweep":
        run, show, best = sweep_parsers()
        if rest[:1] == ("show",):
            return "bbb sweep show", show, rest[1:]
        if rest[:1] == ("best",):
            return "bbb sweep best", best, rest[1:]
        return "bbb sweep", run, rest
    return f"bbb {name}", _subparsers(top)[name], rest


def _is_placeholder(token: str) -> bool:
    """RUN_DIR, N, F.toml, SPACE.toml, ..., <command>, $c: a word the reader replaces."""
    t = token.strip("[]")
    return (
        "..." in t or t.startswith(("<", "$")) or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\w+)?", t))
    )


def option_problems(name: str, parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> list[str]:
    """What in ``argv`` the parser does not accept: unknown options (exact names, as the docs
    should write them, not argparse's accepted abbreviations), values outside an option's
    choices, values of the wrong type."""
    problems: list[str] = []
    opts = parser._option_string_actions
    toks = [t.strip("[]") for t in argv]
    for i, tok in enumerate(toks):
        if not tok.startswith("-") or tok == "-" or re.fullmatch(r"-[\d.e+-]+", tok):
            continue
        flag, eq, inline = tok.partition("=")
        action = opts.get(flag)
        if action is None:
            problems.append(f"{name}: no option {flag}")
            continue
        if action.nargs == 0:
            continue
        if eq:
            values = [inline]
        else:
            values = []
            for v in toks[i + 1 :]:
                if v.startswith("--"):
                    break
                values.append(v)
                single = action.nargs in (None, "?") or isinstance(action.nargs, int)
                if single and len(values) == (action.nargs if isinstance(action.nargs, int) else 1):
                    break
        for v in values:
            if _is_placeholder(v):
                continue
            for alt in v.split("|") if "|" in v else [v]:
                if action.choices is not None and alt not in action.choices:
                    problems.append(
                        f"{name} {flag}: {alt!r} is not one of {sorted(map(str, action.choices))}"
                    )
                elif action.type is not None and action.choices is None:
                    try:
                        action.type(alt)
                    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                        problems.append(f"{name} {flag}: {alt!r} is refused ({e})")
    return problems


def bbb_problems(cmd: Command) -> list[str]:
    argv = cmd.argv
    # an inline span is a command when it names a subcommand or an option; `bbb: error: ...`,
    # `bbb 0.1.0` or `bbb native kernels: ...` are messages it prints
    if cmd.snippet.lang == "inline" and (
        ": " in cmd.snippet.text or (argv and not re.fullmatch(r"-.*|[a-z][a-z-]*", argv[0]))
    ):
        return []
    if argv and _is_placeholder(argv[0]):
        return []
    try:
        name, parser, rest = bbb_parser(argv)
    except KeyError:
        return [f"no command `bbb {argv[0]}`"]
    return option_problems(name, parser, rest)


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    pass


def script_parser(path: str) -> argparse.ArgumentParser | None:
    """The ``argparse`` parser a script builds, caught as it parses (the script is run up to
    that point and no further); None for a script that does not use ``argparse``."""
    import runpy
    import sys

    file = ROOT / path
    imported = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    # argparse, or a wrapper of the `bbb bench` command line (benchmarks/step_time.py)
    if "argparse" not in imported and "bbb.bench.main" not in imported:
        return None
    captured: list[argparse.ArgumentParser] = []

    def grab(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        captured.append(self)
        raise _Captured

    saved = argparse.ArgumentParser.parse_known_args, list(sys.argv), list(sys.path)
    argparse.ArgumentParser.parse_known_args = grab  # type: ignore[method-assign]
    sys.argv = [str(file)]
    sys.path[:0] = [str(file.parent), str(ROOT)]
    try:
        runpy.run_path(str(file), run_name="__main__")
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = saved[0]  # type: ignore[method-assign]
        sys.argv[:], sys.path[:] = saved[1], saved[2]
    return captured[0] if captured else None


def script_problems(cmd: Command) -> list[str]:
    path = cmd.program
    if "/" not in path:  # `python flipout_floor.py`, in a paragraph about benchmarks/probes
        found = [p for d in SCRIPT_DIRS for p in (ROOT / d).rglob(path)]
        if len(found) == 1:
            path = str(found[0].relative_to(ROOT))
    if not (ROOT / path).is_file():
        return [f"no file {path}"]
    parser = script_parser(path)
    if parser is None:
        return []
    argv = cmd.argv
    name = path
    subs = _subparsers(parser)
    if subs and argv and argv[0] in subs:
        name, parser, argv = f"{path} {argv[0]}", subs[argv[0]], argv[1:]
    elif subs and argv and not argv[0].startswith("-") and not _is_placeholder(argv[0]):
        return [f"{path}: no subcommand {argv[0]!r} (one of {sorted(subs)})"]
    return option_problems(name, parser, argv)


# ---------------------------------------------------------------------------------------------
# paths and test names the docs cite

_PATH = re.compile(
    r"(?<![\w./-])((?:src|tests|docs|examples|experiments|benchmarks|bbb)/[\w./*<>-]*[\w*>/])"
)
_TEST_REF = re.compile(r"(test_\w+\.py)::(test_\w+)")


def cited_paths(doc: str) -> Iterator[tuple[int, str]]:
    """(line, path) of every repository path written in a code span or block of ``doc``."""
    for snip in snippets(doc):
        for m in _PATH.finditer(snip.text):
            yield snip.line, m.group(1)


def path_exists(path: str) -> bool:
    if path.startswith("bbb/"):  # the README's table of the pieces: the package's own files
        path = "src/" + path
    if "<" in path or re.search(r"(^|/)[A-Z][A-Z0-9_]*(\.\w+)?(/|$)", path):
        # experiments/uci/configs/<name>.toml, runs/NAME: any file of that form will do
        pattern = re.sub(r"<[^>]*>|(?<=/)[A-Z][A-Z0-9_]*(?=[./]|$)", "*", path)
        return any(ROOT.glob(pattern))
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def _test_functions(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    return {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def cited_tests(doc: str) -> Iterator[tuple[int, str, str]]:
    """(line, file, test) of every ``test_FILE.py::test_NAME`` in ``doc``, and of every
    ``::test_NAME`` continuing the file named before it on the same table row."""
    for lineno, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        file = None
        for m in re.finditer(r"(test_\w+\.py)?::(test_\w+)", line):
            file = m.group(1) or file
            if file is not None:
                yield lineno, file, m.group(2)


def make_target_exists(target: str) -> bool:
    """``make -n TARGET`` (a dry run: nothing is executed) knows the target."""
    import subprocess

    r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    return r.returncode == 0


def resolve_name(dotted: str) -> bool:
    """``bbb.a.b.C`` names an attribute or a module of the installed package."""
    import importlib

    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# the tests

# Commands and paths of docs/RESULTS.md that are right where they stand: the text says they
# ran at a commit whose code has since changed.
HISTORICAL = {
    # "measured it with `python benchmarks/probes/recompute_sigma.py` (at that commit, ...)":
    # commit c260482, reverted in the next commit with its probe
    ("docs/RESULTS.md", "benchmarks/probes/recompute_sigma.py"),
    # "a review of `src/bbb/bandit.py`" (session 12), "`src/bbb/uci.py` (`bbb uci`; since split
    # into the package `src/bbb/uci/`)": the modules before they became packages
    ("docs/RESULTS.md", "src/bbb/bandit.py"),
    ("docs/RESULTS.md", "src/bbb/uci.py"),
    # "compact export = ..., `experiments/mnist/run.py export_compact`": a function of the
    # driver (session 4), not a subcommand; since bb680f7 the library's bbb.save_compact
    ("docs/RESULTS.md", "experiments/mnist/run.py export_compact"),
}


def test_the_command_reader_finds_the_documented_commands() -> None:
    """The reader is not vacuous: it finds the README's commands, fenced and inline, joined
    over continuation lines, with prompts, comments, `&` and environment assignments removed."""
    readme = [
        " ".join((c.program, *c.argv)) for c in all_commands() if c.snippet.doc == "README.md"
    ]
    for expected in [
        "bbb demo --out runs/demo --quiet",
        "bbb train --dataset mnist --subset 2000 --epochs 2 --hidden 100 100 --out runs/r1 --quiet",
        "bbb bandit --agents greedy-0 greedy-0.01 greedy-0.05 --out runs/bandit-greedy",
        "bbb train --dataset mnist --device cuda --batch-size 512 --epochs 20 --out runs/mnist-ddp",
        "bbb sweep SPACE.toml --out SWEEP_DIR [--trials N] [--workers K] [--storage URL] "
        "[--sampler auto|grid|tpe|random] [--pruner median|hyperband|none] [--heartbeat S]",
        "bbb train --kernels native",
        "make test-all",
    ]:
        assert expected in readme
    assert len([c for c in all_commands("bbb")]) > 150


def test_the_option_check_catches_what_it_is_for() -> None:
    """A wrong subcommand, option, choice or typed value in a code block is reported."""
    bad = Snippet(
        "x.md",
        1,
        "sh",
        "bbb train --epoch 3 --lr abc\nbbb evaluate RUN --split train\n"
        "bbb sweep S.toml --out D --sampler auto|grd\nbbb sweep show D --tops 3\n"
        "bbb trian --epochs 2\nbbb bench --sizes x\n",
    )
    problems = [p for c in commands(bad) for p in bbb_problems(c)]
    assert problems == [
        "bbb train: no option --epoch",
        "bbb train --lr: 'abc' is refused (could not convert string to float: 'abc')",
        "bbb evaluate --split: 'train' is not one of ['test', 'val']",
        "bbb sweep --sampler: 'grd' is not one of ['auto', 'grid', 'random', 'tpe']",
        "bbb sweep show: no option --tops",
        "no command `bbb trian`",
        "bbb bench --sizes: 'x' is refused (expected comma-separated positive integers, got 'x')",
    ]
    # messages in inline spans are not commands; placeholders are not values
    fine = Snippet("x.md", 1, "inline", "bbb native kernels: gradients are first-order only")
    assert [p for c in commands(fine) for p in bbb_problems(c)] == []
    ok = Snippet("x.md", 1, "sh", "bbb prune RUN_DIR --fraction F --export FILE\n")
    assert [p for c in commands(ok) for p in bbb_problems(c)] == []
    quoted = Snippet("x.md", 1, "inline", "evaluate --num-sample 0")
    assert [p for c in commands(quoted) for p in bbb_problems(c)] == [
        "bbb evaluate: no option --num-sample"
    ]
    # a transcript: the `$ ` lines are commands, the others its output
    transcript = Snippet("x.md", 1, "", "$ bbb demo --quiet\nbbb demo --bogus\n")
    assert [" ".join(c.argv) for c in commands(transcript)] == ["demo --quiet"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_bbb_command_in_the_docs_names_real_subcommands_and_options(doc: str) -> None:
    problems = [
        f"{c.where()}: {p}"
        for s in snippets(doc)
        for c in commands(s)
        if c.program == "bbb"
        for p in bbb_problems(c)
    ]
    assert problems == []


@pytest.mark.parametrize(
    "doc",
    [pytest.param(d, marks=pytest.mark.slow) if d == "docs/RESULTS.md" else d for d in DOCS],
)  # RESULTS.md names ~30 scripts, each run up to its argument parser (~7 s)
def test_every_script_in_the_docs_exists_and_takes_its_options(doc: str) -> None:
    problems = [
        f"{c.where()}: {p}"
        for s in snippets(doc)
        for c in commands(s)
        if c.program.endswith(".py")
        and (doc, c.program) not in HISTORICAL
        and (doc, " ".join((c.program, *c.argv))) not in HISTORICAL
        for p in script_problems(c)
    ]
    assert problems == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_make_target_in_the_docs_exists(doc: str) -> None:
    targets = {c.argv[0] for s in snippets(doc) for c in commands(s) if c.program == "make"}
    assert [t for t in sorted(targets) if not make_target_exists(t)] == []


def test_the_make_target_check_can_fail() -> None:
    assert make_target_exists("test") and not make_target_exists("no-such-target")


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_in_the_docs_exists(doc: str) -> None:
    missing = [
        f"{doc}:{line}: {p}"
        for line, p in cited_paths(doc)
        if (doc, p) not in HISTORICAL and not path_exists(p)
    ]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_the_docs_cite_exists(doc: str) -> None:
    cache: dict[str, set[str]] = {}
    missing = []
    for line, file, name in cited_tests(doc):
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"{doc}:{line}: no file tests/{file}")
            continue
        if file not in cache:
            cache[file] = _test_functions(path)
        if name not in cache[file]:
            missing.append(f"{doc}:{line}: no test {file}::{name}")
    assert missing == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_dotted_bbb_name_in_the_docs_exists(doc: str) -> None:
    names = {
        (s.line, m.group(1))
        for s in snippets(doc)
        for m in re.finditer(r"(?<![\w./-])(bbb(?:\.[A-Za-z_]\w*)+)(?![\w/])", s.text)
        if not m.group(1).endswith((".py", ".toml", ".json", ".md", ".pt"))
    }
    assert [f"{doc}:{line}: {n}" for line, n in sorted(names) if not resolve_name(n)] == []


@pytest.mark.slow  # collects two test files (~10 s)
def test_the_reliability_tables_cases_are_real_test_ids() -> None:
    """The Bad input table's `case` column, and each `::test[id]` of docs/RELIABILITY.md, name
    test ids pytest collects."""
    import subprocess
    import sys

    doc = (ROOT / "docs/RELIABILITY.md").read_text(encoding="utf-8").splitlines()
    wanted: set[str] = set()
    for line in doc:
        file = test = None
        for m in re.finditer(r"(?:(test_\w+\.py)?::(test_\w+))?\[([^\]]+)\]", line):
            if m.group(2):
                file, test = m.group(1) or file, m.group(2)
            if file and test and m.group(3) != "case":
                wanted.add(f"tests/{file}::{test}[{m.group(3)}]")
    start = doc.index("## Bad input")
    end = next(i for i in range(start + 1, len(doc)) if doc[i].startswith("## "))
    for line in doc[start:end]:
        last = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
        if line.startswith("|") and "::" not in last and "---" not in last:
            for m in re.finditer(r"`([a-z0-9]+(?:-[a-z0-9]+)+)`", last):
                wanted.add(f"tests/test_reliability.py::test_bad_input_is_a_clear_error[{m[1]}]")
    assert len(wanted) > 60  # the table's cases are read
    files = sorted({w.split("::")[0] for w in wanted})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    collected = {line.strip() for line in out.splitlines()}  # one id a line; ids hold spaces
    assert sorted(wanted - collected) == []


# ---------------------------------------------------------------------------------------------
# the README's Python, and its account of the exit codes


def _python_blocks(doc: str) -> list[Snippet]:
    return [s for s in snippets(doc) if s.lang == "python"]


def _mnist_or_skip() -> None:
    import bbb
    from bbb.data.checksums import MissingDataError

    try:
        bbb.data.load_mnist(split="test")
    except MissingDataError as e:
        pytest.skip(f"no MNIST data: {e}")


def test_the_readme_quickstart_runs_and_gives_what_it_says(monkeypatch) -> None:
    """The Quickstart as written, on the first 512 training and 256 test images (the loader is
    cut short; the code is the README's)."""
    import torch
    from torch.utils.data import TensorDataset

    import bbb

    _mnist_or_skip()
    (quick,) = [s for s in _python_blocks("README.md") if "load_mnist" in s.text]
    real = bbb.data.load_mnist

    def small(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ds = real(*args, subset=512 if kwargs.get("split") == "train" else 256, **kwargs)
        assert isinstance(ds, TensorDataset)
        return ds

    monkeypatch.setattr(bbb.data, "load_mnist", small)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(quick.text, f"README.md:{quick.line}", "exec"), ns)  # noqa: S102
    assert ns["x"].shape[1:] == (784,) and ns["y"].dtype == torch.int64
    assert ns["x"].max() == 255 / 126  # "x / 126"
    pred = ns["pred"]
    assert pred.probs.shape == (256, 10)
    for name in ("entropy", "aleatoric", "epistemic"):
        assert getattr(pred, name).shape == (256,)
    torch.testing.assert_close(pred.entropy, pred.aleatoric + pred.epistemic)
    ece = bbb.metrics.expected_calibration_error(pred.probs, ns["y_test"])
    assert 0.0 <= float(ece) <= 1.0
    assert torch.isfinite(ns["out"].loss)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A toy-curve run of 2 epochs at ``runs/r1`` under a fresh directory (no data files)."""
    from bbb.cli import main

    root = tmp_path_factory.mktemp("docs-toy")
    argv = ["train", "--dataset", "toy", "--hidden", "8", "--epochs", "2"]
    assert main([*argv, "--out", str(root / "runs/r1"), "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def uci_run(tmp_path_factory) -> Path:
    """A bostonHousing run of 2 epochs (`bbb train --dataset uci`), at ``runs/r1`` under a
    fresh directory."""
    from bbb.cli import main
    from bbb.data.checksums import MissingDataError, resolve_data_dir

    try:
        if not (resolve_data_dir() / "uci" / "bostonHousing").is_dir():
            pytest.skip("no UCI bostonHousing data")
    except MissingDataError as e:
        pytest.skip(f"no data directory: {e}")
    root = tmp_path_factory.mktemp("docs")
    argv = ["train", "--dataset", "uci", "--uci-path", "bostonHousing", "--hidden", "8"]
    argv += ["--epochs", "2", "--num-samples", "1", "--out", str(root / "runs/r1"), "--quiet"]
    assert main(argv) == 0
    return root


def test_the_readme_load_run_snippet_and_its_unit_conversion_run(uci_run, monkeypatch) -> None:
    """`bbb.load_run("runs/r1", ...)` as the README writes it, then each expression of that
    section (`pred = bbb.predict(...)`, the conversions to original units, the normalisation
    statistics) on the run's test inputs."""
    import torch

    import bbb

    monkeypatch.chdir(uci_run)
    (block,) = [s for s in _python_blocks("README.md") if "load_run" in s.text]
    ns: dict = {"bbb": bbb}
    exec(compile(block.text, f"README.md:{block.line}", "exec"), ns)  # noqa: S102
    cfg, model, data = ns["cfg"], ns["model"], ns["data"]
    assert isinstance(cfg, bbb.config.TrainConfig) and isinstance(data, bbb.runs.RunData)
    assert not model.training  # "The model comes back in eval mode"
    ns["x"] = data.test.tensors[0]
    # the section's inline code that is Python and uses the loaded run
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### A run from Python")
    end = text.index("\n### ", start + 1)
    spans = [
        s
        for s in snippets("README.md")
        if s.lang == "inline"
        and start <= _offset(text, s.line) < end
        and re.search(r"\bpred\b|\bdata\.", s.text)
    ]
    assert len(spans) >= 4
    results = {}
    for s in spans:
        tree = ast.parse(s.text)
        if isinstance(tree.body[-1], ast.Expr):
            results[s.text] = eval(
                compile(ast.Expression(tree.body[-1].value), "README", "eval"), ns
            )  # noqa: S307
        else:
            exec(compile(tree, "README", "exec"), ns)  # noqa: S102
    y = data.test.tensors[1]
    mean = results["pred.mean * data.y_std + data.y_mean"]
    assert mean.shape == y.shape
    assert results["pred.variance * data.y_std**2"].shape == y.shape
    assert len(results['data.normalization["x_mean"]']) == data.in_features
    # the conversion puts the mean in the units of the data file: its RMSE is bbb evaluate's
    # scale, not the normalised one (targets of a 2-epoch net: within a few y_std)
    rmse = (mean - (y * data.y_std + data.y_mean)).pow(2).mean().sqrt()
    assert torch.isfinite(rmse) and rmse > 1.0


def _offset(text: str, line: int) -> int:
    """Character offset of the start of 1-based ``line`` in ``text``."""
    return sum(len(t) + 1 for t in text.split("\n")[: line - 1])


def test_the_readme_sweep_space_is_accepted(tmp_path) -> None:
    """The README's example space file loads, and its candidates are valid run settings."""
    from bbb.sweep.space import load_space

    (toml,) = [s for s in snippets("README.md") if s.lang == "toml"]
    path = tmp_path / "space.toml"
    path.write_text(toml.text, encoding="utf-8")
    space = load_space(path)
    assert space.command == "train" and space.metric == "error" and space.trials == 40
    assert [p.name for p in space.params] == [
        "lr", "num_samples", "prior_pi", "prior", "prior_sigma1", "hidden"
    ]  # fmt: skip
    for prior in ("gaussian", "scale_mixture"):
        searched = {"lr": 1e-3, "num_samples": 2, "prior_pi": 0.25, "prior": prior}
        cfg = space.config({**searched, "prior_sigma1": 1, "hidden": [400, 400]})
        assert cfg.prior_sigma1 == pytest.approx(0.36787944117144233)  # exp(-1)


# README, "Command line": each example it gives of exit code 2 (the command line as written
# cannot be used) and of exit code 1 (a value or state found wrong while checking or working)
EXIT_CODES = [
    (["train", "--epochs", "abc"], 2),
    (["evaluate", "RUN", "--split", "train"], 2),
    (["train", "--resume", "RUN", "--config", "c.toml"], 2),
    (["train", "--resume", "RUN", "--out", "o"], 2),
    (["train", "--resume", "RUN", "--overwrite"], 2),
    (["train", "--resume", "RUN", "--lr", "0.5"], 2),
    (["train", "--lr", "-1", "--out", "OUT"], 1),
    (["train", "--estimator", "bogus", "--out", "OUT"], 1),
    (["evaluate", "RUN", "--num-samples", "0"], 1),
    (["prune", "RUN", "--fraction", "1.0"], 1),
    (["train", "--resume", "RUN", "--epochs", "1"], 1),
    (["train", "--method", "sgd", "--prior", "laplace", "--out", "OUT"], 1),
    (["train", "--dataset", "mnist", "--noise-sigma", "1", "--out", "OUT"], 1),
    (["train", "--momentum", "0.9", "--out", "OUT"], 1),
    (["bandit", "--resume", "--overwrite", "--out", "OUT"], 1),
    (["uci", "bostonHousing", "--all", "ROOT"], 1),
]


@pytest.mark.parametrize(
    ("argv", "code"),
    EXIT_CODES,
    ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v),
)
def test_the_readmes_exit_codes(argv, code, toy_run, capsys) -> None:
    from bbb.cli import main

    run = str(toy_run / "runs/r1")
    out = str(toy_run / "never-written")
    argv = [{"RUN": run, "OUT": out, "ROOT": str(toy_run)}.get(a, a) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("bbb: error: ") and err.count("\n") == 1
    assert not Path(out).exists()


def test_cuda_without_cuda_exits_with_1(tmp_path, capsys) -> None:
    import torch

    from bbb.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r")]) == 1
    assert not (tmp_path / "r").exists()


def test_option_sets_in_the_examples_readme_apply_to_the_scripts_they_are_given_for() -> None:
    """A span of several options in examples/README.md's prose (an option set to run, such as
    a smoke test's) is accepted by the examples its sentence names, or by every example when
    it names none (before: `--epochs 1 --subset 500` was offered for all three, and
    heteroscedastic_regression.py has no --subset, bayesianize_existing_model.py no --epochs)."""
    doc = "examples/README.md"
    text = " ".join((ROOT / doc).read_text(encoding="utf-8").split())
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    checked = 0
    for s in snippets(doc):
        argv = s.text.split()
        if s.lang != "inline" or sum(a.startswith("--") for a in argv) < 2:
            continue
        if not all(a.startswith("--") or not a.startswith("-") for a in argv):
            continue
        at = text.index(f"`{s.text}`")
        start = max(text.rfind(". ", 0, at), text.rfind("; ", 0, at)) + 2
        end = min(i for i in (text.find(". ", at), text.find("; ", at), len(text)) if i >= 0)
        named = [e for e in examples if e in text[start:end]] or examples
        for name in named:
            c = Command(s, tuple(argv), f"examples/{name}")
            assert script_problems(c) == [], f"{doc}:{s.line}: {s.text} for {name}"
        checked += 1
    assert checked >= 1


def _bbb_definitions() -> dict[str, object]:
    """Every public class or function the bbb package defines, by name."""
    import importlib
    import pkgutil

    import bbb

    found: dict[str, object] = {}
    for info in pkgutil.walk_packages(bbb.__path__, "bbb."):
        if info.name.endswith("__main__"):
            continue
        for name, obj in vars(importlib.import_module(info.name)).items():
            if (
                not name.startswith("_")
                and (isinstance(obj, type) or callable(obj))
                and getattr(obj, "__module__", "").startswith("bbb")
            ):
                found.setdefault(name, obj)
    return found


def test_every_bbb_class_or_function_the_readme_names_can_be_found() -> None:
    """A class or function of bbb that the README names (`TrainConfig.unused_settings()`,
    `StopTraining`, `train_run(...)`) is in `bbb.__all__`, or the README says where it lives:
    written in full (`bbb.config.TrainConfig`) somewhere, or in a row of its table of the
    pieces whose last column names the module (`Trainer` | `bbb/train/`)."""
    import importlib

    import torch

    import bbb

    doc = "README.md"
    text = (ROOT / doc).read_text(encoding="utf-8")
    defined = _bbb_definitions()
    # "where" of the table of the pieces: `Name` ... | `bbb/train/` -> bbb.train
    table_homes: dict[str, list[str]] = {}
    for row in text.splitlines():
        cells = row.strip().strip("|").split(" | ")
        if row.startswith("|") and len(cells) == 2:
            homes = [
                p.strip("/").removesuffix(".py").replace("/", ".")
                for p in re.findall(r"`(bbb/[\w/.]+)`", cells[1])
            ]
            for name in re.findall(r"`(\w+)", cells[0]):
                table_homes.setdefault(name, []).extend(homes)
    unlocated = []
    for s in snippets(doc):
        m = re.fullmatch(r"([A-Za-z_]\w*)((?:\.\w+)*)(\(.*\))?", s.text)
        if s.lang != "inline" or not m or not (m[1][0].isupper() or m[2] or m[3]):
            continue
        name = m[1]
        if name not in defined or name in bbb.__all__:
            continue
        if any(hasattr(mod, name) for mod in (torch, torch.nn, torch.optim, torch.utils.data)):
            continue  # PyTorch's (`Adam(fused=True)`)
        written = [w for w in re.findall(rf"\b(bbb(?:\.\w+)+)\.{name}\b", text) if resolve_name(w)]
        homes = [h for h in table_homes.get(name, []) if hasattr(importlib.import_module(h), name)]
        if not written and not homes:
            unlocated.append(f"{doc}:{s.line}: {s.text} ({defined[name].__module__})")
    assert unlocated == []
