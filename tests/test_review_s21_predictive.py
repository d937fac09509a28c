"""Review session 21 (predictive uncertainty, calibration metrics): regression tests."""

from __future__ import annotations

import pytest
import torch

import bbb
from bbb import BayesLinear, predict
from bbb import metrics as M

# ------------------------------------------------------------ calibration: ties at bin edges


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_a_confidence_on_a_bin_edge_falls_in_the_same_bin_in_every_dtype(
    dtype: torch.dtype,
) -> None:
    """Bins are (i/n, (i+1)/n]: a confidence of exactly 0.6 (n = 10) is in bin 5. In float32
    0.6 is stored as 0.6000000238..., and compared with the float64 edge 0.6 it fell in bin 6
    (0.6, 0.7] (also 0.2, 0.4, 0.8): the bins and the ECE depended on the probabilities' dtype."""
    rows = [[0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5], [0.25, 0.75]]
    labels = torch.tensor([0, 1, 0, 1, 0, 0])
    p = torch.tensor(rows, dtype=dtype)
    data = M.reliability_diagram_data(p, labels, n_bins=10)
    # confidences 0.6, 0.8, 0.7, 0.9, 0.5, 0.75: bins 5, 7, 6, 8, 4, 7
    assert data.bin_count.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 1, 0]
    ref = M.expected_calibration_error(torch.tensor(rows, dtype=torch.float64), labels, 10)
    assert M.expected_calibration_error(p, labels, n_bins=10) == pytest.approx(ref, abs=1e-3)
    # the report's ECE bins the same way as expected_calibration_error
    report = M.classification_report(p, labels, n_bins=10)
    assert report["ece"] == M.expected_calibration_error(p, labels, n_bins=10)
    # the reported edges stay the exact k / n
    assert torch.equal(data.bin_edges, torch.arange(11, dtype=torch.float64) / 10)


# ------------------------------------------------------------ low-precision probabilities


def test_the_metrics_accept_a_bfloat16_softmax_and_still_refuse_logits() -> None:
    """A bfloat16 softmax's rows sum to 1 only within ~2**-8 (values rounded to 8 significant
    bits): with the fixed tolerance 1e-3 every metric refused ~40% of the rows as "not
    probabilities". The tolerance is now the larger of 1e-3 and the dtype's epsilon."""
    g = torch.Generator().manual_seed(0)
    logits = (2.0 * torch.randn(1000, 10, generator=g)).bfloat16()
    p = torch.softmax(logits, dim=-1)
    y = torch.randint(0, 10, (1000,), generator=g)
    assert ((p.double().sum(1) - 1).abs() > 1e-3).any()  # the case this is about
    report = M.classification_report(p, y)
    ref = p.double()
    ref = ref / ref.sum(1, keepdim=True)  # renormalised: the metrics barely move
    assert report["nll"] == pytest.approx(M.nll(ref, y), abs=1e-2)
    assert report["brier"] == pytest.approx(M.brier(ref, y), abs=1e-2)
    assert report["accuracy"] == M.accuracy(ref, y)
    for f in (M.nll, M.brier, M.accuracy, M.expected_calibration_error):
        f(p, y)
        with pytest.raises(ValueError, match="sum to 1"):
            f(logits.softmax(-1) * 1.02, y)  # 2% off is not rounding
    # float32 keeps the 1e-3 tolerance
    with pytest.raises(ValueError, match="sum to 1"):
        M.nll(torch.tensor([[0.6, 0.402]]), torch.tensor([0]))


# ------------------------------------------------------------ the classification split


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        BayesLinear(5, 16, rho_init=-2.0), torch.nn.ReLU(), BayesLinear(16, 4, rho_init=-2.0)
    ).eval()


@pytest.mark.parametrize("num_samples", [3, 7, 100])
def test_the_mutual_information_is_zero_when_all_samples_agree(num_samples: int) -> None:
    """In mean mode every sample's probabilities are the same: the mutual information is 0.
    entropy - aleatoric in float32 left up to 3.6e-7 nats on ~1/3 of the inputs (the float32
    mean of S equal values is not always that value, and the two entropies round apart)."""
    model = _model()
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    with bbb.sampling(model, "mean"):
        pred = predict(model, x, num_samples=num_samples)
    assert bool((pred.sample_probs == pred.sample_probs[:1]).all())  # the case this is about
    assert bool((pred.epistemic == 0).all())
    assert pred.epistemic.dtype == pred.probs.dtype


