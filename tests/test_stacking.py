"""bbb.nn.stacking: S stacked copies of a batch; the local estimator's shared moments and
flipout's shared mean path."""

from __future__ import annotations

import pytest
import torch

import bbb
from bbb.nn.module import vectorized_samples
from bbb.nn.stacking import identical_blocks, repeat_samples


def test_repeat_samples_stacks_and_marks() -> None:
    x = torch.randn(4, 3, 2)
    rep = repeat_samples(x, 5)
    assert rep.shape == (20, 3, 2)
    for s in range(5):
        assert torch.equal(rep[4 * s : 4 * (s + 1)], x)
    assert identical_blocks(rep) == 5
    assert repeat_samples(x, 1) is x and identical_blocks(x) == 1
    assert identical_blocks(rep + 0) == 1  # a derived tensor is not known to be stacked
    rep.mul_(2)  # modified in place: no longer trusted (its blocks could now differ)
    assert identical_blocks(rep) == 1


def _run(model: torch.nn.Module, x: torch.Tensor, s: int, marked: bool, seed: int = 1):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    with vectorized_samples(model, s):
        y = model(repeat_samples(x, s) if marked else x.repeat(s, *([1] * (x.dim() - 1))))
    loss = (y**2).sum() + bbb.kl_divergence(model)
    model.zero_grad()
    loss.backward()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("kernels", ["eager", "native"])
def test_mlp_same_outputs_and_gradients_as_the_unshared_pass(kernels: str, estimator: str) -> None:
    """Same seed, same noise stream (the S noises and signs are drawn in the same order and
    shape): the shared first-layer moments (flipout: mean path) change the outputs and
    gradients only by float rounding (those matrix products run on B instead of S * B rows)."""
    torch.manual_seed(0)
    with bbb.use_kernels(kernels):
        model = bbb.models.bayes_mlp(20, [30, 30], 4, estimator=estimator)
        x = torch.randn(7, 20)
        y1, g1 = _run(model, x, 5, marked=True)
        y0, g0 = _run(model, x, 5, marked=False)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert len(g1) == len(g0) == 12  # 3 layers: weight and bias mu and rho
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_conv_same_outputs_as_the_unshared_pass(estimator: str) -> None:
    torch.manual_seed(0)
    conv = bbb.BayesConv2d(2, 3, 3, estimator=estimator)
    x = torch.randn(4, 2, 6, 6)
    y1, g1 = _run(conv, x, 3, marked=True)
    y0, g0 = _run(conv, x, 3, marked=False)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_modified_input_takes_the_general_path(estimator: str) -> None:
    torch.manual_seed(0)
    layer = bbb.BayesLinear(5, 3, estimator=estimator)
    x = torch.randn(2, 5)
    rep = repeat_samples(x, 4)
    rep[2:4].mul_(-3.0)  # block 1 now differs from block 0
    torch.manual_seed(3)
    with torch.no_grad(), vectorized_samples(layer, 4):
        y = layer(rep)
    plain = rep.clone()  # the same values, unmarked
    torch.manual_seed(3)
    with torch.no_grad(), vectorized_samples(layer, 4):
        y0 = layer(plain)
    torch.testing.assert_close(y, y0)


def test_each_sample_gets_its_own_noise_with_the_local_moments() -> None:
    """Across S = 4000 stacked samples of one input row, a local layer's outputs have the
    pre-activation's mean x mu^T + b_mu and variance x^2 sigma^2^T + sigma_b^2 (checked to 5
    standard errors: of the mean, sqrt(var / S); of the variance, var sqrt(2 / (S - 1)) for
    Gaussian outputs), so the shared moments did not share the noise."""
    torch.manual_seed(0)
    layer = bbb.BayesLinear(6, 3, estimator="local", rho_init=(-1.0, -0.5))
    x = torch.randn(1, 6)
    s = 4000
    with torch.no_grad(), vectorized_samples(layer, s):
        y = layer(repeat_samples(x, s)).double()  # (S, 3)
        w_sigma = torch.nn.functional.softplus(layer.weight_rho).double()
        b_sigma = torch.nn.functional.softplus(layer.bias_rho).double()
        mean = x.double() @ layer.weight_mu.double().T + layer.bias_mu.double()
        var = (x.double() ** 2) @ (w_sigma**2).T + b_sigma**2
    assert (y[1:] != y[:1]).all()  # no two samples equal
    se_mean = (var / s).sqrt()
    assert ((y.mean(0) - mean[0]).abs() < 5 * se_mean[0]).all()
    se_var = var[0] * (2 / (s - 1)) ** 0.5
    assert ((y.var(0) - var[0]).abs() < 5 * se_var).all()


def test_elbo_and_predict_use_it() -> None:
    """bbb.ELBO and bbb.predict hand the model the marked tensor (seen by the first layer)."""
    seen: list[int] = []
    layer = bbb.BayesLinear(4, 2, estimator="local")
    layer.register_forward_pre_hook(lambda m, args: seen.append(identical_blocks(args[0])))
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    bbb.ELBO(bbb.Categorical(), 10, num_samples=6)(layer, x, y)
    bbb.predict(layer, x, num_samples=7)
    assert seen == [6, 7]


def test_inference_mode_works_unmarked() -> None:
    """Inference tensors keep no version counter: the stacked input is left unmarked there
    and prediction still works (every block computed)."""
    model = bbb.models.bayes_mlp(4, [5], 2, estimator="local")
    x = torch.randn(3, 4)
    with torch.inference_mode():
        rep = repeat_samples(x, 4)
        assert identical_blocks(rep) == 1
        torch.manual_seed(5)
        pred = bbb.predict(model, x, num_samples=4)
    assert pred.probs.shape == (3, 2)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(3))
    # every block computed: the same numbers as the marked (shared-moments) pass outside
    # inference mode with the same noise stream, to float32 rounding (as in the tests above)
    torch.manual_seed(5)
    marked = bbb.predict(model, x, num_samples=4)
    torch.testing.assert_close(pred.sample_probs, marked.sample_probs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pred.sample_probs[0], pred.sample_probs[1])  # distinct samples
