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


# ----------------------------------------------------------------- 2. review of conv.py
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_local_variance_follows_the_padding_mode(padding_mode: str) -> None:
    """Local reparameterisation's output variance is op(x^2, sigma^2) + sigma_b^2 with x^2
    padded in the layer's mode: the exact variance of weight-space sampling, sum_i sigma_i^2
    (dy/dw_i)^2 + sigma_b^2 (y is linear in w; the Jacobian from torch's nn.Conv2d with that
    padding mode), also at the border, where zero padding of the variance would lose the taps
    that read the padded values. Checked against the empirical variance of 4000 draws."""
    torch.manual_seed(5)
    layer = BayesConv2d(
        2, 3, 3, padding=1, padding_mode=padding_mode, estimator="local", rho_init=(-1.0, 0.0)
    )
    x = torch.randn(1, 2, 5, 6)
    twin = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)

    def out(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(twin, {"weight": w, "bias": layer.bias_mu}, (x,))

    jac = torch.func.jacrev(out)(layer.weight_mu.detach())  # (1, 3, 5, 6, *W)
    exact = (jac.square() * layer.weight_sigma.detach().square()).flatten(4).sum(-1)
    exact = exact + layer.bias_sigma.detach().square().view(1, 3, 1, 1)
    n = 4000
    with torch.no_grad(), bbb.vectorized_samples(layer, n):
        y = layer(bbb.repeat_samples(x, n))
    var = y.var(0, keepdim=True)
    # the sample variance of n Gaussian draws has standard error var * sqrt(2 / (n - 1)):
    # 5 standard errors (a false failure over the 90 outputs has probability ~ 5e-5)
    tol = 5 * exact * (2 / (n - 1)) ** 0.5
    assert torch.all((var - exact).abs() <= tol)
    # the check can tell: zero padding of the variance is far outside it at the border
    zero_padded = torch.nn.functional.conv2d(
        x.square(),
        layer.weight_sigma.detach().square(),
        layer.bias_sigma.detach().square(),
        padding=1,
    )
    assert ((zero_padded - exact).abs() > 3 * tol).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"padding_mode": "mirror"},
            "BayesConv2d: unknown padding_mode 'mirror'; accepted values: zeros, reflect, "
            "replicate, circular",
        ),
        (
            {"padding": "full"},
            "BayesConv2d padding string must be 'same' or 'valid', got 'full' (or give a "
            "non-negative int, or a tuple of them, one per spatial dimension)",
        ),
        (
            {"padding": 1.5},
            "BayesConv2d padding must be an int or a tuple of 2 ints (one per spatial "
            "dimension), got 1.5 (or one of the strings 'same', 'valid')",
        ),
        (
            {"padding": "same", "stride": (1, 2)},
            "BayesConv2d: padding='same' is not supported for strided convolutions (stride=(1, "
            "2)), as in torch; give the padding as ints, or stride=1",
        ),
    ],
)
def test_bad_padding_arguments_name_the_layer_and_every_accepted_form(
    kwargs: dict[str, object], message: str
) -> None:
    """In a network of many layers the constructor's padding errors said neither which kind of
    layer refused (``unknown padding_mode 'mirror'``) nor, for a non-int padding, that the
    strings 'same' and 'valid' are accepted too."""
    with pytest.raises(ValueError, match=re.escape(message)):
        BayesConv2d(3, 4, 3, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("kernel", "dilation"), [(4, 1), (3, 2), ((2, 3), (3, 1))])
def test_same_padding_matches_torch_in_every_padding_mode(
    padding_mode: str, kernel: int | tuple[int, int], dilation: int | tuple[int, int]
) -> None:
    """padding='same' with even kernels and dilations (the odd element after, as torch), for
    every padding mode, unbatched too: nn.Conv2d's output in mean mode."""
    torch.manual_seed(2)
    layer = BayesConv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=padding_mode)
    twin = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=padding_mode)
    with torch.no_grad():
        twin.weight.copy_(layer.weight_mu)
        twin.bias.copy_(layer.bias_mu)
    bbb.set_sampling(layer, "mean")
    for x in (torch.randn(2, 2, 7, 8), torch.randn(2, 7, 8)):
        torch.testing.assert_close(layer(x), twin(x).detach(), rtol=1e-5, atol=1e-6)