def test_the_mutual_information_matches_a_float64_reference() -> None:
    """I = H[mean_s p_s] - mean_s H[p_s], all in float64 from the same float32 sample
    probabilities: agreement to 1e-9 (float64 rounding of sums of ~50 * 4 terms of size <= 1,
    then float32 output: relative 6e-8); float32's difference of entropies was off by 3e-7."""
    model = _model()
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    pred = predict(model, x, num_samples=50)
    sp = pred.sample_probs.double()
    p = sp.mean(0)
    h = -(p * p.log()).sum(-1)
    a = -(sp * sp.log()).sum(-1).mean(0)
    ref = h - a
    assert float(ref.min()) > 1e-3  # samples disagree: a genuine epistemic part
    torch.testing.assert_close(pred.epistemic.double(), ref, rtol=1e-6, atol=1e-9)
    # still the difference of the two reported entropies, to float32 rounding
    torch.testing.assert_close(pred.epistemic, pred.entropy - pred.aleatoric, rtol=0, atol=1e-6)


# ------------------------------------------------------------ low-precision regression


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_regression_model_predicts_in_float32(dtype: torch.dtype) -> None:
    """A float16/bfloat16 heteroscedastic model: its means and log-variances are summarised in
    float32, as for classification. Before: quantiles raised RuntimeError (torch.quantile takes
    float32/float64 only), exp(log_var) overflowed float16 to inf above log_var = 11.1, and the
    aleatoric mean over samples was rounded to 3 digits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(BayesLinear(5, 4, rho_init=-3.0)).to(dtype).eval()
    with torch.no_grad():
        model[0].bias_mu.copy_(torch.tensor([1.0, -2.0, 12.0, 0.5]))  # log-variance 12
    lik = bbb.Gaussian("heteroscedastic", output_dim=2)
    x = torch.randn(50, 5).to(dtype)
    torch.manual_seed(1)
    pred = predict(model, x, likelihood=lik, num_samples=20)
    assert pred.sample_means.dtype == torch.float32
    # the same outputs, split and summarised in float64 (law of total variance)
    torch.manual_seed(1)
    out = bbb.sample_outputs(model, x, 20).double()
    m, v = out[..., :2], out[..., 2:].exp() + lik.min_variance
    torch.testing.assert_close(pred.mean.double(), m.mean(0), rtol=1e-6, atol=1e-6)
    ref_var = v.mean(0) + m.var(0, correction=0)
    torch.testing.assert_close(pred.variance.double(), ref_var, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(pred.variance).all())
    q = pred.quantiles([0.1, 0.9], generator=torch.Generator().manual_seed(0))
    assert q.shape == (2, 50, 2) and bool(torch.isfinite(q).all())
    assert bool(torch.isfinite(pred.log_prob(torch.zeros(50, 2))).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_gaussian_log_likelihood_of_low_precision_outputs_is_finite(
    dtype: torch.dtype,
) -> None:
    """float16 outputs: exp(log_var) overflowed above log_var = 11.1 and (y - mean)**2 / var
    above 65504 (a residual of 3 at sigma = 0.01), so the log-likelihood, and the ELBO of a
    float16 model, was -inf. It is now evaluated in float32, to float32 rounding of the
    float64 value of the same (low-precision) outputs."""
    fixed = bbb.Gaussian("fixed", sigma=0.01)
    out = torch.zeros(2, 3, 1, dtype=dtype)
    y = torch.full((3,), 3.0, dtype=dtype)
    lp = fixed.log_prob(out, y)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), fixed.log_prob(out.double(), y.double()))
    hetero = bbb.Gaussian("heteroscedastic")
    o = torch.tensor([[[0.0, 12.0], [1.0, -3.0]]], dtype=dtype)
    t = torch.tensor([1.0, 2.0], dtype=dtype)
    lp = hetero.log_prob(o, t)
    torch.testing.assert_close(lp.double(), hetero.log_prob(o.double(), t.double()))
    # the ELBO of a low-precision model: finite, with finite gradients for its parameters
    torch.manual_seed(0)
    model = torch.nn.Sequential(BayesLinear(4, 2, rho_init=-3.0)).to(dtype)
    with torch.no_grad():
        model[0].bias_mu.copy_(torch.tensor([0.0, 12.0]))
    elbo = bbb.ELBO(hetero, dataset_size=100)
    res = elbo(model, torch.randn(8, 4).to(dtype), torch.randn(8).to(dtype))
    assert bool(torch.isfinite(res.loss))
    res.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
