"""Bayesian transposed convolutions (``BayesConvTranspose1d/2d/3d``).

Agreement with ``nn.ConvTranspose*d`` (mean network, sigma -> 0, ``output_size``), the three
estimators' output distributions against the exact moments of weight-space sampling (computed
from the Jacobian of the output in the weights, independently of the layer's own formulas),
the vectorized multi-sample pass against a per-sample loop with the same weights, gradients,
priors and KL modes (eager and native kernels), conversion (``bayesianize``,
``to_deterministic``), pruning with compact export, and input validation.

Statistical checks use float64, fixed seeds and ``stats.z`` (= 5) standard errors (see
``conftest.py``); deterministic checks are exact or at float64 rounding level.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbb
from bbb import (
    ESTIMATORS,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    GaussianPrior,
    LaplacePrior,
    ScaleMixturePrior,
)
from bbb.nn.conv_transpose import _BayesConvTransposeNd

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

DT = torch.float64
LAYERS: dict[int, type[_BayesConvTransposeNd]] = {
    1: BayesConvTranspose1d,
    2: BayesConvTranspose2d,
    3: BayesConvTranspose3d,
}
TORCH: dict[int, type[nn.modules.conv._ConvTransposeNd]] = {
    1: nn.ConvTranspose1d,
    2: nn.ConvTranspose2d,
    3: nn.ConvTranspose3d,
}
F_T: dict[int, Callable[..., Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}
# a layer's configuration with every option away from its default (output_padding 1 < stride 2)
CONFIG = {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2, "dilation": 1}


def _pair(d: int, **kw: object) -> tuple[_BayesConvTransposeNd, nn.Module]:
    """A Bayesian layer (4 -> 6 channels, kernel 3) and nn.ConvTranspose*d with its mean."""
    estimator = str(kw.pop("estimator", "reparam"))
    opts = {**CONFIG, **kw}
    layer = LAYERS[d](
        4,
        6,
        3,
        estimator=estimator,
        rho_init=-30.0,
        dtype=DT,
        **opts,  # type: ignore[arg-type]
    )
    ref = TORCH[d](4, 6, 3, dtype=DT, **opts)  # type: ignore[arg-type]
    with torch.no_grad():
        ref.weight.copy_(layer.weight_mu)
        if ref.bias is not None:
            assert layer.bias_mu is not None
            ref.bias.copy_(layer.bias_mu)
    return layer, ref


def _functional(layer: _BayesConvTransposeNd, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The layer's function with weights ``w`` and bias ``b``, by torch directly."""
    return F_T[layer._dim](
        x,
        w,
        b,
        stride=layer.stride,
        padding=layer.padding,
        output_padding=layer.output_padding,
        groups=layer.groups,
        dilation=layer.dilation,
    )


# ----------------------------------------------------------------- agreement with torch
@pytest.mark.parametrize("d", [1, 2, 3])
def test_mean_network_equals_nn_conv_transpose(d: int) -> None:
    torch.manual_seed(d)
    for kw in ({}, {"bias": False, "groups": 1, "dilation": 2, "output_padding": 0}):
        layer, ref = _pair(d, **kw)
        assert layer.weight_mu.shape == ref.weight.shape  # torch's (in, out / groups, *k)
        x = torch.randn(2, 4, *(3,) * d, dtype=DT)
        with bbb.sampling(layer, "mean"):
            assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_tends_to_nn_conv_transpose_as_sigma_goes_to_zero(estimator: str) -> None:
    torch.manual_seed(0)
    for d in (1, 2, 3):
        layer, ref = _pair(d, estimator=estimator)  # sigma = softplus(-30) ~ 1e-13
        x = torch.randn(2, 4, *(3,) * d, dtype=DT)
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-10)
        with bbb.vectorized_samples(layer, 3):
            y = layer(bbb.repeat_samples(x, 3))
        torch.testing.assert_close(y, ref(x).repeat(3, *(1,) * (d + 1)), rtol=0, atol=1e-10)


