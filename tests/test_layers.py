"""Bayesian layers: shapes, the three estimators, the vectorized multi-sample path, the
sampling modes, masks, and the distribution of weights and pre-activations.

Statistical checks use float64, fixed seeds and tolerances of ``stats.z`` (= 5) standard
errors (see ``conftest.py``); deterministic checks are exact or at float64 rounding level.
"""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bbb
from bbb import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    GaussianPrior,
    LaplacePrior,
    ScaleMixturePrior,
)
from bbb.nn import estimators as est

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("single_thread"),  # see conftest.single_thread
]

DT = torch.float64

# (id, constructor without estimator/dtype, input shape)
CONFIGS = [
    ("linear", partial(BayesLinear, 5, 3), (4, 5)),
    ("linear-nobias", partial(BayesLinear, 5, 3, bias=False), (4, 5)),
    ("linear-3d-input", partial(BayesLinear, 5, 3), (4, 2, 5)),
    ("conv1d", partial(BayesConv1d, 3, 4, 3), (2, 3, 9)),
    ("conv1d-stride-pad", partial(BayesConv1d, 3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    ("conv1d-same-dilation", partial(BayesConv1d, 3, 4, 3, padding="same", dilation=2), (2, 3, 9)),
    ("conv1d-groups", partial(BayesConv1d, 4, 6, 3, groups=2), (2, 4, 9)),
    ("conv1d-reflect", partial(BayesConv1d, 3, 4, 3, padding=2, padding_mode="reflect"), (2, 3, 9)),
    ("conv1d-valid-nobias", partial(BayesConv1d, 3, 4, 1, padding="valid", bias=False), (2, 3, 9)),
    (
        "conv2d-stride-pad",
        partial(BayesConv2d, 2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
        (2, 2, 7, 6),
    ),
    ("conv2d-same-even-kernel", partial(BayesConv2d, 2, 3, 4, padding="same"), (2, 2, 7, 6)),
    (
        "conv2d-groups-dilation",
        partial(BayesConv2d, 4, 6, 3, groups=2, dilation=2, padding=1),
        (2, 4, 7, 6),
    ),
    (
        "conv2d-reflect-nobias",
        partial(BayesConv2d, 2, 3, 3, padding=1, padding_mode="reflect", bias=False),
        (2, 2, 7, 6),
    ),
    (
        "conv2d-circular-same",
        partial(BayesConv2d, 2, 3, 3, padding="same", padding_mode="circular"),
        (2, 2, 7, 6),
    ),
    (
        "conv2d-depthwise-reflect-same",
        partial(BayesConv2d, 4, 4, 3, padding="same", groups=4, padding_mode="reflect"),
        (2, 4, 7, 6),
    ),
    ("conv3d", partial(BayesConv3d, 2, 3, 3, padding=1), (2, 2, 5, 4, 4)),
    (
        "conv3d-stride-groups",
        partial(BayesConv3d, 2, 4, (1, 2, 2), stride=2, groups=2),
        (2, 2, 5, 4, 4),
    ),
    (
        "conv3d-same-reflect-nobias",
        partial(BayesConv3d, 2, 3, 3, padding="same", padding_mode="reflect", bias=False),
        (2, 2, 5, 4, 4),
    ),
]
CONFIG_IDS = [c[0] for c in CONFIGS]


def _make(cfg, estimator: str = "reparam", **kw):
    _, ctor, shape = cfg
    layer = ctor(estimator=estimator, rho_init=(-3.0, -2.0), dtype=DT, **kw)
    return layer, torch.randn(shape, dtype=DT)


def _reference(layer: bbb.BayesModule) -> nn.Module:
    """The plain torch module with the same hyper-parameters and weight = mu, bias = mu_b."""
    bias = layer.bias_mu is not None
    if isinstance(layer, BayesLinear):
        ref: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias, dtype=DT)
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer._dim]
        ref = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=bias,
            padding_mode=layer.padding_mode,
            dtype=DT,
        )
    with torch.no_grad():
        ref.weight.copy_(layer.weight_mu)
        if bias:
            ref.bias.copy_(layer.bias_mu)
    return ref


