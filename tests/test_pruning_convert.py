"""SNR pruning, state-dict round trips (pruning masks and prior buffers included) and the
conversions between ordinary and Bayesian networks."""

from __future__ import annotations

import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bbb
from bbb import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    LaplacePrior,
    ScaleMixturePrior,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

DT = torch.float64


def _mlp() -> nn.Module:
    return nn.Sequential(
        BayesLinear(4, 6, mu_init=(-1, 1), rho_init=(-4.0, 0.0)),
        nn.Tanh(),
        BayesLinear(6, 3, mu_init=(-1, 1), rho_init=(-4.0, 0.0)),
    )


# --------------------------------------------------------------------------- SNR and pruning


def test_snr_is_abs_mu_over_sigma(float64_default) -> None:
    torch.manual_seed(0)
    model = _mlp()
    values = bbb.snr(model)
    assert set(values) == {"0", "2"}
    for name, layer in (("0", model[0]), ("2", model[2])):
        expected = layer.weight_mu.abs() / F.softplus(layer.weight_rho)
        torch.testing.assert_close(values[name], expected.detach(), rtol=1e-14, atol=0)


def test_a_weight_of_mean_zero_and_underflowed_sigma_has_snr_zero() -> None:
    # mu = 0 with sigma = softplus(-200) = 0 in float32 (the weight is always exactly 0) was
    # 0/0 = NaN, ranked above every other weight, so pruning never removed it
    layer = bbb.BayesLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[0.0, 0.5, 1.0, 2.0]]))
        layer.weight_rho.copy_(torch.tensor([[-200.0, 0.0, 0.0, -200.0]]))
    values = bbb.snr(layer)[""]
    assert values[0, 0] == 0 and torch.isinf(values[0, 3]) and not values.isnan().any()
    bbb.prune_by_snr(layer, 0.25)
    assert layer.weight_mask is not None and layer.weight_mask[0].tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9])
def test_global_pruning_removes_the_lowest_snr_weights(fraction: float, float64_default) -> None:
    torch.manual_seed(0)
    model = _mlp()
    before = bbb.snr(model)
    flat = torch.cat([v.flatten() for v in before.values()])
    result = bbb.prune_by_snr(model, fraction)
    k = math.floor(fraction * flat.numel())
    assert (result.removed, result.total) == (k, flat.numel())
    assert result.fraction == k / flat.numel()
    masks = torch.cat([model[0].weight_mask.flatten(), model[2].weight_mask.flatten()])
    assert int((masks == 0).sum()) == k and set(masks.unique().tolist()) <= {0.0, 1.0}
    if k > 0:
        removed, kept = flat[masks == 0], flat[masks == 1]
        assert float(removed.max()) <= float(kept.min())
        assert result.threshold == pytest.approx(float(removed.max()), rel=1e-6)  # float32 scores
    # the pruned model's weights are mu * mask in the mean network and SNR 0 where pruned
    x = torch.randn(5, 4)
    with bbb.sampling(model, "mean"):
        hidden = torch.tanh(
            F.linear(x, model[0].weight_mu * model[0].weight_mask, model[0].bias_mu)
        )
        expected = F.linear(hidden, model[2].weight_mu * model[2].weight_mask, model[2].bias_mu)
        assert torch.equal(model(x), expected)
    assert torch.all(bbb.snr(model)["0"][model[0].weight_mask == 0] == 0)


def test_pruning_again_starts_from_unpruned_snrs_and_can_be_removed(float64_default) -> None:
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(3, 4)
    with bbb.sampling(model, "mean"):
        unpruned = model(x)
    bbb.prune_by_snr(model, 0.5)
    assert bbb.prune_by_snr(model, 0.25).removed == math.floor(0.25 * 42)
    # the same weights as pruning the untouched network by 0.25 (not the lowest of the masked
    # SNRs, which would count the 21 weights removed before as the lowest)
    torch.manual_seed(0)
    fresh = _mlp()
    bbb.prune_by_snr(fresh, 0.25)
    for i in (0, 2):
        assert torch.equal(model[i].weight_mask, fresh[i].weight_mask)
    # the docstring's example: 0.5 then 0.75 removes 75%
    assert bbb.prune_by_snr(model, 0.75).removed == math.floor(0.75 * 42)
    bbb.remove_pruning(model)
    assert model[0].weight_mask is None and model[2].weight_mask is None
    with bbb.sampling(model, "mean"):
        assert torch.equal(model(x), unpruned)


def test_per_layer_pruning(float64_default) -> None:
    torch.manual_seed(0)
    model = _mlp()
    result = bbb.prune_by_snr(model, 0.5, per_layer=True)
    assert result.per_layer == {"0": 12 / 24, "2": 9 / 18}
    for layer in (model[0], model[2]):
        s = (layer.weight_mu.abs() / layer.weight_sigma).detach()
        assert float(s[layer.weight_mask == 0].max()) <= float(s[layer.weight_mask == 1].min())
    assert math.isnan(result.threshold)


