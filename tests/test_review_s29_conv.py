"""Session 29 review of the convolutions (issue #3): unbatched inputs as torch takes them,
and a demanding user's checks of ``bbb.nn.conv`` (padding modes, groups, dtypes, copies)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import bbb
from bbb import _native as N
from bbb.nn.conv import BayesConv1d, BayesConv2d, BayesConv3d
from bbb.nn.conv_transpose import (
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
)
from bbb.nn.module import BayesModule

CONV: dict[int, type[BayesModule]] = {1: BayesConv1d, 2: BayesConv2d, 3: BayesConv3d}
CONV_T: dict[int, type[BayesModule]] = {
    1: BayesConvTranspose1d,
    2: BayesConvTranspose2d,
    3: BayesConvTranspose3d,
}
TORCH_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TORCH_CONV_T: dict[int, type[nn.Module]] = {
    1: nn.ConvTranspose1d,
    2: nn.ConvTranspose2d,
    3: nn.ConvTranspose3d,
}
SPATIAL = {1: (7,), 2: (5, 6), 3: (4, 5, 3)}  # unequal sizes: a transposed axis would show
KERNELS = ["eager"] + (["native"] if N.available() else [])


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    bbb.set_kernels("eager")


def _layer(transposed: bool, dim: int, estimator: str) -> BayesModule:
    """A small strided layer of ``dim`` spatial dimensions (3 -> 4 channels) and a sigma
    large enough that every draw shows."""
    torch.manual_seed(0)
    cls = (CONV_T if transposed else CONV)[dim]
    return cls(3, 4, 3, stride=2, padding=1, estimator=estimator, rho_init=(-2.0, -1.0))


def _torch_twin(layer: BayesModule, transposed: bool, dim: int) -> nn.Module:
    """The ``nn.Conv*d`` / ``nn.ConvTranspose*d`` with the layer's arguments and mean weights."""
    cls = (TORCH_CONV_T if transposed else TORCH_CONV)[dim]
    net = cls(3, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        net.weight.copy_(layer.weight_mu)
        net.bias.copy_(layer.bias_mu)
    return net


# ----------------------------------------------------------------- 1. unbatched inputs
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("mode", ["sample", "frozen", "mean"])
@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_an_unbatched_input_gives_the_batch_of_one_s_output(
    transposed: bool, dim: int, estimator: str, mode: str, kernels: str
) -> None:
    """(C_in, *spatial), as nn.Conv*d / nn.ConvTranspose*d take it, is run as x.unsqueeze(0):
    the same output (bit for bit, the same random draws for the same seed) and the same
    gradients, without the batch dimension; num_samples 1 inside vectorized_samples too; in
    mean mode, torch's layer of the same weights. It was a ValueError advising x.unsqueeze(0)."""
    layer = _layer(transposed, dim, estimator)
    x = torch.randn(3, *SPATIAL[dim])
    bbb.set_kernels(kernels)
    bbb.set_sampling(layer, mode)

    def run(inp: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layer.zero_grad()
        torch.manual_seed(7)
        bbb.resample(layer)  # frozen: a new sample, drawn from the seed
        y = layer(inp)
        (y.square().sum() + bbb.kl_divergence(layer)).backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters()]

    y, grads = run(x)
    want, want_grads = run(x.unsqueeze(0))
    assert y.shape == want.shape[1:]
    assert torch.equal(y, want[0])
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.equal(g, w)
    with bbb.vectorized_samples(layer, 1):
        torch.manual_seed(7)
        bbb.resample(layer)
        assert torch.equal(layer(x), want[0])
    if mode == "mean":
        twin = _torch_twin(layer, transposed, dim)
        torch.testing.assert_close(y, twin(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_output_size_of_an_unbatched_input_is_read_as_torch_reads_it(dim: int) -> None:
    """nn.ConvTranspose*d(x_unbatched, output_size): the spatial sizes, or (C_out, *spatial)
    (an unbatched skip.shape); (N, C_out, *spatial) is refused, as torch refuses it."""
    layer = _layer(True, dim, "reparam")
    bbb.set_sampling(layer, "mean")
    twin = _torch_twin(layer, True, dim)
    x = torch.randn(3, *SPATIAL[dim])
    larger = tuple(2 * n for n in SPATIAL[dim])  # the largest of stride 2: output_padding 1
    want = twin(x, output_size=larger).detach()
    assert want.shape == (4, *larger)
    for size in (larger, (4, *larger), torch.Size((4, *larger)), torch.tensor(larger)):
        torch.testing.assert_close(layer(x, output_size=size), want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    bbb.set_sampling(layer, "sample")
    y = layer(x, output_size=(4, *larger))
    torch.manual_seed(3)
    assert torch.equal(y, layer(x.unsqueeze(0), output_size=(1, 4, *larger))[0])
    with pytest.raises(ValueError, match=r"output_size must have"):
        twin(x, output_size=(1, 4, *larger))  # (torch's own message)
    with pytest.raises(ValueError, match=r"the input is unbatched: no batch entry"):
        layer(x, output_size=(1, 4, *larger))
    with pytest.raises(ValueError, match=r"gives 5 channels, but the layer has out_channels=4"):
        layer(x, output_size=(5, *larger))


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_an_unbatched_input_cannot_hold_the_stacked_samples(
    transposed: bool, estimator: str
) -> None:
    """Inside vectorized_samples with S > 1 the samples are stacked along the batch dimension,
    which an unbatched input lacks (the rule of BayesLinear's 1-D inputs): refused, naming the
    user's shape and x.unsqueeze(0), also through bbb.predict; the batch of one works."""
    layer = _layer(transposed, 2, estimator)
    x = torch.randn(3, 5, 6)
    name = type(layer).__name__
    msg = f"{name}: an unbatched (C_in, H, W) input cannot hold the 3 Monte Carlo samples"
    with pytest.raises(ValueError, match=re.escape(msg)) as info, bbb.vectorized_samples(layer, 3):
        layer(bbb.repeat_samples(x, 3))
    assert "(your input: (3, 5, 6))" in str(info.value)
    assert "x.unsqueeze(0)" in str(info.value)
    model = nn.Sequential(layer, nn.Flatten())
    with pytest.raises(ValueError, match=re.escape(msg)):
        bbb.predict(model, x, likelihood=bbb.Categorical(), num_samples=3)
    with pytest.raises(ValueError, match=re.escape(msg)), bbb.vectorized_samples(layer, 3):
        layer(x)  # not divisible by S, not a repeat: received as it is
    with (
        pytest.raises(ValueError, match=re.escape(msg)),
        bbb.vectorized_samples(layer, 3, batch_size=3),
    ):
        layer(x)  # would have been taken for a batch of 3 and repeated along its channels
    out = bbb.predict(model, x.unsqueeze(0), likelihood=bbb.Categorical(), num_samples=3)
    assert out.probs.shape[0] == 1


def test_unbatched_inputs_of_the_wrong_channels_are_named() -> None:
    """A (d + 1)-D input whose dimension 0 is not in_channels: the message names both shapes
    accepted; a one-channel layer given N rows without a channel dimension is told
    x.unsqueeze(1) (not an unbatched input); 2-D into a 2-D conv names both ranks."""
    with pytest.raises(
        ValueError,
        match=re.escape(
            "BayesConv2d expected input of shape (N, 3, ..., ...) or unbatched (3, ..., ...), "
            "got (4, 5, 5): dimension 0 of an unbatched input (C_in, H, W) must be "
            "in_channels=3, got 4"
        ),
    ):
        BayesConv2d(3, 2, 3)(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(1\)") as info:
        BayesConvTranspose1d(1, 2, 3)(torch.randn(8, 20))
    assert "unsqueeze(0)" not in str(info.value)
    assert BayesConv1d(1, 2, 3)(torch.randn(1, 20)).shape == (2, 18)  # one unbatched example
    with pytest.raises(
        ValueError,
        match=re.escape("a 4-D input (N, C_in, H, W) or an unbatched 3-D one (C_in, H, W)"),
    ):
        BayesConv2d(3, 2, 3)(torch.randn(5, 5))


def test_a_bayesianized_network_takes_the_unbatched_inputs_of_the_original() -> None:
    """bbb.bayesianize as a drop-in: a network called on unbatched inputs keeps working, and in
    mean mode gives the original's output."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
    )
    x = torch.randn(3, 5, 6)
    bnet = bbb.bayesianize(net, init_from_weights=True)
    assert bnet(x).shape == (2, 10, 12)
    with bbb.sampling(bnet, "mean"):
        torch.testing.assert_close(bnet(x), net(x), rtol=1e-5, atol=1e-6)
