"""Session 26, the lead's own fixes (issue 4).

- ``evaluate`` (and so the Trainer's validation) restores each submodule's own train/eval mode,
  and ``Trainer.fit`` keeps in eval mode the submodules the user put there (a frozen body's
  BatchNorm) while training the rest; a model wholly in eval mode still trains in training mode.
- ``wrap_elbo`` passes DistributedDataParallel's options through (``static_graph=True`` and the
  like; the two-rank check that it reaches DDP and keeps the ranks in step is
  ``test_review_s25_fsdp.py::test_ddp_static_graph_keeps_the_ranks_in_step[static-wrap]``) and
  refuses, before anything else, the options it sets itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.train import Trainer, evaluate
from bbb.train import distributed as D


@pytest.mark.parametrize(
    "option", ["device_ids", "output_device", "broadcast_buffers", "forward_sync_buffers"]
)
def test_wrap_elbo_refuses_the_ddp_options_it_sets_itself(option: str) -> None:
    model = nn.Sequential(bbb.BayesLinear(3, 2))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=10)
    with pytest.raises(TypeError, match=f"wrap_elbo sets {option} itself"):
        D.wrap_elbo(model, elbo, **{option: None})


# --- the Trainer and evaluate() keep the eval mode of submodules the user set -------------


def _bn_body_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), bbb.BayesLinear(8, 3))


def _loader() -> DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g) * 3 + 1  # far from BatchNorm's initial statistics
    y = torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_evaluate_restores_each_submodules_own_mode() -> None:
    model = _bn_body_model()
    model[1].eval()  # the user's choice: a frozen BatchNorm
    evaluate(model, _loader(), bbb.Categorical(), num_samples=2)
    # before: model.train(was_training) put the BatchNorm back in training mode
    assert model.training and not model[1].training and model[3].training


@pytest.mark.parametrize("body_eval", [True, False])
def test_a_body_put_in_eval_mode_stays_there_while_the_trainer_trains(body_eval: bool) -> None:
    model = _bn_body_model()
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    if body_eval:
        model[1].eval()
    before = model[1].running_mean.clone()
    loader = _loader()
    head = [p for p in model.parameters() if p.requires_grad]
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=len(loader.dataset))  # type: ignore[arg-type]
    opt = torch.optim.Adam(head, lr=1e-2)
    mu_before = model[3].weight_mu.detach().clone()
    trainer = Trainer(
        model, elbo, opt, loader, val_loader=loader, epochs=2, log=None, progress=False
    )
    trainer.fit()
    assert not torch.equal(model[3].weight_mu, mu_before)  # the head trained
    if body_eval:
        # before: fit() called model.train() every epoch, and the frozen body's running
        # statistics moved towards the training batches'
        assert torch.equal(model[1].running_mean, before)
        assert not model[1].training and model.training
    else:  # a model left in training mode throughout trains its BatchNorm, as before
        assert not torch.equal(model[1].running_mean, before)
        assert model[1].training


def test_a_model_wholly_in_eval_mode_still_trains_in_training_mode() -> None:
    model = _bn_body_model()
    model.eval()  # e.g. left so by a prediction before training
    before = model[1].running_mean.clone()
    loader = _loader()
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=len(loader.dataset))  # type: ignore[arg-type]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    Trainer(model, elbo, opt, loader, epochs=1, log=None, progress=False).fit()
    assert not torch.equal(model[1].running_mean, before)


# --- ELBO(shared_prefix=True): the layers before the first Bayesian layer run once ---------


class _CountRows(nn.Module):
    """Identity that records the rows of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.rows.append(x.shape[0])
        return x


