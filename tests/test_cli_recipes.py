"""`bbb train` reaches the Trainer's per-step schedules and steps_per_epoch (issue #4) and
writes a regression run's calibration (issue #3): --lr-warmup-steps, --steps-per-epoch,
metrics.json's "calibration", calibration.png, and bbb evaluate's calibration: section."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import bbb.metrics
import bbb.plots
from bbb.cli import main
from bbb.config import ConfigError, TrainConfig
from bbb.runs import build_objective, check_step_plan, warmup_multiplier
from bbb.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

# 64 points in minibatches of 16: 4 optimizer steps per pass
TOY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2", "--quiet",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Skip drawing PNGs; returns the paths calibration plots were asked for."""
    asked: list[Path] = []
    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(
        bbb.metrics, "plot_regression_calibration", lambda *a, **k: asked.append(k["path"])
    )
    return asked


def cli(*args: Any) -> int:
    return main([str(a) for a in args])


def rows(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
        for line in lines
        if line.strip()
    ]


def same_state(a: Path, b: Path) -> None:
    """Bit-identical last checkpoints (model, optimizer, scheduler) and metrics rows."""
    sa = torch.load(latest_checkpoint(a / "checkpoints"), weights_only=False)
    sb = torch.load(latest_checkpoint(b / "checkpoints"), weights_only=False)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for i, st in sa["optimizer"]["state"].items():  # Adam's moments and step counts
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa["scheduler"] == sb["scheduler"]
    assert sa["epoch"] == sb["epoch"]
    assert rows(a) == rows(b)


# ---------------------------------------------------------------------- warm-up schedule


def test_warmup_multiplier_is_linear_then_constant_or_cosine() -> None:
    f = warmup_multiplier(4, 10, "cosine")
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0  # the cosine starts at the full rate
    assert f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert f(10) == pytest.approx(0.0, abs=1e-15)  # after the last step
    g = warmup_multiplier(2, 5)
    assert [g(s) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="accepted values: constant, cosine"):
        warmup_multiplier(2, 5, "linear")
    with pytest.raises(ValueError, match="warmup_steps=5 must be smaller than total_steps=5"):
        warmup_multiplier(5, 5)
    with pytest.raises(ValueError, match="warmup_steps must be a positive integer"):
        warmup_multiplier(0, 5)


@pytest.mark.usefixtures("no_plots")
def test_warmup_and_cosine_per_step_rates_in_metrics(tmp_path: Path) -> None:
    """8 steps per epoch (2 passes), warm-up over 5, cosine over the remaining 19 of 24."""
    run = tmp_path / "run"
    args = ["--epochs", "3", "--steps-per-epoch", "8", "--lr-warmup-steps", "5"]
    assert cli("train", *TOY, *args, "--lr-schedule", "cosine", "--lr", "0.01", "--out", run) == 0
    f = warmup_multiplier(5, 24, "cosine")
    r = rows(run)
    assert [x["epoch"] for x in r] == [1, 2, 3]
    for e, row in enumerate(r):  # the rates of each epoch's first and last step
        assert row["lr"] == pytest.approx(0.01 * f(8 * e), rel=1e-12)
        assert row["lr_last"] == pytest.approx(0.01 * f(8 * e + 7), rel=1e-12)
    assert r[0]["lr"] == pytest.approx(0.002)  # lr / N at the first step
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr_warmup_steps"] == 5 and saved["steps_per_epoch"] == 8


@pytest.mark.usefixtures("no_plots")
def test_default_schedule_is_stepped_per_epoch_as_before(tmp_path: Path) -> None:
    """lr_warmup_steps 0: a CosineAnnealingLR over epochs, stepped once per epoch (no lr_last)."""
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "2", "--lr-schedule", "cosine", "--out", run) == 0
    r = rows(run)
    assert [x["lr"] for x in r] == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert all("lr_last" not in x for x in r)
    cfg = TrainConfig(dataset="toy", lr_schedule="cosine")
    model = torch.nn.Linear(1, 1)
    _, _, sched = build_objective(cfg, model, bbb.Gaussian(), 64, 3)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    # a caller that lays out its own epochs (bbb uci) cannot honour the new settings
    for bad in ({"lr_warmup_steps": 2}, {"steps_per_epoch": 4}):
        with pytest.raises(ConfigError, match="settings of `bbb train`"):
            build_objective(TrainConfig(dataset="toy", **bad), model, bbb.Gaussian(), 64, 3)


