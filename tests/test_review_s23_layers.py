"""Session 23 review of the Bayesian layers and estimators, convolutions especially (#3).

Statistical checks use fixed seeds and tolerances of ``stats.z`` (= 5) standard errors (see
``conftest.py``; each test says which standard error); deterministic checks are exact or at
float64 rounding level. References are computed independently here (``torch.nn`` modules,
``torch.nn.functional`` with the weights given explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbb
from bbb import BayesConv1d, BayesConv2d, BayesConv3d
from bbb import kernels as K

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("single_thread"),  # see conftest.single_thread
]

DT = torch.float64


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    K.set_kernels("eager")


# --------------------------------------------------------------------------- float16 local


def _local_half(rho: float, **kw: object) -> BayesConv2d:
    torch.manual_seed(0)
    layer = BayesConv2d(1, 1, 1, bias=False, estimator="local", rho_init=rho, dtype=torch.float16)
    with torch.no_grad():
        layer.weight_mu.zero_()  # the output is then std * noise alone: no rounding of a mean
    return layer


@pytest.mark.parametrize("rho", [-7.0, -9.0])
def test_float16_local_output_has_the_posterior_standard_deviation(rho: float) -> None:
    # sigma = softplus(-7) = 9.1e-4 (variance 8.3e-7) and softplus(-9) = 1.2e-4 (1.5e-8): both
    # below float16's smallest normal number, 6.1e-5. Before: the first was floored to it
    # (std 7.8e-3, 8.6x too large), the second's sigma^2 underflowed to 0 (no noise at all).
    layer = _local_half(rho)
    n = 128 * 128
    x = torch.ones(1, 1, 128, 128, dtype=torch.float16)  # n outputs, independent noise each
    y = layer(x).float().flatten()
    sigma = F.softplus(torch.tensor(rho, dtype=DT)).item()
    assert torch.isfinite(y).all()
    # the sample standard deviation of n normal draws has standard error sigma / sqrt(2 n);
    # the float16 rounding of sigma (rel. 5e-4) and of each output (rel. 5e-4) is far below it
    se = sigma / math.sqrt(2 * n)
    assert abs(y.double().std().item() - sigma) <= 5 * se


def test_float16_local_with_inputs_above_256_is_finite_with_the_right_spread() -> None:
    # x^2 overflowed float16 (max 65504) for |x| > 255.9: the local output was +-inf where
    # reparam's and flipout's were finite.
    layer = _local_half(-3.0)
    x = torch.full((1, 1, 64, 64), 300.0, dtype=torch.float16)
    y = layer(x).float().flatten().double()
    assert torch.isfinite(y).all()
    std = 300.0 * F.softplus(torch.tensor(-3.0, dtype=DT)).item()
    # standard error of the sample std of n normal draws: std / sqrt(2 n)
    assert abs(y.std().item() - std) <= 5 * std / math.sqrt(2 * y.numel())
    layer(x).float().sum().backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


def test_local_under_a_float16_autocast_keeps_the_variance_in_range() -> None:
    torch.manual_seed(0)
    layer = BayesConv2d(1, 1, 1, bias=False, estimator="local", rho_init=-3.0)
    with torch.no_grad():
        layer.weight_mu.zero_()
    x = torch.full((1, 1, 64, 64), 300.0)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    y64 = y.double().flatten()
    assert torch.isfinite(y64).all()
    std = 300.0 * layer.weight_sigma.item()
    # standard error of the sample std of n normal draws: std / sqrt(2 n)
    assert abs(y64.std().item() - std) <= 5 * std / math.sqrt(2 * y64.numel())


def test_float16_local_zero_input_still_gives_the_mean_and_a_finite_gradient() -> None:
    layer = _local_half(-7.0)
    y = layer(torch.zeros(2, 1, 3, 3, dtype=torch.float16))
    assert (y == 0).all()
    y.sum().backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


# --------------------------------------------------------------------------- conv coverage
# (id, constructor without estimator/dtype, input shape): the options a convolution takes
CONV_CASES = [
    (
        "2d-groups-dilation-stride-tuples",
        partial(
            BayesConv2d, 4, 6, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2
        ),
        (2, 4, 6, 7),
    ),
    (
        "2d-depthwise-circular-same",
        partial(BayesConv2d, 3, 3, 3, padding="same", groups=3, padding_mode="circular"),
        (2, 3, 4, 5),
    ),
    (
        "2d-multiplier-reflect-same-even-kernel",
        partial(BayesConv2d, 2, 4, 4, padding="same", groups=2, padding_mode="reflect"),
        (2, 2, 6, 5),
    ),
    (
        "1d-reflect-dilation-nobias",
        partial(BayesConv1d, 2, 3, 3, padding=2, padding_mode="reflect", bias=False, dilation=2),
        (2, 2, 7),
    ),
    (
        "1d-valid-replicate",
        partial(BayesConv1d, 2, 2, 2, padding="valid", padding_mode="replicate", stride=2),
        (2, 2, 7),
    ),
    (
        "3d-replicate-same",
        partial(BayesConv3d, 2, 2, 2, padding="same", padding_mode="replicate"),
        (2, 2, 3, 3, 3),
    ),
    (
        "3d-stride-pad-nobias",
        partial(BayesConv3d, 2, 4, (1, 2, 2), stride=2, padding=1, groups=2, bias=False),
        (2, 2, 3, 4, 4),
    ),
]
CASE_IDS = [c[0] for c in CONV_CASES]


def _layer(case, estimator: str = "reparam", dtype: torch.dtype = DT, **kw):  # type: ignore[no-untyped-def]
    _, ctor, _ = case
    common = {"mu_init": (-0.5, 0.5), "rho_init": (-1.5, -0.5)}
    return ctor(estimator=estimator, dtype=dtype, **{**common, **kw})


def _torch_conv(layer: bbb.BayesModule, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """``x`` through a plain ``nn.ConvNd`` of the layer's options with weight w, bias b."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer._dim]
    ref = cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=b is not None,
        padding_mode=layer.padding_mode,
        dtype=x.dtype,
    )
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return torch.func.functional_call(ref, params, (x,))


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values in other memory layouts: channels-last, non-contiguous, one example."""
    perm = [0, *range(2, x.dim()), 1]  # channels last, whatever the number of dimensions
    inv = [perm.index(i) for i in range(x.dim())]
    return {
        "contiguous": x,
        "channels-last": x.permute(perm).contiguous().permute(inv),
        "non-contiguous": torch.stack([x, x], dim=-1)[..., 0],
    }


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_layouts_match_torch_in_mean_frozen_and_vectorized_passes(
    case, estimator: str
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    layer = _layer(case, estimator)
    x = torch.randn(case[2], dtype=DT)
    s = 3
    for name, xin in _layouts(x).items():
        assert torch.equal(xin, x)
        for rows in (x.shape[0], 1):  # the batch, and a batch of one
            xr, xv = xin[:rows], x[:rows]
            with bbb.sampling(layer, "mean"):
                ref = _torch_conv(layer, xv, layer.weight_mu, layer.bias_mu)
                torch.testing.assert_close(layer(xr), ref, rtol=0, atol=1e-12, msg=name)
            # S frozen weight samples in one pass: block s is the plain conv with sample s
            with bbb.sampling(layer, "frozen"), bbb.vectorized_samples(layer, s):
                bbb.resample(layer)
                y = layer(bbb.repeat_samples(xr, s))
                rec = layer._record
            assert rec is not None and rec.w is not None
            for q in range(s):
                b = None if rec.b is None else rec.b[q]
                ref = _torch_conv(layer, xv, rec.w[q], b)
                torch.testing.assert_close(
                    y[q * rows : (q + 1) * rows], ref, rtol=0, atol=1e-12, msg=name
                )
            # sampling mode: the right shape whether or not the blocks are marked identical
            with bbb.vectorized_samples(layer, s):
                assert layer(bbb.repeat_samples(xr, s)).shape == (s * rows, *ref.shape[1:])
                assert layer(torch.cat([xr] * s)).shape == (s * rows, *ref.shape[1:])


def _exact_moments(layer: bbb.BayesModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of each output under weight-space sampling, from the plain conv:
    E y = conv(x, mu) + mu_b and Var y = conv(x^2, sigma^2) + sigma_b^2 (independent weights)."""
    with torch.no_grad():
        b_var = None if layer.bias_sigma is None else layer.bias_sigma**2
        mean = _torch_conv(layer, x, layer.weight_mu, layer.bias_mu)
        var = _torch_conv(layer, x * x, layer.weight_sigma**2, b_var)
    return mean, var


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_output_moments_equal_weight_space_sampling(case, estimator: str, stats) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    layer = _layer(case, estimator)
    x = torch.randn(case[2], dtype=DT)[:1]
    xin = _layouts(x)["channels-last" if estimator == "local" else "non-contiguous"]
    mean, var = _exact_moments(layer, x)
    s = 3000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(xin, s))
    # every output element over the s independent draws: mean within 5 standard errors
    # sqrt(var / s) of the exact mean, sample variance within 5 of its own standard errors
    # sqrt((m4 - var^2) / s) of the exact variance (conftest.Stats)
    stats.assert_mean(y, mean[0], known_var=var[0], what=f"{estimator} mean")
    stats.assert_var(y, var[0], what=f"{estimator} variance")


