"""Findings of a new-user trial of the public API (session 8): predict, the predictive
summaries and the ELBO refuse input that used to pass silently or fail obscurely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bbb


def _classifier(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, out))


def test_predict_refuses_a_one_output_model_without_a_regression_likelihood() -> None:
    model = _classifier(out=1)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"at least 2 classes.*likelihood=bbb\.Gaussian"):
        bbb.predict(model, x, num_samples=3)
    pred = bbb.predict(model, x, num_samples=3, likelihood=bbb.Gaussian(sigma=0.5))
    assert isinstance(pred, bbb.RegressionPrediction)
    assert pred.mean.shape == (5, 1)


@pytest.mark.parametrize("max_rows", [0, -5, 2.5, True])
def test_predict_refuses_a_bad_max_rows(max_rows: object) -> None:
    with pytest.raises(ValueError, match="max_rows must be a positive integer"):
        bbb.predict(_classifier(), torch.randn(2, 4), num_samples=2, max_rows=max_rows)  # type: ignore[arg-type]


def test_classification_log_prob_checks_its_targets() -> None:
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    pred = bbb.ClassificationPrediction(probs, probs.unsqueeze(0))
    # integer targets and whole-number floats give log p of that class
    expected = torch.log(torch.tensor([0.5, 0.6]))
    assert torch.allclose(pred.log_prob(torch.tensor([2, 0])), expected)
    assert torch.allclose(pred.log_prob(torch.tensor([2.0, 0.0])), expected)
    with pytest.raises(ValueError, match="whole numbers.*0.7"):
        pred.log_prob(torch.tensor([0.7, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 3\), got 5"):
        pred.log_prob(torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"\[0, 3\), got -1"):
        pred.log_prob(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got \(3,\)"):
        pred.log_prob(torch.tensor([0, 1, 2]))


def test_elbo_takes_any_integer_type_for_sizes_but_not_bools_or_floats() -> None:
    lik = bbb.Categorical()
    for n in (10, np.int64(10), torch.tensor(10)):
        elbo = bbb.ELBO(lik, n, num_samples=np.int32(2))  # type: ignore[arg-type]
        assert type(elbo.dataset_size) is int and elbo.dataset_size == 10
        assert type(elbo.num_samples) is int and elbo.num_samples == 2
        assert elbo.kl_weight(5, None, None) == pytest.approx(0.1)
    for bad in (True, 10.0, 0, -3, "10", np.float64(10)):
        with pytest.raises(ValueError, match="dataset_size must be a positive integer"):
            bbb.ELBO(lik, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        bbb.ELBO(lik, 10, num_samples=0)
