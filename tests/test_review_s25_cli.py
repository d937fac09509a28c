"""Session 25 review of the command line, the benchmark and the scripts (issues #4 and #8).

Each test names the defect it guards against. Everything here runs without data and in
well under a second (the scripts' own work is replaced where only their options matter).
"""

from __future__ import annotations

import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- bbb bench (#8) ---------------------------------------------------------------------------


def test_kernels_step_returns_the_loss() -> None:
    """The bbb-kernels / bbb-native step returned None, not the step's loss: the loss (a float
    read from the device) is what makes a timed step wait for a GPU, so on CUDA those rows timed
    the kernel launches only (mypy: Callable[[], None] returned as a Step)."""
    from bbb import bench

    step = bench._kernels_step(lambda: 2.5, "compile")
    assert step is not None
    assert step() == 2.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "400,400"], "--sizes lists 400 twice"),
        (["--samples", "1,10,1"], "--samples lists 1 twice"),
        (["--nets", "mlp,mlp"], "--nets lists mlp twice"),
        (["--estimators", "local,reparam,local"], "--estimators lists local twice"),
        (["--priors", "gaussian,gaussian"], "--priors lists gaussian twice"),
    ],
)
def test_bench_refuses_a_value_listed_twice(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bbb bench --sizes 400,400` measured the same network twice and printed two
    identical-looking rows (a repeated sample count, estimator or prior was built twice and
    timed once). A repeat is refused like any other bad value: one line, exit code 1, before
    anything is measured."""
    from bbb import bench
    from bbb.cli import main

    def measured(*_: Any) -> None:  # a repeat let through: fail here, not after a benchmark
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(bench, "machine_info", measured)
    assert main(["bench", "--no-peers", *args]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"bbb: error: {message}: give each value once\n"
    assert captured.out == ""


# --- benchmarks/time_to_accuracy.py (#8) ------------------------------------------------------


def _load_tta(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    path = ROOT / "benchmarks" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    assert spec is not None and spec.loader is not None
    tta = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "time_to_accuracy", tta)
    spec.loader.exec_module(tta)
    return tta


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "2"], "--target must be a validation error in (0, 1], got 2.0"),
        (["--eval-every", "0"], "--eval-every must be positive, got 0"),
        (["--subset", "100"], "--subset must be at least the batch size 128, got 100"),
        (["--libraries", "torchbnn"], "--libraries: unknown library 'torchbnn'"),
        (["--estimator", "bogus"], "--estimator: unknown estimator 'bogus'"),
    ],
)
def test_time_to_accuracy_refuses_a_value_with_exit_code_1(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An out-of-range value or unknown name exited with 2, bbb's code for a command line that
    cannot be parsed; `bbb bench` (and the README's exit codes) give 1 for such a value.
    --estimator bogus was a ValueError traceback after the data had been loaded."""
    tta = _load_tta(monkeypatch)
    argv = ["--libraries", "bbb", *args, "--data-dir", "/nonexistent"]
    assert tta.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"benchmarks/time_to_accuracy.py: error: {message}"), err
    assert err.count("\n") == 1


def test_time_to_accuracy_keeps_2_for_what_cannot_be_parsed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tta = _load_tta(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        tta.main(["--target", "abc", "--data-dir", "/nonexistent"])
    assert exc.value.code == 2
    assert "argument --target: invalid float value: 'abc'" in capsys.readouterr().err


def test_time_to_accuracy_missing_data_is_one_line(tmp_path: Path) -> None:
    """A wrong --data-dir was a MissingDataError traceback (the examples and `bbb` say it in
    one line, exit code 1)."""
    absent = tmp_path / "absent"
    script = ROOT / "benchmarks" / "time_to_accuracy.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--libraries", "bbb", "--data-dir", str(absent)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(
        f"benchmarks/time_to_accuracy.py: error: Data directory {absent}"
    ), proc.stderr
    assert proc.stderr.count("\n") == 1


# --- experiments/mnist/run.py (#4) ------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True])
def test_mnist_driver_draws_no_progress_bar_into_a_log(
    quiet: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --quiet, table1 drew tqdm bars (redrawn with carriage returns) into a log file
    or a pipe, where `bbb train` draws none: bars only on a terminal, none with --quiet; the
    per-epoch lines are printed either way, as by `bbb train --quiet`."""
    import bbb.runs

    calls: list[dict[str, Any]] = []

    def fake_train_run(cfg: Any, rd: Any, **kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return {}

    monkeypatch.setattr(bbb.runs, "train_run", fake_train_run)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # pytest's capture: not a terminal
    assert not sys.stderr.isatty()
    driver = runpy.run_path(str(ROOT / "experiments" / "mnist" / "run.py"), run_name="s25")
    argv = ["table1", "--methods", "sgd", "--widths", "8", "--epochs", "1", "--subset", "128"]
    driver["main"]([*argv, *(["--quiet"] if quiet else []), "--out", str(tmp_path)])
    assert [c["progress"] for c in calls] == [False]
