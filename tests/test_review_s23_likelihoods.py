"""Review s23: the likelihoods' numerics and devices, the UCI pipeline's divergence handling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import bbb

_LOG_2PI = math.log(2 * math.pi)


def _exact_lp(target: float, mean: float, var: float) -> float:
    return -0.5 * (_LOG_2PI + math.log(var) + (target - mean) ** 2 / var)


def test_heteroscedastic_log_prob_is_finite_beyond_float32_exp_range() -> None:
    """log_var = 100: exp overflowed float32 (-inf, NaN gradient); exact -50.92."""
    out = torch.tensor([[[0.5, 100.0]]], requires_grad=True)
    lik = bbb.Gaussian("heteroscedastic")
    lp = lik.log_prob(out, torch.tensor([1.0]))
    exact = _exact_lp(1.0, 0.5, math.exp(100.0) + 1e-6)
    assert lp.item() == pytest.approx(exact, rel=1e-6)
    lp.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    # d/dlog_var = -(1 - r^2/var) / 2 = -1/2; d/dmean = r / var ~ 0
    assert out.grad[0, 0, 1].item() == pytest.approx(-0.5, rel=1e-6)
    assert abs(out.grad[0, 0, 0].item()) < 1e-30


def test_heteroscedastic_log_prob_of_a_residual_whose_square_overflows() -> None:
    """r = 1e20 (r^2 beyond float32) at log_var = 92 (var ~ r^2): r^2 / var ~ 1.1, finite."""
    out = torch.tensor([[[0.0, 92.0]]])
    lp = bbb.Gaussian("heteroscedastic").log_prob(out, torch.tensor([1e20]))
    exact = _exact_lp(1e20, 0.0, math.exp(92.0) + 1e-6)
    assert lp.item() == pytest.approx(exact, rel=1e-5)


def test_heteroscedastic_min_variance_floor_in_log_space_matches_the_variance() -> None:
    """log_prob's log(exp(lv) + min_variance) is the log of mean_and_variance's variance."""
    lik = bbb.Gaussian("heteroscedastic", min_variance=1e-3)
    lv = torch.tensor([-40.0, -7.0, 0.0, 5.0], dtype=torch.float64)
    out = torch.stack([torch.zeros_like(lv), lv], -1).unsqueeze(0)  # (1, 4, 2)
    target = torch.full((4,), 0.3, dtype=torch.float64)
    _, var = lik.mean_and_variance(out)
    lp = lik.log_prob(out, target)
    want = [_exact_lp(0.3, 0.0, math.exp(v) + 1e-3) for v in lv.tolist()]
    assert torch.allclose(var[0, :, 0], lv.exp() + 1e-3, rtol=1e-15, atol=0)
    assert torch.allclose(lp[0], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_learned_noise_loss_and_gradient_stay_finite_at_a_huge_sigma() -> None:
    """log_sigma = 50 (var = e^100, beyond float32): the loss was -inf and its gradient NaN."""
    lik = bbb.Gaussian("learned", sigma=1.0)
    with torch.no_grad():
        lik.log_sigma.fill_(50.0)
    lp = lik.log_prob(torch.zeros(1, 3, 1), torch.tensor([0.5, -1.0, 2.0]))
    assert torch.isfinite(lp).all()
    assert lp[0, 0].item() == pytest.approx(-0.5 * (_LOG_2PI + 100.0), rel=1e-6)
    lp.sum().backward()
    # d/dlog_sigma of sum_b -(log_sigma + r_b^2 exp(-2 log_sigma) / 2) = -3
    assert lik.log_sigma.grad is not None
    assert lik.log_sigma.grad.item() == pytest.approx(-3.0, rel=1e-6)


@pytest.mark.parametrize("noise", ["fixed", "learned"])
def test_homoscedastic_variance_follows_the_outputs_device(noise: str) -> None:
    """The likelihood on the CPU, the model's outputs elsewhere (meta stands for a GPU): the
    variances stayed on the CPU (expand_as does not move), and log_prob mixed devices."""
    lik = bbb.Gaussian(noise, sigma=0.3)
    out = torch.zeros(2, 3, 1, device="meta")
    mean, var = lik.mean_and_variance(out)
    assert mean.device.type == "meta" and var.device.type == "meta"
    assert var.shape == (2, 3, 1)
    lp = lik.log_prob(out, torch.zeros(3, device="meta"))
    assert lp.device.type == "meta" and lp.shape == (2, 3)


def test_categorical_log_prob_on_the_meta_device() -> None:
    """The range check read the meta targets' values ("cannot be called on meta tensors")."""
    lp = bbb.Categorical().log_prob(
        torch.zeros(2, 3, 4, device="meta"), torch.zeros(3, dtype=torch.long, device="meta")
    )
    assert lp.device.type == "meta" and lp.shape == (2, 3)


