"""Session 24 review of the Bayesian layers' mathematics (#3): property-based and statistical
tests of shapes, moments, gradients, modes and initialisation, and regression tests.

Statistical checks use float64, fixed seeds and tolerances of ``stats.z`` (= 5) standard
errors (``conftest.Stats``; each test says which standard error). References are computed
independently here (``torch.nn.functional`` with the weights given explicitly,
``torch.distributions``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bbb
from bbb import BayesConv2d, BayesLinear
from bbb import kernels as K
from bbb.nn.ensemble import BayesLinearEnsemble

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("single_thread"),  # see conftest.single_thread
]

DT = torch.float64
SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    K.set_kernels("eager")


def _ens_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """K independent linear maps by hand: x (K, N, in), w (K, out, in), b (K, out)."""
    y = torch.einsum("kni,koi->kno", x, w)
    return y if b is None else y + b.unsqueeze(1)


# --------------------------------------------------------------------------- shapes, layout


@SETTINGS
@given(
    estimator=st.sampled_from(bbb.ESTIMATORS),
    in_f=st.integers(1, 4),
    out_f=st.integers(1, 4),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    batch=st.integers(0, 3),
    bias=st.booleans(),
    num_samples=st.integers(1, 3),
    marked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_layout_for_any_leading_dims_is_samples_first(
    estimator: str,
    in_f: int,
    out_f: int,
    lead: list[int],
    batch: int,
    bias: bool,
    num_samples: int,
    marked: bool,
    seed: int,
) -> None:
    """(B, *, in) inputs with 0-3 extra dims (some of size 0), in/out features from 1, an empty
    batch: the mean pass is F.linear; inside vectorized_samples(S) the output is (S * B, *,
    out) with block s the linear map at weight sample s (frozen mode, recorded sample), as
    the docstrings say; sampling passes of every estimator have that shape too."""
    torch.manual_seed(seed)
    layer = BayesLinear(in_f, out_f, bias, estimator=estimator, rho_init=(-2.0, -1.0), dtype=DT)
    x = torch.randn(batch, *lead, in_f, dtype=DT)
    s = num_samples
    xs = bbb.repeat_samples(x, s) if marked else torch.cat([x] * s)
    with bbb.sampling(layer, "mean"):
        assert torch.equal(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))
    with bbb.vectorized_samples(layer, s):
        y = layer(xs)
        assert y.shape == (s * batch, *lead, out_f)
        assert torch.isfinite(y).all()
        with bbb.sampling(layer, "frozen"):
            y = layer(xs)
    rec = layer._record
    assert rec is not None and rec.w is not None
    for q in range(s):
        b = None if rec.b is None else rec.b[q]
        # batched matrix product vs one F.linear: float64 rounding
        torch.testing.assert_close(
            y[q * batch : (q + 1) * batch], F.linear(x, rec.w[q], b), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_linear_takes_a_one_d_input_of_one_feature_and_a_zero_d_is_refused(estimator: str) -> None:
    torch.manual_seed(0)
    layer = BayesLinear(1, 1, estimator=estimator, dtype=DT)
    x = torch.tensor([0.5], dtype=DT)
    assert layer(x).shape == (1,)
    with bbb.sampling(layer, "mean"):
        assert torch.equal(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))
    with pytest.raises(ValueError, match="0-d input"):
        layer(torch.tensor(0.5, dtype=DT))


@SETTINGS
@given(
    estimator=st.sampled_from(bbb.ESTIMATORS),
    members=st.integers(1, 3),
    in_f=st.integers(1, 3),
    out_f=st.integers(1, 3),
    n=st.integers(0, 3),
    bias=st.booleans(),
    num_samples=st.integers(1, 3),
    marked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ensemble_layout_is_samples_then_members(
    estimator: str,
    members: int,
    in_f: int,
    out_f: int,
    n: int,
    bias: bool,
    num_samples: int,
    marked: bool,
    seed: int,
) -> None:
    """(K, N, in) -> (K, N, out); inside vectorized_samples(S) the input and output are
    (S * K, N, .), block s of K members using weight sample s."""
    torch.manual_seed(seed)
    layer = BayesLinearEnsemble(
        members, in_f, out_f, bias, estimator=estimator, rho_init=(-2.0, -1.0), dtype=DT
    )
    x = torch.randn(members, n, in_f, dtype=DT)
    s = num_samples
    xs = bbb.repeat_samples(x, s) if marked else torch.cat([x] * s)
    with bbb.sampling(layer, "mean"):
        torch.testing.assert_close(
            layer(x), _ens_linear(x, layer.weight_mu, layer.bias_mu), rtol=1e-12, atol=1e-12
        )
    with bbb.vectorized_samples(layer, s):
        y = layer(xs)
        assert y.shape == (s * members, n, out_f)
        with bbb.sampling(layer, "mean"):
            ym = layer(xs)
        with bbb.sampling(layer, "frozen"):
            y = layer(xs)
    rec = layer._record
    assert rec is not None and rec.w is not None
    for q in range(s):
        block = slice(q * members, (q + 1) * members)
        b = None if rec.b is None else rec.b[q]
        torch.testing.assert_close(y[block], _ens_linear(x, rec.w[q], b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            ym[block], _ens_linear(x, layer.weight_mu, layer.bias_mu), rtol=1e-12, atol=1e-12
        )


# --------------------------------------------------------------------------- moments


def _cov_and_se(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample covariance over dim 0 of a and b and its standard error sqrt(var(a'b') / n)
    (a', b' centred): the large-n standard error of a mean of products."""
    prod = (a - a.mean(0)) * (b - b.mean(0))
    return prod.mean(0), prod.std(0) / math.sqrt(a.shape[0])


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_linear_moments_on_a_four_d_input(estimator: str, stats) -> None:  # type: ignore[no-untyped-def]
    """(N, T1, T2, in) inputs: every output's mean is x mu^T + mu_b and its variance
    x^2 sigma^2^T + sigma_b^2, for each estimator (local's marginals are exact there too)."""
    torch.manual_seed(10)
    layer = BayesLinear(3, 2, estimator=estimator, mu_init=(-1.0, 1.0), rho_init=(-1.5, -0.5))
    layer = layer.to(DT)
    x = torch.randn(2, 2, 3, 3, dtype=DT)
    with torch.no_grad():
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)
        var = F.linear(x * x, layer.weight_sigma**2, layer.bias_sigma**2)
    s = 4000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(x, s)).reshape(s, *mean.shape)
    # mean within 5 SE sqrt(var / s); sample variance within 5 SE sqrt((m4 - v^2) / s)
    stats.assert_mean(y, mean, known_var=var, what=f"{estimator} mean")
    stats.assert_var(y, var, what=f"{estimator} variance")


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_ensemble_moments_and_member_independence(estimator: str, stats) -> None:  # type: ignore[no-untyped-def]
    """Each member is an independent BayesLinear: exact per-output mean and variance, zero
    covariance between members, and between two examples of one member the covariance of
    its estimator (reparam: the shared weights' x1 x2 sigma^2 + sigma_b^2; local, flipout: 0)."""
    torch.manual_seed(11)
    layer = BayesLinearEnsemble(
        2, 3, 2, estimator=estimator, mu_init=(-1.0, 1.0), rho_init=(-1.0, 0.0), dtype=DT
    )
    x1 = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    x2 = torch.tensor([0.5, 1.5, -2.0], dtype=DT)
    x = torch.stack([x1, x2]).expand(2, 2, 3)  # the same two examples for both members
    with torch.no_grad():
        mu, sig2 = layer.weight_mu, layer.weight_sigma**2
        bmu, bsig2 = layer.bias_mu, layer.bias_sigma**2
        mean = _ens_linear(x, mu, bmu)
        var = _ens_linear(x * x, sig2, bsig2)
        shared = torch.einsum("i,koi->ko", x1 * x2, sig2) + bsig2  # (K, out)
    s = 20000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(x, s)).reshape(s, *mean.shape)
    stats.assert_mean(y, mean, known_var=var, what=f"{estimator} mean")
    stats.assert_var(y, var, what=f"{estimator} variance")
    # member 0 against member 1 (same example): independent, covariance 0 within 5 SE
    c, se = _cov_and_se(y[:, 0], y[:, 1])
    assert torch.all(c.abs() <= stats.z * se)
    # example 0 against example 1 of each member
    c, se = _cov_and_se(y[:, :, 0], y[:, :, 1])
    expected = shared if estimator == "reparam" else torch.zeros_like(shared)
    assert float(shared.abs().min()) > 0.5  # the two cases are far apart
    assert torch.all((c - expected).abs() <= stats.z * se), (c, expected)