def _cov_and_se(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample covariance over dim 0 of a and b and its standard error sqrt(var(a'b') / n)
    (a', b' centred): the large-n standard error of a mean of products."""
    prod = (a - a.mean(0)) * (b - b.mean(0))
    return prod.mean(0), prod.std(0) / math.sqrt(a.shape[0])


@pytest.mark.parametrize("case", CONV_CASES[:4], ids=CASE_IDS[:4])
def test_conv_flipout_positions_share_the_sample_and_examples_do_not(case, stats) -> None:  # type: ignore[no-untyped-def]
    """Within an example, flipout's outputs have the joint distribution of weight-space
    sampling (positions that share weights are correlated as under reparam); between two
    examples of one pass they are uncorrelated (independent signs per example), whereas
    reparam's are fully correlated (one weight sample per pass); local's positions are
    uncorrelated (its documented approximation)."""
    torch.manual_seed(2)
    x1 = torch.randn(case[2], dtype=DT)[:1]
    x = torch.cat([x1, x1])  # two identical examples in each pass
    layers = {e: _layer(case, e) for e in bbb.ESTIMATORS}
    for e in ("local", "flipout"):
        layers[e].load_state_dict(layers["reparam"].state_dict())
    _, var = _exact_moments(layers["reparam"], x1)
    s = 4000
    out = {}
    with torch.no_grad():
        for e, layer in layers.items():
            with bbb.vectorized_samples(layer, s):
                out[e] = layer(bbb.repeat_samples(x, s)).reshape(s, 2, -1)
    # position 0 against every position of channel 0, within example 0
    n_pos = var[0, 0].numel()
    for e in ("reparam", "flipout", "local"):
        y = out[e][:, 0]
        c, se = _cov_and_se(y[:, :n_pos], y[:, :1].expand(-1, n_pos))
        ref, ref_se = _cov_and_se(
            out["reparam"][:, 0, :n_pos], out["reparam"][:, 0, :1].expand(-1, n_pos)
        )
        if e == "flipout":
            # two independent estimates of one covariance: within 5 SE of their difference
            assert torch.all((c - ref).abs() <= stats.z * (se**2 + ref_se**2).sqrt())
        if e == "local":
            # independent noise per position: 0 off the diagonal, within 5 SE
            assert torch.all(c[1:].abs() <= stats.z * se[1:])
    # example 0 against example 1, output by output
    for e in bbb.ESTIMATORS:
        c, se = _cov_and_se(out[e][:, 0], out[e][:, 1])
        if e == "reparam":  # one weight sample for both: the covariance is the variance
            assert torch.all((c - var.flatten()).abs() <= stats.z * se)
        else:  # independent signs (flipout) or noise (local) per example: 0
            assert torch.all(c.abs() <= stats.z * se)
