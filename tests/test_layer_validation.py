"""Layer fixes: low-precision KL, learnable priors, constructor validation, shape errors in the
caller's terms, and ``reset_parameters`` re-applying the constructor's initialisation.

Statistical tolerances are ``stats.z`` (= 5) standard errors, see ``conftest.py``; rounding
tolerances are derived from the unit roundoff of the dtype involved.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

import bbb
from bbb import kernels
from bbb.nn.ensemble import BayesLinearEnsemble

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

# unit roundoff (half the spacing of the numbers near 1) of the low-precision dtypes
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CONVS = {1: bbb.BayesConv1d, 2: bbb.BayesConv2d, 3: bbb.BayesConv3d}


def _mlp(**kw: object) -> nn.Sequential:
    return nn.Sequential(bbb.BayesLinear(784, 400, **kw), nn.ReLU(), bbb.BayesLinear(400, 10, **kw))


# ----------------------------------------------------------------------------- 1. float16 KL
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_kl_is_finite_float32_and_equals_the_float32_kl(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model32 = _mlp(kl="closed_form")
    low = copy.deepcopy(model32).to(dtype)
    # the float32 model holding exactly the low-precision model's (rounded) parameters
    rounded = copy.deepcopy(low).float()
    x = torch.randn(8, 784)
    low(x.to(dtype))
    rounded(x)
    model32(x)
    k_low = bbb.kl_divergence(low)
    k_rounded = bbb.kl_divergence(rounded)
    k32 = bbb.kl_divergence(model32)
    # > 300k weights at ~4 nats each: far beyond float16's largest value (65504)
    assert k32.item() > 10 * torch.finfo(torch.float16).max
    assert k_low.dtype == torch.float32
    assert torch.isfinite(k_low)
    # same parameter values, both summed in float32: equal to float32 summation rounding
    assert k_low.item() == pytest.approx(k_rounded.item(), rel=1e-6)
    # against the unrounded model: rounding each parameter by at most u |theta| moves the KL by
    # at most u * sum |dKL/dtheta| |theta| to first order (the bound assumes all the errors
    # align; the actual deviation is far smaller)
    params = list(model32.parameters())
    grads = torch.autograd.grad(k32, params)
    bound = UNIT_ROUNDOFF[dtype] * sum(
        float((g.abs() * p.detach().abs()).sum()) for g, p in zip(grads, params, strict=True)
    )
    assert abs(k_low.item() - k32.item()) <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_kl_gradients_reach_the_low_precision_parameters(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    layer = bbb.BayesLinear(100, 200, kl="closed_form").to(dtype)
    reference = copy.deepcopy(layer).float()
    layer(torch.randn(3, 100, dtype=dtype))
    layer.kl().backward()
    reference.kl().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert torch.isfinite(p.grad).all(), name
        # the float32 gradient rounded once to the parameter dtype (relative error <= u)
        tol = UNIT_ROUNDOFF[dtype] * q.grad.abs()
        assert torch.all((p.grad.float() - q.grad).abs() <= tol), name


def test_half_mc_kl_is_finite_and_equals_a_float32_evaluation_of_the_same_sample() -> None:
    torch.manual_seed(2)
    layer = bbb.BayesLinear(100, 200, kl="mc").half()
    layer(torch.randn(3, 100).half())
    k = layer.kl()
    assert k.dtype == torch.float32 and torch.isfinite(k)
    rec = layer._record
    assert rec is not None
    # independent float32 evaluation at the forward's (half) sample: log q along the path
    # w = mu + sigma eps is N(eps; 0, 1) - log sigma; log p is the N(0, 1) prior at w
    expected = torch.zeros((), dtype=torch.float64)
    magnitude = 0.0  # sum of the absolute values of everything the float32 sums add up
    for rho, eps, w in ((layer.weight_rho, rec.eps_w, rec.w), (layer.bias_rho, rec.eps_b, rec.b)):
        assert eps is not None and w is not None
        sigma = F.softplus(rho.detach().float())
        log_q = D.Normal(0.0, 1.0).log_prob(eps[0].float()).double() - torch.log(sigma).double()
        log_p = D.Normal(0.0, 1.0).log_prob(w[0].detach().float()).double()
        expected += (log_q - log_p).sum()
        magnitude += float(log_q.abs().sum() + log_p.abs().sum())
    # float32 cascade summation of 20200 terms: error <= log2(n) * u32 * sum |terms|
    assert k.item() == pytest.approx(expected.item(), abs=math.log2(20200) * 2.0**-24 * magnitude)
    k.backward()
    assert layer.weight_mu.grad is not None and torch.isfinite(layer.weight_mu.grad).all()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


def test_the_fused_compiled_forward_is_not_used_for_low_precision_layers() -> None:
    # the compiled fused node sums the KL in the parameters' dtype: low precision avoids it
    layer = bbb.BayesLinear(4, 3, kl="closed_form")
    with kernels.use_kernels("compile"):
        assert layer._fusable("sample", 1)
        assert not layer.half()._fusable("sample", 1)


# ----------------------------------------------------------------------------- 2. learned prior
class LearnedScalePrior(bbb.Prior):
    """N(0, s^2) with a learnable log s."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(math.log(scale)))

    def distribution(self) -> D.Normal:
        return D.Normal(0.0, self.log_s.exp())


