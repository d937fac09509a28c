"""Session 25 review of the layers (issue 3): the priors' analytic score under torch.func
transforms, and the conversions' bias handling that the typing pass touched."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch import distributions as D
from torch.func import functional_call, grad, stack_module_state, vmap

import bbb
from bbb.priors import GaussianPrior, LaplacePrior, Prior, ScaleMixturePrior


class _Score(nn.Module):
    """A module whose forward is its prior's grad_log_prob (functional_call needs a forward)."""

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, w: Tensor) -> Tensor:
        return self.prior.grad_log_prob(w)


_MEMBERS = {
    "gaussian": lambda i: GaussianPrior(0.5 + i, mean=0.1 * i),
    "scale_mixture": lambda i: ScaleMixturePrior(0.3 + 0.2 * i, 1.0 + i, math.exp(-3.0 - i)),
    "laplace": lambda i: LaplacePrior(0.5 + i, loc=0.1 * i),
}


def _stacked(kind: str, k: int = 3) -> tuple[list[nn.Module], dict[str, Tensor]]:
    members: list[nn.Module] = [_Score(_MEMBERS[kind](i)) for i in range(k)]
    _, buffers = stack_module_state(members)
    return members, buffers


@pytest.mark.parametrize("kind", sorted(_MEMBERS))
def test_grad_log_prob_under_vmap_of_stacked_priors(kind: str) -> None:
    # Before: every built-in prior read its hyper-parameters as Python floats, and vmap over
    # the stacked buffers raised "vmap: It looks like you're calling .item() on a Tensor".
    members, buffers = _stacked(kind)
    w = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = vmap(lambda b, x: functional_call(members[0], b, (x,)))(buffers, w)
    expected = torch.stack([m(w[i]) for i, m in enumerate(members)])
    # deterministic: the transformed path reads the float32 buffers, the loop the exact
    # constructor values; they differ by float32 rounding (a few ulps), nothing else
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_scale_mixture_score_under_vmap_keeps_the_clamp() -> None:
    # at zero, near it and far in the tails (responsibilities saturated, u clamped): the
    # transformed path stays finite and agrees with the float path
    members, buffers = _stacked("scale_mixture")
    w = torch.tensor([0.0, 1e-3, 0.5, 30.0, -1e4, 1e6]).expand(3, 6).contiguous()
    out = vmap(lambda b, x: functional_call(members[0], b, (x,)))(buffers, w)
    expected = torch.stack([m(w[i]) for i, m in enumerate(members)])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# vmap over the weights only: torch warns that its in-place clamp_ has no batching rule
@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("kind", sorted(_MEMBERS))
def test_grad_log_prob_float_path_unchanged(kind: str) -> None:
    # outside transforms, and under vmap over the weights only (buffers not batched), the
    # float fast path runs: the same bits as a call outside any transform
    prior = _MEMBERS[kind](1)
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    plain = prior.grad_log_prob(w)
    assert torch.equal(vmap(prior.grad_log_prob)(w), plain)
    if kind == "gaussian":
        mean, sigma = prior._value("mean"), prior._value("sigma")
        assert torch.equal(plain, (w - mean).mul_(-1.0 / (sigma * sigma)))
    elif kind == "laplace":
        loc, scale = prior._value("loc"), prior._value("scale")
        assert torch.equal(plain, torch.sign(w - loc).mul_(-1.0 / scale))


def test_grad_log_prob_differentiable_in_hyper_parameters_under_grad() -> None:
    # torch.func.grad with respect to the buffers: before, float(buffer) raised; now the
    # derivative of sum(-(w - m) / s^2) is n / s^2 in m and 2 sum(w - m) / s^3 in s
    prior = GaussianPrior(0.5, mean=0.1)
    module = _Score(prior)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    g = grad(lambda b: functional_call(module, b, (w,)).sum())(dict(module.named_buffers()))
    m, s = 0.1, 0.5
    torch.testing.assert_close(g["prior.mean"], torch.tensor(w.numel() / s**2))
    torch.testing.assert_close(g["prior.sigma"], (2.0 * (w - m).sum() / s**3).float())


class _ScaleBuffer(Prior):
    """A prior without its own grad_log_prob: the base class's autograd default."""

    s: Tensor

    def __init__(self, s: float) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor(s))

    def distribution(self) -> D.Normal:
        return D.Normal(0.0, self.s)


def test_default_grad_log_prob_under_vmap() -> None:
    # the default differentiated log_prob with requires_grad_ and autograd.grad, which
    # torch.func transforms refuse ("You are attempting to call Tensor.requires_grad_()")
    members: list[nn.Module] = [_Score(_ScaleBuffer(0.5 + i)) for i in range(2)]
    _, buffers = stack_module_state(members)
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    out = vmap(lambda b, x: functional_call(members[0], b, (x,)))(buffers, w)
    expected = torch.stack([m(w[i]) for i, m in enumerate(members)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[1], -w[1] / 1.5**2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(3, 2, bias=False),
        lambda: nn.Linear(3, 2),
        lambda: nn.Conv2d(1, 2, 3, bias=False),
        lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
    ],
)
def test_bayesianize_and_back_keeps_weights_and_bias(make: Callable[[], nn.Module]) -> None:
    # the conversions' bias handling (rewritten by the typing pass): a layer without bias
    # round-trips without one, a layer with one keeps its values
    torch.manual_seed(4)
    layer = make()
    bayes = bbb.bayesianize(layer, init_from_weights=True)
    back = bbb.to_deterministic(bayes)
    assert type(back) is type(layer)
    assert (back.bias is None) == (layer.bias is None)
    for name, p in layer.named_parameters():
        assert torch.equal(getattr(back, name), p)


@pytest.mark.parametrize("read_first", [False, True])
def test_functional_call_with_swapped_prior_buffer_keeps_exact_value(read_first: bool) -> None:
    # functional_call swaps the given tensor in for the prior's buffer and restores it after.
    # Before, the swapped-in value replaced the exact one, and the restored float32 buffer
    # then gave its rounded value for good: 0.1 became 0.10000000149011612 (.double() no
    # longer restored 0.1, and the float fast paths used the rounded value).
    prior = GaussianPrior(0.1)
    module = _Score(prior)
    w = torch.ones(3)
    if read_first:
        prior.grad_log_prob(w)
    swapped = functional_call(module, {"prior.sigma": torch.tensor(2.0)}, (w,))
    torch.testing.assert_close(swapped, torch.full((3,), -1.0 / 4.0))  # the swapped value used
    assert prior._value("sigma") == 0.1
    assert float(prior.double().sigma) == 0.1
    # an in-place edit of the restored buffer is still read
    prior.sigma.fill_(0.5)
    assert prior._value("sigma") == 0.5
