"""bbb._native and the kernels backend "native": the noise generator and the fused sample + KL.

The generator is checked against Threefry-2x32-20's published known-answer vectors (Random123,
Salmon et al. 2011), then statistically (moments, Kolmogorov-Smirnov, tails, independence of
a Box-Muller pair), each tolerance derived from the standard error of its statistic. The
fused kernels are checked against the same formulas evaluated in float64 with autograd, with
the noise the kernel drew; the layers' outputs against their analytic moments.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bbb
from bbb import _native as N
from bbb import kernels as K
from bbb.config import TrainConfig
from bbb.models import bayes_mlp

pytestmark = pytest.mark.skipif(
    not N.available(), reason=f"native library not available: {N.error()}"
)


G = ("gaussian", 0.0, 1.0)  # N(0, 1), closed-form KL


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    K.set_kernels("eager")


def _threefry(c0: int, c1: int, k0: int, k1: int) -> tuple[int, int]:
    lib = N.load()
    assert lib is not None
    out = np.zeros(2, dtype=np.uint32)
    lib.bbb_threefry2x32(c0, c1, k0, k1, out.ctypes.data)
    return int(out[0]), int(out[1])


def test_threefry_known_answers() -> None:
    # Random123's kat_vectors for threefry2x32_20 (counter words, key words -> output words)
    assert _threefry(0, 0, 0, 0) == (0x6B200159, 0x99BA4EFE)
    assert _threefry(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) == (0x1CB996FC, 0xBB002BE7)
    assert _threefry(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344) == (0xC4923A9C, 0x483DF7A0)


def _normals(n: int, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    return N.normal((n,)).double().numpy()


def test_normal_moments_tails_and_ks() -> None:
    n = 1 << 21
    z = _normals(n)
    assert np.isfinite(z).all()
    se = 1 / math.sqrt(n)
    # sample moments: standard errors sqrt(Var(Z^k) / n) = sqrt(1, 2, 15, 96) / sqrt(n); 5 SE
    assert abs(z.mean()) < 5 * se
    assert abs((z**2).mean() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(15) * se
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96) * se
    # tails: P(|Z| > 3) = 0.0026998, binomial standard error, 5 SE
    p = math.erfc(3 / math.sqrt(2))
    assert abs((np.abs(z) > 3).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Kolmogorov-Smirnov against the normal CDF: 1.95 / sqrt(n) is the 0.1% critical value
    zs = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(zs / math.sqrt(2)))
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.95 / math.sqrt(n)


def test_box_muller_pairs_and_neighbours_are_uncorrelated() -> None:
    n = 1 << 21
    z = _normals(n, seed=3).reshape(-1, 2, 256)  # tile layout: z0 of pair j at j, z1 at 256 + j
    z0, z1 = z[:, 0].ravel(), z[:, 1].ravel()
    m = z0.size
    # corr(z0, z1) and corr(z0^2, z1^2) of independent normals: mean 0, standard error
    # 1/sqrt(m); a defect of the uniforms would show in the radius (the squares); 5 SE
    assert abs(np.corrcoef(z0, z1)[0, 1]) < 5 / math.sqrt(m)
    assert abs(np.corrcoef(z0**2, z1**2)[0, 1]) < 5 / math.sqrt(m)
    flat = z.ravel()
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5 / math.sqrt(flat.size)


def test_normal_stream_is_reproducible_and_independent_of_threads_and_offsets() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _normals(300_001, seed=5)
        torch.set_num_threads(2)
        two = _normals(300_001, seed=5)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, _normals(300_001, seed=6))
    # element e depends only on (key, e): a slice from a tile boundary equals the stream there
    lib = N.load()
    assert lib is not None
    full = torch.empty(4096)
    lib.bbb_normal(full.data_ptr(), 0, 4096, 7, 9, 1)
    part = torch.empty(1000)
    lib.bbb_normal(part.data_ptr(), 1024, 1000, 7, 9, 1)
    torch.testing.assert_close(part, full[1024:2024], rtol=0, atol=0)


def _reference(kind: str, mu: torch.Tensor, rho: torch.Tensor, eps: torch.Tensor | None):
    """t and the KL sum in float64 from the formulas (autograd for the gradients)."""
    sigma = F.softplus(rho)
    log_sigma = torch.where(rho < -20, rho, torch.log(sigma))
    prior_s = 0.7
    kl = (
        math.log(prior_s) - log_sigma + (sigma**2 + (mu - 0.1) ** 2) / (2 * prior_s**2) - 0.5
    ).sum()
    if kind == "reparam":
        t = mu + sigma * eps
    elif kind == "flipout":
        t = sigma * eps
    else:
        t = sigma**2
    return t, kl


@pytest.mark.parametrize("kind", ["reparam", "flipout", "local"])
@pytest.mark.parametrize("n", [37, 512, 70_001])
def test_fused_kernel_matches_float64_formulas(kind: str, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    mu = (torch.randn(n, generator=g) * 0.3).requires_grad_()
    # rho over the whole range: below the -20 switch, the usual -7..-3, and positive
    rho = torch.cat(
        [torch.linspace(-30.0, 4.0, min(n, 200)), torch.rand(max(0, n - 200), generator=g) * 6 - 8]
    )[:n].requires_grad_()
    prior = bbb.GaussianPrior(0.7, mean=0.1)
    K.set_kernels("native")
    torch.manual_seed(0)
    t, kl, eps, _ = K.native_sample_and_kl(kind, mu, rho, prior)
    assert (eps is None) == (kind == "local")
    g_t = torch.randn(n, generator=g)
    (gm, gr) = torch.autograd.grad((t * g_t).sum() + 0.37 * kl, (mu, rho))
    mu64 = mu.detach().double().requires_grad_()
    rho64 = rho.detach().double().requires_grad_()
    t64, kl64 = _reference(kind, mu64, rho64, None if eps is None else eps.double())
    (gm64, gr64) = torch.autograd.grad((t64 * g_t.double()).sum() + 0.37 * kl64, (mu64, rho64))
    # float32 against float64: a few float32 ulps per element; the KL is a sum of n terms
    # accumulated in float64 partial sums, so its error is that of the per-term rounding
    torch.testing.assert_close(t.double(), t64, rtol=2e-6, atol=1e-6)
    assert abs(kl.item() - kl64.item()) <= 1e-6 * max(1.0, abs(kl64.item())) + 1e-4
    torch.testing.assert_close(gm.double(), gm64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(gr.double(), gr64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["reparam", "flipout", "local"])
@pytest.mark.parametrize("n", [37, 70_001])
def test_fused_mixture_mc_kernel_matches_float64_formulas(kind: str, n: int) -> None:
    """Scale-mixture prior, Monte Carlo KL at w = mu + sigma eps (for local, eps is the KL's
    own sample): value and gradients against the float64 formulas with autograd."""
    g = torch.Generator().manual_seed(n + 1)
    mu = (torch.randn(n, generator=g) * 0.3).requires_grad_()
    rho = torch.cat(
        [torch.linspace(-30.0, 4.0, min(n, 200)), torch.rand(max(0, n - 200), generator=g) * 6 - 8]
    )[:n].requires_grad_()
    prior = bbb.ScaleMixturePrior(0.25, 1.0, math.exp(-6))
    K.set_kernels("native")
    torch.manual_seed(0)
    t, kl, eps, _ = K.native_sample_and_kl(kind, mu, rho, prior, "mc")
    assert eps is not None
    g_t = torch.randn(n, generator=g)
    (gm, gr) = torch.autograd.grad((t * g_t).sum() + 0.37 * kl, (mu, rho))
    mu64 = mu.detach().double().requires_grad_()
    rho64 = rho.detach().double().requires_grad_()
    e64 = eps.double()
    sigma = F.softplus(rho64)
    log_sigma = torch.where(rho64 < -20, rho64, torch.log(sigma))
    w = mu64 + sigma * e64
    kl64 = (bbb.kl.gaussian_log_q(e64, log_sigma) - prior.log_prob(w)).sum()
    t64 = {"reparam": w, "flipout": sigma * e64, "local": sigma**2}[kind]
    (gm64, gr64) = torch.autograd.grad((t64 * g_t.double()).sum() + 0.37 * kl64, (mu64, rho64))
    torch.testing.assert_close(t.double(), t64, rtol=2e-6, atol=1e-6)
    # The score -d log p/dw is up to 1/sigma2^2 = e^12 times w, and w = mu + sigma eps carries
    # float32 rounding (a few ulps of |mu| + |sigma eps|, relative to w itself where they
    # cancel): an ill-conditioned quantity, not a kernel error. The bound per element:
    # 0.37 (the KL's weight) x |d score / dw| at w (float64: -d^2 log p / dw^2, up to ~e^12 and
    # more where the responsibilities switch) x 4 ulps of (|mu| + |sigma eps|), times
    # |eps| sigmoid(rho) for d/drho; plus float32 rounding of the rest.
    wd, h = w.detach(), 1e-6  # central difference of the float64 score (smooth at scale s2)
    d2 = (prior.grad_log_prob(wd + h) - prior.grad_log_prob(wd - h)) / (2 * h)
    cond = d2.abs() + 1.0
    scale = (mu64.abs() + (sigma * e64).abs()).detach() * (4 * 2.0**-24) * 0.37 * cond
    assert ((gm.double() - gm64).abs() <= 1e-5 * gm64.abs() + 1e-6 + scale).all()
    sig = torch.sigmoid(rho64).detach()
    assert ((gr.double() - gr64).abs() <= 1e-5 * gr64.abs() + 1e-6 + scale * e64.abs() * sig).all()
    # the value: per-term float32 rounding of log-densities up to ~|w|^2 e^12 / 2, summed
    terms = (kl64.detach().abs() + (w.detach() ** 2 * math.exp(12)).sum()) * 2.0**-22
    assert abs(kl.item() - kl64.item()) <= float(terms) + 1e-3


@pytest.mark.parametrize("kind", ["reparam", "flipout"])
@pytest.mark.parametrize("mixture", [False, True], ids=["gaussian", "mixture"])
def test_fused_kernel_with_several_samples_matches_float64_formulas(
    kind: str, mixture: bool
) -> None:
    """S = 3 weight samples in one node: t and eps (3, n); the closed form once, or the Monte
    Carlo KL averaged over the samples; gradients summed over the samples' upstream terms."""
    n, S = 40_001, 3
    g = torch.Generator().manual_seed(7)
    mu = (torch.randn(n, generator=g) * 0.3).requires_grad_()
    rho = (torch.rand(n, generator=g) * 6 - 8).requires_grad_()
    prior = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-2)) if mixture else bbb.GaussianPrior(0.7)
    K.set_kernels("native")
    torch.manual_seed(0)
    t, kl, eps, _ = K.native_sample_and_kl(
        kind, mu, rho, prior, "mc" if mixture else "closed_form", samples=S
    )
    assert t.shape == (S, n) and eps is not None and eps.shape == (S, n)
    # the rows are distinct noise: sample correlations ~ N(0, 1/n); 5 SE
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert abs(float(torch.corrcoef(eps[[a, b]])[0, 1])) < 5 / math.sqrt(n)
    g_t = torch.randn(S, n, generator=g)
    (gm, gr) = torch.autograd.grad((t * g_t).sum() + 0.37 * kl, (mu, rho))
    mu64 = mu.detach().double().requires_grad_()
    rho64 = rho.detach().double().requires_grad_()
    e64 = eps.double()
    sigma = F.softplus(rho64)
    w = mu64 + sigma * e64  # (S, n)
    if mixture:
        lq = bbb.kl.gaussian_log_q(e64, torch.log(sigma))
        kl64 = (lq - prior.log_prob(w)).sum() / S
    else:
        kl64 = bbb.closed_form_kl(mu64, sigma, prior).sum()
    t64 = w if kind == "reparam" else sigma * e64
    (gm64, gr64) = torch.autograd.grad((t64 * g_t.double()).sum() + 0.37 * kl64, (mu64, rho64))
    torch.testing.assert_close(t.double(), t64, rtol=2e-6, atol=1e-6)
    assert abs(kl.item() - kl64.item()) <= 1e-5 * (1 + abs(kl64.item()))
    # sigma2 = e^-2 keeps the score well conditioned here (slope <= e^4)
    torch.testing.assert_close(gm.double(), gm64, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gr.double(), gr64, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("kind", "samples"),
    [("flipout", 1), ("flipout", 3), ("local", 1)],
    ids=["flip1", "flip3", "local"],
)
@pytest.mark.parametrize("mixture", [False, True], ids=["gaussian", "mixture"])
def test_mean_path_gradient_is_added_in_the_native_backward(
    kind: str, samples: int, mixture: bool
) -> None:
    """native_sample_and_kl(mean_path=True): mu passed through the node (no copy); its upstream gradient
    is added to the KL's and the estimator's by the C backward, both the one-sample loop and
    the tiled several-sample one: the same gradients as without it plus g_mu."""
    n = 40_001  # two 32768-element blocks, the last partial
    g = torch.Generator().manual_seed(11)
    mu = (torch.randn(n, generator=g) * 0.3).requires_grad_()
    rho = (torch.rand(n, generator=g) * 6 - 8).requires_grad_()
    prior = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-2)) if mixture else bbb.GaussianPrior(0.7)
    mode = "mc" if mixture else "closed_form"
    K.set_kernels("native")
    rows = samples if kind == "flipout" else 1
    g_t = torch.randn(*((rows,) if rows > 1 else ()), n, generator=g)
    g_m = torch.randn(n, generator=g)
    torch.manual_seed(0)
    t, kl, _, mu_alias = K.native_sample_and_kl(kind, mu, rho, prior, mode, None, samples, True)
    assert mu_alias is not None
    assert mu_alias.data_ptr() == mu.data_ptr() and torch.equal(mu_alias, mu)
    gm, gr = torch.autograd.grad((t * g_t).sum() + 0.37 * kl + (mu_alias * g_m).sum(), (mu, rho))
    torch.manual_seed(0)  # the same noise
    t0, kl0, _, none = K.native_sample_and_kl(kind, mu, rho, prior, mode, samples=samples)
    assert none is None
    torch.testing.assert_close(t, t0, rtol=0, atol=0)
    gm0, gr0 = torch.autograd.grad((t0 * g_t).sum() + 0.37 * kl0, (mu, rho))
    # one float32 addition (or a fused multiply-add) apart: a few ulps
    torch.testing.assert_close(gm, gm0 + g_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gr, gr0, rtol=0, atol=0)
    # an output left out of the loss passes no gradient (not zero-filled by autograd: the C
    # backward takes none), and the mean path alone gives d/dmu = g_m, d/drho = 0
    torch.manual_seed(0)
    _, _, _, mu_alias = K.native_sample_and_kl(kind, mu, rho, prior, mode, None, samples, True)
    assert mu_alias is not None
    gm, gr = torch.autograd.grad((mu_alias * g_m).sum(), (mu, rho))
    torch.testing.assert_close(gm, g_m, rtol=0, atol=0)
    assert not gr.any()
    with pytest.raises(ValueError, match="'reparam' has no separate mean path"):
        K.native_sample_and_kl("reparam", mu, rho, prior, mode, mean_path=True)
    with pytest.raises(ValueError, match="g_mu is for 'flipout' and 'local'"):
        N.sample_kl_bwd("reparam", mu.detach(), rho.detach(), mu.detach(), mu.detach(),
                        mu.detach(), 1.0, ("gaussian", 0.0, 1.0), g_mu=g_m)  # fmt: skip


