"""Session 29 review of ``BayesConvTranspose1d/2d/3d``, ``BayesLinearEnsemble`` and
``bbb.nn.stacking`` (issue #3): regression tests for the defects found.

Deterministic checks only (exact, or at float rounding level); fixed seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bbb
from bbb import BayesConvTranspose2d

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


class _UpNet(nn.Module):
    """A U-Net's up-sampling step: a strided down convolution, then a transposed one told
    the input's size (``output_size=x.shape``), which is symbolic under ``torch.export`` with
    dynamic shapes."""

    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x), output_size=x.shape)


def test_output_size_from_a_dynamic_shape_exports_as_nn_conv_transpose_does() -> None:
    # Before: torch.export with a dynamic height refused output_size=x.shape ("output_size
    # must be a sequence of 2 positive ints ..., got torch.Size([2, 4, s53, 8])"), which
    # nn.ConvTranspose2d exports; now the exported graph gives each height's size.
    torch.manual_seed(0)
    net = _UpNet(BayesConvTranspose2d(4, 4, 3, stride=2, padding=1))
    bbb.set_sampling(net, "mean")
    half = torch.export.Dim("half", min=2, max=32)
    exported = torch.export.export(
        net, (torch.randn(2, 4, 8, 8),), dynamic_shapes={"x": {2: 2 * half}}
    ).module()
    for height in (8, 12):  # 12: another size than the example's
        x = torch.randn(2, 4, height, 8)
        y = exported(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, net(x), rtol=0, atol=1e-6)


def test_output_size_as_an_integer_tensor_or_array_as_nn_conv_transpose_takes_it() -> None:
    # Before: a 1-D tensor or NumPy array, which nn.ConvTranspose2d.forward takes, was refused
    torch.manual_seed(0)
    layer = BayesConvTranspose2d(4, 6, 3, stride=2)
    ref = nn.ConvTranspose2d(4, 6, 3, stride=2)
    with torch.no_grad():
        ref.weight.copy_(layer.weight_mu)
        ref.bias.copy_(layer.bias_mu)  # type: ignore[union-attr,arg-type]
    x = torch.randn(2, 4, 5, 5)
    with bbb.sampling(layer, "mean"):
        for size in (torch.tensor([12, 11]), np.array([12, 11]), np.array([2, 6, 12, 11])):
            y = layer(x, output_size=size)  # type: ignore[arg-type]
            assert y.shape == (2, 6, 12, 11)
            assert torch.equal(y, ref(x, output_size=[12, 11]))
        # a float tensor or a 2-D one is not a size: refused naming the accepted forms
        for bad in (torch.tensor([12.0, 11.0]), torch.tensor([[12, 11]])):
            with pytest.raises(ValueError, match="or a 1-D integer tensor or array of them"):
                layer(x, output_size=bad)


def test_ensemble_bias_must_be_a_bool() -> None:
    # Before: bias="no" (truthy) gave every member a bias silently, as any non-bool did
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match=r"bias must be True or False, got "):
            bbb.BayesLinearEnsemble(2, 3, 4, bias=bad)  # type: ignore[arg-type]
    assert bbb.BayesLinearEnsemble(2, 3, 4, bias=False).bias_mu is None


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_ensemble_on_repeated_blocks_that_split_the_members(estimator: str) -> None:
    # One member's input repeated for all K members with repeat_samples: blocks of 1 row
    # for K = 3 members. Before: local and flipout computed the mean path on one block as if
    # it held the K members and failed in torch's reshape ("shape '[0, 3, 5, 4]' is
    # invalid"); now the rows are applied as any input: the mean network's output equals that
    # of the same rows without the mark, and with sigma ~ 0 (rho = -30: sigma ~ 1e-13) so do
    # the sampled outputs.
    torch.manual_seed(0)
    layer = bbb.BayesLinearEnsemble(3, 4, 2, estimator=estimator, rho_init=-30.0)
    x = torch.randn(1, 5, 4)
    marked = bbb.nn.repeat_samples(x, 3)
    plain = x.expand(3, 5, 4)
    y = layer(marked)
    assert y.shape == (3, 5, 2)
    with bbb.sampling(layer, "mean"):
        reference = layer(plain)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    with bbb.vectorized_samples(layer, 2):  # 2 samples x 3 members, blocks of one row
        y2 = layer(bbb.nn.repeat_samples(x, 6))
    torch.testing.assert_close(y2, reference.repeat(2, 1, 1), rtol=0, atol=1e-6)


def test_output_shape_refuses_sizes_of_another_length_by_name() -> None:
    # Before: Python's "zip() argument 2 is longer than argument 1" (or a TypeError for an int)
    layer = BayesConvTranspose2d(4, 6, 3, stride=2)
    assert layer.output_shape((5, 5)) == (11, 11)
    assert layer.output_shape((5, 5), (1, 0)) == (12, 11)
    with pytest.raises(ValueError, match=r"input_size must be a sequence of 2 ints .*H, W.*\(5,\)"):
        layer.output_shape((5,))
    with pytest.raises(ValueError, match=r"input_size must be a sequence of 2 ints.*got 5"):
        layer.output_shape(5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"output_padding must be a sequence of 2 ints.*\(1, 1, 1\)"
    ):
        layer.output_shape((5, 5), (1, 1, 1))