def _apply_ref(ref: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return torch.func.functional_call(ref, params, (x,))


def _stack(x: torch.Tensor, s: int) -> torch.Tensor:
    """S copies of the batch stacked in front: (S * B, ...), as vectorized_samples expects."""
    return x.unsqueeze(0).expand(s, *x.shape).reshape(s * x.shape[0], *x.shape[1:])


# --------------------------------------------------------------------------- shapes and ops


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_mean_mode_equals_torch_op_exactly(cfg, estimator: str) -> None:
    torch.manual_seed(0)
    layer, x = _make(cfg, estimator)
    expected = _reference(layer)(x)
    with bbb.sampling(layer, "mean"):
        y = layer(x)
        y_again = layer(x)
    assert y.shape == expected.shape
    # same op on the same tensors: bit-identical
    assert torch.equal(y, expected)
    assert torch.equal(y, y_again)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_sample_mode_shapes_and_vectorized_shapes(cfg, estimator: str) -> None:
    torch.manual_seed(0)
    layer, x = _make(cfg, estimator)
    expected = _reference(layer)(x)
    y = layer(x)
    assert y.shape == expected.shape
    assert torch.isfinite(y).all()
    assert not torch.equal(y, expected)  # noise was added
    s = 3
    with bbb.vectorized_samples(layer, s):
        ys = layer(_stack(x, s))
    assert ys.shape == (s * x.shape[0], *expected.shape[1:])
    blocks = ys.reshape(s, *expected.shape)
    assert not torch.equal(blocks[0], blocks[1])  # a different weight sample per block


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_vectorized_frozen_blocks_equal_separate_weight_samples(cfg) -> None:
    """Inside vectorized_samples(S), block s is the op with weight mu + sigma * eps[s]."""
    torch.manual_seed(0)
    layer, x = _make(cfg)
    ref = _reference(layer)
    s, n = 4, x.shape[0]
    layer.set_sampling("frozen")
    with bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s))
    frozen = layer._frozen
    assert frozen is not None and frozen.eps_w is not None
    assert frozen.eps_w.shape == (s, *layer.weight_mu.shape)
    with torch.no_grad():
        for i in range(s):
            w = layer.weight_mu + layer.weight_sigma * frozen.eps_w[i]
            b = None
            if layer.bias_mu is not None:
                assert frozen.eps_b is not None
                b = layer.bias_mu + layer.bias_sigma * frozen.eps_b[i]
            # batched (grouped conv / bmm) vs separate op: equal up to float64 rounding
            torch.testing.assert_close(
                y[i * n : (i + 1) * n], _apply_ref(ref, x, w, b), rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_vectorized_reparam_blocks_use_recorded_weight_samples(cfg) -> None:
    torch.manual_seed(1)
    layer, x = _make(cfg, "reparam")
    ref = _reference(layer)
    s, n = 3, x.shape[0]
    with bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s))
    rec = layer._record
    assert rec is not None and rec.w is not None and rec.eps_w is not None
    with torch.no_grad():
        # addcmul (fused) vs mul + add: equal up to one rounding
        torch.testing.assert_close(
            rec.w, layer.weight_mu + layer.weight_sigma * rec.eps_w, rtol=1e-14, atol=1e-15
        )
        for i in range(s):
            b = None if rec.b is None else rec.b[i]
            torch.testing.assert_close(
                y[i * n : (i + 1) * n], _apply_ref(ref, x, rec.w[i], b), rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_vectorized_flipout_with_unit_signs_is_weight_space_sampling(cfg, monkeypatch) -> None:
    """With every random sign forced to +1, flipout is op(x, mu) + op(x, sigma * eps[s])."""
    monkeypatch.setattr(est, "rademacher", lambda shape, like: torch.ones(shape, dtype=like.dtype))
    torch.manual_seed(2)
    layer, x = _make(cfg, "flipout")
    ref = _reference(layer)
    s, n = 3, x.shape[0]
    with bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s))
    rec = layer._record
    assert rec is not None and rec.eps_w is not None
    with torch.no_grad():
        for i in range(s):
            w = layer.weight_mu + layer.weight_sigma * rec.eps_w[i]
            b = None
            if layer.bias_mu is not None:
                assert rec.eps_b is not None
                b = layer.bias_mu + layer.bias_sigma * rec.eps_b[i]
            # op(x, mu) + op(x, dW) vs op(x, mu + dW): equal up to float64 rounding
            torch.testing.assert_close(
                y[i * n : (i + 1) * n], _apply_ref(ref, x, w, b), rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize(
    "cfg", [c for c in CONFIGS if c[0].startswith("conv2d")], ids=lambda c: c[0]
)
def test_conv_flipout_signs_are_per_example_and_channel(cfg, monkeypatch) -> None:
    """Flipout's signs for a convolution are shared over positions (one per row and channel)."""
    shapes: list[tuple[int, ...]] = []

    def recording_rademacher(shape, like):
        shapes.append(tuple(shape))
        return torch.ones(shape, dtype=like.dtype)

    monkeypatch.setattr(est, "rademacher", recording_rademacher)
    layer, x = _make(cfg, "flipout")
    y = layer(x)
    assert shapes == [(x.shape[0], x.shape[1], 1, 1), (y.shape[0], y.shape[1], 1, 1)]


# --------------------------------------------------------------------------- sampling modes


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_frozen_mode_is_fixed_until_resample(estimator: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        BayesLinear(5, 4, estimator=estimator, rho_init=-2.0, dtype=DT),
        nn.Tanh(),
        BayesLinear(4, 2, estimator=estimator, rho_init=-2.0, dtype=DT),
    )
    x = torch.randn(6, 5, dtype=DT)
    y_a, y_b = model(x), model(x)
    assert not torch.equal(y_a, y_b)  # sample mode: fresh noise per call
    bbb.set_sampling(model, "frozen")
    y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    # one weight sample shared by all rows: the frozen output is the op with mu + sigma * eps
    first = model[0]
    w = first.weight_mu + first.weight_sigma * first._frozen.eps_w[0]
    b = first.bias_mu + first.bias_sigma * first._frozen.eps_b[0]
    h = torch.tanh(F.linear(x, w, b))
    second = model[2]
    w2 = second.weight_mu + second.weight_sigma * second._frozen.eps_w[0]
    b2 = second.bias_mu + second.bias_sigma * second._frozen.eps_b[0]
    torch.testing.assert_close(y1, F.linear(h, w2, b2), rtol=1e-12, atol=1e-12)
    bbb.resample(model)
    y3 = model(x)
    assert not torch.equal(y1, y3)
    assert torch.equal(y3, model(x))
    bbb.set_sampling(model, "sample")
    assert not torch.equal(model(x), model(x))


def test_sampling_context_restores_modes_even_on_error() -> None:
    model = nn.Sequential(BayesLinear(3, 3), BayesLinear(3, 2))
    model[1].set_sampling("frozen")
    with pytest.raises(RuntimeError, match="boom"), bbb.sampling(model, "mean"):
        assert [m.mode for m in bbb.bayes_modules(model)] == ["mean", "mean"]
        raise RuntimeError("boom")
    assert [m.mode for m in bbb.bayes_modules(model)] == ["sample", "frozen"]
    with bbb.vectorized_samples(model, 4):
        assert [m.num_samples for m in bbb.bayes_modules(model)] == [4, 4]
    assert [m.num_samples for m in bbb.bayes_modules(model)] == [1, 1]


# --------------------------------------------------------------------------- masks


def _masked_layer(kind: str, estimator: str):
    if kind == "linear":
        layer = BayesLinear(5, 3, estimator=estimator, rho_init=-1.0, dtype=DT)
        mask = torch.ones(3, 5, dtype=DT)
        mask[:, 2] = 0  # input feature 2 is pruned from every output
        x = torch.randn(4, 5, dtype=DT)
    else:
        layer = BayesConv2d(3, 2, 3, padding=1, estimator=estimator, rho_init=-1.0, dtype=DT)
        mask = torch.ones(2, 3, 3, 3, dtype=DT)
        mask[:, 2] = 0  # input channel 2 is pruned from every output
        x = torch.randn(4, 3, 5, 5, dtype=DT)
    layer.weight_mask = mask
    x2 = x.clone()
    x2[:, 2] = 100 * torch.randn_like(x2[:, 2])
    return layer, mask, x, x2


@pytest.mark.parametrize("mode", ["sample", "frozen", "mean"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_masked_weights_are_exactly_zero(kind: str, estimator: str, mode: str) -> None:
    torch.manual_seed(0)
    layer, mask, x, x2 = _masked_layer(kind, estimator)
    layer.set_sampling(mode)
    # The pruned input has no effect at all: same noise (seed), different pruned input.
    torch.manual_seed(7)
    y1 = layer(x)
    rec = layer._record
    layer.resample()
    torch.manual_seed(7)
    y2 = layer(x2)
    assert torch.equal(y1, y2)
    # the weight sample itself, where the pass builds one (weight-space sampling, and every
    # estimator's frozen sample): its pruned entries are exactly zero
    builds_sample = mode == "frozen" or (mode == "sample" and estimator == "reparam")
    assert (rec is not None and rec.w is not None) == builds_sample
    if builds_sample:
        assert torch.all(rec.w[:, mask == 0] == 0)


@pytest.mark.parametrize("mode", ["sample", "frozen", "mean"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fully_pruned_output_is_exactly_zero(estimator: str, mode: str) -> None:
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, bias=False, estimator=estimator, rho_init=-1.0, dtype=DT)
    mask = torch.ones(3, 4, dtype=DT)
    mask[1] = 0  # output 1 has no weights left
    layer.weight_mask = mask
    layer.set_sampling(mode)
    y = layer(torch.randn(5, 4, dtype=DT))
    assert torch.all(y[:, 1] == 0)
    assert torch.all(y[:, 0] != 0)


# --------------------------------------------------------------------------- distributions


def test_weight_samples_have_mean_mu_and_std_sigma(stats) -> None:
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, mu_init=(-1.0, 1.0), rho_init=(-2.0, 0.5), dtype=DT)
    s = 20000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        layer(torch.zeros(s, 3, dtype=DT))
    rec = layer._record
    assert rec is not None and rec.w is not None and rec.b is not None
    for sample, mu, sigma in (
        (rec.w, layer.weight_mu, layer.weight_sigma),
        (rec.b, layer.bias_mu, layer.bias_sigma),
    ):
        mu, sigma = mu.detach(), sigma.detach()
        stats.assert_mean(sample, mu, known_var=sigma**2, what="weight mean")
        stats.assert_var(sample, sigma**2, what="weight variance")
    # the noise is independent across samples and between weights and biases: lag-1 and
    # cross correlations within Z / sqrt(s) (their SE under independence is 1 / sqrt(s))
    eps_w = ((rec.w - layer.weight_mu) / layer.weight_sigma).detach().reshape(s, -1)
    eps_b = ((rec.b - layer.bias_mu) / layer.bias_sigma).detach().reshape(s, -1)
    for j in range(eps_w.shape[1]):
        assert abs(float(_lag1_correlation(eps_w[:, j]))) < stats.z / s**0.5
    for j in range(eps_b.shape[1]):
        assert abs(float((eps_w[:, 0] * eps_b[:, j]).mean())) < stats.z / s**0.5


def _lag1_correlation(v: torch.Tensor) -> torch.Tensor:
    c = v - v.mean()
    return (c[1:] * c[:-1]).mean() / c.pow(2).mean()


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # overrides single_thread: the noise fill uses one chunk per thread
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_large_weight_noise_is_iid_standard_normal(stats, two_threads) -> None:
    """Noise tensors large enough for a multi-threaded fill (2^18+ elements) are still i.i.d.
    N(0, 1), reproducible under torch.manual_seed, with no stream repeated across chunks."""
    assert torch.get_num_threads() == 2
    torch.manual_seed(0)
    layer = BayesLinear(8, 8, bias=False, dtype=DT)
    s = 5000  # 320000 noise values in one pass
    torch.manual_seed(1)
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        layer(torch.zeros(s, 8, dtype=DT))
    eps = layer._record.eps_w.flatten()
    # float64 normals from distinct streams essentially never coincide
    assert eps.unique().numel() == eps.numel()
    one = torch.ones(1, dtype=DT)
    stats.assert_mean(eps.unsqueeze(1), 0 * one, known_var=one, what="noise mean")
    stats.assert_var(eps.unsqueeze(1), one, what="noise variance")
    n = eps.numel()
    p_in = 0.6826894921370859  # P(|Z| < 1)
    # a proportion: standard error sqrt(p (1 - p) / n); 5 SE
    assert abs(float((eps.abs() < 1).double().mean()) - p_in) <= 5 * math.sqrt(
        p_in * (1 - p_in) / n
    )
    # lag-1 autocorrelation of i.i.d. values: standard error 1 / sqrt(n); 5 SE
    assert abs(float(_lag1_correlation(eps))) <= 5 / math.sqrt(n)
    torch.manual_seed(1)
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        layer(torch.zeros(s, 8, dtype=DT))
    assert torch.equal(layer._record.eps_w.flatten(), eps)


@pytest.mark.parametrize("numel", [10, 63, 64, 1000, 100_003])
def test_flipout_signs_are_fair_and_independent(numel: int) -> None:
    """k draws of numel signs (k >= 100, and >= 20000 signs in all, so that every size is
    checked statistically, both of rademacher's paths: one randint per sign below 64, 63 bits
    unpacked per random word from 64) are +-1, fair, uncorrelated with their neighbours, and
    unbiased at each position of a draw and of a 63-bit word. A fair sign has variance 1, so
    each mean below has standard error 1 / sqrt(its count); tolerances are 5 SE."""
    torch.manual_seed(0)
    like = torch.empty(0, dtype=DT)
    k = max(100, -(-20_000 // numel))
    signs = torch.stack([est.rademacher((numel,), like) for _ in range(k)])  # (k, numel)
    assert signs.shape == (k, numel) and signs.dtype == DT
    assert torch.all(signs.abs() == 1)  # only -1 and +1 (both occur: the mean check below)
    flat = signs.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) <= 5 / math.sqrt(n)
    # lag-1 correlation of independent signs: standard error 1 / sqrt(n) as well
    assert abs(float(_lag1_correlation(flat))) <= 5 / math.sqrt(n)
    # each of the first (up to) 128 positions of a draw, over the k draws: SE 1 / sqrt(k)
    # (128 comparisons at 5 SE: a false alarm has probability < 1e-4 for the fixed seed)
    assert float(signs[:, :128].mean(0).abs().max()) <= 5 / math.sqrt(k)
    # each bit position within a word (sign j of a draw is bit j % 63 of its word), pooled
    # over the words and draws: SE 1 / sqrt(count)
    bit = torch.arange(numel) % 63
    count = (torch.bincount(bit, minlength=63) * k).to(DT)
    per_bit = torch.zeros(63, dtype=DT).index_add_(0, bit, signs.sum(0))
    used = count > 0
    assert torch.all((per_bit[used] / count[used]).abs() <= 5 / count[used].sqrt())


def _exact_linear_moments(layer: BayesLinear, x: torch.Tensor):
    """Mean and variance of x W^T + b when W, b ~ N(mu, sigma^2) independently."""
    with torch.no_grad():
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)
        var = F.linear(x * x, layer.weight_sigma**2, layer.bias_sigma**2)
    return mean, var


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_preactivation_moments_equal_weight_space_sampling(estimator: str, stats) -> None:
    """Local reparameterization and flipout pre-activations have weight-space sampling's mean
    and variance (and weight-space sampling itself matches the exact moments)."""
    torch.manual_seed(0)
    layer = BayesLinear(
        4, 3, estimator=estimator, mu_init=(-1.0, 1.0), rho_init=(-2.0, 0.0), dtype=DT
    )
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=DT)
    mean, var = _exact_linear_moments(layer, x)
    s = 20000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s))  # S independent draws of the same row
    stats.assert_mean(y, mean[0], known_var=var[0], what=f"{estimator} mean")
    stats.assert_var(y, var[0], what=f"{estimator} variance")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_row_covariance_within_a_sample(estimator: str, stats) -> None:
    """Two rows of one pass: weight-space sampling correlates them (shared weights); local
    reparameterization and flipout's random signs make them uncorrelated."""
    torch.manual_seed(1)
    layer = BayesLinear(
        3, 2, estimator=estimator, mu_init=(-1.0, 1.0), rho_init=(-1.0, 0.0), dtype=DT
    )
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 1.5, -2.0]], dtype=DT)
    mean, _ = _exact_linear_moments(layer, x)
    s = 20000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s)).reshape(s, 2, 2)
    prod = (y[:, 0] - mean[0]) * (y[:, 1] - mean[1])  # mean of prod = Cov(row 0, row 1)
    with torch.no_grad():
        shared = F.linear(x[0] * x[1], layer.weight_sigma**2, layer.bias_sigma**2)
    expected = shared if estimator == "reparam" else torch.zeros_like(shared)
    assert float(shared.abs().min()) > 0.5  # the two cases are far apart
    stats.assert_mean(prod, expected, what=f"{estimator} row covariance")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sequence_positions_share_the_weight_sample(estimator: str, stats) -> None:
    """(N, T, in) inputs: the T positions of one example share its weight sample, so under
    weight-space sampling and flipout (signs shared by the positions) two positions covary as
    weight-space sampling says; local reparameterization draws them independently (documented
    as an approximation for such inputs). Tolerance: stats' standard-error bound."""
    torch.manual_seed(2)
    layer = BayesLinear(
        3, 2, estimator=estimator, mu_init=(-1.0, 1.0), rho_init=(-1.0, 0.0), dtype=DT
    )
    x = torch.tensor([[[1.0, 2.0, -1.0], [0.5, 1.5, -2.0]]], dtype=DT)  # one example, T = 2
    mean, _ = _exact_linear_moments(layer, x[0])
    s = 20000
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(_stack(x, s))  # (S, T, out)
    assert y.shape == (s, 2, 2)
    prod = (y[:, 0] - mean[0]) * (y[:, 1] - mean[1])  # mean of prod = Cov(position 0, 1)
    with torch.no_grad():
        shared = F.linear(x[0, 0] * x[0, 1], layer.weight_sigma**2, layer.bias_sigma**2)
    expected = torch.zeros_like(shared) if estimator == "local" else shared
    assert float(shared.abs().min()) > 0.5  # the two cases are far apart
    stats.assert_mean(prod, expected, what=f"{estimator} position covariance")