def test_native_kl_follows_an_edited_prior() -> None:
    """A prior edited in place after construction (here sigma 1 -> 0.5) reaches the native
    kernels: their KL equals the eager closed form with the new value (before session 18 the
    kernels kept the constructor's value: 2525.6 against 1836.0 for these weights)."""
    K.set_kernels("native")
    prior = bbb.GaussianPrior(1.0)
    mu = torch.linspace(-0.3, 0.3, 1000, requires_grad=True)
    rho = torch.full((1000,), -3.0, requires_grad=True)
    prior.sigma.fill_(0.5)
    _, kl, _, _ = K.native_sample_and_kl("local", mu, rho, prior)
    eager = bbb.kl.closed_form_kl_sum(mu, rho, prior)
    torch.testing.assert_close(kl, eager, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("kind", "samples"),
    [("reparam", 1), ("reparam", 3), ("flipout", 1), ("flipout", 3), ("local", 1)],
)
@pytest.mark.parametrize("mixture", [False, True], ids=["gaussian", "mixture"])
def test_layer_node_equals_one_node_per_pair(kind: str, samples: int, mixture: bool) -> None:
    """native_layer_sample_and_kl (weights and bias in one node) gives exactly what two
    native_sample_and_kl calls give, weights first: the same tensors and noise (the same keys,
    drawn in that order), the KL their float32 sum, and the same gradients of both pairs,
    mean paths included."""
    g = torch.Generator().manual_seed(5)
    shapes = [(37, 41), (37,)]  # weights and bias; a partial tile each
    params = [
        ((torch.randn(s, generator=g) * 0.3).requires_grad_(), (torch.rand(s, generator=g) * 6 - 8).requires_grad_())
        for s in shapes
    ]  # fmt: skip
    prior = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-2)) if mixture else bbb.GaussianPrior(0.7)
    mode = "mc" if mixture else "closed_form"
    routed = kind != "reparam"
    K.set_kernels("native")
    rows = samples if kind != "local" else 1
    g_t = [torch.randn(*((rows,) if rows > 1 else ()), *s, generator=g) for s in shapes]
    g_m = [torch.randn(s, generator=g) for s in shapes]
    (mw, rw), (mb, rb) = params
    flat = [mw, rw, mb, rb]

    def loss(
        ts: list[torch.Tensor], kl: torch.Tensor, mus: list[torch.Tensor | None]
    ) -> torch.Tensor:
        total = 0.37 * kl + sum((t * gt).sum() for t, gt in zip(ts, g_t, strict=True))
        if routed:
            total = total + sum((m * gm).sum() for m, gm in zip(mus, g_m, strict=True))
        return total

    torch.manual_seed(0)
    out = K.native_layer_sample_and_kl(kind, mw, rw, mb, rb, prior, mode, None, samples, routed)
    assert out.t_b is not None
    grads = torch.autograd.grad(loss([out.t, out.t_b], out.kl, [out.mu, out.mu_b]), flat)
    torch.manual_seed(0)  # the same keys, drawn in the same order
    w = K.native_sample_and_kl(kind, mw, rw, prior, mode, None, samples, routed)
    b = K.native_sample_and_kl(kind, mb, rb, prior, mode, None, samples, routed)
    for x, y in ((out.t, w[0]), (out.t_b, b[0]), (out.kl, w[1] + b[1])):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in ((out.eps, w[2]), (out.eps_b, b[2])):
        assert (x is None and y is None) or torch.equal(x, y)  # type: ignore[arg-type]
    grads2 = torch.autograd.grad(loss([w[0], b[0]], w[1] + b[1], [w[3], b[3]]), flat)
    for x, y in zip(grads, grads2, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # no bias: the weights' outputs alone
    torch.manual_seed(0)
    only = K.native_layer_sample_and_kl(kind, mw, rw, None, None, prior, mode, None, samples)
    assert only.t_b is None and only.eps_b is None and only.mu_b is None
    torch.testing.assert_close(only.t, w[0], rtol=0, atol=0)
    torch.testing.assert_close(only.kl, w[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="give both mu_b and rho_b, or neither"):
        K.native_layer_sample_and_kl(kind, mw, rw, mb, None, prior, mode)


@pytest.mark.parametrize("estimator", ["flipout", "local"])
def test_native_flipout_and_local_layers_mean_gradients_are_exact(estimator: str) -> None:
    """The layers route their mean path through the native node: d/dmu of the loss is the
    mean path's g^T x plus the closed-form KL's (mu - loc) / s^2, whatever the noise."""
    torch.manual_seed(0)
    layer = bbb.BayesLinear(6, 5, prior=bbb.GaussianPrior(0.5, mean=0.2), estimator=estimator)
    x = torch.randn(7, 6)
    gy = torch.randn(7, 5)
    K.set_kernels("native")
    y = layer(x)
    ((y * gy).sum() + 0.03 * layer.kl()).backward()
    ref_w = gy.double().T @ x.double() + 0.03 * (layer.weight_mu.double() - 0.2) / 0.25
    ref_b = gy.double().sum(0) + 0.03 * (layer.bias_mu.double() - 0.2) / 0.25
    assert layer.weight_mu.grad is not None and layer.bias_mu.grad is not None
    torch.testing.assert_close(layer.weight_mu.grad.double(), ref_w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias_mu.grad.double(), ref_b.detach(), rtol=1e-5, atol=1e-6)
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


def test_native_reparam_layer_with_several_samples_uses_one_node_per_parameter() -> None:
    torch.manual_seed(0)
    layer = bbb.BayesLinear(5, 4, prior=bbb.GaussianPrior(0.5), estimator="reparam")
    x = torch.randn(3, 5)
    K.set_kernels("native")
    with bbb.vectorized_samples(layer, 2):
        y = layer(torch.cat([x, x]))
    rec = layer._record
    assert rec is not None and rec.kl_w is not None and rec.eps_w is not None
    assert rec.eps_w.shape == (2, 4, 5) and rec.eps_b is not None and rec.eps_b.shape == (2, 4)
    w = layer.weight_mu + layer.weight_sigma * rec.eps_w
    b = layer.bias_mu + layer.bias_sigma * rec.eps_b
    want = torch.cat([x @ w[i].T + b[i] for i in range(2)])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_native_mixture_layers_use_the_fused_mc_node_and_kl_matches_eager_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a scale-mixture prior each estimator's layer takes the fused Monte Carlo node, and
    its KL is the eager formula sum(log q(w) - log p(w)) at w = mu + sigma * eps for the noise
    that node drew (for local: the KL's own sample, which the layer does not record)."""
    torch.manual_seed(0)
    prior = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-6))
    drawn: list[K.NativeLayerOutputs] = []
    real = K.native_layer_sample_and_kl

    def spy(*args: object, **kwargs: object) -> K.NativeLayerOutputs:
        out = real(*args, **kwargs)  # the real node; only its noise is kept for the check
        drawn.append(out)
        return out

    monkeypatch.setattr(K, "native_layer_sample_and_kl", spy)
    for estimator in bbb.ESTIMATORS:
        layer = bbb.BayesLinear(5, 3, prior=prior, estimator=estimator, kl="mc")
        drawn.clear()
        with bbb.use_kernels("native"):
            layer(torch.randn(4, 5))
        rec = layer._record
        assert rec is not None and rec.kl_w is not None and rec.kl_mode == "mc"
        assert len(drawn) == 1 and drawn[0].eps is not None and drawn[0].eps_b is not None
        eps_w, eps_b = drawn[0].eps, drawn[0].eps_b
        if estimator != "local":  # the layer records the node's noise as its own
            assert rec.eps_w is not None and rec.eps_b is not None
            assert torch.equal(rec.eps_w[0], eps_w) and torch.equal(rec.eps_b[0], eps_b)
        kl = layer.kl()
        assert kl is rec.kl_w  # the node's value, not a recomputation
        # the eager formula in float64 with the node's noise
        expected, size = 0.0, 0.0
        for mu, rho, eps in (
            (layer.weight_mu, layer.weight_rho, eps_w),
            (layer.bias_mu, layer.bias_rho, eps_b),
        ):
            mu, rho, eps = mu.detach().double(), rho.detach().double(), eps.double()
            sigma = F.softplus(rho)
            w = mu + sigma * eps
            log_q = bbb.kl.gaussian_log_q(eps, bbb.kl.log_softplus(rho, sigma))
            log_p = prior.log_prob(w)
            expected += float((log_q - log_p).sum())
            # what float32 rounding can move: each log-density by a few ulps of its size, and
            # log p by the rounding of w (a few ulps of w) times the score d log p / dw
            size += float((log_q.abs() + log_p.abs() + (w * prior.grad_log_prob(w)).abs()).sum())
        # 8 float32 ulps of those sizes (measured: at most 1.4 ulps over five seeds)
        assert abs(kl.item() - expected) <= 8 * 2.0**-24 * size, (estimator, kl.item(), expected)
        # changing the KL mode after the pass: kl() does not reuse the Monte Carlo value, it
        # asks for the closed form, which this pair does not have
        layer.kl_mode = "closed_form"
        with pytest.raises(NotImplementedError, match="p type Normal and q type MixtureSameFamily"):
            layer.kl()
    # sigma2 / sigma1 below e^-30: 1 / sigma2^2 leaves float32's comfortable range; eager path
    tiny = bbb.ScaleMixturePrior(0.5, 1.0, math.exp(-40))
    layer = bbb.BayesLinear(5, 3, prior=tiny, kl="mc")
    drawn.clear()
    with bbb.use_kernels("native"):
        layer(torch.randn(4, 5))
    assert layer._record is not None and layer._record.kl_w is None
    assert drawn == []  # the native node was not called


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_native_layer_output_has_the_posterior_moments(estimator: str) -> None:
    # y = x W^T + b with W ~ q: mean x mu^T + b_mu, variance x^2 sigma^2^T + sigma_b^2.
    torch.manual_seed(0)
    layer = bbb.BayesLinear(6, 3, prior=bbb.GaussianPrior(1.0), estimator=estimator, rho_init=-1)
    x = torch.randn(1, 6)
    K.set_kernels("native")
    draws = 6000
    with torch.enable_grad():
        ys = torch.stack([layer(x)[0].detach() for _ in range(draws)]).double()
    rec = layer._record
    assert rec is not None and rec.kl_w is not None  # the fused native node was used
    mean = (x @ layer.weight_mu.T + layer.bias_mu).detach().double()[0]
    var = ((x**2) @ (layer.weight_sigma**2).T + layer.bias_sigma**2).detach().double()[0]
    se_mean = (var / draws).sqrt()
    assert ((ys.mean(0) - mean).abs() < 5 * se_mean).all()
    # the sample variance of normal draws has standard error var * sqrt(2 / (draws - 1))
    assert ((ys.var(0) - var).abs() < 5 * var * math.sqrt(2 / (draws - 1))).all()


def test_native_reparam_layer_gradients_match_float64() -> None:
    torch.manual_seed(0)
    layer = bbb.BayesLinear(5, 4, prior=bbb.GaussianPrior(0.5), estimator="reparam")
    x = torch.randn(3, 5)
    K.set_kernels("native")
    y = layer(x)
    rec = layer._record
    assert rec is not None and rec.eps_w is not None and rec.eps_b is not None
    ((y**2).sum() + 0.01 * layer.kl()).backward()
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    w = p["weight_mu"] + F.softplus(p["weight_rho"]) * rec.eps_w[0].double()
    b = p["bias_mu"] + F.softplus(p["bias_rho"]) * rec.eps_b[0].double()
    y64 = x.double() @ w.T + b
    prior = bbb.GaussianPrior(0.5)
    kl64 = sum(
        bbb.closed_form_kl(p[f"{n}_mu"], F.softplus(p[f"{n}_rho"]), prior).sum()
        for n in ("weight", "bias")
    )
    ((y64**2).sum() + 0.01 * kl64).backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    for name, param in layer.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(param.grad.double(), p[name].grad, rtol=1e-5, atol=1e-6)


def test_native_training_learns_and_falls_back_for_other_dtypes() -> None:
    torch.manual_seed(0)
    model = bayes_mlp(4, [16], 1, prior=bbb.GaussianPrior(1.0))
    x = torch.randn(256, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.1), 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    K.set_kernels("native")
    first = None
    for _ in range(300):
        opt.zero_grad()
        res = elbo(model, x, y)
        res.loss.backward()
        opt.step()
        first = first if first is not None else res.nll.item()
    assert res.nll.item() < 0.2 * first
    # float64 models use the eager kernels under the native backend (float32 only)
    model64 = bayes_mlp(4, [16], 1, prior=bbb.GaussianPrior(1.0)).double()
    model64(x.double())
    assert all(m._record.kl_w is None for m in bbb.bayes_modules(model64))  # type: ignore[union-attr]


def test_unavailable_library_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(N, "_tried", False)
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_error", None)
    monkeypatch.setattr(K, "_native_warned", False)
    monkeypatch.setattr(N, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        bbb.set_kernels("native")
    assert "native" in K.failures()
    torch.manual_seed(0)
    model = bayes_mlp(3, [5], 2, prior=bbb.GaussianPrior(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        out = model(torch.randn(4, 3))
    assert out.shape == (4, 2)
    assert all(m._record.kl_w is None for m in bbb.bayes_modules(model))  # type: ignore[union-attr]


def test_build_is_cached_and_atomic(tmp_path: object) -> None:
    code = (
        "import sys; from bbb import _native as N; assert N.available(), N.error(); "
        "print(sorted(p.name for p in N._cache_dir().iterdir()))"
    )
    env = {**os.environ, "BBB_CACHE_DIR": str(tmp_path)}  # the compiler found as in-process
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    names = eval(first.stdout)  # noqa: S307 - our own printed list
    assert len(names) == 1 and names[0].startswith("bbb_native-") and names[0].endswith(".so")
    lib = next(iter(tmp_path.glob("bbb_native-*.so")))  # type: ignore[attr-defined]
    before = (lib.stat().st_ino, lib.stat().st_mtime_ns)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert second.returncode == 0 and eval(second.stdout) == names  # noqa: S307
    assert (lib.stat().st_ino, lib.stat().st_mtime_ns) == before  # reused, not rebuilt


def _child_normal(q: object) -> None:
    # no torch operation that could itself wait on the parent's OpenMP team: numpy for the check
    x = N.normal((200_000,)).numpy()
    q.put(float(x.std()))  # type: ignore[attr-defined]


def test_a_forked_child_draws_noise_without_hanging() -> None:
    import multiprocessing as mp

    torch.manual_seed(0)
    N.normal((1_000_000,))  # the parent has used its OpenMP threads
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_normal, args=(q,))
    p.start()
    try:
        std = q.get(timeout=60)
    finally:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    # 200000 normals: the sample sd has standard error ~ 1 / sqrt(2 n) = 0.0016; 5 SE
    assert abs(std - 1) < 0.008


def test_data_loss_and_kl_may_be_backpropagated_separately() -> None:
    """The fused node's graph is freed by the first backward; kl() then recomputes (eager) at
    the same weight sample: the same KL, and the same accumulated gradients as one backward of
    data loss + KL through the node."""
    K.set_kernels("native")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    for prior, mode in ((bbb.GaussianPrior(0.5), "closed_form"), (bbb.ScaleMixturePrior(), "mc")):
        results = []
        for separate in (True, False):
            torch.manual_seed(0)  # the same layer and the same noise in both runs
            layer = bbb.BayesLinear(4, 3, prior=prior, estimator="reparam", kl=mode)
            y = layer(x)
            rec = layer._record
            assert rec is not None and rec.kl_w is not None
            if separate:
                y.sum().backward()
                assert rec.kl_used == [True]
                kl = layer.kl()
                assert kl is not rec.kl_w  # recomputed, not the freed node's output
                kl.backward()  # no "backward through the graph a second time"
            else:
                kl = layer.kl()
                assert kl is rec.kl_w
                (y.sum() + kl).backward()
            results.append([kl.detach()] + [p.grad.clone() for p in layer.parameters()])
        # the native node's float32 formulas against the eager ones: rounding only, 16 float32
        # ulps (2^-23 each) relative, or 1e-6 absolute for entries near 0 (measured: 2 ulps)
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=16 * 2.0**-23, atol=1e-6)


def test_second_order_gradients_are_refused_not_silently_wrong() -> None:
    torch.manual_seed(0)
    K.set_kernels("native")
    layer = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(0.5), estimator="reparam")
    layer(torch.randn(5, 4))
    (g,) = torch.autograd.grad(layer.kl(), layer.weight_rho, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), layer.weight_rho)


