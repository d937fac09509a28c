"""Session 29 review of the training loop and the sweeps' up-front checks (issue #4): a
``val_metric`` without validation data, a sweep's ``batch_size`` larger than the training set,
and the Trainer's input validation.

Everything is tiny and exact (no statistical check): a few toy points, a 4-unit hidden layer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.models import bayes_mlp
from bbb.sweep.space import SweepError, load_space
from bbb.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N = 8
X = torch.linspace(-1, 1, N).reshape(N, 1)
REGRESSION = TensorDataset(X, torch.sin(3 * X))
CLASSIFICATION = TensorDataset(X, (X[:, 0] > 0).long())


def trainer(classification: bool = False, **kwargs: Any) -> Trainer:
    """A Trainer of a tiny Bayesian MLP on ``N`` toy points (no validation unless given)."""
    torch.manual_seed(0)
    ds = CLASSIFICATION if classification else REGRESSION
    model = bayes_mlp(1, [4], 2 if classification else 1)
    likelihood = bbb.Categorical() if classification else bbb.Gaussian(sigma=0.5)
    options: dict[str, Any] = {"progress": False, "log": None, "epochs": 1}
    options.update(kwargs)
    return Trainer(
        model,
        bbb.ELBO(likelihood, N),
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(ds, batch_size=4),
        **options,
    )


# --------------------------------------------------------------------------- 1. val_metric


@pytest.mark.parametrize(
    ("classification", "metric"),
    [(False, "rmse"), (False, "log_likelihood"), (True, "accuracy"), (True, "nll")],
)
def test_a_val_metric_without_a_val_loader_is_refused(classification: bool, metric: str) -> None:
    """It was accepted and never computed: the best model was the last epoch's, silently."""
    with pytest.raises(ValueError) as err:
        trainer(classification, val_metric=metric)
    msg = str(err.value)
    assert f"val_metric={metric!r} needs a val_loader, and none was given" in msg
    assert "the best model is the last epoch's" in msg
    assert "pass val_loader=" in msg


@pytest.mark.parametrize(("classification", "default"), [(False, "nll"), (True, "error")])
def test_the_default_val_metric_is_accepted_without_a_val_loader(
    classification: bool, default: str
) -> None:
    """``bbb.uci``'s training passes ``val_metric="nll"`` whether or not it validates."""
    t = trainer(classification, val_metric=default)
    assert t.val_metric == default
    assert t.fit()["best_epoch"] == 1


def test_a_val_metric_with_a_val_loader_is_used() -> None:
    t = trainer(val_metric="rmse", val_loader=DataLoader(REGRESSION, batch_size=N))
    summary = t.fit()
    assert summary["val_metric"] == "rmse"
    assert summary["best_val"] == t.history[0]["val_rmse"]


def test_an_unknown_val_metric_is_refused_before_the_missing_val_loader() -> None:
    with pytest.raises(ValueError, match=r"unknown val_metric 'error'; accepted values: rmse, "):
        trainer(val_metric="error")
    # an empty string was taken for "the default"
    with pytest.raises(ValueError, match=r"unknown val_metric ''; accepted values: rmse, "):
        trainer(val_metric="", val_loader=DataLoader(REGRESSION, batch_size=N))


# --------------------------------------------------------------------------- 2. sweep batch_size
HAVE_OPTUNA = importlib.util.find_spec("optuna") is not None
SPACE = """
[sweep]
command = "train"
trials = 2

[train]
dataset = "toy"
toy_n = 64
hidden = [4]
epochs = 1
val_samples = 1
{fixed}

[search]
{search}
"""
# toy_n = 64: 64 training examples


def space_file(tmp: Path, fixed: str, search: str) -> Path:
    path = tmp / "space.toml"
    path.write_text(SPACE.format(fixed=fixed, search=search))
    return path


@pytest.mark.parametrize(
    ("fixed", "search", "expected"),
    [
        # a fixed batch size: every trial failed at its start (the study was created first)
        ("batch_size = 65", "lr = [1e-3, 1e-2]",
         r"space.toml: no trial can train: batch_size=65 is larger than the training set "
         r"\(64 examples\)$"),
        # a range whose lowest value is already too large
        ("", "batch_size = { int = [100, 200] }",
         r"no trial can train: every combination of the searched batch_size \(2 checked.*"
         r"batch_size = 100: batch_size=100 is larger than the training set \(64 examples\)"),
        # every value of a grid
        ("", "batch_size = [65, 128]",
         r"every combination of the searched batch_size \(2 checked.*"
         r"batch_size=65 is larger than the training set \(64 examples\)"),
    ],
)  # fmt: skip
def test_a_batch_size_larger_than_the_training_set_is_refused_up_front(
    tmp_path: Path, fixed: str, search: str, expected: str
) -> None:
    space = load_space(space_file(tmp_path, fixed, search))
    with pytest.raises(SweepError, match=expected) as err:
        space.check_step_plans()
    assert "\n" not in str(err.value)  # one line: bbb's "bbb: error: ..."


@pytest.mark.parametrize(
    ("search", "failing"),
    [
        ("batch_size = { int = [16, 128] }", "1 of 2"),  # 16 trains, 128 does not
        ("batch_size = [16, 65, 128]", "2 of 3"),  # the grid exactly
        ("batch_size = [16, 64]", None),  # the whole training set is one minibatch: fine
    ],
)
def test_a_batch_size_range_that_partly_fits_runs_with_a_note(
    tmp_path: Path, search: str, failing: str | None
) -> None:
    notes = load_space(space_file(tmp_path, "", search)).check_step_plans()
    if failing is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(failing), notes
        assert "is larger than the training set (64 examples)" in notes[0]
        assert "a trial given such values fails at its start" in notes[0]


@pytest.mark.skipif(not HAVE_OPTUNA, reason="bbb sweep needs Optuna")
def test_bbb_sweep_refuses_a_fixed_batch_size_above_the_training_set_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bbb.cli import main

    space = space_file(tmp_path, "batch_size = 100", "lr = [1e-3, 1e-2]")
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no trial can train: batch_size=100 is larger than the training set (64 ex" in err
    assert not out.exists()


@pytest.mark.skipif(not HAVE_OPTUNA, reason="bbb sweep needs Optuna")
def test_a_sweep_with_some_batch_sizes_too_large_trains_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The note up front; the too-large value's trial fails at its start with the same
    reason (its error column), the other trains."""
    from bbb.cli import main

    space = space_file(tmp_path, "", "batch_size = [32, 128]")
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: 1 of 2 combinations of the searched batch_size" in printed
    assert "failed: batch_size=128 is larger than the training set (64 examples)" in printed
    finished = [json.loads(p.read_text()) for p in out.glob("trials/*/trial.json")]
    assert [t["params"]["batch_size"] for t in finished] == [32]
