"""The minibatch ELBO: the loss formula computed by hand for every likelihood and KL weighting,
Blundell's minibatch weights, KL annealing, the gradients of weight-space sampling against the
update rule of Blundell et al. (2015), and argument validation."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

import bbb
from bbb import (
    ELBO,
    BayesLinear,
    Categorical,
    Gaussian,
    GaussianPrior,
    LaplacePrior,
    ScaleMixturePrior,
    blundell_weight,
    linear_annealing,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),  # see conftest.single_thread
    # the formulas are checked on the mean network (no noise), on purpose
    pytest.mark.filterwarnings("ignore:ELBO. a training step:RuntimeWarning"),
]

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)
PRIOR_SIGMA = 0.5


def _closed_form_kl_by_hand(layer: BayesLinear) -> torch.Tensor:
    """KL(q || N(0, PRIOR_SIGMA^2)) summed over weights and biases, via torch.distributions."""
    p = D.Normal(torch.tensor(0.0, dtype=DT), torch.tensor(PRIOR_SIGMA, dtype=DT))
    total = torch.zeros((), dtype=DT)
    for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
        total = total + D.kl_divergence(D.Normal(mu, F.softplus(rho)), p).sum()
    return total


def _problem(kind: str, b: int = 6):
    """A likelihood, a BayesLinear model for it, and a minibatch (x, y)."""
    x = torch.randn(b, 4)
    if kind == "categorical":
        lik, out_dim = Categorical(), 3
        y = torch.randint(0, 3, (b,))
    elif kind == "gaussian-fixed":
        lik, out_dim = Gaussian("fixed", sigma=0.3), 1
        y = torch.randn(b)
    elif kind == "gaussian-learned":
        lik, out_dim = Gaussian("learned", sigma=0.7, output_dim=2), 2
        y = torch.randn(b, 2)
    else:
        lik, out_dim = Gaussian("heteroscedastic", output_dim=2), 4
        y = torch.randn(b, 2)
    model = BayesLinear(
        4,
        out_dim,
        prior=GaussianPrior(PRIOR_SIGMA),
        kl="closed_form",
        mu_init=(-1, 1),
        rho_init=(-2.0, -1.0),
    )
    return lik, model, x, y


def _nll_by_hand(kind: str, lik, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over samples and examples of -log p(y | out), from the textbook densities."""
    if kind == "categorical":
        log_softmax = out - torch.logsumexp(out, dim=-1, keepdim=True)
        return -log_softmax.gather(-1, y.expand(out.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean()
    if kind == "gaussian-hetero":
        mean, log_var = out[..., :2], out[..., 2:]
        var = log_var.exp() + 1e-6  # the documented min_variance floor
    else:
        mean = out
        var = (lik.log_sigma.detach().exp() ** 2).expand_as(out)
        if kind == "gaussian-fixed":
            torch.testing.assert_close(var, torch.full_like(var, 0.09), rtol=1e-14, atol=0)
    target = y.unsqueeze(-1) if y.dim() == 1 else y
    per_dim = 0.5 * (LOG_2PI + var.log()) + (target - mean) ** 2 / (2 * var)
    return per_dim.sum(-1).mean()


def _frozen_outputs_by_hand(model: BayesLinear, x: torch.Tensor) -> torch.Tensor:
    """Outputs (S, B, O) of the S frozen weight samples w_s = mu + sigma * eps_s."""
    fr = model._frozen
    with torch.no_grad():
        w = model.weight_mu + model.weight_sigma * fr.eps_w
        b = model.bias_mu + model.bias_sigma * fr.eps_b
    return torch.stack([F.linear(x, w[s], b[s]) for s in range(w.shape[0])])


LIKELIHOODS = ["categorical", "gaussian-fixed", "gaussian-learned", "gaussian-hetero"]


@pytest.mark.parametrize("kind", LIKELIHOODS)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_uniform_elbo_is_nll_plus_kl_over_n(kind: str, num_samples: int, float64_default) -> None:
    torch.manual_seed(0)
    lik, model, x, y = _problem(kind)
    n = 50
    elbo = ELBO(lik, dataset_size=n, num_samples=num_samples)
    model.set_sampling("frozen")  # fixes the weight samples so they can be used by hand
    res = elbo(model, x, y)
    out = _frozen_outputs_by_hand(model, x)
    torch.testing.assert_close(res.output, out, rtol=1e-12, atol=1e-12)
    assert res.output.shape == (num_samples, x.shape[0], out.shape[-1])
    nll = _nll_by_hand(kind, lik, out, y)
    kl = _closed_form_kl_by_hand(model).detach()
    # by-hand formulas vs the library: float64 rounding only
    torch.testing.assert_close(res.nll, nll, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.kl, kl, rtol=1e-12, atol=0)
    assert res.kl_weight == 1.0 / n
    torch.testing.assert_close(res.loss.detach(), nll + kl / n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", LIKELIHOODS)
def test_blundell_elbo_is_nll_plus_pi_i_kl_over_b(kind: str, float64_default) -> None:
    torch.manual_seed(1)
    lik, model, x, y = _problem(kind, b=5)
    m = 4
    elbo = ELBO(lik, dataset_size=20, num_samples=2, kl_weighting="blundell")
    model.set_sampling("frozen")
    for i in range(m):
        res = elbo(model, x, y, batch_index=i, num_batches=m)
        pi_i = 2.0 ** (m - (i + 1)) / (2.0**m - 1)  # eq. 9 with 1-based i
        nll = _nll_by_hand(kind, lik, _frozen_outputs_by_hand(model, x), y)
        kl = _closed_form_kl_by_hand(model).detach()
        assert res.kl_weight == pytest.approx(pi_i / 5, rel=1e-15)
        torch.testing.assert_close(res.loss.detach(), nll + pi_i * kl / 5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["uniform", "blundell"])
def test_epoch_sum_is_the_full_data_negative_elbo(weighting: str, float64_default) -> None:
    """Summed over the M minibatches of an epoch, B_i * loss_i = -ELBO of the whole data set
    (sum of the NLLs + KL), for both weightings (Blundell's pi_i sum to 1)."""
    torch.manual_seed(2)
    lik, model, x, y = _problem("gaussian-fixed", b=12)
    model.set_sampling("mean")  # deterministic outputs
    elbo = ELBO(lik, dataset_size=12, kl_weighting=weighting)
    batches = [(0, 5), (5, 9), (9, 12)]  # uneven minibatches
    total = 0.0
    for i, (lo, hi) in enumerate(batches):
        res = elbo(model, x[lo:hi], y[lo:hi], batch_index=i, num_batches=len(batches))
        total += (hi - lo) * float(res.loss.detach())
    out = model(x).unsqueeze(0)
    full = 12 * _nll_by_hand("gaussian-fixed", lik, out, y) + _closed_form_kl_by_hand(model)
    # uniform: sum_i B_i / N = 1; blundell: sum_i pi_i = 1. Either way the KL counts once.
    assert total == pytest.approx(float(full.detach()), rel=1e-12)


# --------------------------------------------------------------------------- Blundell weights


@pytest.mark.parametrize("m", [1, 2, 3, 10, 100, 391, 1074, 1500])
def test_blundell_weights_sum_to_one(m: int) -> None:
    weights = [blundell_weight(i, m) for i in range(m)]
    assert all(math.isfinite(w) and w >= 0 for w in weights)
    assert math.fsum(weights) == pytest.approx(1.0, rel=1e-14, abs=0)
    assert all(a >= b for a, b in zip(weights, weights[1:], strict=False))
    # exact rational values 2^(M-i) / (2^M - 1), i = 1..M (first ten)
    for i in range(min(m, 10)):
        exact = Fraction(2 ** (m - i - 1), 2**m - 1)
        assert weights[i] == pytest.approx(float(exact), rel=1e-15)


def test_blundell_weight_391_has_no_overflow() -> None:
    m = 391  # ceil(50000 / 128): MNIST with batches of 128
    w = [blundell_weight(i, m) for i in range(m)]
    assert w[0] == pytest.approx(0.5, rel=1e-15)
    assert w[-1] == pytest.approx(float(Fraction(1, 2**m - 1)), rel=1e-15) and w[-1] > 0
    assert math.fsum(w) == pytest.approx(1.0, rel=1e-15)


def test_blundell_weight_rejects_bad_indices() -> None:
    with pytest.raises(
        ValueError, match=re.escape("num_batches must be a positive integer, got 0")
    ):
        blundell_weight(0, 0)
    with pytest.raises(ValueError, match=re.escape("batch_index must lie in [0, 4), got 4")):
        blundell_weight(4, 4)
    with pytest.raises(ValueError, match=re.escape("batch_index must lie in [0, 4), got -1")):
        blundell_weight(-1, 4)


def test_blundell_weight_takes_any_integer_type_for_both_arguments() -> None:
    """num_batches, like batch_index, may be a NumPy or 0-d tensor integer (it was refused
    as "must be a positive integer, got np.int64(4)"); a bool is neither."""
    np = pytest.importorskip("numpy")
    assert blundell_weight(np.int64(1), np.int64(4)) == blundell_weight(1, 4)
    assert blundell_weight(torch.tensor(1), torch.tensor(4)) == blundell_weight(1, 4)
    with pytest.raises(ValueError, match=re.escape("num_batches must be a positive integer")):
        blundell_weight(0, True)
    with pytest.raises(ValueError, match=re.escape("batch_index must be an integer, got True")):
        blundell_weight(True, 4)


# --------------------------------------------------------------------------- annealing


def test_linear_annealing_schedule_values() -> None:
    sched = linear_annealing(4, start=0.2, end=1.0)
    assert [sched(s) for s in (0, 2, 4, 10)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    with pytest.raises(
        ValueError, match=re.escape("warmup_steps must be a positive integer, got 0")
    ):
        linear_annealing(0)
    # a fractional or bool step count, or a non-finite end, used to be taken silently
    # (2.5 steps; True as 1 step; a nan scale for every step)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="warmup_steps must be a positive integer"):
            linear_annealing(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("end must be a finite number, got nan")):
        linear_annealing(3, end=float("nan"))
    assert linear_annealing(np.int64(2))(1) == pytest.approx(0.5)


def test_kl_weight_follows_step_buffer(float64_default) -> None:
    torch.manual_seed(0)
    lik, model, x, y = _problem("gaussian-fixed")
    n = 40
    elbo = ELBO(lik, dataset_size=n, kl_scale=linear_annealing(4))
    seen = []
    for _ in range(6):
        res = elbo(model, x, y)
        seen.append(res.kl_weight)
        torch.testing.assert_close(
            res.loss.detach(), res.nll + res.kl_weight * res.kl, rtol=1e-12, atol=0
        )
    assert seen == pytest.approx([0.0, 0.25 / n, 0.5 / n, 0.75 / n, 1.0 / n, 1.0 / n])
    assert int(elbo.step) == 6
    # no step is taken without gradients or in eval mode
    with torch.no_grad():
        elbo(model, x, y)
    elbo.eval()
    elbo(model, x, y)
    elbo.train()
    assert int(elbo.step) == 6
    # the step travels with the state dict
    fresh = ELBO(lik, dataset_size=n, kl_scale=linear_annealing(4))
    assert "step" in elbo.state_dict()
    assert fresh(model, x, y).kl_weight == 0.0
    fresh.load_state_dict(elbo.state_dict())
    assert fresh(model, x, y).kl_weight == 1.0 / n


def test_constant_kl_scale_multiplies_weight(float64_default) -> None:
    lik, model, x, y = _problem("categorical", b=4)
    res = ELBO(lik, dataset_size=10, kl_scale=0.25)(model, x, y)
    assert res.kl_weight == 0.25 / 10
    res = ELBO(lik, dataset_size=10, kl_weighting="blundell", kl_scale=0.5)(
        model, x, y, batch_index=0, num_batches=2
    )
    assert res.kl_weight == pytest.approx(0.5 * (2 / 3) / 4, rel=1e-15)


# --------------------------------------------------------------------------- gradients


def _prior(name: str):
    return {
        "gaussian": GaussianPrior(PRIOR_SIGMA),
        "laplace": LaplacePrior(PRIOR_SIGMA),
        "scale_mixture": ScaleMixturePrior(0.5, 1.0, math.exp(-2)),
    }[name]


def _log_prior_by_hand(name: str, w: torch.Tensor) -> torch.Tensor:
    if name == "gaussian":
        return D.Normal(0.0, PRIOR_SIGMA).log_prob(w)
    if name == "laplace":
        return D.Laplace(0.0, PRIOR_SIGMA).log_prob(w)
    return torch.logaddexp(
        math.log(0.5) + D.Normal(0.0, 1.0).log_prob(w),
        math.log(0.5) + D.Normal(0.0, math.exp(-2)).log_prob(w),
    )


@pytest.mark.parametrize(
    ("prior_name", "kl_mode"),
    [
        ("gaussian", "mc"),
        ("scale_mixture", "mc"),
        ("laplace", "mc"),
        ("gaussian", "closed_form"),
        ("laplace", "closed_form"),
    ],
)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_reparam_gradients_equal_the_paper_update(
    prior_name: str, kl_mode: str, num_samples: int, float64_default
) -> None:
    """Blundell et al. (2015), section 3.2: with w = mu + log(1 + exp(rho)) * eps and
    f(w, theta) = loss(w) + log q(w | theta) - log p(w) (scaled here by the ELBO's 1/N),
    grad_mu = df/dw + df/dmu and grad_rho = df/dw * eps / (1 + exp(-rho)) + df/drho, summed
    over the S weight samples; with the closed-form KL the partials are dKL/dmu, dKL/drho."""
    torch.manual_seed(0)
    n, b, sigma_noise = 50, 8, 0.5
    layer = BayesLinear(
        3, 2, prior=_prior(prior_name), kl=kl_mode, mu_init=(-1, 1), rho_init=(-2.0, 0.0)
    )
    elbo = ELBO(
        Gaussian("fixed", sigma=sigma_noise, output_dim=2), dataset_size=n, num_samples=num_samples
    )
    x, y = torch.randn(b, 3), torch.randn(b, 2)
    elbo(layer, x, y).loss.backward()
    rec = layer._record
    assert rec is not None and rec.w is not None and rec.b is not None

    # f with the weight samples as free variables, theta = (mu, rho) held apart
    W = rec.w.detach().clone().requires_grad_(True)  # (S, 2, 3)
    Bs = rec.b.detach().clone().requires_grad_(True)  # (S, 2)
    theta = [
        t.detach().clone().requires_grad_(True)
        for t in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)
    ]
    mu_w, rho_w, mu_b, rho_b = theta
    out = torch.einsum("bi,soi->sbo", x, W) + Bs[:, None, :]
    nll = (
        (0.5 * (LOG_2PI + 2 * math.log(sigma_noise)) + (y - out) ** 2 / (2 * sigma_noise**2))
        .sum(-1)
        .mean()
    )
    if kl_mode == "mc":
        log_q = D.Normal(mu_w, F.softplus(rho_w)).log_prob(W).sum((1, 2)) + D.Normal(
            mu_b, F.softplus(rho_b)
        ).log_prob(Bs).sum(1)
        log_p = _log_prior_by_hand(prior_name, W).sum((1, 2)) + _log_prior_by_hand(
            prior_name, Bs
        ).sum(1)
        kl = (log_q - log_p).mean()
    else:
        p = D.Normal(0.0, PRIOR_SIGMA) if prior_name == "gaussian" else D.Laplace(0.0, PRIOR_SIGMA)
        kl = (
            D.kl_divergence(D.Normal(mu_w, F.softplus(rho_w)), p).sum()
            + D.kl_divergence(D.Normal(mu_b, F.softplus(rho_b)), p).sum()
        )
    f = nll + kl / n
    dW, dB, dmu_w, drho_w, dmu_b, drho_b = torch.autograd.grad(f, [W, Bs, *theta])

    expected = {
        "weight_mu": dW.sum(0) + dmu_w,
        "weight_rho": (dW * rec.eps_w).sum(0) / (1 + torch.exp(-rho_w.detach())) + drho_w,
        "bias_mu": dB.sum(0) + dmu_b,
        "bias_rho": (dB * rec.eps_b).sum(0) / (1 + torch.exp(-rho_b.detach())) + drho_b,
    }
    for name, grad in expected.items():
        # two float64 evaluations of the same derivative; the MC partials cancel terms of size
        # |eps| / sigma ~ 10, so allow rounding at 1e-9 relative
        torch.testing.assert_close(getattr(layer, name).grad, grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kl_mode", ["closed_form", "mc"])
def test_zero_variance_local_case_has_finite_gradients(dtype: torch.dtype, kl_mode: str) -> None:
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, bias=False, estimator="local", kl=kl_mode, dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype)
    x[1] = 0.0  # an all-zero input row: zero pre-activation variance
    elbo = ELBO(Gaussian("fixed", sigma=0.5, output_dim=2), dataset_size=10).to(dtype)
    res = elbo(layer, x, torch.randn(4, 2, dtype=dtype))
    assert torch.isfinite(res.output).all()
    # exactly zero: the mean is 0 * mu and the standard deviation is 0 where the variance is
    assert torch.all(res.output[0, 1] == 0)
    res.loss.backward()
    for p in (layer.weight_mu, layer.weight_rho):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # an entirely zero batch: no data gradient to mu or rho at all (exact zeros, not NaN)
    layer.zero_grad()
    layer(torch.zeros(3, 3, dtype=dtype)).sum().backward()
    assert torch.all(layer.weight_rho.grad == 0) and torch.all(layer.weight_mu.grad == 0)


# --------------------------------------------------------------------------- invalid arguments


def test_elbo_rejects_invalid_arguments() -> None:
    lik = Categorical()
    for bad in (0, -3, 2.5):
        with pytest.raises(
            ValueError, match=re.escape(f"dataset_size must be a positive integer, got {bad!r}")
        ):
            ELBO(lik, dataset_size=bad)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape("unknown kl_weighting 'linear'; accepted values: uniform, blundell"),
    ):
        ELBO(lik, dataset_size=10, kl_weighting="linear")
    for bad in (0, -1):
        with pytest.raises(
            ValueError, match=re.escape(f"num_samples must be a positive integer, got {bad}")
        ):
            ELBO(lik, dataset_size=10, num_samples=bad)
    with pytest.raises(
        ValueError, match=re.escape("kl_scale must be a finite number >= 0, got -1.0")
    ):
        ELBO(lik, dataset_size=10, kl_scale=-1.0)
    with pytest.raises(
        TypeError, match="likelihood must be a bbb Likelihood .* got CrossEntropyLoss"
    ):
        ELBO(torch.nn.CrossEntropyLoss(), dataset_size=10)  # type: ignore[arg-type]


def test_elbo_rejects_invalid_batches() -> None:
    model = BayesLinear(3, 2)
    elbo = ELBO(Categorical(), dataset_size=4)
    with pytest.raises(
        ValueError, match=re.escape("minibatch of 5 examples is larger than dataset_size=4")
    ):
        elbo(model, torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("x has 3 examples but y has 2")):
        elbo(model, torch.randn(3, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(
        ValueError, match="ELBO needs a non-empty minibatch, got x of shape \\(0, 3\\)"
    ):
        elbo(model, torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(
        ValueError, match=re.escape("BayesLinear expected input of shape (N, ..., 3), got (2, 4)")
    ):
        elbo(model, torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    blundell = ELBO(Categorical(), dataset_size=4, kl_weighting="blundell")
    with pytest.raises(
        ValueError, match="kl_weighting='blundell' needs batch_index and num_batches"
    ):
        blundell(model, torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_likelihoods_reject_invalid_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown noise 'poisson'; accepted values: fixed, learned, heteroscedastic"
        ),
    ):
        Gaussian("poisson")
    with pytest.raises(
        ValueError, match=re.escape("Gaussian sigma must be a finite positive number, got -1.0")
    ):
        Gaussian(sigma=-1.0)
    with pytest.raises(
        ValueError, match=re.escape("Gaussian output_dim must be a positive integer, got 0")
    ):
        Gaussian(output_dim=0)
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(
        ValueError, match=re.escape("Categorical targets must lie in [0, 3), got values in [0, 3]")
    ):
        Categorical().log_prob(logits, torch.tensor([0, 3]))
    with pytest.raises(
        ValueError, match="Categorical targets must be integer class indices, got torch.float32"
    ):
        Categorical().log_prob(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError,
        match=re.escape("Gaussian(noise='fixed') expects 1 output(s) per example, got 3"),
    ):
        Gaussian().log_prob(logits, torch.zeros(2))
    with pytest.raises(
        ValueError, match="heteroscedastic Gaussian expects the model to output 2\\*D values"
    ):
        Gaussian("heteroscedastic").log_prob(logits, torch.zeros(2))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Gaussian target shape (2, 2) does not match the model's mean shape (2, 1)"
        ),
    ):
        Gaussian().log_prob(torch.zeros(1, 2, 1), torch.zeros(2, 2))


def test_learned_noise_is_a_parameter_and_fixed_noise_a_buffer() -> None:
    learned = Gaussian("learned", sigma=0.7, output_dim=2)
    assert [n for n, _ in learned.named_parameters()] == ["log_sigma"]
    fixed = Gaussian("fixed", sigma=0.7)
    assert list(fixed.parameters()) == [] and "log_sigma" in dict(fixed.named_buffers())
    torch.testing.assert_close(learned.sigma, torch.full((2,), 0.7))
    # the ELBO exposes the learned noise to an optimizer via its parameters
    elbo = ELBO(learned, dataset_size=5)
    assert any(p is learned.log_sigma for p in elbo.parameters())
    assert bbb.NOISE_MODELS == ("fixed", "learned", "heteroscedastic")