@pytest.mark.parametrize("prior", [G, ("mixture", -1.2, 4.0, 1.0, math.exp(12))])
def test_fused_kernels_do_not_depend_on_the_thread_count(prior: tuple) -> None:
    n = 100_003  # four 32768-element blocks, the last partial
    g = torch.Generator().manual_seed(1)
    mu, rho, up = torch.randn(n, generator=g), torch.rand(n, generator=g) * 4 - 6, torch.randn(n)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            torch.manual_seed(3)
            tt, kl, sigma, eps = N.sample_kl_fwd("reparam", mu, rho, prior)
            gm, gr = N.sample_kl_bwd("reparam", mu, rho, sigma, eps, up, 0.7, prior)
            out.append((tt, torch.tensor(kl), sigma, eps, gm, gr))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernels_refuse_tensors_they_cannot_read() -> None:
    with pytest.raises(ValueError, match="rho has 5 elements, expected 4"):
        N.sample_kl_fwd("reparam", torch.zeros(4), torch.zeros(5), G)
    with pytest.raises(ValueError, match="mu must be a contiguous float32 CPU tensor"):
        N.sample_kl_fwd("reparam", torch.zeros(4, dtype=torch.float64), torch.zeros(4), G)
    with pytest.raises(ValueError, match="contiguous=False"):
        N.sample_kl_fwd("local", torch.zeros(4, 4).t(), torch.zeros(16), G)
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="eps has 3 elements, expected 2"):
        N.sample_kl_bwd("reparam", z, z, z, z, torch.zeros(2), 1.0, G)
    with pytest.raises(ValueError, match="prior must be"):
        N.sample_kl_fwd("reparam", z, z, ("laplace", 1.0))
    with pytest.raises(ValueError, match="eps is required"):
        N.sample_kl_bwd("local", z, z, z, None, z, 1.0, ("mixture", 0.0, 0.0, 1.0, 1.0))


def test_backend_name_is_accepted_everywhere() -> None:
    assert "native" in bbb.KERNEL_BACKENDS
    with pytest.raises(ValueError, match="accepted values: eager, compile, native"):
        bbb.set_kernels("c")
    TrainConfig(kernels="native").validate()
