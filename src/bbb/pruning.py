"""Signal-to-noise ratio of weights and pruning by it (Blundell et al. 2015, section 5.1).

The SNR of a weight is |mu| / sigma. Pruning removes the weights of lowest SNR: their mask is
set to zero, so they are exactly zero in every sampling mode and leave the KL. Biases are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

from .nn.module import BayesModule

__all__ = ["snr", "prune_by_snr", "remove_pruning", "PruneResult"]


def _named_layers(model: nn.Module) -> list[tuple[str, BayesModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesModule)]


@torch.no_grad()
def snr(model: nn.Module) -> dict[str, Tensor]:
    """|mu| / sigma of every weight, per Bayesian layer: ``{layer name: tensor shaped like W}``.

    Biases are not included. Pruned weights have SNR 0, and so has a weight with mu = 0 whose
    sigma underflowed to 0 (rho below ~-100 in float32: always exactly zero, 0/0 otherwise NaN,
    which :func:`prune_by_snr` would rank above every other weight).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _named_layers(model):
        value = _unmasked_snr(layer)
        if layer.weight_mask is not None:
            value = value * layer.weight_mask
        out[name] = value
    return out


def _unmasked_snr(layer: BayesModule) -> Tensor:
    """|mu| / sigma of the layer's weights (shape W), 0 where mu = 0 (also when sigma is 0)."""
    mu = layer.weight_mu.abs()
    return torch.where(mu == 0, 0.0, mu / layer.weight_sigma)


@dataclass
class PruneResult:
    """What :func:`prune_by_snr` did."""

    fraction: float  # fraction of weights removed overall
    threshold: float  # largest SNR removed (global mode; nan per layer)
    removed: int
    total: int
    per_layer: dict[str, float]  # fraction removed in each layer


def _floor_count(fraction: float, n: int) -> int:
    """floor(fraction * n) for the decimal the user wrote: ``0.29 * 100`` is
    28.999999999999996 in floats, so the fraction is read back from its shortest repr (29/100)."""
    return math.floor(Fraction(repr(float(fraction))) * n)


@torch.no_grad()
def prune_by_snr(model: nn.Module, fraction: float, *, per_layer: bool = False) -> PruneResult:
    """Remove the ``fraction`` of weights with the lowest SNR |mu| / sigma (in place).

    Args:
        model: a network with Bayesian layers.
        fraction: in [0, 1): the share of weights to remove.
        per_layer: ``False`` (the paper): one global threshold over the weights of all Bayesian
            layers; ``True``: remove ``fraction`` of each layer's weights.

    Exactly ``floor(fraction * n)`` weights are removed (ties broken by position). Pruning again
    starts from the unpruned SNRs, so ``prune_by_snr(m, 0.5)`` then ``0.75`` removes 75%.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction!r}")
    layers = _named_layers(model)
    if not layers:
        raise ValueError("prune_by_snr: the model has no Bayesian layers")
    scores = {}
    for name, layer in layers:
        layer.weight_mask = None
        scores[name] = _unmasked_snr(layer).flatten()
    per_layer_frac: dict[str, float] = {}
    threshold = float("nan")
    if per_layer:
        for name, layer in layers:
            s = scores[name]
            k = _floor_count(fraction, s.numel())
            mask = torch.ones_like(s)
            if k:
                mask[torch.argsort(s, stable=True)[:k]] = 0
            layer.weight_mask = mask.reshape(layer.weight_mu.shape)
            per_layer_frac[name] = k / s.numel()
    else:
        flat = torch.cat([scores[n].double() for n, _ in layers])
        k = _floor_count(fraction, flat.numel())
        mask = torch.ones_like(flat)
        if k:
            order = torch.argsort(flat, stable=True)
            mask[order[:k]] = 0
            threshold = float(flat[order[k - 1]])
        start = 0
        for name, layer in layers:
            n = layer.weight_mu.numel()
            m = mask[start : start + n].reshape(layer.weight_mu.shape).to(layer.weight_mu.dtype)
            layer.weight_mask = m
            per_layer_frac[name] = int((m == 0).sum()) / n
            start += n
    total = sum(layer.weight_mu.numel() for _, layer in layers)
    removed = sum(int((layer.weight_mask == 0).sum()) for _, layer in layers)  # type: ignore[union-attr]
    return PruneResult(removed / total, threshold, removed, total, per_layer_frac)


def remove_pruning(model: nn.Module) -> None:
    """Drop every pruning mask (weights come back with their trained mu and sigma)."""
    for _, layer in _named_layers(model):
        layer.weight_mask = None