CONV_MOMENT_CASES = {
    # (layer constructor kwargs, input shape, how to compute the op by hand)
    "conv2d-reflect": (
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": 1,
            "padding_mode": "reflect",
        },
        (1, 2, 4, 4),
        lambda x, w, b: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b),
    ),
    "conv1d-groups-stride-dilation": (
        {
            "in_channels": 4,
            "out_channels": 2,
            "kernel_size": 3,
            "stride": 2,
            "dilation": 2,
            "groups": 2,
        },
        (1, 4, 11),
        lambda x, w, b: F.conv1d(x, w, b, stride=2, dilation=2, groups=2),
    ),
}


@pytest.mark.parametrize("case", list(CONV_MOMENT_CASES))
@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_conv_marginal_moments_equal_weight_space_sampling(
    estimator: str, case: str, stats
) -> None:
    torch.manual_seed(0)
    kw, shape, op = CONV_MOMENT_CASES[case]
    cls = BayesConv2d if len(shape) == 4 else BayesConv1d
    common = {"mu_init": (-0.5, 0.5), "rho_init": (-2.0, -1.0), "dtype": DT}
    ws = cls(**kw, estimator="reparam", **common)
    layer = cls(**kw, estimator=estimator, **common)
    layer.load_state_dict(ws.state_dict())
    x = torch.randn(shape, dtype=DT)
    with torch.no_grad():  # exact marginal moments of weight-space sampling, computed directly
        mean = op(x, ws.weight_mu, ws.bias_mu)[0]
        var = op(x * x, ws.weight_sigma**2, ws.bias_sigma**2)[0]
    s = 4000
    with torch.no_grad(), bbb.vectorized_samples(ws, s), bbb.vectorized_samples(layer, s):
        y_ws = ws(_stack(x, s))
        y = layer(_stack(x, s))
    assert y.shape == (s, *mean.shape)
    stats.assert_mean(y_ws, mean, known_var=var, what="weight-space mean")
    stats.assert_var(y_ws, var, what="weight-space variance")
    stats.assert_mean(y, mean, known_var=var, what=f"{estimator} mean")
    stats.assert_var(y, var, what=f"{estimator} variance")
    stats.assert_same_moments(y, y_ws, what=f"{estimator} vs weight-space")


