"""Tests of `bbb.train`: the Trainer loop, exact resume, divergence, checkpoints, run directories.

Everything runs on a few dozen toy points, so each test takes well under a second or two. The
resume tests compare tensors with ``torch.equal``: on CPU a resumed run must end with exactly the
parameters, optimizer state and ELBO state of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import bbb
from bbb.data import load_toy
from bbb.elbo import ELBOResult
from bbb.models import bayes_mlp, mlp
from bbb.train import (
    CheckpointError,
    Trainer,
    TrainingDivergedError,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from bbb.train.checkpoint import (
    atomic_write_text,
    check_writable,
    latest_checkpoint,
    list_checkpoints,
)

# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality of (nested) state: tensors with torch.equal, the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TIMING_KEYS = ("train_seconds",)


def loss_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows without the wall-clock fields (which legitimately differ)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def make_trainer(
    out_dir: Path | None,
    epochs: int,
    *,
    kind: str = "local",
    seed: int = 0,
    elbo_cls: type[bbb.ELBO] = bbb.ELBO,
    n_train: int = 96,
    **trainer_kwargs: Any,
) -> Trainer:
    """A small, fully seeded toy-regression trainer (a fresh one per call, as after a crash).

    ``kind``: a Bayesian-layer estimator (``reparam``, ``local``, ``flipout``), ``annealed``
    (local estimator, Blundell KL weights and a KL warm-up: the ELBO step counter matters) or
    ``dropout`` (a deterministic network whose dropout masks use the global RNG).
    """
    generator = seed_everything(seed)
    train, val = load_toy(n_train=n_train, n_val=32, seed=seed)
    likelihood = bbb.Gaussian("learned", sigma=0.5)
    model: nn.Module
    if kind == "dropout":
        model = mlp(1, [16], 1, dropout=0.2)
        elbo = elbo_cls(likelihood, len(train), kl_scale=0.0)
    else:
        estimator = "local" if kind == "annealed" else kind
        model = bayes_mlp(1, [16], 1, estimator=estimator, mu_init="fan_in")
        if kind == "annealed":
            elbo = elbo_cls(
                likelihood,
                len(train),
                num_samples=2,
                kl_weighting="blundell",
                kl_scale=bbb.linear_annealing(7),
            )
        else:
            elbo = elbo_cls(likelihood, len(train), num_samples=2)
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=generator)
    kwargs: dict[str, Any] = {
        "val_loader": DataLoader(val, batch_size=32),
        "scheduler": scheduler,
        "epochs": epochs,
        "out_dir": out_dir,
        "val_samples": 3,
        "progress": False,
        "log": None,
        "loader_generator": generator,
    }
    kwargs.update(trainer_kwargs)
    return Trainer(model, elbo, optimizer, loader, **kwargs)


def final_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": trainer.model.state_dict(),
        "elbo": trainer.elbo.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
    }


# --------------------------------------------------------------------------- basic loop


def test_fit_writes_one_metrics_line_per_epoch_and_keeps_two_checkpoints(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, epochs=4)
    summary = trainer.fit()
    assert summary["epochs_trained"] == 4
    assert summary["val_metric"] == "nll"
    assert summary["stopped_early"] is False
    rows = loss_rows(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    val_nll = [r["val_nll"] for r in rows]  # the best epoch is the logged lowest (the first)
    assert summary["best_epoch"] == 1 + val_nll.index(min(val_nll))
    assert summary["best_val"] == min(val_nll)
    for r in rows:
        assert {"loss", "nll", "kl", "val_rmse", "val_nll", "val_log_likelihood", "lr"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "nll", "kl", "val_nll"))
    # StepLR(gamma=0.9) stepped once per epoch: each row logs the rate its epoch trained with
    # (epoch 1 at the initial 1e-2), not the next epoch's.
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * 0.9**e for e in range(4)])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "checkpoint-00003.pt",
        "checkpoint-00004.pt",
    ]
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files left behind"
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    state, path = load_checkpoint(tmp_path / "checkpoints")
    assert path.name == "checkpoint-00004.pt"
    assert state["format"] == "bbb-checkpoint-1"
    assert state["epoch"] == 4
    assert_same(state["model"], trainer.model.state_dict(), "checkpoint model")


def test_load_best_restores_best_epoch_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.fit()
    trainer.load_best()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert_same(trainer.model.state_dict(), best["model"], "model after load_best")
    assert_same(trainer.elbo.state_dict(), best["elbo"], "elbo after load_best")


@pytest.mark.parametrize("metric", ["nll", "rmse", "log_likelihood"])
def test_best_epoch_is_the_best_validation_score_in_the_metrics_direction(metric: str) -> None:
    """The best epoch is the history's lowest nll / rmse and highest log-likelihood. With
    lr 5e-2 each curve's optimum is an interior epoch (measured: 4, 3, 4 of
    6), so neither 'the last epoch' nor the wrong direction (epoch 1 for log-likelihood)
    passes."""
    trainer = make_trainer(None, epochs=6, val_metric=metric)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 5e-2
    summary = trainer.fit()
    scores = [r[f"val_{metric}"] for r in trainer.history]
    best = 1 + scores.index((max if metric == "log_likelihood" else min)(scores))
    assert 1 < best < 6, scores  # an interior optimum: the check can tell the cases apart
    assert summary["best_epoch"] == best and trainer.best_epoch == best
    assert summary["best_val"] == scores[best - 1]


def test_fit_without_validation_keeps_last_epoch_as_best(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, epochs=2, val_loader=None)
    summary = trainer.fit()
    assert summary["best_epoch"] == 2
    assert summary["best_val"] is None
    assert all("val_nll" not in r for r in loss_rows(tmp_path / "metrics.jsonl"))


def test_early_stopping_stops_after_patience_epochs() -> None:
    # A deterministic network (dropout is off when validating) with a zero learning rate has
    # the same validation score every epoch: epoch 1 is the best, epoch 2 is one bad epoch.
    trainer = make_trainer(None, epochs=50, kind="dropout", patience=1, val_metric="rmse")
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    summary = trainer.fit()
    assert summary["stopped_early"] is True
    assert summary["epochs_trained"] == 2
    assert summary["best_epoch"] == 1
    assert trainer.bad_epochs == 1


def test_in_memory_trainer_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(None, epochs=2)
    trainer.fit()
    assert len(trainer.history) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"patience": 0}, "patience must be a positive integer"),
        ({"val_samples": 0}, "val_samples must be >= 1"),
        ({"val_metric": "error"}, "unknown val_metric 'error'"),
    ],
)
def test_trainer_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    epochs = kwargs.pop("epochs", 2)
    with pytest.raises(ValueError, match=message):
        make_trainer(None, epochs, **kwargs)


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("kind", ["local", "reparam", "flipout", "annealed", "dropout"])
def test_resume_equals_uninterrupted_run(tmp_path: Path, kind: str) -> None:
    """fit 2 epochs, then a *new* Trainer with epochs=4 and fit(resume=True) == 4 straight."""
    straight = make_trainer(tmp_path / "straight", epochs=4, kind=kind)
    straight.fit()

    make_trainer(tmp_path / "resumed", epochs=2, kind=kind).fit()
    # Disturb the global RNG as another program would: resume must not depend on it.
    torch.manual_seed(12345)
    torch.rand(7)
    resumed = make_trainer(tmp_path / "resumed", epochs=4, kind=kind, seed=0)
    summary = resumed.fit(resume=True)

    assert summary["epochs_trained"] == 4
    assert_same(final_state(resumed), final_state(straight), "final state")
    assert resumed.best_epoch == straight.best_epoch
    assert loss_rows(tmp_path / "resumed" / "metrics.jsonl") == loss_rows(
        tmp_path / "straight" / "metrics.jsonl"
    )
    best_a = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    best_b = torch.load(tmp_path / "resumed" / "best.pt", weights_only=True)
    assert_same(best_b, best_a, "best.pt")
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoints")
    b, _ = load_checkpoint(tmp_path / "resumed" / "checkpoints")
    for key in ("epoch", "model", "optimizer", "scheduler", "elbo", "rng", "loader_generator"):
        assert_same(b[key], a[key], f"checkpoint[{key!r}]")


@pytest.mark.parametrize("kind", ["local", "reparam", "flipout"])
def test_resume_equals_uninterrupted_run_with_native_kernels(tmp_path: Path, kind: str) -> None:
    """The native kernels' noise is a function of the global generator's state, which the
    checkpoint restores: resuming under bbb.use_kernels("native") is bit-identical too."""
    from bbb import _native

    if not _native.available():
        pytest.skip(f"native library not available: {_native.error()}")
    with bbb.use_kernels("native"):
        straight = make_trainer(tmp_path / "straight", epochs=3, kind=kind)
        straight.fit()
        make_trainer(tmp_path / "resumed", epochs=1, kind=kind).fit()
        torch.manual_seed(12345)
        resumed = make_trainer(tmp_path / "resumed", epochs=3, kind=kind, seed=0)
        resumed.fit(resume=True)
    assert_same(final_state(resumed), final_state(straight), "final state")
    assert loss_rows(tmp_path / "resumed" / "metrics.jsonl") == loss_rows(
        tmp_path / "straight" / "metrics.jsonl"
    )


def test_resume_of_a_finished_run_does_nothing_more(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, epochs=3)
    first.fit()
    again = make_trainer(tmp_path, epochs=3)
    summary = again.fit(resume=True)
    assert summary["epochs_trained"] == 3
    assert_same(again.model.state_dict(), first.model.state_dict(), "model")
    assert len(loss_rows(tmp_path / "metrics.jsonl")) == 3


def test_resume_drops_metrics_lines_written_after_the_checkpoint(tmp_path: Path) -> None:
    """A crash between the metrics line and the checkpoint (or mid-line) leaves extra lines."""
    straight = make_trainer(tmp_path / "a", epochs=3)
    straight.fit()
    run = tmp_path / "b"
    make_trainer(run, epochs=2).fit()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"epoch": 3, "loss": 1.0}) + "\n")  # epoch 3 never checkpointed
        f.write('{"epoch": 4, "loss": 0.')  # cut by the crash
    resumed = make_trainer(run, epochs=3)
    resumed.fit(resume=True)
    assert loss_rows(run / "metrics.jsonl") == loss_rows(tmp_path / "a" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "a", epochs=4)
    straight.fit()
    run = tmp_path / "b"
    make_trainer(run, epochs=3).fit()
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == "checkpoint-00003.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    resumed = make_trainer(run, epochs=4)
    with pytest.warns(UserWarning, match="checkpoint-00003.pt"):
        resumed.fit(resume=True)  # continues from epoch 2, redoes epoch 3 exactly
    assert_same(final_state(resumed), final_state(straight), "final state")
    assert loss_rows(run / "metrics.jsonl") == loss_rows(tmp_path / "a" / "metrics.jsonl")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume: no checkpoint in"):
        make_trainer(tmp_path, epochs=2).fit(resume=True)
    with pytest.raises(ValueError, match="resume=True needs an out_dir"):
        make_trainer(None, epochs=2).fit(resume=True)


# --------------------------------------------------------------------------- divergence


class FlakyELBO(bbb.ELBO):
    """An ELBO whose loss becomes ``bad`` on the ``fail_at``-th training call (1-based)."""

    fail_at = 9  # 96 points / 16 = 6 steps per epoch: epoch 2, step 3
    bad = math.nan

    def forward(self, *args: Any, **kwargs: Any) -> ELBOResult:  # type: ignore[override]
        result = super().forward(*args, **kwargs)
        if self.training and int(self.step) == self.fail_at:
            result.loss = result.loss * self.bad
        return result


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(
    tmp_path: Path, bad: float
) -> None:
    cls = type("Flaky", (FlakyELBO,), {"bad": bad})
    trainer = make_trainer(tmp_path, epochs=4, elbo_cls=cls)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit()
    message = str(info.value)
    assert f"loss became {bad}" in message
    assert "epoch 2, step 3 of 6" in message
    assert "checkpoint-00001.pt" in message  # names the last good checkpoint
    state, path = load_checkpoint(tmp_path / "checkpoints")
    assert path.name == "checkpoint-00001.pt"
    assert state["epoch"] == 1
    for name, t in state["model"].items():
        assert torch.isfinite(t).all(), name
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1
    assert [r["epoch"] for r in loss_rows(tmp_path / "metrics.jsonl")] == [1]


def test_divergence_in_memory_names_epoch_and_step() -> None:
    cls = type("Flaky", (FlakyELBO,), {"fail_at": 2})
    trainer = make_trainer(None, epochs=2, elbo_cls=cls)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2 of 6"):
        trainer.fit()


def test_absurd_learning_rate_diverges_cleanly() -> None:
    trainer = make_trainer(None, epochs=3)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e6
    with pytest.raises(TrainingDivergedError, match=r"loss became (nan|inf) at epoch \d+, step"):
        trainer.fit()


# --------------------------------------------------------------------------- checkpoints


def _two_checkpoints(directory: Path) -> dict[int, dict[str, Any]]:
    states = {}
    for epoch in (1, 2):
        states[epoch] = {"epoch": epoch, "model": {"w": torch.full((3, 4), float(epoch))}}
        save_checkpoint(directory, epoch, states[epoch])
    return states


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif how == "not-a-dict":
        torch.save([1, 2, 3], path)
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "not-a-dict"])
def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path: Path, how: str) -> None:
    states = _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoint-00002.pt"
    _corrupt(newest, how)
    with pytest.warns(UserWarning, match=r"checkpoint-00002\.pt"):
        state, path = load_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-00001.pt"
    assert_same(state, states[1], "fallback state")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "not-a-dict"])
def test_single_corrupt_checkpoint_file_is_an_error_naming_it(tmp_path: Path, how: str) -> None:
    _two_checkpoints(tmp_path)
    bad = tmp_path / "checkpoint-00002.pt"
    _corrupt(bad, how)
    with pytest.raises(CheckpointError, match=r"checkpoint-00002\.pt"):
        load_checkpoint(bad)


def test_directory_with_only_corrupt_checkpoints_names_each(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    for p in list_checkpoints(tmp_path):
        _corrupt(p, "truncated")
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match="no readable checkpoint") as info,
    ):
        load_checkpoint(tmp_path)
    assert "checkpoint-00001.pt" in str(info.value)
    assert "checkpoint-00002.pt" in str(info.value)


def test_missing_checkpoints_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint-"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint-00007.pt")


def test_save_checkpoint_keeps_the_newest_two(tmp_path: Path) -> None:
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch})
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00004.pt",
        "checkpoint-00005.pt",
    ]
    state, _ = load_checkpoint(tmp_path)
    assert state["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00004.pt",
        "checkpoint-00005.pt",
    ]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_text(target, "old\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_write_respects_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.json", "{}\n")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    plain_mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain_mode == 0o644
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == plain_mode


# --------------------------------------------------------------------------- unwritable run dirs


def test_run_dir_under_a_regular_file_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    trainer = make_trainer(blocker / "run", epochs=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(OSError, match=r"is under .*a-file, which is a file, not a directory"):
        trainer.fit()
    assert_same(trainer.model.state_dict(), before, "model (must be untouched)")
    assert trainer.history == []
    with pytest.raises(OSError, match=r"a-file is a file, not a directory: choose another"):
        make_trainer(blocker, epochs=2).fit()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: root ignores directory permissions",
)
def test_read_only_run_dir_fails_before_training(tmp_path: Path) -> None:
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        trainer = make_trainer(run, epochs=2)
        with pytest.raises(OSError, match="is not writable") as info:
            trainer.fit()
        assert str(run) in str(info.value)
        assert trainer.history == []
        with pytest.raises(OSError, match="choose another --out"):
            check_writable(run)
    finally:
        run.chmod(0o700)


def test_cosine_lr_schedule_decays_per_epoch_and_resumes(tmp_path) -> None:
    """lr_schedule = "cosine": lr_e = lr (1 + cos(pi e / E)) / 2 after epoch e, saved in the
    checkpoint, and a run stopped after 2 of 4 epochs resumes to the same final state."""
    import math

    from bbb.config import ConfigError, TrainConfig
    from bbb.runs import train_run
    from bbb.train.checkpoint import load_checkpoint

    base = dict(dataset="toy", toy_n=64, hidden=[8], batch_size=16, lr=0.01, val_samples=2)
    cfg = TrainConfig(**base, epochs=4, lr_schedule="cosine").validate()
    train_run(cfg, tmp_path / "full", progress=False, log=None)
    state, _ = load_checkpoint(tmp_path / "full" / "checkpoints")
    lr_end = state["optimizer"]["param_groups"][0]["lr"]
    assert lr_end == pytest.approx(0.01 * (1 + math.cos(math.pi * 4 / 4)) / 2, abs=1e-12)
    # every epoch trained with lr (1 + cos(pi e / 4)) / 2 for e = 0..3 (a linear decay to 0
    # would give 0.01, 0.0075, 0.005, 0.0025)
    rows = [
        json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["lr"] for r in rows] == pytest.approx(
        [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)], abs=1e-12
    )
    sched = state["scheduler"]
    assert sched is not None and sched["last_epoch"] == 4

    from bbb.train.trainer import StopTraining

    def stop_after_two(epoch: int, _: dict) -> None:
        if epoch >= 2:
            raise StopTraining

    train_run(cfg, tmp_path / "part", progress=False, log=None, epoch_callback=stop_after_two)
    train_run(cfg, tmp_path / "part", resume=True, progress=False, log=None)
    resumed, _ = load_checkpoint(tmp_path / "part" / "checkpoints")
    assert resumed["epoch"] == state["epoch"] == 4
    for k, v in state["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    with pytest.raises(ConfigError, match="lr_schedule.*constant, cosine"):
        TrainConfig(**base, lr_schedule="linear").validate()


# --------------------------------------------------------------------------- run-directory lock


def test_a_second_process_cannot_train_into_a_locked_run_directory(tmp_path: Path) -> None:
    """Another process holding the run's lock (a job still running) makes fit() fail before
    anything in the directory changes; the lock is released when fit returns."""
    from bbb.train import RunLockedError
    from tests.conftest import lock_held_by_another_process

    with lock_held_by_another_process(tmp_path) as pid:
        with pytest.raises(RunLockedError, match=rf"is in use: process {pid} on "):
            make_trainer(tmp_path, epochs=1).fit()
        assert not (tmp_path / "metrics.jsonl").exists()
        assert not (tmp_path / "checkpoints").exists()
    make_trainer(tmp_path, epochs=1).fit()  # free again once the holder has exited
    # within one process the lock is re-entrant and released by fit: a second fit resumes
    trainer = make_trainer(tmp_path, epochs=2)
    from bbb.train.checkpoint import RunLock

    with RunLock(tmp_path):
        assert trainer.fit(resume=True)["epochs_trained"] == 2
    with RunLock(tmp_path):  # released by both holders
        pass


def _name_best_epoch(checkpoint: Path, epoch: int) -> None:
    """Rewrite ``checkpoint`` as if the run's best epoch so far were ``epoch``."""
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "best_epoch": epoch}, checkpoint)


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_resume_with_lost_best_weights_warns_and_chooses_the_best_again(
    tmp_path: Path, how: str
) -> None:
    """best.pt deleted or unreadable while the epoch checkpoints are intact, and the best epoch
    an earlier one than the checkpoint's: resuming warns that the best epoch's weights are lost
    and re-selects, so the summary never names an epoch whose weights load_best() cannot
    restore."""
    first = make_trainer(tmp_path, epochs=2)
    first.fit()
    _name_best_epoch(tmp_path / "checkpoints" / "checkpoint-00002.pt", 1)
    best = tmp_path / "best.pt"
    if how == "missing":
        best.unlink()
    else:
        best.write_bytes(best.read_bytes()[:100])
    trainer = make_trainer(tmp_path, epochs=3)
    with pytest.warns(UserWarning, match="its weights are lost"):
        summary = trainer.fit(resume=True)
    assert summary["best_epoch"] == 3  # the only epoch whose weights exist
    assert torch.load(best, weights_only=True)["epoch"] == 3
    trainer.load_best()
    assert_same(trainer.model.state_dict(), torch.load(best, weights_only=True)["model"])


