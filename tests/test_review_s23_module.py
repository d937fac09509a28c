"""Review session 23, area G: the Bayesian layers' module machinery (issue #3)."""

from __future__ import annotations

import copy
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
    return fresh.kl().item()  # no forward pass: the closed form of the current state


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
        before = layer.kl().item()
        torch.testing.assert_close(before, _reference_kl(layer), rtol=1e-5, atol=0)
        layer.prior = bbb.GaussianPrior(0.1)
        replaced = layer.kl().item()
        layer(x)
        layer.prior.sigma.fill_(0.5)  # an in-place edit of the hyper-parameter
        edited = layer.kl().item()
    ref = BayesLinear(4, 3, prior=bbb.GaussianPrior(0.1))
    ref.load_state_dict(layer.state_dict(), strict=False)
    ref.prior = bbb.GaussianPrior(0.1)
    assert replaced != pytest.approx(before, rel=1e-3)
    torch.testing.assert_close(replaced, ref.kl().item(), rtol=1e-5, atol=0)
    ref.prior = bbb.GaussianPrior(0.5)
    torch.testing.assert_close(edited, ref.kl().item(), rtol=1e-5, atol=0)


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
        inside = layer.kl().item() if estimator != "local" or kl != "mc" else None
    k = layer.kl()
    k.backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()
    if inside is not None:  # the same weight sample as inside (local's mc KL draws its own)
        assert k.item() == pytest.approx(inside, rel=1e-6)


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


# ------------------------------------------------------------------ moves after a forward pass
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("kl", ["closed_form", "mc"])
def test_kl_after_a_dtype_or_device_move_uses_the_moved_parameters(estimator: str, kl: str) -> None:
    # .to()/.double() keep the parameters' identity and version counter: kl() reused the
    # forward's softplus and weight sample, of the old dtype (float32 digits in a float64 KL)
    # and device (a device-mismatch error, here with the meta device standing in for a GPU)
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, estimator=estimator, kl=kl)
    layer(torch.randn(4, 3))
    before = layer.kl().item()
    layer.double()
    moved = layer.kl()
    assert moved.dtype == torch.float64
    if kl == "closed_form":
        fresh = copy.deepcopy(layer)  # a copy starts without the forward's record
        assert moved.item() == fresh.kl().item()  # float64 throughout, bit for bit
    elif estimator != "local":  # the same noise: the forward's sample, now in float64
        assert moved.item() == pytest.approx(before, rel=1e-6)
    layer.to("meta")
    assert layer.kl().device.type == "meta"


def test_one_d_input_not_from_repeat_samples_is_not_split_into_samples() -> None:
    # only repeat_samples' marked copies are the user's vector S times: a (6,) received as is
    # inside vectorized_samples(., 3) is not "your input (2,)"
    layer = BayesLinear(6, 2)
    with vectorized_samples(layer, 3), pytest.raises(ValueError) as info:
        layer(torch.randn(6))
    assert "(2,)" not in str(info.value)
    assert "x.unsqueeze(0)" in str(info.value)


# ------------------------------------------------------------------ conv: the missing dimension
@pytest.mark.parametrize("num_samples", [1, 10])
@pytest.mark.parametrize(
    ("layer", "shape"),
    [(bbb.BayesConv2d, (8, 28, 28)), (bbb.BayesConv1d, (8, 20))],
)
def test_single_channel_inputs_without_a_channel_dimension_are_told_unsqueeze_1(
    layer: type, shape: tuple[int, ...], num_samples: int
) -> None:
    # MNIST as (N, 28, 28) into a one-channel conv: the message said x.unsqueeze(0), which
    # gives (1, N, 28, 28) and a channel error
    torch.manual_seed(0)
    model = nn.Sequential(layer(1, 2, 3), nn.Flatten())
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(1\)") as info:
        bbb.predict(model, x, likelihood=bbb.Categorical(), num_samples=num_samples)
    assert "unsqueeze(0)" not in str(info.value)
    # the advice is right
    out = bbb.predict(model, x.unsqueeze(1), likelihood=bbb.Categorical(), num_samples=2)
    assert out.probs.shape[0] == shape[0]


def test_an_unbatched_conv_input_is_still_told_unsqueeze_0() -> None:
    # since session 29 an unbatched input runs as torch's layers run it; inside
    # vectorized_samples with S > 1 it cannot hold the samples and is told unsqueeze(0)
    layer = BayesConv2d(3, 2, 3)
    with (
        bbb.vectorized_samples(layer, 2),
        pytest.raises(ValueError, match=r"x\.unsqueeze\(0\)") as info,
    ):
        layer(torch.randn(3, 8, 8))
    assert "unsqueeze(1)" not in str(info.value)
    assert layer(torch.randn(3, 8, 8).unsqueeze(0)).shape == (1, 2, 6, 6)