def test_local_moments_agree_with_pyro_hidden_layer(stats) -> None:
    pytest.importorskip("pyro")
    from pyro.contrib.bnn import HiddenLayer

    torch.manual_seed(0)
    prior_scale = 0.5  # exactly representable: no float32 rounding of the prior buffer
    layer = BayesLinear(
        4,
        3,
        bias=False,
        estimator="local",
        prior=GaussianPrior(prior_scale),
        mu_init=(-1.0, 1.0),
        rho_init=(-2.0, 0.0),
        dtype=DT,
    ).to(DT)  # prior buffers in float64 as well (0.5 is exact in any precision)
    mu, sigma = layer.weight_mu.detach(), layer.weight_sigma.detach()
    X = torch.randn(2, 4, dtype=DT)
    s = 20000
    hidden = HiddenLayer(
        X, A_mean=mu.T, A_scale=sigma.T, non_linearity=lambda t: t, include_hidden_bias=False
    )
    y_pyro = hidden.rsample((s,))
    with torch.no_grad(), bbb.vectorized_samples(layer, s):
        y = layer(_stack(X, s)).reshape(s, 2, 3)
    stats.assert_same_moments(y, y_pyro, what="bbb local vs pyro HiddenLayer")
    # pyro's KL of the weight posterior to N(0, prior_scale^2) equals the closed form
    kl_pyro = HiddenLayer(X, A_mean=mu.T, A_scale=sigma.T, A_prior_scale=prior_scale).KL
    torch.testing.assert_close(layer.kl().detach(), kl_pyro, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    dim=st.sampled_from([0, 1, 2, 3]),
    estimator=st.sampled_from(ESTIMATORS),
    groups=st.integers(1, 2),
    c_in_per_group=st.integers(1, 2),
    c_out_per_group=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_mean_mode(
    dim,
    estimator,
    groups,
    c_in_per_group,
    c_out_per_group,
    kernel,
    stride,
    padding,
    padding_mode,
    bias,
    batch,
    seed,
) -> None:
    torch.manual_seed(seed)
    c_in, c_out = groups * c_in_per_group, groups * c_out_per_group
    if dim == 0:
        layer = BayesLinear(c_in, c_out, bias=bias, estimator=estimator, dtype=DT)
        x = torch.randn(batch, c_in, dtype=DT)
    else:
        if padding == "same":
            stride = 1
        cls = {1: BayesConv1d, 2: BayesConv2d, 3: BayesConv3d}[dim]
        layer = cls(
            c_in,
            c_out,
            kernel,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            estimator=estimator,
            dtype=DT,
        )
        x = torch.randn(batch, c_in, *([5] * dim), dtype=DT)
    expected = _reference(layer)(x)
    assert layer(x).shape == expected.shape
    with bbb.sampling(layer, "mean"):
        assert torch.equal(layer(x), expected)
    with bbb.vectorized_samples(layer, 2):
        assert layer(_stack(x, 2)).shape == (2 * batch, *expected.shape[1:])


# --------------------------------------------------------------------------- modules, dtype


def test_to_float64_moves_prior_buffers_and_masks() -> None:
    model = nn.Sequential(
        BayesLinear(3, 4, prior=GaussianPrior(0.5)),
        nn.ReLU(),
        BayesLinear(4, 4, prior=ScaleMixturePrior(0.25, 1.0, 0.01)),
        nn.ReLU(),
        BayesLinear(4, 2, prior=LaplacePrior(0.5)),
    )
    model[0].weight_mask = torch.ones(4, 3)
    assert all(b.dtype == torch.float32 for b in model.buffers())
    model.to(torch.float64)
    buffers = dict(model.named_buffers())
    assert {
        "0.prior.sigma",
        "2.prior.pi",
        "2.prior.sigma2",
        "4.prior.scale",
        "0.weight_mask",
    } <= set(buffers)
    assert all(b.dtype == torch.float64 for b in buffers.values())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    y = model(torch.randn(5, 3, dtype=torch.float64))
    kl = bbb.kl_divergence(model)
    assert y.dtype == torch.float64 and kl.dtype == torch.float64
    assert torch.isfinite(kl)


def _kl_float64_reference(layer: BayesLinear, prior_sigma: float) -> torch.Tensor:
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=DT), torch.tensor(prior_sigma, dtype=DT))
    return sum(
        torch.distributions.kl_divergence(torch.distributions.Normal(mu, F.softplus(rho)), p).sum()
        for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho))
    )