def test_global_pruning_ranks_float64_snrs_exactly() -> None:
    layer = BayesLinear(2, 1, bias=False, dtype=DT)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[1.0 + 1e-9, 1.0]], dtype=DT))  # SNR0 > SNR1
        layer.weight_rho.fill_(-3.0)
    assert bbb.snr(layer)[""][0, 0] > bbb.snr(layer)[""][0, 1]
    bbb.prune_by_snr(layer, 0.5, per_layer=True)
    assert layer.weight_mask.tolist() == [[1.0, 0.0]]  # the lower SNR (weight 1) goes
    bbb.prune_by_snr(layer, 0.5)
    assert layer.weight_mask.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_prune_fraction_outside_unit_interval_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"fraction must lie in [0, 1), got {bad!r}")):
        bbb.prune_by_snr(_mlp(), bad)


def test_prune_model_without_bayesian_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="prune_by_snr: the model has no Bayesian layers"):
        bbb.prune_by_snr(nn.Linear(2, 2), 0.5)


# --------------------------------------------------------------------------- save / load


def _convnet(prior_conv, prior_lin) -> nn.Module:
    return nn.Sequential(
        BayesConv2d(2, 4, 3, padding=1, prior=prior_conv, rho_init=(-4.0, -1.0)),
        nn.ReLU(),
        nn.Flatten(),
        BayesLinear(4 * 5 * 5, 3, prior=prior_lin, rho_init=(-4.0, -1.0)),
    )


