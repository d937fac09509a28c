"""Review session 23, area G: the Bayesian layers' module machinery (issue #3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbb
from bbb import BayesLinearEnsemble
from bbb.nn import BayesConv2d, BayesLinear, repeat_samples, sampling, vectorized_samples


# ------------------------------------------------------------------ 1-D input advice
def _regression_net(in_features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(BayesLinear(in_features, 8), nn.Tanh(), BayesLinear(8, 1))


@pytest.mark.parametrize("num_samples", [1, 20])
def test_one_d_input_to_a_one_feature_layer_is_told_to_unsqueeze_last(num_samples: int) -> None:
    # 1-D regression: a vector of N scalars is N examples of one feature, (N, 1)
    with pytest.raises(ValueError) as info:
        bbb.predict(
            _regression_net(1), torch.randn(20), likelihood=bbb.Gaussian(), num_samples=num_samples
        )
    msg = str(info.value)
    assert "x.unsqueeze(-1)" in msg
    assert "x.unsqueeze(0)" not in msg
    if num_samples > 1:
        assert "(20,)" in msg  # the user's shape, besides the stacked one


def test_one_d_input_of_one_example_is_told_to_unsqueeze_first() -> None:
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(0\)") as info:
        bbb.predict(_regression_net(3), torch.randn(3), likelihood=bbb.Gaussian(), num_samples=5)
    assert "unsqueeze(-1)" not in str(info.value)
    # the advice is right: the unsqueezed input is accepted
    out = bbb.predict(
        _regression_net(3), torch.randn(3).unsqueeze(0), likelihood=bbb.Gaussian(), num_samples=5
    )
    assert out.mean.shape == (1, 1)


# ------------------------------------------------------------------ ensemble: no wasted draws
def test_ensemble_initialises_its_weights_with_one_draw() -> None:
    # the weights were initialised twice (the second time to initialise the bias): the first
    # uniform draw was thrown away
    torch.manual_seed(0)
    layer = BayesLinearEnsemble(4, 3, 2)
    torch.manual_seed(0)
    expected = torch.empty(4, 2, 3).uniform_(-(3**-0.5), 3**-0.5)
    assert torch.equal(layer.weight_mu.detach(), expected)
    assert layer.bias_mu is not None and layer.bias_mu.shape == (4, 2)
    assert layer.bias_rho is not None and layer.bias_rho.shape == (4, 2)
    assert (
        float(layer.bias_rho.detach().min()) >= -5.0
        and float(layer.bias_rho.detach().max()) <= -4.0
    )
    assert list(layer.state_dict())[:4] == ["weight_mu", "weight_rho", "bias_mu", "bias_rho"]


@pytest.mark.parametrize("mode", ["sample", "frozen"])
def test_ensemble_bias_noise_is_the_next_draw_after_the_weights(mode: str) -> None:
    # an (S, K) normal draw was made for the bias and discarded, then (S, K, out) drawn
    layer = BayesLinearEnsemble(4, 3, 2)
    x = torch.randn(2 * 4, 5, 3)
    torch.manual_seed(1)
    with sampling(layer, mode), vectorized_samples(layer, 2):
        layer(x)
    rec = layer._record
    assert rec is not None and rec.eps_w is not None and rec.eps_b is not None
    torch.manual_seed(1)
    eps_w = torch.randn(2, 4, 2, 3)
    eps_b = torch.randn(2, 4, 2)
    assert torch.equal(rec.eps_w, eps_w)
    assert torch.equal(rec.eps_b, eps_b)
    # and the pass used those weights
    w = layer.weight_mu + layer.weight_sigma * eps_w
    assert layer.bias_mu is not None and layer.bias_sigma is not None
    b = layer.bias_mu + layer.bias_sigma * eps_b
    torch.testing.assert_close(rec.w, w)
    torch.testing.assert_close(rec.b, b)


# ------------------------------------------------------------------ conv: the user's shape
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("mode", ["sample", "mean", "frozen"])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_error_inside_vectorized_samples_names_the_users_shape(
    estimator: str, mode: str, padding_mode: str
) -> None:
    layer = BayesConv2d(2, 3, 3, padding=4, padding_mode=padding_mode, estimator=estimator)
    x = repeat_samples(torch.randn(1, 2, 3, 3), 3)
    with pytest.raises(RuntimeError) as info, vectorized_samples(layer, 3), sampling(layer, mode):
        layer(x)
    msg = str(info.value)
    assert "6, 3, 3" not in msg  # the folded (B, S * C, ...) the user never built
    if padding_mode == "reflect":  # torch's circular message names no shape
        assert "[1, 2, 3, 3]" in msg
    # the same error as outside vectorized_samples
    with pytest.raises(RuntimeError) as plain:
        layer(torch.randn(1, 2, 3, 3))
    assert str(plain.value) == msg