def test_float64_layer_has_float64_prior() -> None:
    torch.manual_seed(0)
    # 0.5 is exact in float32: with float32 prior buffers, log(prior sigma) and the other prior
    # terms would still be evaluated in float32 (a relative error ~1e-9 in the KL)
    layer = BayesLinear(
        4, 3, prior=GaussianPrior(0.5), kl="closed_form", rho_init=(-3.0, 0.0), dtype=DT
    )
    assert layer.prior.sigma.dtype == DT
    # float64 reference: agreement to float64 rounding (a few ulps of the sum)
    torch.testing.assert_close(layer.kl(), _kl_float64_reference(layer, 0.5), rtol=1e-13, atol=0)


def test_float64_layer_keeps_prior_hyper_parameters_exact() -> None:
    torch.manual_seed(0)
    layer = BayesLinear(
        4, 3, prior=GaussianPrior(0.1), kl="closed_form", rho_init=(-3.0, 0.0), dtype=DT
    )
    assert layer.prior.sigma.dtype == DT
    # float64 reference: agreement to float64 rounding (a few ulps of the sum)
    torch.testing.assert_close(layer.kl(), _kl_float64_reference(layer, 0.1), rtol=1e-13, atol=0)
    assert float(layer.prior.sigma) == 0.1


def test_model_inside_sequential() -> None:
    torch.manual_seed(0)
    conv = BayesConv2d(1, 2, 3, dtype=DT)
    lin = BayesLinear(2 * 3 * 3, 4, dtype=DT)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)
    x = torch.randn(6, 1, 5, 5, dtype=DT)
    assert model(x).shape == (6, 4)
    assert list(bbb.bayes_modules(model)) == [conv, lin]
    assert len(list(model.parameters())) == 8
    with bbb.sampling(model, "mean"):
        expected = F.linear(
            F.relu(F.conv2d(x, conv.weight_mu, conv.bias_mu)).flatten(1), lin.weight_mu, lin.bias_mu
        )
        assert torch.equal(model(x), expected)
    with bbb.vectorized_samples(model, 3):
        assert model(_stack(x, 3)).shape == (18, 4)
    model(x)
    torch.testing.assert_close(bbb.kl_divergence(model), conv.kl() + lin.kl(), rtol=0, atol=0)
    assert float(bbb.kl_divergence(nn.Sequential(nn.Linear(2, 2)))) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["local", "reparam"])
