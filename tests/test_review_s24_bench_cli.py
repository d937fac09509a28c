"""Session 24 review of `bbb bench` and `bbb sweep` refusals (#8, #10): every refused command is
one `bbb: error: ...` line with the README's exit codes (2: a malformed command line, 1: a value
that is refused), and nothing is measured or written first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bbb import bench
from bbb.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys: pytest.CaptureFixture[str], prefix: str = "bbb: error: ") -> str:
    """The single stderr line of a refused command (nothing on stdout), without its prefix."""
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert captured.err.startswith(prefix), captured.err
    return captured.err[len(prefix) : -1]


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused command must not get as far as measuring anything."""

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused command measured the step times")

    monkeypatch.setattr(bench, "run_step_times", measured)
    monkeypatch.setattr(bench.bench_peers, "available_peers", measured)


# --------------------------------------------------------------------------- bbb bench (#8)

BENCH_REFUSALS = [
    # an unknown name or an empty list: a refused value, 1 (was a `bbb bench: ...` line
    # raised as SystemExit, outside bbb's `bbb: error:` format)
    (["--nets", "foo"], 1, "--nets: unknown net 'foo'; accepted values: mlp, conv"),
    (
        ["--estimators", "reparam,foo"],
        1,
        "--estimators: unknown estimator 'foo'; accepted values: reparam, local, flipout",
    ),
    (
        ["--priors", "laplace"],
        1,
        "--priors: unknown prior 'laplace'; accepted values: gaussian, scale_mixture",
    ),
    (["--priors", ""], 1, "--priors is empty; accepted values: gaussian, scale_mixture"),
    (["--nets", ","], 1, "--nets is empty; accepted values: mlp, conv"),
    (["--device", "gpu0"], 1, "--device 'gpu0' is not a torch device"),
    (["--device", "meta"], 1, "--device meta: only cpu and cuda are supported"),
    # a number out of range: 1 (was 2, the exit code of a malformed command line)
    (["--samples", "0"], 1, "--samples: values must be positive integers, got 0"),
    (["--samples", ","], 1, "--samples is empty: give comma-separated positive integers"),
    (["--sizes", "400,-1"], 1, "--sizes: values must be positive integers, got -1"),
    (["--repeats", "0"], 1, "--repeats must be an integer >= 1, got 0"),
    (["--batch", "-3"], 1, "--batch must be an integer >= 1, got -3"),
    (["--warmup", "-1"], 1, "--warmup must be an integer >= 0, got -1"),
    (["--threads", "0"], 1, "--threads must be an integer >= 1, got 0"),
    (["--variance-draws", "1"], 1, "--variance-draws must be an integer >= 2, got 1"),
    # malformed: 2
    (["--samples", "1,x"], 2, "argument --samples: expected comma-separated positive integers"),
    (["--repeats", "many"], 2, "argument --repeats: expected an integer, got 'many'"),
    (["--bogus"], 2, "unrecognized arguments: --bogus (see `bbb bench --help`)"),
    (["--sizes"], 2, "argument --sizes: expected one argument"),
]