def test_output_size_picks_the_size_as_nn_conv_transpose_does() -> None:
    torch.manual_seed(0)
    layer, ref = _pair(2, output_padding=0)
    x = torch.randn(2, 4, 3, 4, dtype=DT)
    with bbb.sampling(layer, "mean"):
        # stride 2: heights 5..6 and widths 7..8 are reachable
        for size in ((5, 7), (6, 8), (5, 8), torch.Size((2, 6, 6, 7))):
            y = layer(x, output_size=size)
            assert torch.equal(y, ref(x, output_size=list(size)))
            assert y.shape[2:] == tuple(size)[-2:]
        assert layer(x).shape[2:] == (5, 7)  # the call's output_padding does not stay
        with pytest.raises(
            ValueError, match=r"output size of \(7, 7\).*sizes in \(5\.\.6, 7\.\.8\)"
        ):
            layer(x, output_size=(7, 7))
        with pytest.raises(ValueError, match=r"\(2, 5, 6, 7\) gives 5 channels.*out_channels=6"):
            layer(x, output_size=(2, 5, 6, 7))
        with pytest.raises(ValueError, match="output_size must be a sequence of 2 positive ints"):
            layer(x, output_size=(6,))
        with pytest.raises(ValueError, match="output_size must be"):
            layer(x, output_size=6)  # type: ignore[arg-type]
    # in the sampling path and with several samples folded into one pass
    with bbb.vectorized_samples(layer, 2):
        y = layer(bbb.repeat_samples(x, 2), output_size=(6, 8))
    assert y.shape == (4, 6, 6, 8)
    torch.testing.assert_close(y[:2], ref(x, output_size=[6, 8]), rtol=0, atol=1e-10)