def _reference_kl(layer: bbb.BayesLinear, kl: str) -> torch.Tensor:
    """The KL written independently of bbb.kl, from torch.distributions."""
    s = layer.prior.log_s.exp()
    total = torch.zeros((), dtype=torch.float64)
    rec = layer._record
    pairs = [
        (layer.weight_mu, layer.weight_rho, None if rec is None else rec.eps_w),
        (layer.bias_mu, layer.bias_rho, None if rec is None else rec.eps_b),
    ]
    for mu, rho, eps in pairs:
        sigma = F.softplus(rho)
        if kl == "closed_form":
            total = total + (torch.log(s / sigma) + (sigma**2 + mu**2) / (2 * s**2) - 0.5).sum()
        else:
            assert eps is not None
            w = mu + sigma * eps[0]
            total = total + (D.Normal(mu, sigma).log_prob(w) - D.Normal(0.0, s).log_prob(w)).sum()
    return total


@pytest.mark.parametrize(
    ("kl", "estimator"),
    [("closed_form", "reparam"), ("closed_form", "local"), ("mc", "reparam"), ("mc", "flipout")],
)
def test_learnable_prior_parameters_receive_the_kl_gradient(kl: str, estimator: str) -> None:
    torch.manual_seed(3)
    prior = LearnedScalePrior(0.7)
    layer = bbb.BayesLinear(
        5, 4, prior=prior, kl=kl, estimator=estimator, rho_init=(-2.0, 0.0), dtype=torch.float64
    )
    assert any(p is prior.log_s for p in layer.parameters())  # an optimizer sees it
    layer(torch.randn(6, 5, dtype=torch.float64))
    params = [prior.log_s, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho]
    with warnings.catch_warnings():
        # formerly: "Converting a tensor with requires_grad=True to a scalar", gradient dropped
        warnings.simplefilter("error")
        k = layer.kl()
        grads = torch.autograd.grad(k, params)
    ref = _reference_kl(layer, kl)
    ref_grads = torch.autograd.grad(ref, params)
    assert k.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, r, name in zip(
        grads, ref_grads, ["log_s", "w_mu", "w_rho", "b_mu", "b_rho"], strict=True
    ):
        # float64 throughout: agreement to a few hundred ulps of the largest gradient
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12), name
    assert grads[0].abs().item() > 1e-3  # a gradient that actually moves the prior


def test_a_built_in_prior_with_a_parameter_hyper_parameter_is_a_clear_error() -> None:
    prior = bbb.GaussianPrior(1.0)
    del prior.sigma
    prior.sigma = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"GaussianPrior\.sigma has been made an nn\.Parameter"):
        prior.grad_log_prob(torch.zeros(3))


