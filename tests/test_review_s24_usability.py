"""Session 24: usability of the metric reports, the likelihoods' repr and the Trainer's
summaries (issues #3, #4)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb import metrics as M
from bbb.models import bayes_mlp
from bbb.predictive import ClassificationPrediction, RegressionPrediction
from bbb.train import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


def _regression_prediction() -> tuple[RegressionPrediction, torch.Tensor]:
    torch.manual_seed(0)
    net = bayes_mlp(2, [8], 1)
    x, y = torch.randn(12, 2), torch.randn(12)
    pred = bbb.predict(net, x, likelihood=bbb.Gaussian(sigma=0.3), num_samples=4)
    assert isinstance(pred, RegressionPrediction)
    return pred, y


def _classification_prediction() -> tuple[ClassificationPrediction, torch.Tensor]:
    torch.manual_seed(0)
    net = bayes_mlp(2, [8], 3)
    x, y = torch.randn(12, 2), torch.randint(0, 3, (12,))
    pred = bbb.predict(net, x, num_samples=4)
    assert isinstance(pred, ClassificationPrediction)
    return pred, y


# ------------------------------------------------------------------ reports take predictions


def test_regression_report_takes_the_prediction_of_predict() -> None:
    """regression_report(pred, y) failed with "missing 1 required positional argument:
    'target'": it took the prediction for the means and y for the variances."""
    pred, y = _regression_prediction()
    by_tensors = M.regression_report(pred.sample_means, pred.sample_variances, y, y_scale=2.0)
    assert M.regression_report(pred, y, y_scale=2.0) == by_tensors
    assert M.regression_report(pred, target=y, y_scale=2.0) == by_tensors
    # the mixture log-density of the prediction itself (float32 there: rel 1e-6)
    mixture = float(pred.log_prob(y).double().mean()) - math.log(2.0)
    assert by_tensors["log_likelihood"] == pytest.approx(mixture, rel=1e-5)


def test_regression_report_says_how_to_call_it() -> None:
    pred, y = _regression_prediction()
    with pytest.raises(TypeError, match="y_scale by keyword"):
        M.regression_report(pred, y, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"regression_report\(pred, target\) needs the targets"):
        M.regression_report(pred)
    with pytest.raises(TypeError, match=r"missing target .*regression_report\(pred, target\)"):
        M.regression_report(pred.sample_means, pred.sample_variances)
    cpred, labels = _classification_prediction()
    with pytest.raises(TypeError, match=r"use classification_report\(pred, labels\)"):
        M.regression_report(cpred, labels)  # type: ignore[arg-type]


def test_classification_report_takes_the_prediction_of_predict() -> None:
    """classification_report(pred, y) said "probs must be a torch.Tensor, got
    ClassificationPrediction"; it now reads the prediction's probs and exact log_probs."""
    pred, y = _classification_prediction()
    assert pred.log_probs is not None
    expected = M.classification_report(pred.probs, y, n_bins=5, log_probs=pred.log_probs)
    assert M.classification_report(pred, y, n_bins=5) == expected
    # the NLL is the exact one of log_probs, not the one clamped at 1e-12: a confidently
    # wrong example (log p = -200, p = 0 in float32) counts 200 nats
    logp = torch.tensor([[0.0, -200.0]]).log_softmax(-1)
    hard = ClassificationPrediction(logp.exp(), logp.exp().unsqueeze(0), logp)
    report = M.classification_report(hard, torch.tensor([1]))
    assert report["nll"] == pytest.approx(200.0, rel=1e-6)
    # a prediction without log_probs: the NLL of its probs, as with tensors
    plain = ClassificationPrediction(pred.probs, pred.sample_probs)
    assert M.classification_report(plain, y) == M.classification_report(pred.probs, y)
    with pytest.raises(TypeError, match="do not pass log_probs too"):
        M.classification_report(pred, y, log_probs=pred.log_probs)
    rpred, target = _regression_prediction()
    with pytest.raises(TypeError, match=r"use regression_report\(pred, target\)"):
        M.classification_report(rpred, target)  # type: ignore[arg-type]


def test_metric_functions_name_the_prediction_fields_to_pass() -> None:
    """accuracy(pred, y) said only "probs must be a torch.Tensor, got ClassificationPrediction"."""
    pred, y = _classification_prediction()
    with pytest.raises(TypeError, match=r"got ClassificationPrediction: pass its \.probs"):
        M.accuracy(pred, y)  # type: ignore[arg-type]
    rpred, target = _regression_prediction()
    with pytest.raises(TypeError, match=r"got RegressionPrediction: pass its \.sample_means"):
        M.rmse(rpred, target)  # type: ignore[arg-type]