@pytest.mark.parametrize("how", ["missing", "corrupt", "behind"])
def test_best_weights_of_the_checkpoints_own_epoch_are_never_lost(tmp_path: Path, how: str) -> None:
    """best.pt is written after the epoch's checkpoint, so a crash (or Ctrl-C) between the two
    leaves best.pt behind (or, at the first epoch, missing), and the checkpoint, naming its own
    epoch the best, holds the best weights: resuming takes them from it and rewrites best.pt
    (before, best.pt was written first: a crash between left it ahead and the checkpoint's best
    weights lost)."""
    first = make_trainer(tmp_path, epochs=2)
    first.fit()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-00002.pt"
    _name_best_epoch(checkpoint, 2)
    best = tmp_path / "best.pt"
    if how == "missing":
        best.unlink()
    elif how == "corrupt":
        best.write_bytes(best.read_bytes()[:100])
    else:  # epoch 1's best.pt, as a crash right after epoch 2's checkpoint leaves it
        old = torch.load(best, weights_only=True)
        torch.save({**old, "epoch": 1}, best)
    trainer = make_trainer(tmp_path, epochs=2)
    if how == "corrupt":  # said, since something damaged the file, but nothing is lost
        with pytest.warns(UserWarning, match="best.pt is unreadable .*: rewritten from checkpoint"):
            summary = trainer.fit(resume=True)
    else:  # what a crash between the two writes leaves: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            summary = trainer.fit(resume=True)
    assert summary["best_epoch"] == 2
    saved = torch.load(best, weights_only=True)
    assert saved["epoch"] == 2
    model = torch.load(checkpoint, weights_only=True)["model"]
    assert_same(saved["model"], model, "best.pt")
    trainer.load_best()
    assert_same(trainer.model.state_dict(), model, "load_best")