# ----------------------------------------------------------------------------- 3. conv tuples
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
def test_conv_tuple_arguments_of_the_wrong_length_are_rejected(dim: int, arg: str) -> None:
    cls = CONVS[dim]
    kw: dict[str, object] = {"kernel_size": 3}
    for length in (n for n in (dim - 1, dim + 1) if n > 0):
        kw[arg] = (1,) * length if arg != "kernel_size" else (3,) * length
        plural = "s" if dim > 1 else ""
        msg = (
            f"{cls.__name__} {arg} must be an int or a tuple of {dim} int{plural} "
            f"(one per spatial dimension), got {kw[arg]!r} of length {length}"
        )
        with pytest.raises(ValueError, match=re.escape(msg)):
            cls(2, 4, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_tuple_arguments_of_the_right_length_match_torch(dim: int) -> None:
    torch.manual_seed(4)
    kw = {
        "kernel_size": (3,) * dim,
        "stride": (2,) * dim,
        "padding": (1,) * dim,
        "dilation": (1,) * dim,
    }
    layer = CONVS[dim](2, 4, **kw)
    ref = getattr(nn, f"Conv{dim}d")(2, 4, **kw)
    x = torch.randn(2, 2, *([7] * dim))
    with bbb.sampling(layer, "mean"):
        y = layer(x)
    # the mean network is the plain convolution with mu as its weights
    expected = ref._conv_forward(x, layer.weight_mu, layer.bias_mu)
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"kernel_size": (3, True)}, "kernel_size must be positive integers"),
        ({"kernel_size": 3.0}, "kernel_size must be an int or a tuple of 2 ints"),
        ({"kernel_size": 3, "stride": (1, 0)}, "stride must be positive integers, got (1, 0)"),
        ({"kernel_size": 3, "padding": (0, -1)}, "padding must be non-negative integers"),
    ],
)
def test_conv_tuple_entries_are_validated(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"BayesConv2d {msg}")):
        bbb.BayesConv2d(2, 4, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- 4. shape errors
def test_linear_shape_error_reports_the_per_sample_shape_under_predict() -> None:
    model = bbb.BayesLinear(4, 2)
    with pytest.raises(ValueError) as err:
        bbb.predict(model, torch.randn(3, 5), num_samples=100)
    msg = str(err.value)
    assert msg.startswith(
        "BayesLinear expected input of shape (N, ..., 4), got (3, 5): "
        "the last dimension must be in_features=4, got 5"
    )
    assert "received (300, 5)" in msg and "100 samples" in msg and "stacked along dim 0" in msg
    assert "got (300, 5)" not in msg


def test_conv_shape_error_reports_the_per_sample_shape_under_predict() -> None:
    model = nn.Sequential(bbb.BayesConv2d(4, 2, 3), nn.Flatten())
    with pytest.raises(ValueError) as err:
        bbb.predict(model, torch.randn(2, 3, 6, 6), num_samples=10)
    msg = str(err.value)
    assert msg.startswith(
        "BayesConv2d expected input of shape (N, 4, ..., ...), got (2, 3, 6, 6): "
        "dimension 1 (channels) must be in_channels=4, got 3"
    )
    assert "received (20, 3, 6, 6)" in msg and "10 samples" in msg


def test_shape_errors_outside_vectorized_samples_name_the_problem() -> None:
    cases = [
        (bbb.BayesLinear(3, 2), torch.ones(4, 5), "got (4, 5): the last dimension must be "
         "in_features=3, got 5"),
        (bbb.BayesLinear(3, 2), torch.tensor(1.0), "got (): a 0-d input has no feature dimension"),
        (bbb.BayesConv1d(3, 2, 3), torch.ones(8), "got (8,): a 3-D input (N, C_in, L) or an "
         "unbatched 2-D one (C_in, L) is needed, got 1-D"),
        (BayesLinearEnsemble(3, 4, 2), torch.ones(2, 5, 4), "got (2, 5, 4): dimension 0 must be "
         "members=3, got 2"),
    ]  # fmt: skip
    for layer, x, expected in cases:
        with pytest.raises(ValueError) as err:
            layer(x)
        assert expected in str(err.value)
        assert "stacked" not in str(err.value)  # no sample dimension involved


# ----------------------------------------------------------------------------- 5. reset
def _assert_uniform(mu: torch.Tensor, bound: float, stats: object) -> None:
    """mu looks like U(-bound, bound): inside the range, and its variance bound^2 / 3 within
    Z standard errors (the SE from the sample's fourth moment)."""
    flat = mu.detach().reshape(-1).double()
    assert flat.abs().max().item() <= bound
    stats.assert_var(flat.unsqueeze(1), torch.tensor([bound**2 / 3], dtype=torch.float64))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("make", "bound"),
    [
        (lambda: bbb.BayesLinear(50, 40), 0.2),  # default "paper"
        (lambda: bbb.BayesLinear(50, 40, mu_init="fan_in"), 1 / math.sqrt(50)),
        (lambda: bbb.BayesConv2d(6, 40, 3, mu_init="paper"), 0.2),
        (lambda: bbb.BayesConv2d(6, 40, 3), 1 / math.sqrt(54)),  # default "fan_in"
        (lambda: BayesLinearEnsemble(4, 50, 10), 1 / math.sqrt(50)),  # default "fan_in"
        (lambda: bbb.BayesLinear(50, 40, mu_init=(-0.5, 0.5)), 0.5),
    ],
)
def test_reset_parameters_reapplies_the_constructors_init(make, bound: float, stats) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(5)
    layer = make()
    _assert_uniform(layer.weight_mu, bound, stats)
    before = layer.weight_mu.detach().clone()
    layer.reset_parameters(mu_init=(-3.0, 3.0), rho_init=-1.0)  # an explicit one-off init
    assert layer.weight_mu.abs().max().item() > 1.0
    layer.reset_parameters()
    assert not torch.equal(layer.weight_mu, before)  # re-drawn, not restored
    _assert_uniform(layer.weight_mu, bound, stats)
    assert layer.bias_mu is not None and layer.bias_mu.abs().max().item() <= bound
    for rho in (layer.weight_rho, layer.bias_rho):
        assert rho is not None
        assert rho.min().item() >= -5.0 and rho.max().item() <= -4.0  # default rho_init


