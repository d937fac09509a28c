"""The toy regression curve of Blundell et al. (2015), section 5.2.

    y = x + 0.3 sin(2 pi (x + e)) + 0.3 sin(4 pi (x + e)) + e,   e ~ N(0, 0.02)

with the training inputs x drawn uniformly from [0, 0.5]; the noise variance is 0.02
(standard deviation sqrt(0.02) ~= 0.141). Outside [0, 0.5] there is no data, which is where a
Bayesian network's predictive uncertainty should grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["ToyCurve", "load_toy", "toy_curve", "toy_curve_function"]


def toy_curve_function(x: Tensor, noise: Tensor | float = 0.0) -> Tensor:
    """The curve evaluated at ``x`` with noise ``noise`` (0 gives the noise-free curve).

    Args:
        x: inputs, any shape.
        noise: the noise ``e`` (broadcast against ``x``); enters both inside the sines and
            additively, as in the paper.

    Returns:
        ``x + 0.3 sin(2 pi (x + e)) + 0.3 sin(4 pi (x + e)) + e``, same shape as ``x``.
    """
    z = x + noise
    return x + 0.3 * torch.sin(2 * math.pi * z) + 0.3 * torch.sin(4 * math.pi * z) + noise


def _generator(seed: int | None) -> torch.Generator | None:
    """A seeded CPU generator, or None (the global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed)


def _sample(
    n: int,
    low: float,
    high: float,
    noise_var: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` noisy points from ``generator``; see `toy_curve`."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low and high must be finite, got low={low}, high={high}")
    if not high > low:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    if not (math.isfinite(noise_var) and noise_var >= 0):  # (NaN fails every comparison)
        raise ValueError(f"noise_var must be a finite non-negative number, got {noise_var}")
    x = low + (high - low) * torch.rand(n, 1, generator=generator, dtype=dtype)
    e = math.sqrt(noise_var) * torch.randn(n, 1, generator=generator, dtype=dtype)
    return x, toy_curve_function(x, e)


def toy_curve(
    n: int = 100,
    *,
    low: float = 0.0,
    high: float = 0.5,
    noise_var: float = 0.02,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Sample ``n`` points of the noisy toy curve.

    Args:
        n: number of points.
        low, high: x ~ U[low, high].
        noise_var: variance of the Gaussian noise e (0.02 in the paper).
        seed: seed of a private generator (same seed, same data); None uses torch's global RNG.
        dtype: floating dtype of the outputs.

    Returns:
        ``(x, y)``, both of shape (n, 1).
    """
    return _sample(n, low, high, noise_var, _generator(seed), dtype)


@dataclass(frozen=True)
class ToyCurve:
    """Configuration of the toy regression problem (defaults: the paper's)."""

    low: float = 0.0
    high: float = 0.5
    noise_var: float = 0.02

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise e."""
        return math.sqrt(self.noise_var)

    def function(self, x: Tensor) -> Tensor:
        """The noise-free curve at ``x`` (any shape)."""
        return toy_curve_function(x)

    def sample(
        self, n: int, *, seed: int | None = 0, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """``n`` noisy points ``(x, y)`` of shape (n, 1); see `toy_curve`."""
        return toy_curve(
            n, low=self.low, high=self.high, noise_var=self.noise_var, seed=seed, dtype=dtype
        )

    def grid(
        self, n: int = 500, *, margin: float = 0.5, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Evenly spaced inputs of shape (n, 1) covering [low - margin, high + margin].

        Useful for plotting the predictive distribution beyond the training range.
        """
        x = torch.linspace(self.low - margin, self.high + margin, n, dtype=dtype)
        return x.unsqueeze(1)


def load_toy(
    n_train: int = 100,
    n_val: int = 100,
    *,
    curve: ToyCurve | None = None,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[TensorDataset, TensorDataset]:
    """Independent train and validation sets from the toy curve.

    Both are drawn in sequence from one generator seeded with ``seed``, so they never share
    points and are reproducible.

    Returns:
        ``(train, val)``: `TensorDataset` of ``(x, y)`` with shapes (n_train, 1) / (n_val, 1).
    """
    curve = curve or ToyCurve()
    gen = _generator(seed)
    train = _sample(n_train, curve.low, curve.high, curve.noise_var, gen, dtype)
    val = _sample(n_val, curve.low, curve.high, curve.noise_var, gen, dtype)
    return TensorDataset(*train), TensorDataset(*val)
