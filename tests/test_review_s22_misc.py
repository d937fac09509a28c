"""Regression tests for fixes made in session 22 outside the helpers' areas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bbb.bandit.config import SEED_LIMIT, BanditConfig
from bbb.cli import main as cli_main
from bbb.config import TrainConfig


def test_bandit_seeds_that_would_share_a_generator_are_refused() -> None:
    # seed 10000's environment stream was seeded like the agents' noise of a run starting at
    # seed 0 (20000 + 0 = 10000 + 10000): such seeds are refused with the reason
    with pytest.raises(ValueError, match=r"below 10000.*collide"):
        BanditConfig(seeds=[0, SEED_LIMIT]).validate()
    assert BanditConfig(seeds=[0, SEED_LIMIT - 1]).validate().seeds == [0, SEED_LIMIT - 1]


def test_evaluate_into_a_closed_pipe_keeps_its_result_and_exits_quietly(tmp_path: Path) -> None:
    """`bbb evaluate RUN | head -1`: the reader closing the pipe printed 'bbb: error: [Errno
    32] Broken pipe' (exit 1), and the table was printed before eval.json was written, so the
    result was lost. Now the file is written first and the exit is SIGPIPE's quiet 141."""
    run = tmp_path / "run"
    toy = ["--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16"]
    assert (
        cli_main(
            ["train", *toy, "--epochs", "1", "--val-samples", "2", "--quiet", "--out", str(run)]
        )
        == 0
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader: every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bbb",
                "evaluate",
                str(run),
                "--split",
                "val",
                "--num-samples",
                "2",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((run / "eval-val.json").read_text())["num_samples"] == 2


def test_a_setting_given_explicitly_at_its_default_is_refused_where_never_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bbb train --dataset mnist --noise-sigma 1` trained a whole run ignoring the flag (only
    values other than the default were refused); a flag given now counts at any value, while
    a config file's keys at their defaults stay accepted (a run's config.json holds them all)."""
    out = tmp_path / "r"
    assert cli_main(["train", "--dataset", "mnist", "--noise-sigma", "1", "--out", str(out)]) == 1
    assert "noise_sigma=1.0 (regression (toy, uci) only)" in capsys.readouterr().err
    assert cli_main(["train", "--method", "sgd", "--estimator", "reparam", "--out", str(out)]) == 1
    assert "estimator='reparam' (method 'bbb' only)" in capsys.readouterr().err
    assert not out.exists()
    cfg = TrainConfig(dataset="mnist", noise_sigma=1.0)
    assert cfg.unused_settings() == {}  # at the default and not given: nothing to refuse
    assert cfg.unused_settings(given={"noise_sigma"}) == {
        "noise_sigma": "regression (toy, uci) only"
    }


def _tiny_bandit(**kw: object) -> BanditConfig:
    base: dict[str, object] = dict(
        steps=4, seeds=[0], agents=["greedy-0"], updates_per_step=1, batch_size=4,
        buffer_size=8, hidden=4, checkpoint_every=2,
    )  # fmt: skip
    base.update(kw)
    return BanditConfig(**base)  # type: ignore[arg-type]


def test_a_bandit_run_holds_its_directory_and_clears_a_killed_runs_temporaries(
    tmp_path: Path,
) -> None:
    """Two `bbb bandit` processes could run into one directory (nothing refused the second,
    which deleted or overwrote the first's checkpoints), and the temporary file of a
    checkpoint write cut by a kill stayed in checkpoints/ for ever; a bandit run now holds the
    directory's lock, as `bbb train` does, and removes such files when it starts."""
    from bbb.bandit.run import run_bandit
    from bbb.train.checkpoint import RunLockedError

    out = tmp_path / "b"
    run_bandit(_tiny_bandit(steps=2), out, progress=False, log=None)
    stale = out / "checkpoints" / ".checkpoint-00003.pt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bbb.train.checkpoint import RunLock; "
         "l = RunLock(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match="is in use"):
            run_bandit(_tiny_bandit(), out, resume=True, progress=False, log=None)
        assert stale.exists()  # the refused process removed nothing
    finally:
        holder.kill()
        holder.wait()
    result = run_bandit(_tiny_bandit(), out, resume=True, progress=False, log=None)
    assert not stale.exists()
    assert result["steps_done"] == 4 and result["complete"]  # resumed from step 2 to the end


def _strict(path: Path) -> object:
    """A result file read as strict JSON readers do (NaN / Infinity are an error)."""
    return json.loads(
        path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name}: constant {c}")
    )


def test_result_files_are_strict_json_and_a_diverged_uci_split_reads_back_as_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only `bbb train`'s files were strict JSON: the UCI split records, tune.json and
    summaries, the bandit's and the demo's metrics.json and the sweep's trial.json wrote a
    diverged value as `NaN` / `-Infinity`, which strict JSON readers refuse. They now write
    null, and a UCI split record's null rmse / ll reads back as NaN (its resume unchanged).
    Checked through a real `run_uci` whose split 1 diverges (its record from run_split made
    non-finite), and the resume that reads the records back."""
    from test_uci import _write_uci_dir

    import bbb.uci as U
    from bbb.train.checkpoint import strict_json
    from bbb.uci.report import _load_records

    text = strict_json({"a": [float("nan"), 1.0], "b": float("-inf")}, indent=2)
    assert json.loads(text) == {"a": [None, 1.0], "b": None}
    real = U.run.run_split

    def diverging(path: Path, split: int, *args: object, **kw: object) -> dict:
        rec = real(path, split, *args, **kw)  # type: ignore[arg-type]
        return {**rec, "rmse": float("nan"), "ll": float("-inf")} if split == 1 else rec

    monkeypatch.setattr(U.run, "run_split", diverging)  # where run_uci looks it up
    data = _write_uci_dir(tmp_path / "data")
    out = tmp_path / "run"
    cfg = U.uci_config(epochs=2, num_samples=2)
    settings = U.UCIRunSettings(splits=[0, 1], test_samples=3, passes=1)
    U.run_uci(data, out, config=cfg, settings=settings, log=None)
    record = _strict(out / "splits" / "split_1.json")
    assert record["rmse"] is None and record["ll"] is None  # type: ignore[index]
    assert math.isfinite(_strict(out / "splits" / "split_0.json")["rmse"])  # type: ignore[index]
    metrics = _strict(out / "metrics.json")
    assert [s["rmse"] for s in metrics["splits"]][1] is None  # type: ignore[index]
    _strict(out / "uci.json")
    back = _load_records(out)
    assert math.isnan(back[1]["rmse"]) and math.isnan(back[1]["ll"]) and back[1]["epochs"] == 2
    assert back[0] == _strict(out / "splits" / "split_0.json")
    # the resume reads the records back (NaN) and runs nothing again
    monkeypatch.setattr(U.run, "run_split", lambda *a, **k: pytest.fail("split re-run"))
    again = U.run_uci(data, out, config=cfg, settings=settings, resume=True, log=None)
    assert again["n_splits"] == 2