def test_torch_compile(estimator: str) -> None:
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as exc:  # no C++ toolchain / backend on this machine
        pytest.skip(f"torch.compile is unavailable: {type(exc).__name__}: {exc}")
    torch.manual_seed(0)
    model = nn.Sequential(
        BayesLinear(4, 8, estimator=estimator, rho_init=-2.0),
        nn.ReLU(),
        BayesLinear(8, 2, estimator=estimator, rho_init=-2.0),
    )
    compiled = torch.compile(model)
    x = torch.randn(5, 4)
    y = compiled(x)
    assert y.shape == (5, 2) and torch.isfinite(y).all()
    (y.square().sum() + bbb.kl_divergence(model)).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with bbb.sampling(model, "mean"):
        torch.testing.assert_close(compiled(x), model(x))
    with bbb.vectorized_samples(model, 3):
        assert compiled(_stack(x, 3)).shape == (15, 2)


# --------------------------------------------------------------------------- invalid arguments


def test_unknown_estimator_and_kl_are_rejected() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("unknown estimator 'bogus'; accepted values: reparam, local, flipout"),
    ):
        BayesLinear(3, 2, estimator="bogus")
    with pytest.raises(
        ValueError, match=re.escape("unknown estimator 'exact'; accepted values: reparam")
    ):
        BayesConv2d(3, 2, 3, estimator="exact")
    with pytest.raises(
        ValueError,
        match=re.escape("unknown kl mode 'analytic'; accepted values: auto, closed_form, mc"),
    ):
        BayesLinear(3, 2, kl="analytic")
    with pytest.raises(TypeError, match="prior must be a bbb Prior .* got Normal"):
        BayesLinear(3, 2, prior=torch.distributions.Normal(0.0, 1.0))  # type: ignore[arg-type]