def test_flipout_examples_are_uncorrelated_but_not_independent(stats) -> None:  # type: ignore[no-untyped-def]
    """Flipout decorrelates the examples of one pass (documented), but they share one
    perturbation: their squared deviations covary, Cov((y1 - m1)^2, (y2 - m2)^2) =
    x1^2 x2^2 Var(dW^2) = 2 sigma^4 x1^2 x2^2 for one weight and no bias, where local
    reparameterization's are independent (0). Tolerance: 5 standard errors of a mean of
    products."""
    torch.manual_seed(12)
    x = torch.tensor([[1.5], [-2.0]], dtype=DT)
    out = {}
    for e in ("flipout", "local"):
        layer = BayesLinear(1, 1, bias=False, estimator=e, dtype=DT)
        with torch.no_grad():
            layer.weight_mu.fill_(0.3)
            layer.weight_rho.fill_(math.log(math.expm1(0.5)))  # sigma = 0.5
        s = 20000
        with torch.no_grad(), bbb.vectorized_samples(layer, s):
            y = layer(bbb.repeat_samples(x, s)).reshape(s, 2)
        out[e] = y - 0.3 * x[:, 0]
    sigma = 0.5
    dependent = 2 * sigma**4 * 1.5**2 * 2.0**2
    for e, want in (("flipout", dependent), ("local", 0.0)):
        d = out[e]
        c, se = _cov_and_se(d[:, :1], d[:, 1:])
        assert abs(float(c)) <= stats.z * float(se), e  # uncorrelated
        c2, se2 = _cov_and_se(d[:, :1] ** 2, d[:, 1:] ** 2)
        assert abs(float(c2) - want) <= stats.z * float(se2), (e, float(c2), want)
        assert dependent > 4 * stats.z * float(se2)  # the two cases are far apart