def _head_model(estimator: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), _CountRows(), bbb.BayesLinear(16, 3, estimator=estimator)
    )


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_shared_prefix_gives_the_same_loss_and_gradients_with_the_body_run_once(
    estimator: str,
) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    results = []
    for shared in (False, True):
        model = _head_model(estimator)
        elbo = bbb.ELBO(bbb.Categorical(), dataset_size=60, num_samples=4, shared_prefix=shared)
        torch.manual_seed(1)  # the same weight noise: its shapes do not depend on the option
        out = elbo(model, x, y)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        results.append((out.loss.detach(), grads, model[2].rows))
    (loss0, grads0, rows0), (loss1, grads1, rows1) = results
    assert rows0 == [24] and rows1 == [6]  # the body saw S * B rows before, B now
    # the same arithmetic on the same values but for the body's matrix products on 6 rows
    # instead of 24 copies (float32 rounding of a different blocking at most)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shared_prefix_refuses_a_model_that_reshapes_its_rows() -> None:
    class Flatten(nn.Module):  # (B, T, d) -> (B * T, d): a sequence flattened into rows
        def forward(self, x: Tensor) -> Tensor:
            return x.reshape(-1, x.shape[-1])

    model = nn.Sequential(Flatten(), bbb.BayesLinear(4, 2))
    x = torch.randn(3, 5, 4)
    with (
        pytest.raises(ValueError, match=r"received 15 rows .* expected 3 .* or 6"),
        bbb.vectorized_samples(model, 2, batch_size=3),
    ):
        model(x)
    # the layers' state is restored after the error: an ordinary pass works
    assert model[1]._prefix_rows is None and model[1].num_samples == 1
    assert model(x).shape == (15, 2)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_shared_prefix_must_be_a_bool(bad: object) -> None:
    with pytest.raises(TypeError, match="shared_prefix must be True or False"):
        bbb.ELBO(bbb.Categorical(), dataset_size=10, shared_prefix=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_predict_with_shared_prefix_runs_the_body_once_per_input(estimator: str) -> None:
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))
    preds, rows = [], []
    for shared in (False, True):
        model = _head_model(estimator)
        torch.manual_seed(2)
        # max_rows 12: chunks of 3, 3 and 1 inputs (the last one smaller)
        preds.append(bbb.predict(model, x, num_samples=4, max_rows=12, shared_prefix=shared))
        rows.append(model[2].rows)
    assert rows[0] == [12, 12, 4] and rows[1] == [3, 3, 1]
    torch.testing.assert_close(preds[1].sample_probs, preds[0].sample_probs, rtol=1e-5, atol=1e-6)
    # the layers are left as they were
    assert model[3].num_samples == 1 and model[3]._prefix_rows is None


def test_brier_of_a_confident_wrong_float32_softmax_stays_within_its_bound() -> None:
    # a float32 softmax sums to 1 only up to rounding: this one scored 2.000000000000001
    # (found by the property test test_metrics.py::test_ece_in_unit_interval in one run)
    g = torch.Generator().manual_seed(8388609)
    p = torch.softmax(9 * torch.randn(1, 6, generator=g), dim=1)
    assert bbb.metrics.brier(p, torch.tensor([2])) == 2.0


# --- bbb uci refuses the per-step settings before writing anything -----------------------


@pytest.mark.parametrize("line", ["lr_warmup_steps = 3", "steps_per_epoch = 2"])
def test_bbb_uci_refuses_per_step_settings_before_writing_anything(
    tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_uci_calibration import _write_uci_dir

    from bbb.cli import main

    data = _write_uci_dir(tmp_path / "data")
    config = tmp_path / "u.toml"
    config.write_text(line + "\n")
    out = tmp_path / "run"
    code = main(["uci", str(data), "--splits", "0-0", "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    # before: refused by build_objective after config.json, uci.json and splits/ were written
    assert code == 1 and f"{line.split(' =')[0]} = " in err and "not used there" in err
    assert not out.exists()


def test_the_trainer_validates_with_its_elbos_shared_prefix() -> None:
    model = _head_model("local")
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=8, num_samples=3, shared_prefix=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    val = DataLoader(data, batch_size=8)
    trainer = Trainer(
        model, elbo, opt, DataLoader(data, batch_size=8), val_loader=val, val_samples=4,
        epochs=1, log=None, progress=False,
    )  # fmt: skip
    trainer.fit()
    # one training pass (8 rows) and one validation pass (8 rows, not 4 x 8 = 32: before,
    # validation ran the body once per weight sample)
    assert model[2].rows == [8, 8]


def test_a_direct_train_epoch_keeps_the_modes_of_its_moment() -> None:
    model = _bn_body_model()
    loader = _loader()
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=len(loader.dataset))  # type: ignore[arg-type]
    trainer = Trainer(model, elbo, torch.optim.Adam(model.parameters()), loader, log=None)
    trainer.fit()  # every module in training mode
    model[1].eval()  # then the user freezes the BatchNorm and trains one more epoch by hand
    before = model[1].running_mean.clone()
    trainer.train_epoch()
    # before: the list of modules kept in eval mode was the one fit() had read (none)
    assert not model[1].training and torch.equal(model[1].running_mean, before)
