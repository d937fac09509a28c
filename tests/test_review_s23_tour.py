"""Session 23 review, an end-to-end user's tour of the public API (#3): behaviour a user's
script relies on that worked and had no test of its own.

- gradient accumulation: the per-example ELBO of two half minibatches, each divided by 2,
  gives the gradient of the whole minibatch (the KL enters once per optimizer step);
- ``torch.func.functional_call`` of a module that returns ``(output, kl_divergence(net))``
  computes the KL of the parameters swapped in (closed form and Monte Carlo);
- pickling and deep-copying a bayesianized residual conv net with batch norm;
- the ELBO of that net with several samples (one pass per sample, batch norm in training
  mode) on a channels-last input, and under a bfloat16 CPU autocast.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import bbb


class _ResNet(nn.Module):
    """Conv + BatchNorm + ReLU, a residual block, max pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(self.pool(h).flatten(1))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return bbb.bayesianize(_ResNet(), prior=bbb.GaussianPrior(0.5))


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
def test_gradient_accumulation_counts_the_kl_once_per_step(estimator: str) -> None:
    # In the mean network the likelihood term is deterministic, so the accumulated gradient of
    # two halves (each loss / 2) must equal the gradient of the whole minibatch: the KL weight
    # 1/N does not depend on the minibatch size, and each half carries half of it.
    torch.manual_seed(0)
    model = nn.Sequential(
        bbb.BayesLinear(3, 5, estimator=estimator),
        nn.Tanh(),
        bbb.BayesLinear(5, 2, estimator=estimator),
    ).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=40)
    params = list(model.parameters())
    with bbb.sampling(model, "mean"):
        whole = torch.autograd.grad(elbo(model, x, y).loss, params)
        halves = [
            torch.autograd.grad(elbo(model, x[i : i + 4], y[i : i + 4]).loss / 2, params)
            for i in (0, 4)
        ]
    for g, g0, g1 in zip(whole, *halves, strict=True):
        torch.testing.assert_close(g0 + g1, g, rtol=1e-12, atol=1e-12)
    # the rho gradients come from the KL alone here: they are not zero
    assert float(whole[1].abs().sum()) > 0


@pytest.mark.parametrize("kl", ["closed_form", "mc"])
def test_functional_call_gives_the_kl_of_the_swapped_parameters(kl: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(bbb.BayesLinear(4, 6, kl=kl), nn.ReLU(), bbb.BayesLinear(6, 3, kl=kl))

    class WithKL(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(x), bbb.kl_divergence(self.net)

    wrapped = WithKL(net)
    swapped = {k: v.detach() * 1.5 for k, v in wrapped.named_parameters()}
    x = torch.randn(5, 4)
    torch.manual_seed(1)
    out, kl_swapped = torch.func.functional_call(wrapped, swapped, (x,))
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.5)
    torch.manual_seed(1)  # the same weight noise: the Monte Carlo KL uses the forward's sample
    out_ref = reference(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(kl_swapped, bbb.kl_divergence(reference))
    # and not the KL of the module's own parameters
    torch.manual_seed(1)
    net(x)
    assert not torch.allclose(kl_swapped, bbb.kl_divergence(net))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_bayesianized_residual_net_survives_pickle_and_deepcopy(how: str) -> None:
    model = _resnet().eval()
    twin = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    with bbb.sampling(model, "mean"), bbb.sampling(twin, "mean"):
        assert torch.equal(model(x), twin(x))
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    assert torch.equal(a, twin(x))  # the same weight sample at the same seed
    assert float(twin.c1.prior.sigma) == 0.5
    assert torch.equal(bbb.kl_divergence(twin).detach(), bbb.kl_divergence(model).detach())


def test_elbo_of_a_residual_bn_net_with_channels_last_input_and_bf16_autocast() -> None:
    model = _resnet()
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 3, (6,))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=60, num_samples=3)
    state = copy.deepcopy(model.state_dict())  # batch norm's running statistics move
    torch.manual_seed(5)
    ref = elbo(model, x, y)
    model.load_state_dict(state)
    torch.manual_seed(5)
    cl = elbo(model, x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(cl.output, ref.output)
    torch.testing.assert_close(cl.loss, ref.loss)
    # the 3 samples are normalised and drawn separately: they differ
    assert not torch.equal(ref.output[0], ref.output[1])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = elbo(model, x.contiguous(memory_format=torch.channels_last), y)
    assert out.output.dtype == torch.bfloat16 and out.output.shape == (3, 6, 3)
    assert out.loss.dtype == torch.float32 and out.kl.dtype == torch.float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    # the closed-form KL does not depend on the autocast
    torch.testing.assert_close(out.kl, ref.kl)
