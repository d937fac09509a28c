"""Session 23 review of the Bayesian layers and estimators, convolutions especially (#3).

Statistical checks use fixed seeds and tolerances of ``stats.z`` (= 5) standard errors (see
``conftest.py``; each test says which standard error); deterministic checks are exact or at
float64 rounding level. References are computed independently here (``torch.nn`` modules,
``torch.nn.functional`` with the weights given explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from bbb import BayesConv2d
from bbb import kernels as K

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("single_thread"),  # see conftest.single_thread
]

DT = torch.float64


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    K.set_kernels("eager")


# --------------------------------------------------------------------------- float16 local


def _local_half(rho: float, **kw: object) -> BayesConv2d:
    torch.manual_seed(0)
    layer = BayesConv2d(1, 1, 1, bias=False, estimator="local", rho_init=rho, dtype=torch.float16)
    with torch.no_grad():
        layer.weight_mu.zero_()  # the output is then std * noise alone: no rounding of a mean
    return layer


@pytest.mark.parametrize("rho", [-7.0, -9.0])
def test_float16_local_output_has_the_posterior_standard_deviation(rho: float) -> None:
    # sigma = softplus(-7) = 9.1e-4 (variance 8.3e-7) and softplus(-9) = 1.2e-4 (1.5e-8): both
    # below float16's smallest normal number, 6.1e-5. Before: the first was floored to it
    # (std 7.8e-3, 8.6x too large), the second's sigma^2 underflowed to 0 (no noise at all).
    layer = _local_half(rho)
    n = 128 * 128
    x = torch.ones(1, 1, 128, 128, dtype=torch.float16)  # n outputs, independent noise each
    y = layer(x).float().flatten()
    sigma = F.softplus(torch.tensor(rho, dtype=DT)).item()
    assert torch.isfinite(y).all()
    # the sample standard deviation of n normal draws has standard error sigma / sqrt(2 n);
    # the float16 rounding of sigma (rel. 5e-4) and of each output (rel. 5e-4) is far below it
    se = sigma / math.sqrt(2 * n)
    assert abs(y.double().std().item() - sigma) <= 5 * se


def test_float16_local_with_inputs_above_256_is_finite_with_the_right_spread() -> None:
    # x^2 overflowed float16 (max 65504) for |x| > 255.9: the local output was +-inf where
    # reparam's and flipout's were finite.
    layer = _local_half(-3.0)
    x = torch.full((1, 1, 64, 64), 300.0, dtype=torch.float16)
    y = layer(x).float().flatten().double()
    assert torch.isfinite(y).all()
    std = 300.0 * F.softplus(torch.tensor(-3.0, dtype=DT)).item()
    # standard error of the sample std of n normal draws: std / sqrt(2 n)
    assert abs(y.std().item() - std) <= 5 * std / math.sqrt(2 * y.numel())
    layer(x).float().sum().backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


def test_local_under_a_float16_autocast_keeps_the_variance_in_range() -> None:
    torch.manual_seed(0)
    layer = BayesConv2d(1, 1, 1, bias=False, estimator="local", rho_init=-3.0)
    with torch.no_grad():
        layer.weight_mu.zero_()
    x = torch.full((1, 1, 64, 64), 300.0)
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    y64 = y.double().flatten()
    assert torch.isfinite(y64).all()
    std = 300.0 * layer.weight_sigma.item()
    # standard error of the sample std of n normal draws: std / sqrt(2 n)
    assert abs(y64.std().item() - std) <= 5 * std / math.sqrt(2 * y64.numel())


def test_float16_local_zero_input_still_gives_the_mean_and_a_finite_gradient() -> None:
    layer = _local_half(-7.0)
    y = layer(torch.zeros(2, 1, 3, 3, dtype=torch.float16))
    assert (y == 0).all()
    y.sum().backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()
