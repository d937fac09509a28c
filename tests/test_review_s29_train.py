"""Session 29 review of the training loop and the sweeps' up-front checks (issue #4): a
``val_metric`` without validation data, a sweep's ``batch_size`` larger than the training set,
and the Trainer's input validation.

Everything is tiny and exact (no statistical check): a few toy points, a 4-unit hidden layer.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
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
    """A Trainer of a tiny Bayesian MLP on ``N`` toy points (no validation unless given);
    ``model``, ``elbo``, ``optimizer`` and ``train_loader`` may be replaced too."""
    torch.manual_seed(0)
    ds = CLASSIFICATION if classification else REGRESSION
    model = kwargs.pop("model", None) or bayes_mlp(1, [4], 2 if classification else 1)
    likelihood = bbb.Categorical() if classification else bbb.Gaussian(sigma=0.5)
    elbo = kwargs.pop("elbo", None) or bbb.ELBO(likelihood, N)
    parameters = (
        model.parameters()
        if isinstance(model, torch.nn.Module)
        else [torch.nn.Parameter(torch.zeros(1))]
    )
    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(parameters, lr=0.01)
    loader = kwargs.pop("train_loader", None) or DataLoader(ds, batch_size=4)
    options: dict[str, Any] = {"progress": False, "log": None, "epochs": 1}
    options.update(kwargs)
    return Trainer(model, elbo, optimizer, loader, **options)


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


# --------------------------------------------------------------------------- 3. input validation
@pytest.mark.parametrize(
    ("loader", "expected"),
    [
        # a TensorDataset of the inputs alone: an IndexError ("list index out of range")
        (DataLoader(TensorDataset(X), batch_size=4), r"got a list of 1 element\(s\) \(a "
         r"TensorDataset of the inputs alone\? give TensorDataset\(x, y\)\)"),
        # dict minibatches: a KeyError (0)
        ([{"x": X[:4], "y": X[:4]}], r"got a dict with keys 'x', 'y' \(give the pair"),
        # a loader over a bare tensor: "index 1 is out of bounds for dimension 0"
        (DataLoader(X, batch_size=4), r"got a single tensor of shape \(4, 1\) \(a loader over "
         r"a tensor: wrap inputs and targets as TensorDataset\(x, y\)\)"),
        # arrays, not tensors: "'list' object has no attribute 'to'"
        ([(X[:4].tolist(), X[:4].tolist())], r"got a tuple whose first two elements are list, "
         r"list, not tensors"),
    ],
)  # fmt: skip
def test_a_loader_that_does_not_yield_x_y_pairs_is_named(loader: Any, expected: str) -> None:
    prefix = r"the data loader must yield \(x, y\) minibatches \(inputs and targets: two tensors\)"
    with pytest.raises(TypeError, match=prefix + ", " + expected):
        trainer(train_loader=loader).fit()
    # the validation loader and evaluate() read minibatches the same way
    with pytest.raises(TypeError, match=prefix):
        bbb.train.evaluate(bayes_mlp(1, [4], 1), loader, bbb.Gaussian())


def test_extra_elements_after_x_and_y_are_still_accepted() -> None:
    """(x, y, index) minibatches trained before; they still do (the rest is ignored)."""
    t = trainer(train_loader=[(X[:4], REGRESSION.tensors[1][:4], torch.arange(4))])
    assert t.fit()["epochs_trained"] == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"model": lambda x: x}, TypeError, r"model must be a torch.nn.Module, got function"),
        ({"elbo": bbb.Gaussian()}, TypeError, r"elbo must be a bbb.ELBO, got Gaussian: wrap "
         r"it, e.g. bbb.ELBO\(likelihood, dataset_size=len\(train_set\)\)"),
        # the class, not an instance: "type object 'Adam' has no attribute 'param_groups'"
        ({"optimizer": torch.optim.Adam}, TypeError, r"optimizer must be an optimizer "
         r"instance built on the model's parameters .*got the class Adam"),
        # each of these failed only after the first epoch's training
        ({"log": True}, TypeError, r"log must be a callable or None, got bool True"),
        ({"epoch_callback": "stop"}, TypeError,
         r"epoch_callback must be a callable or None, got str 'stop'"),
        ({"loader_generator": 0}, TypeError, r"loader_generator must be the torch.Generator "
         r"that shuffles train_loader, or None \(the loader's own\), got int 0"),
    ],
)  # fmt: skip
def test_wrong_components_are_refused_at_construction(
    kwargs: dict[str, Any], error: type[Exception], expected: str
) -> None:
    with pytest.raises(error, match=expected):
        trainer(**kwargs)


def test_an_optimizer_of_part_of_the_model_is_accepted_silently() -> None:
    """Fine-tuning the head alone (the body's parameters left out of the optimizer) is a
    choice: no warning."""
    torch.manual_seed(0)
    model = bayes_mlp(1, [4], 1)
    head = list(model.parameters())[-2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = trainer(model=model, optimizer=torch.optim.SGD(head, lr=0.01))
    assert t.fit()["epochs_trained"] == 1


def test_an_optimizer_of_another_model_is_warned_about() -> None:
    """It trained nothing, silently (a warning, not an error: a deliberately frozen model,
    e.g. a plateau test, trains so too)."""
    other = torch.optim.SGD(bayes_mlp(1, [4], 1).parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"the optimizer holds none of the model's 8 "
                      r"trainable parameter tensors .*training will not change the model"):  # fmt: skip
        trainer(optimizer=other)