def test_wrong_input_shapes_are_rejected() -> None:
    with pytest.raises(
        ValueError, match=re.escape("BayesLinear expected input of shape (N, ..., 3), got (4, 5)")
    ):
        BayesLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(
        ValueError,
        match=re.escape("BayesConv2d expected input of shape (N, 3, ..., ...), got (2, 4, 5, 5)"),
    ):
        BayesConv2d(3, 2, 3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "BayesConv1d expected input of shape (N, 3, ...) or unbatched (3, ...), got (4, 8): "
            "dimension 0 of an unbatched input (C_in, L) must be in_channels=3, got 4"
        ),
    ):
        BayesConv1d(3, 2, 3)(torch.randn(4, 8))  # unbatched, with the wrong channels
    layer = BayesLinear(3, 2)
    with (
        pytest.raises(ValueError, match="batch of 5 rows is not a multiple of num_samples=2"),
        bbb.vectorized_samples(layer, 2),
    ):
        layer(torch.randn(5, 3))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_vectorized_samples_rejects_bad_num_samples(bad) -> None:
    with (
        pytest.raises(
            ValueError, match=re.escape(f"num_samples must be a positive integer, got {bad!r}")
        ),
        bbb.vectorized_samples(BayesLinear(2, 2), bad),
    ):
        pass