@pytest.mark.parametrize(("args", "code", "message"), BENCH_REFUSALS)
def test_bench_refusals_are_one_bbb_error_line_with_the_readme_exit_code(
    args: list[str],
    code: int,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_measuring: None,
) -> None:
    out = tmp_path / "out" / "bench.json"
    assert cli_main(["bench", "--no-peers", "--json", str(out), *args]) == code
    assert _one_error_line(capsys).startswith(message)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_cuda_index_this_machine_lacks_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--device cuda:3` on a one-GPU machine passed the check and failed at the first step,
    after the peer libraries were imported (an `invalid device ordinal` from deep in torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(bench.BenchError, match=r"--device cuda:3: this machine has 1 CUDA"):
        bench.resolve_device("cuda:3")
    assert bench.resolve_device("cuda:0") == torch.device("cuda:0")
    assert bench.resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_unwritable_json_is_refused_before_anything_is_measured(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_measuring: None
) -> None:
    """`--json DIR` (or a path under a file) failed at the first save, after the step-time
    part: the minutes measured were lost. Now refused first, naming the path."""
    if where == "a directory":
        target, said = tmp_path, f"--json {tmp_path} is a directory"
    else:
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "sub" / "b.json"
        said = f"--json {target}: {tmp_path / 'f'} is a file, not a directory"
    before = sorted(tmp_path.rglob("*"))
    assert cli_main(["bench", "--no-peers", "--json", str(target)]) == 1
    assert _one_error_line(capsys).startswith(said)
    assert sorted(tmp_path.rglob("*")) == before  # no probe file left behind


def test_the_script_refuses_like_bbb_bench_under_its_own_name(
    capsys: pytest.CaptureFixture[str], no_measuring: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/step_time.py printed argparse's usage block for a malformed option and a
    `bbb bench: ...` line (exit 1) for a bad value; now bbb bench's lines and exit codes."""
    prog = "benchmarks/step_time.py"
    assert bench.script_main(["--samples", "0"], prog=prog) == 1
    assert _one_error_line(capsys, f"{prog}: error: ") == (
        "--samples: values must be positive integers, got 0"
    )
    assert bench.script_main(["--nets", "foo"], prog=prog) == 1
    assert _one_error_line(capsys, f"{prog}: error: ").startswith("--nets: unknown net 'foo'")
    assert bench.script_main(["--bogus"], prog=prog) == 2
    assert _one_error_line(capsys, f"{prog}: error: ") == (
        f"unrecognized arguments: --bogus (see `{prog} --help`)"
    )
    with pytest.raises(bench.BenchError):  # --debug: the exception itself
        bench.script_main(["--debug", "--nets", "foo"], prog=prog)
    capsys.readouterr()

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_benchmark", interrupted)
    assert bench.script_main(["--no-peers"], prog=prog) == 130
    assert capsys.readouterr().err == f"{prog}: interrupted\n"


def test_the_step_time_script_runs_script_main() -> None:
    """The wrapper itself, as a user runs it: one error line, the value's exit code."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        "benchmarks/step_time.py: error: --repeats must be an integer >= 1, got 0\n"
    )


# --------------------------------------------------------------------------- bbb sweep (#10)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        # a value out of range: 1; --top 0 was 2, unlike --trials 0
        (["show", "{dir}", "--top", "0"], 1, "--top must be >= 1, got 0"),
        (["show", "{dir}", "--top", "-1"], 1, "--top must be >= 1, got -1"),
        # reported before the space file is read (a missing one was named instead)
        (["{space}", "--out", "{dir}", "--trials", "0"], 1, "--trials must be >= 1, got 0"),
        (["{space}", "--out", "{dir}", "--workers", "0"], 1, "--workers must be >= 1, got 0"),
        (
            ["{space}", "--out", "{dir}", "--heartbeat", "0"],
            1,
            "--heartbeat must be >= 1 second, got 0",
        ),
        # malformed: 2
        (["show", "{dir}", "--top", "ten"], 2, "argument --top: invalid int value: 'ten'"),
        (["{space}", "--out", "{dir}", "--trials", "x"], 2, "argument --trials: invalid int"),
        (["{space}", "--out", "{dir}", "--sampler", "nope"], 2, "argument --sampler: invalid"),
        (["{space}"], 2, "the following arguments are required: --out"),
        (["show"], 2, "the following arguments are required: sweep_dir"),
        (["best", "{dir}", "--top", "3"], 2, "unrecognized arguments: --top 3"),
    ],
)
def test_sweep_refusals_are_one_bbb_error_line_with_the_readme_exit_code(
    args: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir, space = tmp_path / "sweep", tmp_path / "missing.toml"
    argv = [a.format(dir=sweep_dir, space=space) for a in args]
    assert cli_main(["sweep", *argv]) == code
    assert _one_error_line(capsys).startswith(message)
    assert not sweep_dir.exists()


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["bench", "--help"], "usage: bbb bench"),
        (["sweep", "--help"], "usage: bbb sweep"),
        (["sweep", "show", "--help"], "usage: bbb sweep show"),
        (["sweep", "best", "--help"], "usage: bbb sweep best"),
    ],
)
def test_help_of_bench_and_sweep_exits_0(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(usage) and captured.err == ""