# --------------------------------------------------------------------------- gradients


def _exp_loss_grads(layer: bbb.BayesModule, x: torch.Tensor, c: torch.Tensor, s: int, reps: int):
    """``reps`` independent estimates of d/dtheta of (1/s) sum over s samples of
    sum_n exp(c . y_n), each from one vectorized pass of s samples."""
    grads: dict[str, list[torch.Tensor]] = {k: [] for k, _ in layer.named_parameters()}
    for _ in range(reps):
        layer.zero_grad()
        with bbb.vectorized_samples(layer, s):
            y = layer(bbb.repeat_samples(x, s))
        (torch.exp(y @ c).sum() / s).backward()
        for k, q in layer.named_parameters():
            assert q.grad is not None
            grads[k].append(q.grad.clone())
    return {k: torch.stack(v) for k, v in grads.items()}


@pytest.mark.parametrize("kind", ["linear", "ensemble"])
@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_gradients_of_a_nonlinear_loss_are_unbiased(kind: str, estimator: str) -> None:
    """For L = sum_n exp(c . y_n), a loss that couples the outputs of an example, each
    estimator's gradient w.r.t. every mu and rho is unbiased: within an example the outputs
    are independent Gaussians under weight-space sampling (and under local and flipout), so
    E L = sum_n exp(c . m_n + (c^2) . v_n / 2) with m, v the exact mean and variance, whose
    gradient autograd gives exactly. Tolerance: 5 standard errors std / sqrt(reps) of the
    mean of reps i.i.d. gradient estimates (vectorized passes through repeat_samples, so
    local's and flipout's shared-mean paths are the ones checked)."""
    torch.manual_seed(20)
    if kind == "linear":
        layer: bbb.BayesModule = BayesLinear(
            3, 2, estimator=estimator, mu_init=(-0.5, 0.5), rho_init=(-1.5, -0.5), dtype=DT
        )
        x = torch.randn(3, 3, dtype=DT) * 0.7

        def moments(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            s_w, s_b = F.softplus(p["weight_rho"]), F.softplus(p["bias_rho"])
            return F.linear(x, p["weight_mu"], p["bias_mu"]), F.linear(x * x, s_w**2, s_b**2)
    else:
        layer = BayesLinearEnsemble(
            2, 3, 2, estimator=estimator, mu_init=(-0.5, 0.5), rho_init=(-1.5, -0.5), dtype=DT
        )
        x = torch.randn(2, 3, 3, dtype=DT) * 0.7

        def moments(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            s_w, s_b = F.softplus(p["weight_rho"]), F.softplus(p["bias_rho"])
            m = _ens_linear(x, p["weight_mu"], p["bias_mu"])
            return m, _ens_linear(x * x, s_w**2, s_b**2)

    c = torch.tensor([0.8, -0.6], dtype=DT)
    p = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    m, v = moments(p)
    exact = torch.autograd.grad(torch.exp(m @ c + v @ (c * c) / 2).sum(), list(p.values()))
    reps = 200
    grads = _exp_loss_grads(layer, x, c, s=10, reps=reps)
    for (k, _), want in zip(layer.named_parameters(), exact, strict=True):
        g = grads[k]
        se = g.std(0) / math.sqrt(reps)
        assert torch.all((g.mean(0) - want).abs() <= 5 * se + 1e-12), k


@pytest.mark.parametrize("kind", ["linear-2d", "linear-4d", "linear-1d", "ensemble"])
@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("num_samples", [1, 2])
def test_eager_estimators_pass_gradcheck_at_fixed_noise(
    kind: str, estimator: str, num_samples: int
) -> None:
    """float64 gradcheck of output w.r.t. input, mu and rho with the noise (and flipout's
    signs) fixed by reseeding at each evaluation: frozen and sampling passes, S stacked
    samples marked identical (the shared-mean paths) and not."""
    if kind == "linear-1d" and num_samples > 1:
        pytest.skip("a 1-D input holds no sample dimension")
    torch.manual_seed(21)
    if kind == "ensemble":
        layer: bbb.BayesModule = BayesLinearEnsemble(
            2, 3, 2, estimator=estimator, rho_init=(-2.0, -1.0), dtype=DT
        )
        x = torch.randn(2, 2, 3, dtype=DT)
    else:
        layer = BayesLinear(3, 2, estimator=estimator, rho_init=(-2.0, -1.0), dtype=DT)
        shape = {"linear-2d": (2, 3), "linear-4d": (2, 1, 2, 3), "linear-1d": (3,)}[kind]
        x = torch.randn(shape, dtype=DT)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(q.detach().clone().requires_grad_() for q in layer.parameters())
    s = num_samples
    for mode in ("sample", "frozen"):
        for marked in (True, False):

            def f(
                x: torch.Tensor, *ps: torch.Tensor, mode: str = mode, marked: bool = marked
            ) -> torch.Tensor:
                torch.manual_seed(123)  # the same noise and signs at every evaluation
                layer.resample()
                xs = bbb.repeat_samples(x, s) if marked else torch.cat([x] * s)
                with bbb.vectorized_samples(layer, s), bbb.sampling(layer, mode):
                    return torch.func.functional_call(
                        layer, dict(zip(names, ps, strict=True)), (xs,)
                    )

            xg = x.clone().requires_grad_()
            assert torch.autograd.gradcheck(f, (xg, *params)), (mode, marked)


# --------------------------------------------------------------------------- device


PRIORS = {
    "gaussian": lambda: bbb.GaussianPrior(0.5),
    "laplace": lambda: bbb.LaplacePrior(0.5),
    "scale_mixture": lambda: bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-6)),
}
KINDS = {
    "linear": lambda **kw: BayesLinear(3, 2, **kw),
    "conv2d": lambda **kw: BayesConv2d(2, 4, 3, groups=2, **kw),
    "ensemble": lambda **kw: BayesLinearEnsemble(2, 3, 2, **kw),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("prior", list(PRIORS))
def test_a_layer_built_on_the_meta_device_keeps_its_prior_through_to_empty(
    kind: str, prior: str
) -> None:
    """Deferred initialisation (build with device="meta", materialise with to_empty, then
    reset_parameters): the prior's hyper-parameters are the constructor's. Before, device=
    left the prior's buffers on the CPU (dtype= was applied to them, device= was not), and
    to_empty filled them with uninitialised memory: a prior sigma of 0 (ZeroDivisionError in
    kl(), or an infinite KL) or any other value, silently."""
    layer = KINDS[kind](prior=PRIORS[prior](), device="meta")
    assert all(b.device.type == "meta" for b in layer.buffers())  # as torch.nn's device=
    torch.manual_seed(0)
    junk = torch.full((1 << 16,), 1e30)  # recycled by to_empty's allocations, if any
    del junk
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    reference = KINDS[kind](prior=PRIORS[prior]())
    reference.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("prior.")}, strict=False
    )
    for name, buf in reference.prior.named_buffers():
        assert torch.equal(getattr(layer.prior, name), buf), name
    torch.manual_seed(1)
    kl = layer.kl()
    torch.manual_seed(1)  # (the Monte Carlo KL draws its sample: the same one)
    torch.testing.assert_close(kl, reference.kl(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- options set later


def test_options_set_after_construction_are_validated_as_the_constructor_does() -> None:
    """layer.estimator / .mode / .kl_mode assigned after construction: an unknown value is a
    ValueError listing the accepted ones (before: a typo of estimator ran flipout, of mode
    ran "sample", and any kl_mode other than "closed_form" ran the Monte Carlo KL, all
    silently); a valid value takes effect."""
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, dtype=DT)
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="unknown estimator 'lcoal'.*reparam, local, flipout"):
        layer.estimator = "lcoal"
    with pytest.raises(ValueError, match="unknown sampling mode 'means'.*sample, mean, frozen"):
        layer.mode = "means"
    with pytest.raises(ValueError, match="unknown kl mode 'closed'.*auto, closed_form, mc"):
        layer.kl_mode = "closed"
    assert (layer.estimator, layer.mode, layer.kl_mode) == ("reparam", "sample", "closed_form")
    layer.mode = "mean"
    assert torch.equal(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))
    layer.mode = "sample"
    layer.estimator = "local"
    layer(x)
    assert layer._record is not None and layer._record.eps_w is None  # local draws no weights