def test_best_pt_is_written_after_the_epochs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of an improved epoch's writes: metrics line, checkpoint, then best.pt."""
    import bbb.train.trainer as T

    order: list[str] = []
    real_save, real_atomic = T.save_checkpoint, T.atomic_write_bytes
    monkeypatch.setattr(
        T,
        "save_checkpoint",
        lambda d, e, s, **k: order.append("checkpoint") or real_save(d, e, s, **k),
    )
    monkeypatch.setattr(
        T,
        "atomic_write_bytes",
        lambda path, data: order.append(Path(path).name) or real_atomic(path, data),
    )
    make_trainer(tmp_path, epochs=1).fit()
    assert order.index("checkpoint") < order.index("best.pt")


def test_elbo_parameters_left_out_of_the_optimizer_warn() -> None:
    """A learned noise not given to the optimizer would stay at its initial value silently."""
    train, _ = load_toy(n_train=32, n_val=8, seed=0)
    likelihood = bbb.Gaussian("learned", sigma=0.5)
    model = bayes_mlp(1, [8], 1)
    elbo = bbb.ELBO(likelihood, len(train))
    loader = DataLoader(train, batch_size=16)
    with pytest.warns(UserWarning, match=r"likelihood\.log_sigma .* not in the optimizer"):
        Trainer(model, elbo, torch.optim.Adam(model.parameters()), loader, epochs=1, log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.Adam([*model.parameters(), *elbo.parameters()])
        Trainer(model, elbo, opt, loader, epochs=1, log=None, progress=False)


def test_a_refused_fit_releases_the_run_lock(tmp_path: Path) -> None:
    """fit() refused after taking the lock (the directory holds a run and neither resume nor
    overwrite is asked; a resume with fewer epochs than done) must not keep the directory
    locked for the rest of the process (a notebook)."""
    from bbb.train import checkpoint as ck

    make_trainer(tmp_path, epochs=2).fit()
    with pytest.raises(FileExistsError, match="already holds a run"):
        make_trainer(tmp_path, epochs=2).fit()
    assert not ck._HELD_LOCKS
    with pytest.raises(ValueError, match="cannot resume"):
        make_trainer(tmp_path, epochs=1).fit(resume=True)
    assert not ck._HELD_LOCKS