def test_classification_report_refuses_logits_and_nan_as_log_probs() -> None:
    """log_probs=logits gave a wrong (even negative) NLL silently, NaN log_probs a NaN NLL, and
    the log-probabilities of other examples another model's NLL."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3) * 3
    probs, labels = logits.softmax(-1), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="log_probs must be the log of probs.*not logits"):
        M.classification_report(probs, labels, log_probs=logits)
    with pytest.raises(ValueError, match="log_probs must be the log of probs"):
        M.classification_report(probs, labels, log_probs=logits.log_softmax(-1).flip(0))
    nan = logits.log_softmax(-1)
    nan[2, 1] = math.nan
    with pytest.raises(ValueError, match="log_probs contains NaN"):
        M.classification_report(probs, labels, log_probs=nan)
    # -inf is the log of a zero probability: accepted (an infinite NLL where the label has it)
    zero = torch.tensor([[1.0, 0.0]])
    report = M.classification_report(zero, torch.tensor([0]), log_probs=zero.log())
    assert report["nll"] == 0.0


# ------------------------------------------------------------------ likelihood repr


def test_gaussian_repr_shows_the_noise_values() -> None:
    """Gaussian's repr showed noise and output_dim only: not the sigma (nor the variance
    floor) that sets the likelihood."""
    assert repr(bbb.Gaussian(sigma=0.3)) == "Gaussian(noise='fixed', sigma=0.3, output_dim=1)"
    assert repr(bbb.Gaussian("heteroscedastic", min_variance=1e-4, output_dim=2)) == (
        "Gaussian(noise='heteroscedastic', min_variance=0.0001, output_dim=2)"
    )
    learned = bbb.Gaussian("learned", sigma=0.5, output_dim=6)
    assert "sigma=0.5," in repr(learned)
    with torch.no_grad():  # a trained noise: its current values, shortened
        learned.log_sigma.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).log())
    assert "sigma=[0.1, 0.2, 0.3, 0.4, ... (6 values)]" in repr(learned)
    assert "sigma=?" in repr(bbb.Gaussian(sigma=0.3).to("meta"))  # no values: no crash
    assert "sigma=0.3" in repr(bbb.ELBO(bbb.Gaussian(sigma=0.3), 10))
    assert repr(bbb.Categorical()) == "Categorical()"  # no settings to show


# ------------------------------------------------------------------ Trainer summaries


def _trainer(out_dir: Path | None, **elbo_kwargs: Any) -> Trainer:
    generator = seed_everything(0)
    x = torch.linspace(-1, 1, 48).unsqueeze(1)
    data = TensorDataset(x, torch.sin(3 * x).squeeze(1))
    model = bayes_mlp(1, [8], 1)
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.3), len(data), **elbo_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=generator)
    return Trainer(
        model,
        elbo,
        optimizer,
        loader,
        val_loader=DataLoader(data, batch_size=48),
        epochs=2,
        out_dir=out_dir,
        val_samples=2,
        progress=False,
        log=None,
        loader_generator=generator,
    )


def test_fit_summary_holds_the_final_epoch_losses() -> None:
    """fit()'s summary held no training loss: users had to read trainer.history[-1]."""
    trainer = _trainer(None)
    summary = trainer.fit()
    last = trainer.history[-1]
    assert last["epoch"] == 2
    for key in ("loss", "nll", "kl", "kl_weight"):
        assert summary[f"final_{key}"] == last[key]
    assert {  # the keys it held before, unchanged
        "epochs_trained",
        "best_epoch",
        "best_val",
        "val_metric",
        "stopped_early",
        "stopped_by_callback",
        "train_seconds",
    } <= set(summary)


def _rows(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_metrics_rows_hold_the_kl_weight_uniform(tmp_path: Path) -> None:
    """metrics.jsonl had no KL weight: a loss with kl_scale != 1 could not be rebuilt."""
    _trainer(tmp_path, kl_scale=0.5).fit()
    for row in _rows(tmp_path):
        assert row["kl_weight"] == pytest.approx(0.5 / 48, rel=1e-12)
        # constant weight: loss = nll + kl_weight * kl, to float32 rounding of the loss
        rebuilt = row["nll"] + row["kl_weight"] * row["kl"]
        assert row["loss"] == pytest.approx(rebuilt, rel=1e-5)
        assert row["weighted_kl"] == pytest.approx(row["kl_weight"] * row["kl"], rel=1e-5)


def test_metrics_rows_hold_the_kl_weight_blundell_annealed(tmp_path: Path) -> None:
    """Blundell weights pi_i / B_i and an annealed beta: the row's kl_weight is the epoch's
    example-weighted mean of the weights the ELBO applied, and loss = nll + weighted_kl."""
    trainer = _trainer(tmp_path, kl_weighting="blundell", kl_scale=bbb.linear_annealing(6))
    trainer.fit()
    rows = _rows(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    # 3 minibatches of 16 per epoch: steps 0-2 then 3-5, beta = step / 6; the blundell
    # weights pi_i = 2^(3-i) / 7 divided by B = 16, weighted by B and averaged over 48
    pis = [4 / 7, 2 / 7, 1 / 7]
    for epoch, row in enumerate(rows):
        betas = [(3 * epoch + i) / 6 for i in range(3)]
        expected = sum(beta * pi for beta, pi in zip(betas, pis, strict=True)) / 48
        assert row["kl_weight"] == pytest.approx(expected, rel=1e-12)
        assert row["loss"] == pytest.approx(row["nll"] + row["weighted_kl"], rel=1e-5)