def test_reset_parameters_reapplies_a_constant_rho_init() -> None:
    layer = bbb.BayesLinear(3, 2, rho_init=-3.0)
    layer.reset_parameters(rho_init=(-1.0, 0.0))
    layer.reset_parameters()
    assert torch.all(layer.weight_rho == -3.0) and torch.all(layer.bias_rho == -3.0)


# ----------------------------------------------------------------------------- 6. arguments
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (
            {"rho_init": "big"},
            "rho_init must be a finite number or a (low, high) tuple of two finite numbers, "
            "got 'big'",
        ),
        (
            {"rho_init": (1, 2, 3)},
            "rho_init must be a finite number or a (low, high) tuple of two finite numbers, "
            "got (1, 2, 3) (a sequence of length 3)",
        ),
        ({"rho_init": True}, "rho_init must be a finite number"),
        ({"rho_init": (-1.0, "a")}, "rho_init must be a finite number"),
        ({"rho_init": math.inf}, "rho_init must be finite, got inf"),
        (
            {"mu_init": (1,)},
            "mu_init must be one of 'paper', 'fan_in' or a (low, high) tuple of two finite "
            "numbers, got (1,) (a sequence of length 1)",
        ),
        ({"mu_init": 0.1}, "mu_init must be one of 'paper', 'fan_in'"),
        ({"mu_init": (0.0, math.nan)}, "mu_init must be finite, got (0.0, nan)"),
        ({"mu_init": (1.0, -1.0)}, "init ranges must have low <= high, got mu_init=(1.0, -1.0)"),
        ({"mu_init": "xavier"}, "unknown mu_init 'xavier'; accepted values: paper, fan_in"),
    ],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: bbb.BayesLinear(3, 3, **kw),
        lambda **kw: bbb.BayesConv2d(2, 2, 3, **kw),
        lambda **kw: BayesLinearEnsemble(2, 3, 3, **kw),
    ],
)
def test_invalid_inits_are_errors_that_name_the_argument(make, kw, msg: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(msg)):
        make(**kw)


@pytest.mark.parametrize(
    ("make", "msg"),
    [
        (lambda: bbb.BayesLinear(True, 3), "BayesLinear in_features must be a positive integer, "
         "got True (a bool is not accepted)"),
        (lambda: bbb.BayesLinear(3, False), "BayesLinear out_features must be a positive integer, "
         "got False"),
        (lambda: bbb.BayesLinear(3.0, 2), "BayesLinear in_features must be a positive integer, "
         "got 3.0"),
        (lambda: bbb.BayesConv2d(True, 2, 3), "BayesConv2d in_channels must be a positive integer"),
        (lambda: bbb.BayesConv2d(2, 2, 3, groups=True), "BayesConv2d groups must be a positive "
         "integer"),
        (lambda: BayesLinearEnsemble(True, 3, 3), "BayesLinearEnsemble members must be a "
         "positive integer"),
    ],
)  # fmt: skip
def test_sizes_must_be_positive_ints_not_bools(make, msg: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(msg)):
        make()


def test_numpy_integer_sizes_are_accepted_as_ints() -> None:
    np = pytest.importorskip("numpy")
    layer = bbb.BayesLinear(np.int64(3), np.int64(2))
    assert type(layer.in_features) is int and layer.weight_mu.shape == (2, 3)