def test_unknown_sampling_mode_is_rejected() -> None:
    model = nn.Sequential(BayesLinear(2, 2))
    msg = re.escape("unknown sampling mode 'map'; accepted values: sample, mean, frozen")
    with pytest.raises(ValueError, match=msg):
        bbb.set_sampling(model, "map")
    with pytest.raises(ValueError, match=msg), bbb.sampling(model, "map"):
        pass
    assert model[0].mode == "sample"


def test_invalid_layer_hyper_parameters_are_rejected() -> None:
    with pytest.raises(
        ValueError, match=re.escape("BayesLinear in_features must be a positive integer, got 0")
    ):
        BayesLinear(0, 2)
    with pytest.raises(
        ValueError,
        match=r"in_channels \(3\) and out_channels \(4\) must be divisible by groups \(2\)",
    ):
        BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown padding_mode 'mirror'; accepted values: zeros, reflect, replicate, circular"
        ),
    ):
        BayesConv1d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(
        ValueError, match=re.escape("padding string must be 'same' or 'valid', got 'full'")
    ):
        BayesConv1d(2, 2, 3, padding="full")
    with pytest.raises(
        ValueError, match="padding='same' is not supported for strided convolutions"
    ):
        BayesConv2d(2, 2, 3, padding="same", stride=2)
    with pytest.raises(
        ValueError, match=re.escape("unknown mu_init 'xavier'; accepted values: paper, fan_in")
    ):
        BayesLinear(2, 2, mu_init="xavier")
    with pytest.raises(ValueError, match="init ranges must have low <= high"):
        BayesLinear(2, 2, rho_init=(-3.0, -5.0))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_takes_an_unbatched_input_with_every_estimator(estimator: str) -> None:
    """An (in,) input, which nn.Linear takes and the shape check accepts, gives (out,) with
    every estimator (flipout's signs were shaped (in, in) for it and the product failed);
    with every sign +1, flipout is mu + sigma * eps applied to the one example."""
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, estimator=estimator, dtype=DT)
    x = torch.randn(3, dtype=DT)
    assert layer(x).shape == (2,)
    with bbb.sampling(layer, "mean"):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_unbatched_input_inside_vectorized_samples_is_named(estimator: str) -> None:
    """Inside vectorized_samples (S > 1) an (in,) input has no dimension for the S stacked
    samples: local returned one (out,) output as if S were 1, reparam and flipout failed in a
    reshape (torch's message); each now says that the input needs a batch dimension, and so
    does bbb.predict on an unbatched input (it repeated it into (S * in,))."""
    layer = BayesLinear(6, 2, estimator=estimator, dtype=DT)
    msg = re.escape("a 1-D (unbatched) input cannot hold the 3 Monte Carlo samples")
    with (
        bbb.vectorized_samples(layer, 3),
        pytest.raises(ValueError, match=msg + ".*received \\(6,\\)"),
    ):
        layer(torch.randn(6, dtype=DT))
    with pytest.raises(ValueError, match=re.escape("x.unsqueeze(0)")):
        bbb.predict(layer, torch.randn(6, dtype=DT), num_samples=4)
    with bbb.vectorized_samples(layer, 3):  # batched: S blocks of 1 row
        assert layer(torch.randn(3, 6, dtype=DT)).shape == (3, 2)
    assert layer(torch.randn(6, dtype=DT)).shape == (2,)  # S = 1: unbatched as nn.Linear


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_frozen_sample_follows_the_layer_to_another_dtype(dtype: torch.dtype) -> None:
    """A frozen weight sample drawn in float32 is kept, in the new dtype, after model.to(dtype)
    (with bfloat16 the float32 noise made the weight float32 and F.linear failed)."""
    torch.manual_seed(0)
    layer = BayesConv1d(2, 3, 3)
    layer.set_sampling("frozen")
    x = torch.randn(2, 2, 6)
    layer(x)
    eps_w = layer._frozen.eps_w.clone()
    layer.to(dtype)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and layer._frozen.eps_w.dtype == dtype
    torch.testing.assert_close(layer._frozen.eps_w, eps_w.to(dtype), rtol=0, atol=0)
    w = layer.weight_mu + layer.weight_sigma * layer._frozen.eps_w[0]
    b = layer.bias_mu + layer.bias_sigma * layer._frozen.eps_b[0]
    torch.testing.assert_close(y, F.conv1d(x.to(dtype), w, b))
    assert torch.equal(layer(x.to(dtype)), y)  # still the same sample
