"""Review session 23 (predictive uncertainty and metrics, issue #3): regression tests.

Every metric is compared with an independent brute-force computation written here (Python
floats, loops over examples and samples), not with the library's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bbb
from bbb import BayesLinear, predict
from bbb.predictive import ClassificationPrediction

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


def _log_mean_exp(values: list[float]) -> float:
    """log((1/n) sum_i exp(v_i)), by hand with the maximum factored out."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


# ------------------------------------------------------------ classification log_prob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_log_predictive_probability_of_an_underflowing_class_is_exact(
    dtype: torch.dtype,
) -> None:
    """log p(y|x) is the log of the sample-averaged probability. With a logit gap of a few
    hundred the softmax of the losing class underflows to 0 (float32 below 1e-45, float64
    below 1e-323), and log_prob returned the floor log(1e-30) = -69 nats for every such
    input: a confidently wrong prediction's NLL was capped, silently. Now it is the
    log-sum-exp of the samples' log-softmax, checked against a brute force in Python."""
    torch.manual_seed(0)
    model = nn.Sequential(BayesLinear(2, 3, rho_init=-3.0)).to(dtype).eval()
    with torch.no_grad():
        model[0].weight_mu.copy_(torch.tensor([[400.0, 0.0], [0.0, 0.0], [0.0, 300.0]]))
        model[0].bias_mu.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.4], [1e-3, 0.0]], dtype=dtype)
    num_samples = 6
    with bbb.sampling(model, "frozen"):  # the same weights for predict and for the reference
        pred = predict(model, x, num_samples=num_samples)
        logits = bbb.sample_outputs(model, x, num_samples)
    assert isinstance(pred, ClassificationPrediction)
    target = torch.tensor([1, 0, 2, 0])
    got = pred.log_prob(target)
    for b, c in enumerate(target.tolist()):
        per_sample = [_log_softmax(logits[s, b].tolist())[c] for s in range(num_samples)]
        want = _log_mean_exp(per_sample)
        # float32 logits of a few hundred carry ~3e-5 absolute rounding; the log-sum-exp adds
        # no more than a few ulp of the result
        tol = 1e-4 * max(1.0, abs(want)) if dtype == torch.float32 else 1e-9 * max(1.0, abs(want))
        assert got[b].item() == pytest.approx(want, abs=tol), (b, got[b].item(), want)
    assert got[0].item() < -500.0  # the case this is about: far below the old -69 floor
    # where nothing underflows the value is the log of probs, as before
    assert got[3].item() == pytest.approx(math.log(pred.probs[3, 0].item()), abs=1e-6)
    assert torch.allclose(pred.log_probs.exp(), pred.probs, atol=1e-6)