def test_kl_mode_set_after_construction_resolves_auto_for_the_prior() -> None:
    """kl_mode = "auto" is the exact KL for a prior with a closed form (before: anything but
    "closed_form" was taken as "mc", a noisy estimate where the exact value was asked for),
    and it stays the request when the prior is replaced, as the constructor's kl option."""
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, kl="mc", prior=bbb.GaussianPrior(0.5), dtype=DT)
    layer.kl_mode = "auto"
    assert layer.kl_mode == "closed_form"
    exact = BayesLinear(3, 2, prior=bbb.GaussianPrior(0.5), dtype=DT)
    exact.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.kl(), exact.kl(), rtol=1e-12, atol=0)
    layer.prior = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-6))
    assert layer.kl_mode == "mc"
    layer.prior = bbb.GaussianPrior(0.5)
    assert layer.kl_mode == "closed_form"


# --------------------------------------------------------------------------- KL, initialisation


def _mc_kl_reference(layer: bbb.BayesModule, eps_w: torch.Tensor, eps_b: torch.Tensor | None):
    """(1/S) sum_s [log q(w_s) - log p(w_s)] at w_s = mu + sigma * eps_s, in float64 with
    torch.distributions for q."""
    total = torch.zeros((), dtype=DT)
    for mu, rho, eps in (
        (layer.weight_mu, layer.weight_rho, eps_w),
        (layer.bias_mu, layer.bias_rho, eps_b),
    ):
        if mu is None or rho is None or eps is None:
            continue
        mu, sigma = mu.detach(), F.softplus(rho.detach())
        w = mu + sigma * eps
        log_q = torch.distributions.Normal(mu, sigma).log_prob(w)
        total = total + (log_q - layer.prior.log_prob(w)).sum() / eps.shape[0]
    return total