@pytest.mark.usefixtures("no_plots")
def test_resume_of_a_per_step_schedule_is_exact(tmp_path: Path) -> None:
    """A run stopped after epoch 2 of 3 (its newest checkpoint gone) and resumed ends
    bit-identical to the uninterrupted run; changing epochs on resume refuses a per-step
    cosine (laid out over epochs x steps) but not a constant rate after the warm-up."""
    args = [*TOY, "--epochs", "3", "--steps-per-epoch", "6", "--lr-warmup-steps", "4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("train", *args, "--lr-schedule", "cosine", "--out", ref) == 0
    shutil.copytree(ref, run)
    (run / "checkpoints" / "checkpoint-00003.pt").unlink()
    (run / "metrics.json").unlink()
    assert cli("train", "--resume", run, "--quiet") == 0
    same_state(run, ref)
    assert cli("train", "--resume", run, "--epochs", "4", "--quiet") == 1
    # constant after the warm-up: 2 epochs, then 3 by resuming = 3 at once
    const, short = tmp_path / "const", tmp_path / "short"
    assert cli("train", *args, "--out", const) == 0
    assert cli("train", *[a if a != "3" else "2" for a in args], "--out", short) == 0
    assert cli("train", "--resume", short, "--epochs", "3", "--quiet") == 0
    same_state(short, const)


# ---------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        # 4 steps per pass; blundell weights run over one pass
        (["--kl-weighting", "blundell", "--steps-per-epoch", "6"],
         ["steps_per_epoch=6 with kl_weighting 'blundell'", "the 64 training examples in "
          "minibatches of 16 make 4 optimizer step(s) per pass", "a multiple of 4 (e.g. 4, 8, "
          "16), or use kl_weighting 'uniform'"]),
        (["--lr-warmup-steps", "8"],
         ["lr_warmup_steps=8 must be smaller than the run's 8 optimizer steps (epochs=2 x 4 "
          "per epoch; the 64 training examples"]),
        (["--lr-warmup-steps", "20", "--steps-per-epoch", "10"],
         ["lr_warmup_steps=20 must be smaller than the run's 20 optimizer steps (epochs=2 x "
          "10 per epoch; steps_per_epoch=10)"]),
        (["--lr-warmup-steps", "-1"], ["lr_warmup_steps must be a non-negative integer"]),
        (["--steps-per-epoch", "0"], ["steps_per_epoch must be a positive integer or unset"]),
    ],
)  # fmt: skip
def test_bad_step_settings_are_one_line_before_any_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragments: list[str]
) -> None:
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "2", *extra, "--out", run) == 1
    err = capsys.readouterr().err
    assert err.startswith("bbb: error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not run.exists()  # refused before anything was written


def test_check_step_plan_counts_the_passes_of_the_data_given() -> None:
    """The steps per pass are those of the loader (a --subset's size, the last partial
    batch included): 100 examples in 32s are 4 steps."""
    cfg = TrainConfig(dataset="mnist", subset=100, batch_size=32, steps_per_epoch=8)
    assert check_step_plan(cfg, 100, math.ceil(100 / 32), "blundell") == 8
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_step_plan(TrainConfig(steps_per_epoch=6), 100, 4, "blundell")
    assert check_step_plan(TrainConfig(steps_per_epoch=6), 100, 4, "uniform") == 6
    assert check_step_plan(TrainConfig(epochs=2), 100, 4, "uniform") == 4


# ---------------------------------------------------------------------- calibration


def test_regression_run_writes_calibration_to_metrics_and_plot(
    tmp_path: Path, no_plots: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    torch.rand(3)  # the global random state must not matter
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    out = capsys.readouterr().out
    assert "val calibration: coverage_50=" in out
    assert no_plots == [run / "calibration.png"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"summary", "val", "calibration"}  # the toy set has no test split
    assert set(metrics["val"]) == {"rmse", "log_likelihood", "nll"}  # unchanged
    cal = metrics["calibration"]["val"]
    n = cal["n_examples"]
    assert n == 21 and cal["num_samples"] == 2  # max(64 // 3, 10) validation points
    cover = [cal[f"coverage_{a}"] for a in (50, 80, 90, 95, 99)]
    # fractions of n examples, non-decreasing with the level (nested intervals)
    assert all(abs(c * n - round(c * n)) < 1e-9 for c in cover) and cover == sorted(cover)
    assert 0 <= cal["calibration_error"] <= cal["calibration_rmse"] <= 1 and cal["crps"] > 0
    # the same numbers again (their own seeded stream), and training's numbers unchanged
    again = tmp_path / "again"
    assert cli("train", *TOY, "--epochs", "1", "--out", again) == 0
    assert json.loads((again / "metrics.json").read_text())["calibration"] == metrics["calibration"]


def test_calibration_png_is_drawn_and_evaluate_prints_a_calibration_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    assert (run / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli("evaluate", run, "--split", "val", "--num-samples", "3") == 0
    out = capsys.readouterr().out
    uncertainty, calibration = out.split("uncertainty:")[1].split("calibration:")
    assert "mean_epistemic_variance" in uncertainty and "coverage_" not in uncertainty
    for key in ("n_examples", "coverage_50", "coverage_99", "calibration_error", "crps"):
        assert key in calibration, key
    result = json.loads((run / "eval-val.json").read_text())
    assert "coverage_90" in result["uncertainty"]  # the file keeps its layout
    # --overwrite removes the old plot with the rest of the previous run
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    assert cli("train", *TOY, "--epochs", "1", "--out", run, "--overwrite") == 0
    assert not (run / "calibration.png").exists()
