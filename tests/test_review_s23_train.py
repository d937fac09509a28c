"""Review (session 23) of the training engine: trainer, checkpoints, config, distributed.

Each test names what was wrong before its fix. Runs are tiny (32 toy points, an 8-unit hidden
layer, one to three epochs of 4 steps); nothing here is statistical: every check is exact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
import bbb.train.checkpoint as C
import bbb.train.trainer as T
from bbb.config import ConfigError, TrainConfig
from bbb.models import bayes_mlp
from bbb.train import (
    NonFinitePredictionError,
    Trainer,
    TrainingDivergedError,
    evaluate,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N, BATCH = 32, 8  # 4 steps per epoch


def toy_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, N).unsqueeze(1)
    return TensorDataset(x, torch.sin(3 * x) + 0.1 * torch.randn(N, 1, generator=g))


def make(
    out_dir: Path | None, epochs: int, *, val: bool = False, **kw: Any
) -> tuple[Trainer, nn.Module]:
    torch.manual_seed(0)
    ds = toy_data()
    model = bayes_mlp(1, [8], 1, mu_init="fan_in")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen)
    trainer = Trainer(
        model,
        elbo,
        opt,
        loader,
        val_loader=DataLoader(ds, batch_size=16) if val else None,
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=gen,
        val_samples=2,
        **kw,
    )
    return trainer, model


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("momentum", [1.0, 9.0])
def test_sgd_momentum_of_one_or_more_is_refused(momentum: float) -> None:
    # before: accepted; SGD's velocity then never decays (1) or grows geometrically (9, a
    # typo for 0.9), and the run diverged with a loss message that did not name momentum
    with pytest.raises(ConfigError, match="momentum must lie in \\[0, 1\\)"):
        TrainConfig(optimizer="sgd", momentum=momentum).validate()
    TrainConfig(optimizer="sgd", momentum=0.99).validate()  # still accepted
    # a saved Adam run never read its momentum: not a reason to refuse it
    TrainConfig(optimizer="adam", momentum=momentum).validate(check_applicable=False)


# --------------------------------------------------------------------------- durability


def _record_dir_fsyncs(monkeypatch: pytest.MonkeyPatch, watch: Path) -> list[tuple[Path, bool]]:
    """Record every directory fsync: (directory, whether ``watch`` existed at that moment)."""
    calls: list[tuple[Path, bool]] = []
    real = C._fsync_dir

    def record(d: Path) -> None:
        calls.append((Path(d), watch.exists()))
        real(d)

    monkeypatch.setattr(C, "_fsync_dir", record)
    monkeypatch.setattr(T, "_fsync_dir", record, raising=False)
    return calls


def test_new_checkpoint_directories_are_fsynced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: mkdir(parents=True) without syncing the parents: the checkpoint file and its own
    # directory were fsync'ed, but a power cut could still lose the new directories' entries
    calls = _record_dir_fsyncs(monkeypatch, tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"epoch": 1})
    synced = [d for d, _ in calls]
    assert synced.index(tmp_path) < synced.index(tmp_path / "run")  # outermost first
    assert tmp_path / "run" / "checkpoints" in synced


def test_a_new_metrics_file_is_on_disk_before_the_epochs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: metrics.jsonl was fsync'ed, but not its directory entry; in a run that reuses a
    # directory (overwrite: checkpoints/ exists, best.pt is written before the metrics line),
    # the run directory was not synced between creating metrics.jsonl and the checkpoint
    run = tmp_path / "run"
    make(run, 1)[0].fit()
    metrics = run / "metrics.jsonl"
    calls = _record_dir_fsyncs(monkeypatch, metrics)
    real_save = T.save_checkpoint
    saved_at: list[int] = []

    def save(*a: Any, **k: Any) -> Path:
        saved_at.append(len(calls))
        return real_save(*a, **k)

    monkeypatch.setattr(T, "save_checkpoint", save)
    make(run, 1)[0].fit(overwrite=True)
    before_checkpoint = calls[: saved_at[0]]
    assert (run, True) in before_checkpoint, before_checkpoint


# --------------------------------------------------------------------------- divergence


def _nan_gradient_at(param: Tensor, step: int) -> list[int]:
    """Make ``param``'s gradient NaN at backward pass number ``step`` (1-based)."""
    count = [0]

    def hook(g: Tensor) -> Tensor:
        count[0] += 1
        return g * math.nan if count[0] == step else g

    param.register_hook(hook)
    return count


