"""Review session 23, area G: the Bayesian layers' module machinery (issue #3)."""

from __future__ import annotations

from collections.abc import Iterator

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


# ------------------------------------------------------------------ KL cache and the prior
@pytest.fixture
def _kernels_reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from bbb import kernels as K

    # the compile backend's fused paths with the kernels' plain bodies (no real compilation)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def reset() -> None:
        for k in K._ALL:
            k._compiled, k.failed = None, None
        K.set_kernels("eager")

    reset()
    yield
    reset()


def _reference_kl(layer: BayesLinear) -> float:
    fresh = BayesLinear(4, 3, estimator=layer.estimator, prior=bbb.GaussianPrior(1.0))
    fresh.load_state_dict(layer.state_dict())
    return float(fresh.kl())  # no forward pass: the closed form of the current state


@pytest.mark.usefixtures("_kernels_reset")
@pytest.mark.parametrize("backend", ["compile", "native"])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_kl_after_the_prior_changes_is_that_of_the_new_prior(backend: str, estimator: str) -> None:
    # with a fused backend the forward pass computes the KL; kl() returned it after the
    # prior was replaced or edited in place (the old prior's KL, silently)
    from bbb import _native

    if backend == "native" and not _native.available():
        pytest.skip("the native kernels cannot be built here")
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, estimator=estimator)
    x = torch.randn(5, 4)
    with bbb.use_kernels(backend):
        layer(x)
        before = float(layer.kl())
        torch.testing.assert_close(before, _reference_kl(layer), rtol=1e-5, atol=0)
        layer.prior = bbb.GaussianPrior(0.1)
        replaced = float(layer.kl())
        layer(x)
        layer.prior.sigma.fill_(0.5)  # an in-place edit of the hyper-parameter
        edited = float(layer.kl())
    ref = BayesLinear(4, 3, prior=bbb.GaussianPrior(0.1))
    ref.load_state_dict(layer.state_dict(), strict=False)
    ref.prior = bbb.GaussianPrior(0.1)
    assert replaced != pytest.approx(before, rel=1e-3)
    torch.testing.assert_close(replaced, float(ref.kl()), rtol=1e-5, atol=0)
    ref.prior = bbb.GaussianPrior(0.5)
    torch.testing.assert_close(edited, float(ref.kl()), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ inference_mode records
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("kl", ["closed_form", "mc"])
def test_kl_after_an_inference_mode_forward_backpropagates(estimator: str, kl: str) -> None:
    # the forward's record held inference tensors: kl() outside inference_mode raised
    # 'Inference tensors cannot be saved for backward'
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, estimator=estimator, kl=kl)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        layer(x)
        inside = float(layer.kl()) if estimator != "local" or kl != "mc" else None
    k = layer.kl()
    k.backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()
    if inside is not None:  # the same weight sample as inside (local's mc KL draws its own)
        assert float(k) == pytest.approx(inside, rel=1e-6)


def test_a_frozen_sample_drawn_under_inference_mode_is_used_with_autograd() -> None:
    torch.manual_seed(0)
    layer = BayesLinear(4, 3)
    x = torch.randn(5, 4)
    with sampling(layer, "frozen"):
        with torch.inference_mode():
            y0 = layer(x)  # e.g. Thompson sampling's action choice
        y = layer(x)  # then a pass with autograd on the same frozen sample
        y.sum().backward()
        assert layer.kl().isfinite()
    assert torch.equal(y.detach(), y0)
    assert layer.weight_rho.grad is not None and layer.weight_rho.grad.abs().sum() > 0


def test_ensemble_repr_says_whether_it_has_a_bias() -> None:
    # BayesLinear's repr says bias=...; the ensemble's said nothing (bias=False was invisible)
    assert "bias=False" in repr(BayesLinearEnsemble(2, 3, 4, bias=False))
    assert "bias=True" in repr(BayesLinearEnsemble(2, 3, 4))


# ------------------------------------------------------------------ replacing the prior
def test_replacing_the_prior_resolves_kl_auto_for_the_new_prior() -> None:
    # kl="auto" (the default) was resolved once, for the constructor's prior: a Gaussian
    # prior replaced by a scale mixture kept "closed_form", and kl() failed advising kl="auto"
    torch.manual_seed(0)
    layer = BayesLinear(3, 2)
    layer(torch.randn(4, 3))
    mixture = bbb.ScaleMixturePrior(0.5, 1.0, 0.0025)
    layer.prior = mixture
    assert layer.kl_mode == "mc"
    assert torch.isfinite(layer.kl())
    layer.prior = bbb.GaussianPrior(0.3)
    assert layer.kl_mode == "closed_form"
    built = BayesLinear(3, 2, prior=bbb.ScaleMixturePrior(0.5, 1.0, 0.0025))
    assert built.kl_mode == "mc"


def test_an_invalid_prior_replacement_is_refused_and_changes_nothing() -> None:
    layer = BayesLinear(3, 2, kl="closed_form")
    prior = layer.prior
    with pytest.raises(ValueError, match="closed_form"):
        layer.prior = bbb.ScaleMixturePrior(0.5, 1.0, 0.0025)
    with pytest.raises(TypeError, match="bbb Prior"):
        layer.prior = None  # type: ignore[assignment]
    assert layer.prior is prior and layer.kl_mode == "closed_form"
    assert torch.isfinite(layer.kl())