@pytest.mark.parametrize("kind", ["linear", "ensemble"])
@pytest.mark.parametrize("prior", ["laplace", "scale_mixture"])
@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
@pytest.mark.parametrize("mode", ["sample", "frozen"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_monte_carlo_kl_uses_the_forward_pass_sample(
    kind: str, prior: str, estimator: str, mode: str, num_samples: int
) -> None:
    """kl="mc": the KL is the average over the pass's S weight samples, and those are the
    samples the output was computed with (one-weight layer, no bias: the output is x w_s for
    reparam and frozen mode, x (mu + s_in s_out (w_s - mu)) for flipout, so |y - x mu| =
    |x (w_s - mu)|); after an optimizer step the same noise at the new parameters."""
    torch.manual_seed(30)
    s = num_samples
    kw = {"estimator": estimator, "kl": "mc", "prior": PRIORS[prior](), "dtype": DT}
    if kind == "linear":
        layer: bbb.BayesModule = BayesLinear(1, 1, bias=False, rho_init=(-1.0, 0.0), **kw)
        x = torch.tensor([[1.5]], dtype=DT)
    else:
        layer = BayesLinearEnsemble(2, 1, 1, bias=False, rho_init=(-1.0, 0.0), **kw)
        x = torch.tensor([[[1.5]], [[-0.5]]], dtype=DT)
    layer.prior.to(DT)
    bbb.set_sampling(layer, mode)
    with bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(x, s))
    rec = layer._record
    assert rec is not None and rec.eps_w is not None and rec.eps_w.shape[0] == s
    with torch.no_grad():
        w = (layer.weight_mu + layer.weight_sigma * rec.eps_w).reshape(s, -1)  # (S, K)
    xv = x.reshape(-1)
    got = y.detach().reshape(s, -1)
    mu = layer.weight_mu.detach().reshape(-1)
    if estimator == "flipout" and mode == "sample":
        torch.testing.assert_close((got - xv * mu).abs(), (xv * (w - mu)).abs())
    else:
        torch.testing.assert_close(got, xv * w)
    kl = layer.kl()
    torch.testing.assert_close(kl, _mc_kl_reference(layer, rec.eps_w, None), rtol=1e-10, atol=0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (y.sum() + kl).backward()
    opt.step()
    torch.testing.assert_close(
        layer.kl(), _mc_kl_reference(layer, rec.eps_w, None), rtol=1e-10, atol=0
    )


def _assert_uniform(t: torch.Tensor, low: float, high: float, stats, what: str) -> None:  # type: ignore[no-untyped-def]
    """Values of ``t`` i.i.d. U(low, high): inside the range, mean (low + high) / 2 within 5
    standard errors (high - low) / sqrt(12 n), variance (high - low)^2 / 12 within 5 standard
    errors of the sample variance (conftest.Stats)."""
    v = t.detach().reshape(-1, 1).to(DT)
    assert float(v.min()) >= low and float(v.max()) <= high, what
    var = torch.tensor([(high - low) ** 2 / 12], dtype=DT)
    stats.assert_mean(v, torch.tensor([(low + high) / 2], dtype=DT), known_var=var, what=what)
    stats.assert_var(v, var, what=what)


INITS = {
    # (layer, expected mu range, expected rho range)
    "linear-paper": (lambda: BayesLinear(40, 50), (-0.2, 0.2), (-5.0, -4.0)),
    "linear-fan_in": (lambda: BayesLinear(40, 50, mu_init="fan_in"), (-(40**-0.5), 40**-0.5), None),
    "linear-ranges": (
        lambda: BayesLinear(40, 50, mu_init=(0.5, 1.5), rho_init=(-3.0, 2.0)),
        (0.5, 1.5),
        (-3.0, 2.0),
    ),
    # fan_in of a grouped conv: in_channels / groups * prod(kernel) = 3 * 15 = 45
    "conv2d-groups": (
        lambda: BayesConv2d(6, 60, (3, 5), groups=2),
        (-(45**-0.5), 45**-0.5),
        (-5.0, -4.0),
    ),
    "ensemble": (lambda: BayesLinearEnsemble(4, 25, 30), (-(25**-0.5), 25**-0.5), (-5.0, -4.0)),
}


@pytest.mark.parametrize("case", list(INITS))
def test_initialisation_draws_the_documented_uniform_distributions(case: str, stats) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(31)
    make, mu_range, rho_range = INITS[case]
    layer = make()
    for mu, rho in layer._pairs():
        _assert_uniform(mu, *mu_range, stats, f"{case} mu")
        if rho_range is not None:
            _assert_uniform(rho, *rho_range, stats, f"{case} rho")
    torch.manual_seed(32)
    layer.reset_parameters(rho_init=-3.0)  # a constant, for this call only
    assert all(torch.all(rho == -3.0) for _, rho in layer._pairs())
    layer.reset_parameters()  # the constructor's options again
    for mu, _ in layer._pairs():
        _assert_uniform(mu, *mu_range, stats, f"{case} mu after reset")
