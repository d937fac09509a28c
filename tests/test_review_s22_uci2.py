"""Review session 22, second pass over the UCI engine (#7), the sweep worker (#10) and the
benchmark's JSON (#8): regression tests, all tiny (no training run, no timing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bbb import bench
from bbb import uci as U
from bbb.sweep import worker as W

# --------------------------------------------------------------------------- sweep (#10)


class _FakeTrial:
    """The few Optuna trial methods the worker's objective calls."""

    def __init__(self) -> None:
        self.number = 0
        self.params: dict[str, Any] = {}
        self.user_attrs: dict[str, Any] = {}
        self.system_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False


def _fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> W._Worker:
    """A worker on a fake study whose 'training' writes its run directory and reports one
    epoch of val_nll 0.5 (no Optuna, no training)."""
    states = SimpleNamespace(RUNNING=1, WAITING=2, COMPLETE=3, PRUNED=4, FAIL=5)
    optuna = SimpleNamespace(trial=SimpleNamespace(TrialState=states), TrialPruned=RuntimeError)
    monkeypatch.setattr(W, "_import_optuna", lambda: optuna)

    def fake_train_run(cfg: Any, run_dir: Path, **kw: Any) -> dict[str, Any]:
        Path(run_dir).mkdir(parents=True)
        kw["epoch_callback"](1, {"val_nll": 0.5})
        return {"epochs_trained": 1}

    monkeypatch.setattr("bbb.runs.train_run", fake_train_run)
    space = SimpleNamespace(
        params=[], metric="nll", direction="minimize", config=lambda s: U.uci_config()
    )
    study = SimpleNamespace(study_name="s", get_trials=lambda deepcopy=False: [])
    return W._Worker(space=space, study=study, out=tmp_path, sampler="random", n_trials=1, poll=0)  # type: ignore[arg-type]


def test_the_sweep_workers_trial_json_is_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """trial.json was written in place (Path.write_text): a worker killed mid-write left a
    truncated file. It is now written to a temporary file and renamed over its name: a write
    that fails before the rename leaves neither trial.json nor the temporary file."""
    worker = _fake_worker(tmp_path, monkeypatch)
    assert worker.objective(_FakeTrial()) == 0.5
    run_dir = tmp_path / "trials" / "trial-0000"
    info = json.loads((run_dir / "trial.json").read_text())
    assert info["state"] == "COMPLETE" and info["val_nll"] == 0.5 and info["best_epoch"] == 1

    worker = _fake_worker(tmp_path, monkeypatch)

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="killed before the rename"):
        worker.objective(_FakeTrial())
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == []
    capsys.readouterr()


# --------------------------------------------------------------------------- bench (#8)


def test_bench_json_records_the_argv_it_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`command` was " ".join(sys.argv): pytest's command line (or any caller's) when
    bench.main(argv) was called from code."""
    monkeypatch.setattr(bench, "run_step_times", lambda *a, **k: [])
    monkeypatch.setattr(bench.sys, "argv", ["pytest", "-k", "something"])
    out = tmp_path / "b.json"
    args = ["--quick", "--no-peers", "--no-inference", "--no-memory", "--no-variance"]
    args += ["--no-tune-allocator", "--json", str(out)]
    assert bench.main(args) == 0
    assert json.loads(out.read_text())["command"] == "bbb bench " + " ".join(args)
    assert bench.main(args, prog="benchmarks/step_time.py") == 0
    assert json.loads(out.read_text())["command"].startswith("benchmarks/step_time.py --quick")
    capsys.readouterr()


def test_a_failed_memory_row_has_the_shape_of_a_good_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed memory subprocess gave a row of the raw spec keys (threads, device, prior,
    ...) with `error` as a one-element list; now the measured row's keys, null numbers and
    `error` as a string."""
    stderr = {"bbb": "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"}

    def fake_run(cmd: list[str], **_: Any) -> SimpleNamespace:
        lib = json.loads(cmd[-1])["library"]
        if lib in stderr:
            return SimpleNamespace(returncode=1, stdout="", stderr=stderr[lib])
        out = {"base_kib": 1024, "peak_kib": 3072, "offered": True, "allocator_tuned": False}
        return SimpleNamespace(returncode=0, stdout=json.dumps(out) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    good, bad = bench.run_memory([("mlp", 8)], ["reparam"], [], batch=4, tuned_allocator=False)
    assert good["peak_mib"] == 3.0 and good["step_mib"] == 2.0 and "error" not in good
    assert set(bad) == {*good, "error"}
    assert bad["error"] == "RuntimeError: boom"
    assert bad["peak_mib"] is None and bad["step_mib"] is None and bad["library"] == "bbb"
    stderr["bbb"] = ""
    _, bad = bench.run_memory([("mlp", 8)], ["reparam"], [], batch=4, tuned_allocator=False)
    assert bad["error"] == "exit code 1"