def test_homoscedastic_variance_of_float64_outputs_is_computed_in_float64() -> None:
    """A float32 likelihood, float64 outputs: exp(2 log_sigma) was taken in float32 and then
    widened (off by ~1e-8 relative); now it is exp of the float64 log-variance."""
    lik = bbb.Gaussian("learned", sigma=0.3)
    out = torch.zeros(2, 3, 1, dtype=torch.float64)
    _, var = lik.mean_and_variance(out)
    assert var.dtype == torch.float64
    want = torch.exp(2 * lik.log_sigma.detach().double())
    assert torch.equal(var[0, 0], want)

    class Const(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    pred = bbb.predict(
        Const(), torch.zeros(4, 2, dtype=torch.float64), likelihood=lik, num_samples=3
    )
    assert pred.sample_variances.dtype == torch.float64  # type: ignore[union-attr]
    assert torch.equal(pred.sample_variances[0, 0], want)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------
# UCI: divergence detected explicitly (not by the overflow of the likelihood)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def uci_dir(tmp_path: Path) -> Path:
    from test_uci import _write_uci_dir

    return _write_uci_dir(tmp_path / "data")


def test_run_split_reports_a_divergence_with_finite_loss_naming_the_split(uci_dir: Path) -> None:
    """lr = 1e8: the learned noise's log_sigma runs to ~1e8; the loss is finite in log space,
    the parameters are finite, but the test variances exp(2e8) are not: a TrainingDivergedError
    naming the data set, the split and the rate (was a bare NonFinitePredictionError, and
    before the log-space likelihood a loss of inf that did not name the split)."""
    from bbb import uci as U
    from bbb.train import TrainingDivergedError

    cfg = U.uci_config(epochs=2, num_samples=2, lr=1e8)
    with pytest.raises(TrainingDivergedError, match=r"tiny split 1 diverged \(lr=1e\+08\)"):
        U.run_split(uci_dir, 1, cfg, test_samples=2, passes=1)  # type: ignore[arg-type]


def test_tune_records_why_a_point_diverged_and_says_it_when_all_did(uci_dir: Path) -> None:
    """A grid point whose validation predictions overflow is scored as diverged, with the
    reason kept in tune.json's point; when every point diverged the error says why."""
    from bbb import uci as U
    from bbb.data.uci import UCIDataset
    from bbb.train import TrainingDivergedError

    ds = UCIDataset(uci_dir)
    base = U.uci_config(epochs=2, num_samples=2)
    space = U.SearchSpace.from_dict({"grid": {"lr": [0.01, 1e8]}, "smooth": 1})
    result = U.tune(ds, base, space, passes=1, log=None)  # type: ignore[arg-type]
    good, bad = result["points"]
    assert good["val_ll"] is not None and math.isfinite(good["val_ll"])
    assert bad["val_ll"] is None and bad["diverged_on_splits"] == [0]
    assert len(bad["diverged_because"]) == 1 and "NaN or Inf" in bad["diverged_because"][0]
    assert result["chosen"]["lr"] == 0.01
    only_bad = U.SearchSpace.from_dict({"grid": {"lr": [1e8]}, "smooth": 1})
    with pytest.raises(TrainingDivergedError, match=r"every grid point diverged.*NaN or Inf"):
        U.tune(ds, base, only_bad, passes=1, log=None)  # type: ignore[arg-type]


def test_regression_log_prob_moves_cpu_targets_to_the_predictions_device() -> None:
    """Predictions on the model's device (meta stands for a GPU), targets on the CPU: the
    classification log_prob moved them, the regression one failed on mixed devices."""
    from bbb.predictive import RegressionPrediction

    pred = RegressionPrediction(
        torch.zeros(3, 4, 1, device="meta"), torch.ones(3, 4, 1, device="meta")
    )
    lp = pred.log_prob(torch.zeros(4))
    assert lp.device.type == "meta" and lp.shape == (4,)


def test_categorical_refuses_a_single_logit() -> None:
    """One output per example: log_softmax is 0, so the ELBO's data term was 0 (nll = -0.0)
    and the network trained on the KL alone without a word."""
    model = bbb.models.bayes_mlp(3, [4], 1)
    elbo = bbb.ELBO(bbb.Categorical(), 8)
    with pytest.raises(ValueError, match=r"at least 2 classes.*bbb\.Gaussian"):
        elbo(model, torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
