"""KL divergence between the factorised Gaussian posterior and a prior.

Two ways, chosen per layer by the ``kl`` option:

- ``"closed_form"``: sum over weights of KL(N(mu, sigma^2) || p) where the pair
  (``Normal``, type of ``prior.distribution()``) has a closed form. Closed forms are looked up
  first in this module's own registry (fast fused formulas, currently Normal-Normal) and then in
  the registry of ``torch.distributions.kl`` (which also covers Normal-Laplace, Normal-Uniform,
  ...). Asking for it where none exists raises an error naming the pair.
- ``"mc"``: the single-sample Monte Carlo estimate log q(w) - log p(w) at a weight sample
  ``w = mu + sigma * eps`` (Blundell et al. 2015, eq. 2), unbiased for the KL.
- ``"auto"``: closed form when it exists, otherwise Monte Carlo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch import distributions as D

from .priors import Prior

__all__ = [
    "KL_MODES",
    "register_closed_form",
    "has_closed_form",
    "closed_form_kl",
    "mc_kl",
    "gaussian_log_q",
    "resolve_kl_mode",
]

KL_MODES = ("auto", "closed_form", "mc")

# (mu, sigma, log_sigma, prior_distribution) -> elementwise KL, shaped like mu.
ClosedForm = Callable[[Tensor, Tensor, Tensor, D.Distribution], Tensor]
_REGISTRY: dict[type[D.Distribution], ClosedForm] = {}
_CLOSED_FORM_CACHE: dict[type[D.Distribution], bool] = {}


def register_closed_form(prior_type: type[D.Distribution]) -> Callable[[ClosedForm], ClosedForm]:
    """Decorator: register a fast elementwise KL(N(mu, sigma^2) || prior) for a prior type."""

    def deco(fn: ClosedForm) -> ClosedForm:
        _REGISTRY[prior_type] = fn
        _CLOSED_FORM_CACHE.pop(prior_type, None)
        return fn

    return deco


@register_closed_form(D.Normal)
def _kl_normal_normal(mu: Tensor, sigma: Tensor, log_sigma: Tensor, p: D.Distribution) -> Tensor:
    assert isinstance(p, D.Normal)
    # log(s_p / sigma) + (sigma^2 + (mu - m_p)^2) / (2 s_p^2) - 1/2, with log sigma supplied
    # by the caller so that no second softplus/log pass is needed.
    inv_var_p = 0.5 / (p.scale * p.scale)
    return (sigma * sigma + (mu - p.loc) ** 2) * inv_var_p - log_sigma + (torch.log(p.scale) - 0.5)


def has_closed_form(prior: Prior) -> bool:
    """Whether the Gaussian posterior has a closed-form KL to ``prior``.

    True for the types in this module's registry and for every pair that
    ``torch.distributions.kl`` registers with ``Normal`` first (found by asking it once per
    prior type: it raises ``NotImplementedError`` where it has none).
    """
    p = prior.distribution()
    t = type(p)
    if t not in _CLOSED_FORM_CACHE:
        if t in _REGISTRY:
            _CLOSED_FORM_CACHE[t] = True
        else:
            q = D.Normal(torch.zeros(()), torch.ones(()), validate_args=False)
            try:
                D.kl_divergence(q, p)
                _CLOSED_FORM_CACHE[t] = True
            except NotImplementedError:
                _CLOSED_FORM_CACHE[t] = False
    return _CLOSED_FORM_CACHE[t]


def resolve_kl_mode(kl: str, prior: Prior) -> str:
    """Validate a ``kl`` option and resolve ``"auto"`` to ``"closed_form"`` or ``"mc"``."""
    if kl not in KL_MODES:
        raise ValueError(f"unknown kl mode {kl!r}; accepted values: {', '.join(KL_MODES)}")
    closed = has_closed_form(prior)
    if kl == "auto":
        return "closed_form" if closed else "mc"
    if kl == "closed_form" and not closed:
        dist = type(prior.distribution()).__name__
        raise ValueError(
            f"kl='closed_form' is not available for a Normal posterior and a "
            f"{type(prior).__name__} ({dist}); use kl='mc' or kl='auto'"
        )
    return kl


def closed_form_kl(
    mu: Tensor, sigma: Tensor, prior: Prior, log_sigma: Tensor | None = None
) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || prior), shaped like ``mu`` (nats)."""
    p = prior.distribution()
    if log_sigma is None:
        log_sigma = torch.log(sigma)
    fn = _REGISTRY.get(type(p))
    if fn is not None:
        return fn(mu, sigma, log_sigma, p)
    return D.kl_divergence(D.Normal(mu, sigma, validate_args=False), p)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_q(eps: Tensor, log_sigma: Tensor) -> Tensor:
    """Elementwise log N(w; mu, sigma^2) at ``w = mu + sigma * eps``, written in ``eps``.

    This equals the log-density as a function of (mu, rho) along the reparameterised path, so
    its total gradient is the one of the paper's update; writing it in ``eps`` avoids the
    cancellation in ``(w - mu) / sigma`` when sigma is tiny.
    """
    return -0.5 * eps * eps - log_sigma - _HALF_LOG_2PI


def mc_kl(w: Tensor, eps: Tensor, log_sigma: Tensor, prior: Prior) -> Tensor:
    """Elementwise single-sample estimate log q(w) - log p(w) for ``w = mu + sigma * eps``."""
    return gaussian_log_q(eps, log_sigma) - prior.log_prob(w)