def test_nan_parameters_left_by_the_last_step_are_not_saved_as_good(tmp_path: Path) -> None:
    # before: a NaN gradient at an epoch's last step (finite loss) left NaN parameters that,
    # without validation data, were saved in the checkpoint and best.pt, and fit() returned
    # normally: a finished run holding a NaN model
    trainer, model = make(tmp_path / "run", 1)
    _nan_gradient_at(model[0].weight_mu, step=4)
    with pytest.raises(TrainingDivergedError, match="parameters became NaN or Inf during epoch 1"):
        trainer.fit()
    assert not (tmp_path / "run" / "best.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-00001.pt").exists()


def test_the_nan_parameter_check_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer, model = make(tmp_path / "run", 2, val=True)
    _nan_gradient_at(model[0].weight_mu, step=8)  # epoch 2's last step
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit()
    message = str(info.value)
    assert "0.weight_mu" in message and "checkpoint-00001.pt is intact" in message
    # before: validation of the NaN model failed first, with "probs/means contains NaN values"
    assert "contains NaN" not in message


def _nan_output_once(model: nn.Module) -> None:
    """The model's next forward returns NaN (a divergence at the next step)."""
    done = [False]

    def hook(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        if done[0]:
            return out
        done[0] = True
        return out * math.nan

    model.register_forward_hook(hook)


def test_a_divergence_at_an_epochs_first_step_does_not_call_the_newest_checkpoint_good(
    tmp_path: Path,
) -> None:
    # before: "the last good checkpoint checkpoint-00002.pt is intact", although that
    # checkpoint holds exactly the parameters the diverging step started from
    run = tmp_path / "run"
    make(run, 2)[0].fit()
    trainer, model = make(run, 3)
    _nan_output_once(model)  # the resumed run's first step (epoch 3, step 1)
    with pytest.raises(TrainingDivergedError, match="epoch 3, step 1 of 4") as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert "is intact" not in message
    assert "checkpoint-00002.pt holds the parameters this step started from" in message
    assert "checkpoint-00001.pt" in message  # the one to fall back to
    # later in an epoch, the newest checkpoint did train on: it is still named as intact
    trainer, model = make(run, 3)
    calls = [0]

    def nan_at_second_forward(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        calls[0] += 1
        return out * math.nan if calls[0] == 2 else out

    model.register_forward_hook(nan_at_second_forward)
    with pytest.raises(TrainingDivergedError, match="epoch 3, step 2 of 4") as info:
        trainer.fit(resume=True)
    assert "the last good checkpoint" in str(info.value)
    assert "checkpoint-00002.pt is intact" in str(info.value)


# --------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_evaluate_of_a_diverged_model_says_so(task: str) -> None:
    # before: ValueError("probs contains NaN values" / "means contains NaN values") from the
    # metrics, which said neither where the NaN came from nor what to do
    torch.manual_seed(0)
    if task == "classification":
        model, lik = bayes_mlp(2, [4], 3), bbb.Categorical()
        y = torch.tensor([0, 1, 2, 0, 1, 2])
    else:
        model, lik = bayes_mlp(2, [4], 1), bbb.Gaussian("fixed", sigma=0.5)
        y = torch.zeros(6, 1)
    x = torch.randn(6, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    before = evaluate(model, loader, lik, num_samples=2)
    assert all(math.isfinite(v) for v in before.values())
    with torch.no_grad():
        model[0].weight_mu[0, 0] = math.nan  # every example's prediction is NaN
    with pytest.raises(NonFinitePredictionError, match="for 6 of 6 examples .*diverged"):
        evaluate(model, loader, lik, num_samples=2)
    assert issubclass(NonFinitePredictionError, ValueError)  # what evaluate raised before