# ----------------------------------------------------------------- distributions
def _exact_moments(layer: _BayesConvTransposeNd, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and the Jacobian of the outputs (flattened) under weight-space sampling.

    The output is linear in the weights: y = J w + b, so Var(y_j) = sum_k J_jk^2 sigma_k^2
    + sigma_b[o(j)]^2 and Cov(y_i, y_j) = sum_k J_ik J_jk sigma_k^2 (+ sigma_b^2 when i and j
    are of one example's channel: the bias is shared by its positions)."""
    mu = layer.weight_mu.detach()
    assert layer.bias_mu is not None and layer.bias_sigma is not None
    mean = _functional(layer, x, mu, layer.bias_mu.detach())
    jac = torch.autograd.functional.jacobian(lambda w: _functional(layer, x, w, None), mu)
    jac = jac.reshape(mean.numel(), mu.numel())
    s2 = layer.weight_sigma.detach().reshape(-1) ** 2
    b2 = (layer.bias_sigma.detach() ** 2).reshape(1, -1, *(1,) * layer._dim).expand_as(mean)
    var = (jac**2 * s2).sum(1) + b2.reshape(-1)
    return mean.reshape(-1), var, jac


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_output_has_the_mean_and_variance_of_weight_space_sampling(
    estimator: str, stats: type
) -> None:
    """Many draws in one vectorized pass; tolerance: stats.z standard errors of the sample
    mean (known variance) and of the sample variance (from the sample's 4th moment)."""
    torch.manual_seed(1)
    layer = BayesConvTranspose1d(
        4, 4, 3, estimator=estimator, rho_init=(-1.0, 0.0), dtype=DT, **CONFIG
    )
    x = torch.randn(2, 4, 3, dtype=DT)
    mean, var, _ = _exact_moments(layer, x)
    n = 4000
    with torch.no_grad(), bbb.vectorized_samples(layer, n):
        y = layer(bbb.repeat_samples(x, n)).reshape(n, -1)
    stats.assert_mean(y, mean, known_var=var, what=f"{estimator} mean")
    stats.assert_var(y, var, what=f"{estimator} variance")


def test_flipout_keeps_the_correlation_of_positions_sharing_weights_local_does_not(
    stats: type,
) -> None:
    """Flipout gives each example exactly weight-space sampling's joint distribution; local
    reparameterisation draws positions independently (the documented approximation).
    Tolerance: stats.z standard errors of the sample covariance, sqrt((v_a v_b + c^2) / n)
    for Gaussian outputs."""
    torch.manual_seed(2)
    x = torch.randn(1, 4, 3, dtype=DT)
    n = 4000
    covs = {}
    for estimator in ("flipout", "local", "reparam"):
        torch.manual_seed(2)
        layer = BayesConvTranspose1d(
            4, 4, 3, estimator=estimator, rho_init=(-1.0, 0.0), dtype=DT, **CONFIG
        )
        _, var, jac = _exact_moments(layer, x)
        s2 = layer.weight_sigma.detach().reshape(-1) ** 2
        cov = (jac * s2) @ jac.T
        cov.fill_diagonal_(0.0)
        i, j = divmod(int(cov.abs().argmax()), cov.shape[1])  # the most correlated pair
        channel_len = x.new_zeros(layer(x).shape[1:]).shape[1]
        if i // channel_len == j // channel_len:  # one channel: the shared bias adds to it
            assert layer.bias_sigma is not None
            cov[i, j] += layer.bias_sigma[i // channel_len].detach() ** 2
        with torch.no_grad(), bbb.vectorized_samples(layer, n):
            y = layer(bbb.repeat_samples(x, n)).reshape(n, -1)
        a, b = y[:, i] - y[:, i].mean(), y[:, j] - y[:, j].mean()
        emp = (a * b).sum() / (n - 1)
        expected = cov[i, j] if estimator != "local" else cov.new_zeros(())
        se = ((var[i] * var[j] + expected**2) / n).sqrt()
        assert abs(float(cov[i, j])) > 10 * float(se)  # the pair is strongly correlated
        assert abs(float(emp - expected)) <= stats.z * float(se), (estimator, float(emp))
        covs[estimator] = float(emp)
    assert covs["local"] != pytest.approx(covs["flipout"], rel=0.5)


# ----------------------------------------------------------------- vectorized samples
@pytest.mark.parametrize("d", [1, 2, 3])
def test_vectorized_pass_equals_a_loop_over_the_same_weight_samples(d: int) -> None:
    torch.manual_seed(3)
    layer = LAYERS[d](4, 6, 3, rho_init=(-2.0, -1.0), dtype=DT, **CONFIG)  # type: ignore[arg-type]
    x = torch.randn(2, 4, *(3,) * d, dtype=DT)
    s = 3
    with bbb.sampling(layer, "frozen"), bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(x, s))
        frozen = layer._frozen
    assert frozen is not None and frozen.eps_w is not None and frozen.eps_b is not None
    assert layer.bias_sigma is not None and layer.bias_mu is not None
    for k in range(s):
        w = layer.weight_mu + layer.weight_sigma * frozen.eps_w[k]
        b = layer.bias_mu + layer.bias_sigma * frozen.eps_b[k]
        torch.testing.assert_close(y[2 * k : 2 * k + 2], _functional(layer, x, w, b))
    # op_batched (flipout's perturbation path uses it too) against op, sample by sample
    ws = torch.randn(s, *layer.weight_mu.shape, dtype=DT)
    bs = torch.randn(s, 6, dtype=DT)
    xs = torch.randn(s * 2, 4, *(3,) * d, dtype=DT)
    yb = layer.op_batched(xs, ws, bs, s)
    for k in range(s):
        torch.testing.assert_close(
            yb[2 * k : 2 * k + 2], layer.op(xs[2 * k : 2 * k + 2], ws[k], bs[k])
        )


def test_reparam_sample_is_one_network_across_the_chunks_of_sample_outputs() -> None:
    """Without bias the layer is linear in x: y_s(x0 + x1) = y_s(x0) + y_s(x1) holds for
    every sample s only if the three inputs (one per chunk) saw the same weights."""
    torch.manual_seed(4)
    layer = BayesConvTranspose2d(2, 2, 2, stride=2, bias=False, rho_init=-1.0, dtype=DT)
    x = torch.randn(2, 2, 2, 2, dtype=DT)
    inputs = torch.cat([x, x[:1] + x[1:]])
    y = bbb.sample_outputs(layer, inputs, 5, max_rows=5)  # one input per chunk
    assert y.shape == (5, 3, 2, 4, 4)
    torch.testing.assert_close(y[:, 2], y[:, 0] + y[:, 1])
    assert not torch.allclose(y[0], y[1])  # and the samples differ
    with bbb.shared_weight_samples(layer):
        first, second = layer(x), layer(x)
    assert torch.equal(first, second)


# ----------------------------------------------------------------- gradients, priors, KL
@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_reach_mu_and_rho_and_the_kl_is_the_closed_form(
    estimator: str, backend: str
) -> None:
    torch.manual_seed(5)
    layer = BayesConvTranspose2d(4, 6, 3, estimator=estimator, **CONFIG)  # float32: native
    x = torch.randn(2, 4, 3, 3)
    with bbb.use_kernels(backend):
        for s in (1, 3):
            layer.zero_grad()
            with bbb.vectorized_samples(layer, s):
                y = layer(bbb.repeat_samples(x, s))
            assert y.shape == (2 * s, 6, 6, 6)
            kl = layer.kl()
            (y.square().sum() + kl).backward()
            for p in (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho):
                assert p is not None and p.grad is not None
                assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
            # KL(N(mu, s^2) || N(0, 1)) summed over weights (in, out / groups, 3, 3) and bias (out,)
            expected = sum(
                (0.5 * (sig**2 + mu**2 - 1) - sig.log()).sum()
                for mu, sig in (
                    (layer.weight_mu, layer.weight_sigma),
                    (layer.bias_mu, layer.bias_sigma),
                )
                if mu is not None and sig is not None
            )
            torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_every_prior_and_kl_mode_gives_a_finite_kl_with_gradients(backend: str) -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 2, 4)
    priors = (GaussianPrior(0.5), ScaleMixturePrior(0.5, 1.0, 0.002), LaplacePrior(0.3))
    with bbb.use_kernels(backend):
        for prior in priors:
            for kl in ("auto", "mc", "closed_form"):
                if kl == "closed_form" and not bbb.has_closed_form(prior):
                    continue
                for estimator in ESTIMATORS:
                    layer = BayesConvTranspose1d(
                        2, 4, 3, stride=2, prior=prior, kl=kl, estimator=estimator
                    )
                    loss = layer(x).sum() + layer.kl()
                    loss.backward()
                    assert torch.isfinite(loss)
                    assert layer.weight_rho.grad is not None
                    assert layer.weight_rho.grad.abs().sum() > 0


# ----------------------------------------------------------------- conversion, pruning
def _plain_decoder() -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 2, bias=False, dilation=2),
    ).to(DT)


