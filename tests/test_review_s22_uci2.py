"""Review session 22, second pass over the UCI engine (#7), the sweep worker (#10) and the
benchmark's JSON (#8): regression tests, all tiny (no training run, no timing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_uci import _write_uci_dir

from bbb import bench
from bbb import uci as U
from bbb.cli import main as bbb_main
from bbb.config import ConfigError
from bbb.sweep import worker as W
from bbb.uci.report import _load_records

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


# --------------------------------------------------------------------------- UCI records (#7)


def _record(split: int) -> dict[str, Any]:
    return {
        "split": split,
        "rmse": 1.0,
        "ll": -1.5,
        "epochs": 2,
        "seconds": 0.1,
        "noise_std": 0.3,
        "settings": {"lr": 0.01},
    }


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([1, 2], "a JSON list, not an object"),
        (3, "a JSON int, not an object"),
        (None, "a JSON NoneType, not an object"),
        ({}, "missing key(s) split, rmse, ll, epochs, seconds, noise_std, settings"),
        ({**_record(0), "split": "x"}, "its split is 'x', the file name says 0"),
        ({**_record(0), "split": 1.5}, "its split is 1.5, the file name says 0"),
        (_record(1), "its split is 1, the file name says 0"),
        ({**_record(0), "rmse": "1.0"}, "rmse is '1.0', not a number"),
        ({**_record(0), "epochs": 2.5}, "epochs is 2.5, not an integer"),
        ({**_record(0), "settings": []}, "settings is [], not an object"),
    ],
)
def test_a_split_file_that_is_json_but_not_a_record_is_named(
    tmp_path: Path, content: Any, problem: str
) -> None:
    """A split_<i>.json that parsed but was not a record raised a bare TypeError, KeyError
    or ValueError ('list indices must be integers', 'split') naming no file."""
    (tmp_path / "splits").mkdir()
    path = tmp_path / "splits" / "split_0.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        _load_records(tmp_path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_good_split_records_still_load_and_stray_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "split_2.json").write_text(json.dumps(_record(2)))
    (tmp_path / "splits" / "split_1.json").write_text('{"split": 1, "rmse"')  # unfinished
    (tmp_path / "splits" / "split_0 copy.json").write_text("[]")  # not this engine's file
    assert _load_records(tmp_path) == {2: _record(2)}


def test_resume_on_a_bad_split_file_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_uci_dir(tmp_path / "data", n_splits=2)
    out = tmp_path / "run"
    (out / "splits").mkdir(parents=True)
    (out / "splits" / "split_0.json").write_text("{}")
    assert bbb_main(["uci", str(data), "--out", str(out), "--resume", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "split_0.json is not a split record (missing key(s) split" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- [uci] table (#7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uci = 3\nepochs = 2\n", "uci must be a table ([uci] with splits = ...), got 3"),
        ('uci = "0-1"\n', "uci must be a table ([uci] with splits = ...), got '0-1'"),
        ("[uci\n", "is not valid TOML"),
    ],
)
def test_a_uci_key_that_is_not_a_table_is_named(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`uci = 3` raised "TypeError: 'int' object is not iterable" (and `uci = "ab"` an
    unknown-key error listing the letters a, b)."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="c.toml") as info:
        U.uci_table(config)
    assert message in str(info.value)
    if text.startswith("uci = 3"):  # through the command line: one line, before any training
        data = _write_uci_dir(tmp_path / "data", n_splits=2)
        out = tmp_path / "run"
        assert bbb_main(["uci", str(data), "--config", str(config), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not (out / "splits").exists()


# --------------------------------------------------------------------------- --splits (#7)


def test_parse_splits_forms_are_unambiguous_and_non_integers_are_refused() -> None:
    """A bare number is a count (the first N), so '0' selects nothing: the error now says
    how to select split 0 alone (0-0). 1.5 in a list was truncated to split 1, a float
    spec raised "TypeError: 'float' object is not iterable", and '²' a bare int() error."""
    # the documented forms still work
    assert U.parse_splits(None, 4) == [0, 1, 2, 3]
    assert U.parse_splits("2", 4) == [0, 1] == U.parse_splits(2, 4)
    assert U.parse_splits("0-0", 4) == [0] == U.parse_splits([0], 4)
    assert U.parse_splits(" 3 , 0 , 1 - 2 ", 4) == [0, 1, 2, 3]
    assert U.parse_splits((2, 0), 4) == [0, 2]
    with pytest.raises(ValueError, match=r"a bare number is a count .* \(split 0 alone is 0-0\)"):
        U.parse_splits("0", 4)
    for bad in ([1.5], [True], ["1"]):
        with pytest.raises(ValueError, match=r"is not an integer split index; valid splits"):
            U.parse_splits(bad, 4)  # type: ignore[arg-type]
    for bad in (1.5, 2.0, "1.5", "²", "1-1.5", "-1"):
        with pytest.raises(ValueError, match=r"a range a-b \(a single split i: i-i\)"):
            U.parse_splits(bad, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the range 3-1 ends before it starts"):
        U.parse_splits("3-1", 4)


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