def _roundtrip_checks(model: nn.Module, fresh: nn.Module, x: torch.Tensor) -> None:
    with bbb.sampling(model, "mean"), bbb.sampling(fresh, "mean"):
        assert torch.equal(fresh(x), model(x))
    for (name, a), (name_b, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert name == name_b and torch.equal(a, b), name
    # the same noise gives the same sampled outputs and the same (Monte Carlo) KL
    torch.manual_seed(5)
    y_a, kl_a = model(x), bbb.kl_divergence(model)
    torch.manual_seed(5)
    y_b, kl_b = fresh(x), bbb.kl_divergence(fresh)
    assert torch.equal(y_a, y_b) and torch.equal(kl_a, kl_b)


def test_state_dict_round_trip_with_pruning_and_prior_buffers() -> None:
    torch.manual_seed(0)
    model = _convnet(ScaleMixturePrior(0.3, 1.2, math.exp(-5)), LaplacePrior(0.2))
    bbb.prune_by_snr(model, 0.4)
    state = model.state_dict()
    assert {
        "0.weight_mask",
        "3.weight_mask",
        "0.prior.pi",
        "0.prior.sigma2",
        "3.prior.scale",
    } <= set(state)
    fresh = _convnet(ScaleMixturePrior(), LaplacePrior(1.0))  # other hyper-parameters, no masks
    assert fresh[0].weight_mask is None
    fresh.load_state_dict(state)
    assert float(fresh[0].prior.pi) == pytest.approx(0.3) and float(
        fresh[3].prior.scale
    ) == pytest.approx(0.2)
    _roundtrip_checks(model, fresh, torch.randn(2, 2, 5, 5))


def test_torch_save_load_weights_only_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = _convnet(ScaleMixturePrior(0.3, 1.2, math.exp(-5)), LaplacePrior(0.2))
    bbb.prune_by_snr(model, 0.4, per_layer=True)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = _convnet(ScaleMixturePrior(), LaplacePrior(1.0))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _roundtrip_checks(model, fresh, torch.randn(2, 2, 5, 5))
    # also through an in-memory buffer, for a float64 model
    model64 = _mlp().to(DT)
    bbb.prune_by_snr(model64, 0.3)
    buffer = io.BytesIO()
    torch.save(model64.state_dict(), buffer)
    buffer.seek(0)
    fresh64 = _mlp().to(DT)
    fresh64.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh64[0].weight_mask.dtype == DT
    _roundtrip_checks(model64, fresh64, torch.randn(3, 4, dtype=DT))


def test_loading_an_unpruned_state_removes_the_mask() -> None:
    torch.manual_seed(0)
    unpruned = _mlp()
    pruned = _mlp()
    bbb.prune_by_snr(pruned, 0.5)
    pruned.load_state_dict(unpruned.state_dict())
    assert pruned[0].weight_mask is None and pruned[2].weight_mask is None
    _roundtrip_checks(unpruned, pruned, torch.randn(3, 4))


def test_a_partial_non_strict_load_keeps_the_other_layers_pruning() -> None:
    """load_state_dict(strict=False) of a state without a layer's weights leaves that layer
    pruned (its mask was dropped, silently: the mask is no missing key)."""
    torch.manual_seed(0)
    model = _mlp()
    bbb.prune_by_snr(model, 0.5)
    mask = model[0].weight_mask.clone()
    head = {k: v for k, v in _mlp().state_dict().items() if k.startswith("2.")}
    model.load_state_dict(head, strict=False)
    assert model[0].weight_mask is not None and torch.equal(model[0].weight_mask, mask)
    assert model[2].weight_mask is None  # the loaded, unpruned layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_loaded_mask_takes_the_models_dtype(dtype: torch.dtype) -> None:
    """A float32 checkpoint's mask loaded into a model of another dtype is in the model's
    dtype (it stayed float32: a bfloat16 model's masked weights became float32 and every
    forward failed)."""
    torch.manual_seed(0)
    pruned = _mlp()
    bbb.prune_by_snr(pruned, 0.5)
    model = _mlp().to(dtype)
    model.load_state_dict(pruned.state_dict())
    assert model[0].weight_mask.dtype == dtype
    assert torch.equal(model[0].weight_mask, pruned[0].weight_mask.to(dtype))
    x = torch.randn(3, 4, dtype=dtype)
    for mode in ("sample", "mean", "frozen"):
        with bbb.sampling(model, mode):
            assert model(x).dtype == dtype
    assert bbb.to_deterministic(model)[0].weight.dtype == dtype


# --------------------------------------------------------------------------- conversions


def _plain_net(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect", groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.ReLU(),
        nn.Linear(5, 2, bias=False),
    ).to(dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bayesianize_then_to_deterministic_reproduces_the_network(estimator: str) -> None:
    torch.manual_seed(0)
    net = _plain_net()
    x = torch.randn(3, 2, 6, 6)
    expected = net(x)
    bnet = bbb.bayesianize(net, init_from_weights=True, rho_init=-30.0, estimator=estimator)
    kinds = [type(m) for m in bnet]
    assert kinds == [
        BayesConv2d,
        nn.ReLU,
        BayesConv2d,
        nn.ReLU,
        nn.Flatten,
        BayesLinear,
        nn.ReLU,
        BayesLinear,
    ]
    assert type(net[0]) is nn.Conv2d  # the original is untouched (deep copy)
    conv2 = bnet[2]
    assert (conv2.stride, conv2.padding, conv2.groups, conv2.padding_mode) == (
        (2, 2),
        (1, 1),
        2,
        "reflect",
    )
    assert bnet[7].bias_mu is None and all(
        m.estimator == estimator for m in bbb.bayes_modules(bnet)
    )
    assert float(bnet[0].weight_sigma.detach().max()) < 1e-13  # softplus(-30) ~ 9.4e-14
    with bbb.sampling(bnet, "mean"):
        assert torch.equal(bnet(x), expected)  # exactly the original network
    back = bbb.to_deterministic(bnet)
    assert [type(m) for m in back] == [type(m) for m in net]
    assert torch.equal(back(x), expected)
    for a, b in zip(back.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(bnet[0], BayesConv2d)  # to_deterministic works on a copy
    # sampled weights differ from mu by ~1e-13 (local: an output std of ~1e-13 |x|), far below
    # float32's resolution of these O(1) outputs: at most a few ulps of rounding (1e-6 = ~8 ulps
    # at |y| = 1) where a perturbation flips one
    with torch.no_grad():
        for _ in range(3):
            assert float((bnet(x) - expected).abs().max()) <= 1e-6
        with bbb.vectorized_samples(bnet, 4):
            y = bnet(x.repeat(4, 1, 1, 1))
        assert float((y - expected.repeat(4, 1)).abs().max()) <= 1e-6


@pytest.mark.parametrize("mode", ["sample", "frozen"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_to_deterministic_after_a_training_forward_pass(estimator: str, mode: str) -> None:
    torch.manual_seed(0)
    bnet = bbb.bayesianize(_plain_net(), estimator=estimator)
    bbb.set_sampling(bnet, mode)
    x = torch.randn(2, 2, 6, 6)
    loss = bnet(x).square().sum() + bbb.kl_divergence(bnet)
    loss.backward()  # an ordinary training step
    det = bbb.to_deterministic(bnet)
    with bbb.sampling(bnet, "mean"):
        assert torch.equal(det(x), bnet(x))


def test_to_deterministic_of_a_pruned_model_is_its_mean_network() -> None:
    torch.manual_seed(0)
    bnet = bbb.bayesianize(_plain_net(), rho_init=(-4.0, -1.0))
    bbb.prune_by_snr(bnet, 0.5)
    x = torch.randn(2, 2, 6, 6)
    det = bbb.to_deterministic(bnet)
    with bbb.sampling(bnet, "mean"):
        assert torch.equal(det(x), bnet(x))
    torch.testing.assert_close(
        det[5].weight, bnet[5].weight_mu * bnet[5].weight_mask, rtol=0, atol=0
    )
    assert int((det[5].weight == 0).sum()) >= int((bnet[5].weight_mask == 0).sum())


class _SubConvTranspose1d(nn.ConvTranspose1d):
    """A subclass (its forward may differ): bayesianize leaves it deterministic."""


def test_bayesianize_covers_conv1d_conv3d_dtype_and_keeps_other_modules() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", dilation=2),
        _SubConvTranspose1d(3, 3, 2),
        nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
    ).to(DT)
    with pytest.warns(UserWarning, match=r"deterministic: 1 \(_SubConvTranspose1d\)\. It"):
        bnet = bbb.bayesianize(net, prior=LaplacePrior(0.3), kl="mc", init_from_weights=True)
    assert (
        isinstance(bnet[0], BayesConv1d) and bnet[0].padding == "same" and bnet[0].dilation == (2,)
    )
    assert type(bnet[1]) is _SubConvTranspose1d
    assert isinstance(bnet[2][0], BayesLinear) and type(bnet[2][1]) is nn.LayerNorm
    for layer in bbb.bayes_modules(bnet):
        assert layer.weight_mu.dtype == DT and layer.kl_mode == "mc"
        assert isinstance(layer.prior, LaplacePrior)
    x = torch.randn(2, 2, 6, dtype=DT)
    h = bnet[0]
    with bbb.sampling(h, "mean"):
        assert torch.equal(h(x), net[0](x))
    conv3 = bbb.bayesianize(nn.Conv3d(1, 2, (1, 2, 2), stride=(1, 2, 2)), init_from_weights=True)
    assert isinstance(conv3, BayesConv3d) and conv3.stride == (1, 2, 2)
    single = bbb.bayesianize(nn.Linear(3, 2), init_from_weights=False)
    assert isinstance(single, BayesLinear) and single.in_features == 3
    inplace_net = nn.Sequential(nn.Linear(3, 2))
    assert bbb.bayesianize(inplace_net, inplace=True) is inplace_net and isinstance(
        inplace_net[0], BayesLinear
    )


def test_bayesianize_validates_its_options() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("unknown estimator 'mcmc'; accepted values: reparam, local, flipout"),
    ):
        bbb.bayesianize(nn.Sequential(nn.Linear(2, 2)), estimator="mcmc")
    with pytest.raises(ValueError, match="kl='closed_form' is not available .* ScaleMixturePrior"):
        bbb.bayesianize(nn.Sequential(nn.Linear(2, 2)), prior=ScaleMixturePrior(), kl="closed_form")


def test_bayesianize_names_the_weight_layers_it_leaves_and_refuses_a_model_with_none() -> None:
    """Layers that look convertible but are not exactly nn.Linear / nn.ConvNd (parametrized,
    subclassed, attention projections, embeddings) stay deterministic: a warning names each;
    a model with nothing to convert would train as plain maximum likelihood (KL = 0)."""
    from torch.nn.utils import parametrizations

    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(
        parametrizations.weight_norm(nn.Conv2d(1, 2, 3)),
        nn.Flatten(),
        MyLinear(8, 4),
        nn.Embedding(5, 4),
        nn.Linear(4, 3),
    )
    with pytest.warns(UserWarning) as record:
        bnet = bbb.bayesianize(net)
    (message,) = [str(w.message) for w in record]
    for name in ("0 (ParametrizedConv2d)", "2 (MyLinear)", "3 (Embedding)"):
        assert name in message
    assert "4 (" not in message and isinstance(bnet[4], BayesLinear)
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv1d/2d/3d in Sequential"):
        bbb.bayesianize(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    # a model already Bayesian is not an error, and nothing is left deterministic: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = bbb.bayesianize(bnet[4:])
    assert isinstance(again[0], BayesLinear)


def test_a_layer_used_twice_is_converted_once_in_both_directions() -> None:
    """A module used in two places (tied weights) becomes one Bayesian layer used in both
    (named_children lists it once: the second place kept the nn.Linear, and bayesianize
    warned it had been left deterministic), and to_deterministic makes it one nn.Linear
    (the second place kept the BayesLinear, a sampling layer in the deterministic copy)."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bayes = bbb.bayesianize(model, init_from_weights=True)
    assert isinstance(bayes[0], BayesLinear) and bayes[2] is bayes[0]
    det = bbb.to_deterministic(bayes)
    assert type(det[0]) is nn.Linear and det[2] is det[0]
    x = torch.randn(4, 3)
    torch.testing.assert_close(det(x), model(x))