def test_bayesianize_and_to_deterministic_round_trip_transposed_convs() -> None:
    torch.manual_seed(7)
    net = _plain_decoder()
    assert bbb.convertible_layers(net) == ["0", "2"]
    bnet = bbb.bayesianize(net, init_from_weights=True, rho_init="moped", moped_delta=0.05)
    assert isinstance(bnet[0], BayesConvTranspose2d) and isinstance(bnet[2], BayesConvTranspose2d)
    first = bnet[0]
    assert isinstance(first, BayesConvTranspose2d)
    assert (first.stride, first.padding, first.output_padding, first.groups) == (
        (2, 2),
        (1, 1),
        (1, 1),
        2,
    )
    assert bnet[2].dilation == (2, 2) and bnet[2].bias_mu is None
    # MOPED: sigma = 0.05 * |w| (at least 1e-8)
    expected_sigma = (0.05 * net[0].weight.abs()).clamp_min(1e-8)
    torch.testing.assert_close(first.weight_sigma, expected_sigma)
    x = torch.randn(2, 4, 3, 3, dtype=DT)
    with bbb.sampling(bnet, "mean"):
        assert torch.equal(bnet(x), net(x))
        det = bbb.to_deterministic(bnet)
        assert type(det[0]) is nn.ConvTranspose2d and type(det[2]) is nn.ConvTranspose2d
        assert det[0].output_padding == (1, 1) and det[2].dilation == (2, 2)
        assert torch.equal(det(x), bnet(x))
        # output_size goes through to_deterministic's layer alike
        assert torch.equal(det[0](x, output_size=[5, 5]), bnet[0](x, output_size=(5, 5)))
    # include / exclude choose among transposed convs as among the others
    only_last = bbb.bayesianize(net, include="2")
    assert type(only_last[0]) is nn.ConvTranspose2d and isinstance(
        only_last[2], BayesConvTranspose2d
    )
    not_last = bbb.bayesianize(net, exclude=["2"])
    assert isinstance(not_last[0], BayesConvTranspose2d) and type(not_last[2]) is nn.ConvTranspose2d
    for d in (1, 3):
        single = bbb.bayesianize(TORCH[d](2, 4, 2, stride=2, groups=2), init_from_weights=True)
        assert type(single) is LAYERS[d] and type(bbb.to_deterministic(single)) is TORCH[d]


