"""Predictive distributions: averaging over weight samples and the uncertainty decomposition
(total = aleatoric + epistemic, epistemic >= 0; entropy = aleatoric + epistemic for
classification), computed by hand; chunked vectorized sampling; argument validation.

Statistical tolerances are ``stats.z`` (= 5) standard errors (see ``conftest.py``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import distributions as D
from torch import nn

import bbb
from bbb import BayesLinear, Categorical, Gaussian, Likelihood

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


def _classifier() -> nn.Module:
    return nn.Sequential(
        BayesLinear(4, 8, rho_init=-1.0), nn.Tanh(), BayesLinear(8, 3, rho_init=-1.0)
    )


def _entropy_by_hand(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def test_classification_decomposition_adds_up(float64_default) -> None:
    torch.manual_seed(0)
    model = _classifier()
    x = torch.randn(10, 4)
    pred = bbb.predict(model, x, num_samples=64)
    assert isinstance(pred, bbb.ClassificationPrediction)
    assert pred.sample_probs.shape == (64, 10, 3) and pred.probs.shape == (10, 3)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(10), rtol=0, atol=1e-14)
    torch.testing.assert_close(pred.probs, pred.sample_probs.mean(0), rtol=0, atol=0)
    # by hand (all probabilities here are far from 0, so no clamping is involved)
    assert float(pred.sample_probs.min()) > 1e-6
    entropy = _entropy_by_hand(pred.probs)
    aleatoric = _entropy_by_hand(pred.sample_probs).mean(0)
    torch.testing.assert_close(pred.entropy, entropy, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.aleatoric, aleatoric, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.epistemic, entropy - aleatoric, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        pred.entropy, pred.aleatoric + pred.epistemic, rtol=1e-12, atol=1e-14
    )
    assert torch.all(pred.epistemic >= 0) and torch.all(pred.epistemic > 0)
    assert torch.equal(pred.predicted, pred.probs.argmax(-1))
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    torch.testing.assert_close(pred.log_prob(target), pred.probs[torch.arange(10), target].log())


def test_classification_in_mean_mode_has_no_epistemic_uncertainty(float64_default) -> None:
    torch.manual_seed(0)
    model = _classifier()
    x = torch.randn(6, 4)
    with bbb.sampling(model, "mean"):
        pred = bbb.predict(model, x, num_samples=5)
        expected = torch.softmax(model(x), -1)
    for s in range(5):
        torch.testing.assert_close(pred.sample_probs[s], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.epistemic, torch.zeros(6), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        pred.entropy, pred.aleatoric + pred.epistemic, rtol=1e-12, atol=1e-14
    )


def test_predict_restores_modes_and_uses_no_grad() -> None:
    model = _classifier()
    pred = bbb.predict(model, torch.randn(3, 4), num_samples=4)
    assert not pred.probs.requires_grad
    assert all(m.num_samples == 1 and m.mode == "sample" for m in bbb.bayes_modules(model))


def _regression_setup(noise: str):
    out = 2 if noise == "heteroscedastic" else 1
    model = nn.Sequential(
        BayesLinear(3, 16, rho_init=-1.0), nn.Tanh(), BayesLinear(16, out, rho_init=-1.0)
    )
    lik = Gaussian(noise, sigma=0.3)
    return model, lik


@pytest.mark.parametrize("noise", ["fixed", "learned", "heteroscedastic"])
def test_regression_decomposition_adds_up(noise: str, float64_default) -> None:
    torch.manual_seed(0)
    model, lik = _regression_setup(noise)
    x = torch.randn(7, 3)
    model.apply(lambda m: m.set_sampling("frozen") if isinstance(m, bbb.BayesModule) else None)
    s = 50
    pred = bbb.predict(model, x, likelihood=lik, num_samples=s)
    assert isinstance(pred, bbb.RegressionPrediction)
    # the frozen samples make the raw outputs available by hand
    raw = bbb.sample_outputs(model, x, s)
    if noise == "heteroscedastic":
        means, noise_var = raw[..., :1], raw[..., 1:].exp() + 1e-6
    else:
        means, noise_var = raw, torch.full_like(raw, 0.09)
    torch.testing.assert_close(pred.sample_means, means, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.sample_variances, noise_var, rtol=1e-12, atol=1e-14)
    mean = means.mean(0)
    epistemic = ((means - mean) ** 2).mean(0)  # population variance over the S samples
    aleatoric = noise_var.mean(0)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.epistemic, epistemic, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.aleatoric, aleatoric, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.variance, pred.aleatoric + pred.epistemic, rtol=1e-14, atol=0)
    torch.testing.assert_close(pred.std, pred.variance.sqrt(), rtol=1e-14, atol=0)
    assert torch.all(pred.epistemic >= 0) and torch.all(pred.epistemic > 0)


def test_regression_total_variance_is_the_mixture_variance(stats, float64_default) -> None:
    """variance = aleatoric + epistemic is the variance of draws from the predictive mixture."""
    torch.manual_seed(1)
    model, lik = _regression_setup("heteroscedastic")
    pred = bbb.predict(model, torch.randn(4, 3), likelihood=lik, num_samples=20)
    m, v = pred.sample_means, pred.sample_variances  # (S, B, 1)
    draws_per_sample = 2000
    draws = (m + v.sqrt() * torch.randn(draws_per_sample, *m.shape)).reshape(-1, *m.shape[1:])
    # exact mixture mean and variance vs the sample moments of 40000 draws: 5 SE
    stats.assert_mean(draws, pred.mean, known_var=pred.variance, what="mixture mean")
    stats.assert_var(draws, pred.variance, what="mixture variance")


def test_regression_quantiles_hit_the_mixture_cdf(stats, float64_default) -> None:
    torch.manual_seed(2)
    model, lik = _regression_setup("fixed")
    pred = bbb.predict(model, torch.randn(3, 3), likelihood=lik, num_samples=30)
    levels = [0.05, 0.5, 0.95]
    num_draws = 400
    gen = torch.Generator().manual_seed(0)
    q = pred.quantiles(levels, num_draws=num_draws, generator=gen)
    assert q.shape == (3, 3, 1)
    m, v = pred.sample_means, pred.sample_variances
    n = num_draws * m.shape[0]
    for i, level in enumerate(levels):
        cdf = D.Normal(m, v.sqrt()).cdf(q[i]).mean(0)  # mixture CDF at the estimated quantile
        # the CDF value of an empirical quantile has standard error sqrt(q (1 - q) / n)
        se = math.sqrt(level * (1 - level) / n)
        assert torch.all((cdf - level).abs() <= stats.z * se), (cdf, level)


def test_regression_quantiles_validate_q_and_num_draws() -> None:
    torch.manual_seed(0)
    pred = bbb.RegressionPrediction(torch.randn(5, 2, 1), torch.rand(5, 2, 1) + 0.1)
    gen = torch.Generator().manual_seed(0)
    # a single q gives (B, D), the same numbers as the list form's row (torch.quantile's shapes)
    one = pred.quantiles(0.5, num_draws=3, generator=gen)
    row = pred.quantiles([0.5], num_draws=3, generator=torch.Generator().manual_seed(0))
    assert one.shape == (2, 1) and torch.equal(one, row[0])
    assert pred.quantiles(np.float64(0.9), include_noise=False).shape == (2, 1)
    # these reached torch's own errors (or none: num_draws=2.5 crashed inside randn)
    for bad_q in (1.5, [0.1, -0.2], [], "0.5", [True]):
        with pytest.raises(ValueError, match="q must be probabilities in \\[0, 1\\]"):
            pred.quantiles(bad_q)  # type: ignore[arg-type]
    for bad_n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_draws must be a positive integer"):
            pred.quantiles([0.5], num_draws=bad_n)  # type: ignore[arg-type]
    assert pred.quantiles([0.5], num_draws=np.int64(2)).shape == (1, 2, 1)


def test_regression_log_prob_single_output_is_the_mixture_density(float64_default) -> None:
    torch.manual_seed(3)
    model, lik = _regression_setup("fixed")
    x, y = torch.randn(5, 3), torch.randn(5)
    pred = bbb.predict(model, x, likelihood=lik, num_samples=8)
    density = (
        D.Normal(pred.sample_means[..., 0], pred.sample_variances[..., 0].sqrt())
        .log_prob(y)
        .exp()
        .mean(0)
    )
    torch.testing.assert_close(pred.log_prob(y), density.log(), rtol=1e-12, atol=1e-14)


def test_regression_log_prob_multi_output_is_the_mixture_density(float64_default) -> None:
    means = torch.tensor([[[0.0, 0.0]], [[2.0, 2.0]]])  # S = 2 samples, B = 1, D = 2
    variances = torch.full_like(means, 0.25)
    pred = bbb.RegressionPrediction(means, variances)
    y = torch.tensor([[0.0, 2.0]])
    # p(y) = 1/2 N(y; (0, 0), 0.25 I) + 1/2 N(y; (2, 2), 0.25 I)
    comp = D.Normal(means, variances.sqrt()).log_prob(y).sum(-1)  # (S, B)
    expected = torch.logsumexp(comp, 0) - math.log(2)
    torch.testing.assert_close(pred.log_prob(y), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_rows", [6, 25, 65536])
def test_chunked_sampling_uses_the_same_frozen_samples(max_rows: int, float64_default) -> None:
    torch.manual_seed(0)
    model = _classifier()
    bbb.set_sampling(model, "frozen")
    x = torch.randn(11, 4)
    s = 3
    reference = bbb.sample_outputs(model, x, s)  # one chunk
    chunked = bbb.sample_outputs(model, x, s, max_rows=max_rows)  # chunks of max_rows // S rows
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-14)
    # and each block is the network with that block's frozen weights
    first, last = model[0], model[2]
    for i in range(s):
        w1 = first.weight_mu + first.weight_sigma * first._frozen.eps_w[i]
        b1 = first.bias_mu + first.bias_sigma * first._frozen.eps_b[i]
        w2 = last.weight_mu + last.weight_sigma * last._frozen.eps_w[i]
        b2 = last.bias_mu + last.bias_sigma * last._frozen.eps_b[i]
        by_hand = torch.nn.functional.linear(
            torch.tanh(torch.nn.functional.linear(x, w1, b1)), w2, b2
        )
        torch.testing.assert_close(reference[i], by_hand.detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_predict_rejects_bad_num_samples(bad) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"num_samples must be a positive integer, got {bad!r}")
    ):
        bbb.predict(_classifier(), torch.randn(2, 4), num_samples=bad)


def test_predict_rejects_bad_inputs() -> None:
    model = _classifier()
    with pytest.raises(
        ValueError, match=re.escape("predict needs a non-empty batch (B, ...), got shape (0, 4)")
    ):
        bbb.predict(model, torch.randn(0, 4))
    with pytest.raises(ValueError, match="predict: inputs contain NaN or Inf values"):
        bbb.predict(model, torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(
        # the layer sees the S stacked copies of the batch: (S * B, 5)
        ValueError,
        match=r"BayesLinear expected input of shape \(N, \.\.\., 4\), got \(\d+, 5\)",
    ):
        bbb.predict(model, torch.randn(2, 5))
    with pytest.raises(
        ValueError,
        match=re.escape("Categorical predict expects logits (B, C) from the model, got (2, 5, 3)"),
    ):
        bbb.predict(model, torch.randn(2, 5, 4), num_samples=2)
    with pytest.raises(
        TypeError, match="predict supports Categorical and Gaussian likelihoods, got Likelihood"
    ):
        bbb.predict(model, torch.randn(2, 4), likelihood=Likelihood())
    assert isinstance(
        bbb.predict(model, torch.randn(2, 4), likelihood=Categorical(), num_samples=2),
        bbb.ClassificationPrediction,
    )


def test_numpy_integers_are_accepted_as_counts() -> None:
    """num_samples, max_rows (predict, vectorized_samples) and Gaussian's output_dim of a
    NumPy integer type were refused as "must be a positive integer, got np.int64(3)"; a bool
    is refused (vectorized_samples took True as 1)."""
    np = pytest.importorskip("numpy")
    model = _classifier()
    pred = bbb.predict(model, torch.randn(5, 4), num_samples=np.int64(3), max_rows=np.int32(6))
    assert pred.sample_probs.shape[0] == 3
    with bbb.vectorized_samples(model, np.int64(2)):
        assert model(bbb.repeat_samples(torch.randn(5, 4), 2)).shape[0] == 10
    assert Gaussian("learned", output_dim=np.int64(2)).log_sigma.shape == (2,)
    msg = "num_samples must be a positive integer, got True"
    with pytest.raises(ValueError, match=msg), bbb.vectorized_samples(model, True):
        pass
    with pytest.raises(ValueError, match="output_dim must be a positive integer, got True"):
        Gaussian(output_dim=True)


def test_a_bfloat16_model_predicts_probabilities_the_metrics_accept() -> None:
    """The predictive probabilities of a bfloat16 model are float32 rows summing to 1 (in
    bfloat16 they summed to 1 only within ~3e-3, and bbb.metrics refused them as "not
    probabilities"), the same softmax of the same logits."""
    torch.manual_seed(0)
    model = nn.Sequential(BayesLinear(20, 10, rho_init=-1.0, mu_init=(-1.0, 1.0))).bfloat16()
    x = torch.randn(200, 20, dtype=torch.bfloat16)
    pred = bbb.predict(model, x, num_samples=30)
    assert pred.probs.dtype == torch.float32
    assert (pred.probs.sum(-1) - 1).abs().max() < 1e-5
    report = bbb.metrics.classification_report(pred.probs, torch.randint(0, 10, (200,)))
    assert 0.0 <= report["ece"] <= 1.0
    # the same softmax of the same (bfloat16) logits: in mean mode every sample's
    # probabilities are the float32 softmax of the model's output, to float32 rounding
    with bbb.sampling(model, "mean"):
        logits = model(x)
        mean_pred = bbb.predict(model, x, num_samples=2)
    assert logits.dtype == torch.bfloat16
    want = torch.softmax(logits.float(), dim=-1)
    for s in range(2):
        torch.testing.assert_close(mean_pred.sample_probs[s], want, rtol=1e-6, atol=1e-7)
