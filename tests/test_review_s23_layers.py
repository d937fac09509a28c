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
from bbb import BayesConv1d, BayesConv2d, BayesConv3d, BayesLinear
from bbb import kernels as K
from bbb.nn import estimators as est

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


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_gradients_are_unbiased(case, estimator: str) -> None:  # type: ignore[no-untyped-def]
    """E[dL/dtheta] for L = <g, y> + |y|^2 / 2, a loss that adds up over the outputs (local's
    marginals are then exact too), equals the gradient of E[L] = <g, m> + (|m|^2 + sum v) / 2
    with m, v the outputs' exact mean and variance, for mu and rho of weights and bias."""
    torch.manual_seed(3)
    layer = _layer(case, estimator)
    x = torch.randn(case[2], dtype=DT)
    p = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    s_w = F.softplus(p["weight_rho"])
    s_b = F.softplus(p["bias_rho"]) if "bias_rho" in p else None
    m = _torch_conv(layer, x, p["weight_mu"], p.get("bias_mu"))
    v = _torch_conv(layer, x * x, s_w * s_w, None if s_b is None else s_b * s_b)
    g = torch.randn(m.shape, dtype=DT)
    exact = torch.autograd.grad((g * m).sum() + 0.5 * (m * m + v).sum(), list(p.values()))
    reps, s = 150, 10  # 150 independent gradient estimates, each the mean of 10 draws
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in p}
    for _ in range(reps):
        layer.zero_grad()
        with bbb.vectorized_samples(layer, s):
            y = layer(bbb.repeat_samples(x, s)).reshape(s, *m.shape)
        (((g * y).sum() + 0.5 * (y * y).sum()) / s).backward()
        for k, q in layer.named_parameters():
            assert q.grad is not None
            grads[k].append(q.grad.clone())
    for (k, _), want in zip(layer.named_parameters(), exact, strict=True):
        est_ = torch.stack(grads[k])
        # the mean of reps i.i.d. estimates, within 5 standard errors std / sqrt(reps)
        se = est_.std(0) / math.sqrt(reps)
        assert torch.all((est_.mean(0) - want).abs() <= 5 * se + 1e-12), k


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 3, 5)], ids=lambda c: c[0])
def test_conv_estimators_pass_gradcheck_at_fixed_noise(case, estimator: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(4)
    layer = _layer(case, estimator)
    x = torch.randn(case[2], dtype=DT)[:1].requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(q.detach().clone().requires_grad_() for q in layer.parameters())

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(123)  # the same noise (and flipout signs) at every evaluation
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_frozen_parameters_get_no_gradient_and_the_others_do(backend: str, estimator: str) -> None:
    if backend == "native" and not bbb._native.available():
        pytest.skip("the native library cannot be built here")
    K.set_kernels(backend)
    for frozen in ("weight_mu", "weight_rho", "bias_mu", "bias_rho", "all"):
        torch.manual_seed(0)
        layer = BayesConv2d(2, 3, 3, padding=1, estimator=estimator)
        for n, q in layer.named_parameters():
            if frozen in (n, "all"):
                q.requires_grad_(False)
        x = torch.randn(2, 2, 5, 5, requires_grad=True)
        for s in (1, 2):
            with bbb.vectorized_samples(layer, s):
                y = layer(bbb.repeat_samples(x, s))
            (y.pow(2).sum() + layer.kl()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for n, q in layer.named_parameters():
            if q.requires_grad:
                assert q.grad is not None and torch.isfinite(q.grad).all(), (frozen, n)
            else:
                assert q.grad is None, (frozen, n)


# --------------------------------------------------------------------------- native kernels
NATIVE_CASES = [
    (
        "conv2d-groups-dilation",
        partial(
            BayesConv2d, 4, 8, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=4
        ),
        (3, 4, 9, 10),
    ),  # fmt: skip
    (
        "conv2d-reflect-same-even",
        partial(BayesConv2d, 2, 3, 4, padding="same", padding_mode="reflect", dilation=2),
        (2, 2, 9, 9),
    ),  # fmt: skip
    ("conv1d-1-to-1", partial(BayesConv1d, 1, 1, 1), (1, 1, 1)),
    (
        "conv3d-circular-nobias",
        partial(BayesConv3d, 2, 2, 2, padding="same", padding_mode="circular", bias=False),
        (1, 2, 3, 4, 5),
    ),  # fmt: skip
    ("linear-1-to-1", partial(BayesLinear, 1, 1), (3, 1)),
    ("linear-1-to-300", partial(BayesLinear, 1, 300), (3, 1)),
    # 36864 weights: more than one of the C kernels' 32768-element blocks, and a partial one
    ("conv2d-large", partial(BayesConv2d, 64, 64, 3, padding=1), (2, 64, 5, 5)),
]


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_kernels_agree_with_the_eager_formulas_on_convs_and_odd_shapes(
    case,  # type: ignore[no-untyped-def]
    estimator: str,
    samples: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The native node's output, KL and gradients equal the float64 eager computation at the
    noise it drew (flipout's signs set to +1, so that its output is weight-space sampling's)."""
    if not bbb._native.available():
        pytest.skip("the native library cannot be built here")
    _, ctor, shape = case
    torch.manual_seed(1)
    layer = ctor(estimator=estimator, rho_init=(-2.0, -1.0), prior=bbb.GaussianPrior(0.5))
    x = torch.randn(shape)
    monkeypatch.setattr(est, "rademacher", lambda shape, like: torch.ones(shape, dtype=like.dtype))
    K.set_kernels("native")
    with bbb.vectorized_samples(layer, samples):
        y = layer(bbb.repeat_samples(x, samples))
    rec = layer._record
    assert rec is not None and rec.kl_w is not None and rec.eps_w is not None  # the native node
    g = torch.randn(y.shape)
    ((y * g).sum() + 0.3 * layer.kl()).backward()
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    s_w = F.softplus(p["weight_rho"])
    w = p["weight_mu"] + s_w * rec.eps_w.double()
    b = None
    kl = bbb.closed_form_kl(p["weight_mu"], s_w, bbb.GaussianPrior(0.5)).sum()
    if "bias_mu" in p:
        assert rec.eps_b is not None
        s_b = F.softplus(p["bias_rho"])
        b = p["bias_mu"] + s_b * rec.eps_b.double()
        kl = kl + bbb.closed_form_kl(p["bias_mu"], s_b, bbb.GaussianPrior(0.5)).sum()
    y64 = torch.cat(
        [layer.op(x.double(), w[q], None if b is None else b[q]) for q in range(samples)]
    )
    ((y64 * g.double()).sum() + 0.3 * kl).backward()
    # float32 against float64: sums of up to 576 products, a few float32 ulps of each
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(layer.kl().double(), kl.detach(), rtol=1e-6, atol=1e-3)
    for k, q in layer.named_parameters():
        assert q.grad is not None and p[k].grad is not None
        scale = p[k].grad.abs().max().item()
        torch.testing.assert_close(q.grad.double(), p[k].grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_local_layer_equals_the_eager_layer_at_the_same_noise(
    case,  # type: ignore[no-untyped-def]
    samples: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Native local (the variance sigma^2 and the closed-form KL from the native node) gives
    the eager layer's output, KL and gradients when both draw the same output noise."""
    if not bbb._native.available():
        pytest.skip("the native library cannot be built here")
    _, ctor, shape = case
    torch.manual_seed(2)
    layer = ctor(estimator="local", rho_init=(-2.0, -1.0), prior=bbb.GaussianPrior(0.5))
    eager = ctor(estimator="local", rho_init=(-2.0, -1.0), prior=bbb.GaussianPrior(0.5))
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(shape)

    def fixed_noise(shape, dtype=None, device=None):  # type: ignore[no-untyped-def]
        return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)

    monkeypatch.setattr(est._noise, "randn", fixed_noise)
    out = []
    for net, backend in ((layer, "native"), (eager, "eager")):
        with bbb.use_kernels(backend), bbb.vectorized_samples(net, samples):
            y = net(bbb.repeat_samples(x, samples))
            kl = net.kl()
            (y.pow(2).sum() / 2 + 0.3 * kl).backward()
        out.append((y.detach(), kl.detach()))
    assert layer._record is not None and layer._record.kl_w is not None  # the native node
    assert eager._record is not None and eager._record.kl_w is None
    # float32 kernels against float32 eager operations: a few ulps
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-3)
    for (k, q), (_, r) in zip(layer.named_parameters(), eager.named_parameters(), strict=True):
        assert q.grad is not None and r.grad is not None
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(q.grad, r.grad, rtol=1e-4, atol=1e-5 * scale, msg=k)


# --------------------------------------------------------------------------- NaN sigma


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("make", [partial(BayesConv2d, 2, 3, 3), partial(BayesLinear, 18, 3)])
def test_a_nan_sigma_gives_a_nan_local_output_as_in_the_other_estimators(
    make,  # type: ignore[no-untyped-def]
    dtype: torch.dtype,
    backend: str,
) -> None:
    # Before: local turned a NaN variance into a standard deviation of 0, so a layer with a
    # diverged (NaN) rho returned finite outputs equal to the mean, where reparam and flipout
    # returned NaN: a broken model predicted with no uncertainty and no sign of error.
    if backend == "native" and not bbb._native.available():
        pytest.skip("the native library cannot be built here")
    K.set_kernels(backend)
    x = torch.randn(2, 2, 3, 3, dtype=dtype)
    for estimator in bbb.ESTIMATORS:
        torch.manual_seed(0)
        layer = make(estimator=estimator, dtype=dtype)
        with torch.no_grad():
            layer.weight_rho.view(-1)[0] = float("nan")
        xin = x if isinstance(layer, BayesConv2d) else x.flatten(1)
        y = layer(xin)
        # the NaN weight reaches output channel 0 of every example
        assert torch.isnan(y[:, 0]).all(), estimator
        assert not torch.isnan(y[:, 1:]).any(), estimator


# --------------------------------------------------------------------------- repeat_samples


@pytest.mark.parametrize("bad", [0, -1, 2.0, 1.5, True, "2"])
def test_repeat_samples_refuses_what_vectorized_samples_refuses(bad: object) -> None:
    # Before: 0 gave an empty batch without a word (a model's output then had no rows),
    # -1 and 2.0 raised torch's errors about shapes and expand, True passed as 1.
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        bbb.repeat_samples(x, bad)  # type: ignore[arg-type]
    layer = BayesLinear(3, 2)
    with (
        pytest.raises(ValueError, match="num_samples must be a positive integer"),
        bbb.vectorized_samples(layer, bad),  # type: ignore[arg-type]
    ):
        pass


def test_repeat_samples_takes_numpy_integers_and_names_a_0d_input() -> None:
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3)
    y = bbb.repeat_samples(x, np.int64(3))
    assert y.shape == (6, 3) and torch.equal(y[4:], x)
    assert bbb.nn.stacking.identical_blocks(y) == 3
    assert bbb.repeat_samples(x, 1) is x
    with pytest.raises(ValueError, match="batch dimension"):
        bbb.repeat_samples(torch.tensor(1.0), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_layers_run_on_the_meta_device(estimator: str, dtype: torch.dtype) -> None:
    # shape inference on the meta device (a device type autocast does not know: asking it
    # whether autocast is on raises) must keep working with local's float16 variance path
    layer = BayesConv2d(2, 3, 3, estimator=estimator, dtype=dtype, device="meta")
    y = layer(torch.empty(4, 2, 5, 5, dtype=dtype, device="meta"))
    assert y.shape == (4, 3, 3, 3) and y.device.type == "meta" and y.dtype == dtype


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_layers_compile_into_one_graph(estimator: str, stats) -> None:  # type: ignore[no-untyped-def]
    # Before: bbb.nn.noise.randn asked torch for its thread count (and the native library
    # for its normals), which broke the graph at every layer's noise: 8 graphs for this
    # two-layer model, and fullgraph=True failed. (backend "eager": dynamo's tracing only,
    # no code generation, so no compiler is needed.)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        BayesConv2d(2, 3, 3, estimator=estimator, rho_init=-1.0, dtype=DT),
        nn.ReLU(),
        BayesConv2d(3, 2, 3, padding="same", padding_mode="reflect", estimator=estimator, dtype=DT),
        nn.Flatten(),
        BayesLinear(18, 2, estimator=estimator, rho_init=-1.0, dtype=DT),
    )
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(1, 2, 5, 5, dtype=DT)
    s = 2000
    with torch.no_grad(), bbb.vectorized_samples(model, s):
        xs = torch.cat([x] * s)
        y = compiled(xs)
        y_ref = model(xs)
    # the compiled model's noise is torch's own: the same distribution as the eager model's,
    # output by output (two independent samples: means and variances within 5 SE)
    stats.assert_same_moments(y, y_ref, what=f"compiled {estimator}")
    torch._dynamo.reset()