def test_pruning_and_compact_export_of_transposed_convs(tmp_path: Path) -> None:
    torch.manual_seed(8)
    bnet = bbb.bayesianize(_plain_decoder(), rho_init=(-4.0, -1.0))
    result = bbb.prune_by_snr(bnet, 0.5)
    assert result.removed > 0
    mask = bnet[0].weight_mask
    assert mask is not None and mask.shape == bnet[0].weight_mu.shape
    x = torch.randn(2, 4, 3, 3, dtype=DT)
    det = bbb.to_deterministic(bnet)
    with bbb.sampling(bnet, "mean"):
        assert torch.equal(det(x), bnet(x))
    torch.testing.assert_close(det[0].weight, bnet[0].weight_mu * mask, rtol=0, atol=0)
    path = tmp_path / "decoder.pt"
    bbb.save_compact(bnet, path)
    fresh = bbb.bayesianize(_plain_decoder())
    bbb.load_compact(fresh, path)
    with bbb.sampling(bnet, "mean"), bbb.sampling(fresh, "mean"):
        assert torch.equal(fresh(x), bnet(x))
    assert fresh[0].weight_mask is not None and torch.equal(fresh[0].weight_mask, mask)


# ----------------------------------------------------------------- validation
def test_construction_refuses_bad_options_naming_what_is_accepted() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"groups": 3}, r"divisible by groups \(3\)"),
        ({"padding": "same"}, "'same' and 'valid' of convolutions are not defined"),
        ({"padding_mode": "reflect"}, "unknown padding_mode 'reflect'.*accepted values: zeros"),
        ({"output_padding": 2, "stride": 2}, "output_padding must be smaller than the stride"),
        ({"output_padding": 1}, r"dimension 0: 1 >= max\(1, 1\)"),
        ({"kernel_size": (3, 3)}, "kernel_size must be an int or a tuple of 3 ints .* length 2"),
        ({"padding": -1}, "padding must be non-negative integers, got -1"),
        ({"stride": 0}, "stride must be positive integers, got 0"),
        ({"in_channels": True}, "in_channels must be a positive integer.*bool"),
        ({"estimator": "lrt"}, "accepted values: reparam, local, flipout"),
        ({"bias": "yes"}, "bias must be True or False"),
        ({"mu_init": "kaiming"}, "accepted values: paper, fan_in"),
    ]
    for kw, match in cases:
        args = {"in_channels": 2, "out_channels": 4, "kernel_size": 3, **kw}
        cls = BayesConvTranspose1d if kw.get("kernel_size") != (3, 3) else BayesConvTranspose3d
        with pytest.raises(ValueError, match=match):
            cls(**args)  # type: ignore[arg-type]


def test_bad_inputs_are_refused_in_the_callers_terms() -> None:
    layer = BayesConvTranspose2d(3, 2, 2)
    with pytest.raises(
        ValueError, match=r"dimension 0 of an unbatched input.*in_channels=3, got 5"
    ):
        layer(torch.randn(5, 4, 4))
    with pytest.raises(ValueError, match="channels\\) must be in_channels=3, got 5"):
        layer(torch.randn(2, 5, 4, 4))
    with bbb.vectorized_samples(layer, 4), pytest.raises(ValueError, match=r"got \(2, 5, 4, 4\)"):
        layer(torch.randn(8, 5, 4, 4))  # named per Monte Carlo sample
    with pytest.raises(ValueError, match="expected a torch.float32 input"):
        layer(torch.randn(1, 3, 4, 4, dtype=DT))
    one_channel = BayesConvTranspose2d(1, 2, 2)
    with pytest.raises(ValueError, match=r"x.unsqueeze\(1\)"):  # MNIST's (N, 28, 28)
        one_channel(torch.randn(5, 6, 6))
    # an output smaller than one position: torch's own error, for one sample's shapes
    tiny = BayesConvTranspose1d(1, 1, 1, padding=2)
    with bbb.vectorized_samples(tiny, 2), pytest.raises(RuntimeError):
        tiny(torch.randn(4, 1, 1))


def test_repr_names_the_options_away_from_their_defaults() -> None:
    text = repr(BayesConvTranspose2d(4, 6, 3, bias=False, **CONFIG))
    assert "stride=(2, 2), padding=(1, 1), output_padding=(1, 1), groups=2, bias=False" in text
    # torch's transposed layout: (in, out / groups, *kernel_size); the bias is (out,)
    layer = BayesConvTranspose2d(4, 6, 3, groups=2)
    assert layer.weight_mu.shape == (4, 3, 3, 3) and layer.weight_rho.shape == (4, 3, 3, 3)
    assert layer.bias_mu is not None and layer.bias_mu.shape == (6,)
