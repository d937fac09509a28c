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

Summed KLs (:func:`closed_form_kl_sum`, :func:`mc_kl_sum`) of float16/bfloat16 parameters are
computed in float32 and returned as float32 scalars (see :func:`kl_dtype`): the sum over a
layer's weights easily exceeds float16's largest value (65504).

Priors whose hyper-parameters are learnable (a :class:`~bbb.priors.Prior` subclass holding
``nn.Parameter`` objects) receive gradients from both summed KLs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch import distributions as D

from . import kernels as _kernels
from . import priors as _priors
from .priors import GaussianPrior, LaplacePrior, Prior, ScaleMixturePrior

_SCALAR_PRIORS = (GaussianPrior, LaplacePrior, ScaleMixturePrior)

__all__ = [
    "KL_MODES",
    "LOW_PRECISION_DTYPES",
    "kl_dtype",
    "register_closed_form",
    "has_closed_form",
    "closed_form_kl",
    "closed_form_kl_sum",
    "mc_kl",
    "mc_kl_sum",
    "gaussian_log_q",
    "resolve_kl_mode",
    "closed_form_prior_types",
]

KL_MODES = ("auto", "closed_form", "mc")

#: Parameter dtypes whose summed KL is computed in float32.
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def kl_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a summed KL of parameters of ``dtype`` is computed and returned in:
    float32 for float16/bfloat16, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def _all_above_switch(rho: Tensor) -> bool:
    """Whether every rho >= -20, where log(sigma) needs no guard (the fused KLs' fast path).

    Answered on CPU only: on an accelerator, reading the minimum back would stall the host
    once per layer and step (a device sync), which costs more than the guarded formulas, so
    those are used there (the same values to float rounding)."""
    return rho.numel() == 0 or (_cheap_host_read(rho) and bool(rho.min() >= _LOG_SIGMA_SWITCH))


def _cheap_host_read(t: Tensor) -> bool:
    """Whether reading a value of ``t`` back to Python costs no device sync (CPU tensors)."""
    return t.device.type == "cpu"


def _requires_grad(*tensors: object) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _transformed(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` is a torch.func transform's (batched or grad-tracked)."""
    return any(_priors._transformed(t) for t in tensors)


# (mu, sigma, log_sigma, prior_distribution) -> elementwise KL, shaped like mu.
ClosedForm = Callable[[Tensor, Tensor, Tensor, D.Distribution], Tensor]
_REGISTRY: dict[type[D.Distribution], ClosedForm] = {}
_CLOSED_FORM_CACHE: dict[type[D.Distribution], bool] = {}
_CACHED_TORCH_PAIRS = -1  # how many pairs torch.distributions.kl had when the cache was filled


def _check_prior_shape(p: D.Distribution, prior: Prior, shape: torch.Size) -> None:
    """Refuse a prior distribution whose batch shape does not broadcast to the parameter's
    ``shape`` unchanged: a per-weight prior's terms were broadcast against a layer's bias
    (a (4, 4) prior and a (4,) bias: a (4, 4) sum of the bias terms, a wrong KL, silently)."""
    batch = tuple(p.batch_shape)
    if not batch:
        return
    try:
        fits = torch.broadcast_shapes(batch, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"the prior {type(prior).__name__}'s distribution has batch shape {batch}, which "
            f"does not broadcast to a parameter of shape {tuple(shape)}: a layer's prior "
            "applies to each of its tensors (weight and bias), so a per-weight prior needs a "
            "shape every one of them takes (e.g. a layer with bias=False)"
        )


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
    loc, scale = _like(p.loc, mu), _like(p.scale, mu)
    inv_var_p = 0.5 / (scale * scale)
    return (sigma * sigma + (mu - loc) ** 2) * inv_var_p - log_sigma + (torch.log(scale) - 0.5)


def _like(hyper: Tensor, mu: Tensor) -> Tensor:
    """A prior's hyper-parameter in the dtype of ``mu`` (the same tensor where they agree).

    A float16/bfloat16 layer's prior holds float16/bfloat16 values while its KL is computed
    in float32 (:func:`kl_dtype`): a constant such as log(scale) computed in the prior's
    dtype carried its rounding error (up to ~2e-3 nats in bfloat16) into every weight's term,
    ~100 nats over 60k weights.
    """
    return hyper if hyper.dtype == mu.dtype else hyper.to(mu.dtype)


_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@register_closed_form(D.Laplace)
def _kl_normal_laplace(mu: Tensor, sigma: Tensor, log_sigma: Tensor, p: D.Distribution) -> Tensor:
    assert isinstance(p, D.Laplace)
    # -H(N(mu, sigma^2)) - E[log Laplace(w; m, b)] = log(2 b) - log sigma - log(2 pi e) / 2
    #   + E|w - m| / b, with E|w - m| = sigma sqrt(2/pi) exp(-d^2 / (2 sigma^2)) + d erf(d /
    # (sigma sqrt 2)), d = mu - m: written with the caller's log sigma, so that it stays finite
    # with finite gradients however small sigma is (issue: torch.distributions' version takes
    # log(sigma / b) itself and overflows below rho ~ -90 in float32)
    loc, scale = _like(p.loc, mu), _like(p.scale, mu)
    d = mu - loc
    # sigma floored at 1e-30 in the divisions only (E|w - m| moves by < 1e-30 / b), and beyond
    # |z| = 10 (exp(-z^2) < 4e-44, erf(z) = +-1 to as far as float64 resolves) E|w - m| = |d|:
    # both branches, and their gradients, stay finite for any rho
    z = d / (sigma.clamp_min(1e-30) * math.sqrt(2.0))
    near = z.abs() < 10.0
    zs = torch.where(near, z, 0.0)
    near_abs = sigma * _SQRT_2_OVER_PI * torch.exp(-zs * zs) + d * torch.erf(zs)
    mean_abs = torch.where(near, near_abs, d.abs())
    return torch.log(2 * scale) - log_sigma - _HALF_LOG_2PI_E + mean_abs / scale


def has_closed_form(prior: Prior) -> bool:
    """Whether the Gaussian posterior has a closed-form KL to ``prior``.

    True for the types in this module's registry and for every pair that
    ``torch.distributions.kl`` registers with ``Normal`` first (found by asking it once per
    prior type: it raises ``NotImplementedError`` where it has none).
    """
    p = prior.distribution()
    t = type(p)
    # a pair registered with torch.distributions.kl.register_kl after a prior type was first
    # asked about would not be seen by a stale "no": start over when torch's registry grew
    global _CACHED_TORCH_PAIRS
    pairs = len(getattr(D.kl, "_KL_REGISTRY", ()))
    if pairs != _CACHED_TORCH_PAIRS:
        _CLOSED_FORM_CACHE.clear()
        _CACHED_TORCH_PAIRS = pairs
    if t not in _CLOSED_FORM_CACHE:
        if t in _REGISTRY:
            _CLOSED_FORM_CACHE[t] = True
        else:
            # on the CPU (0-d: they meet a prior's tensors on any device), not on the
            # default device, which may be "meta" (no values) or a GPU
            zero, one = torch.zeros((), device="cpu"), torch.ones((), device="cpu")
            q = D.Normal(zero, one, validate_args=False)
            try:
                D.kl_divergence(q, p)
                _CLOSED_FORM_CACHE[t] = True
            except NotImplementedError:
                _CLOSED_FORM_CACHE[t] = False
    return _CLOSED_FORM_CACHE[t]


def closed_form_prior_types() -> list[str]:
    """Names of the prior distribution types with a closed-form KL from a Normal posterior:
    this module's registry and the pairs ``torch.distributions.kl`` registers with ``Normal``
    (or a base class of it) first."""
    names = {t.__name__ for t in _REGISTRY}
    names.update(
        q.__name__
        for (p, q) in getattr(D.kl, "_KL_REGISTRY", {})
        if isinstance(p, type) and issubclass(D.Normal, p) and q is not D.ExponentialFamily
    )
    return sorted(names)


def _no_closed_form_message(prior: Prior) -> str:
    dist = type(prior.distribution()).__name__
    return (
        f"kl='closed_form' is not available for a Normal posterior and a "
        f"{type(prior).__name__} ({dist}); use kl='mc' or kl='auto' (Monte Carlo where there "
        f"is no closed form). Closed forms exist for the prior distributions "
        f"{', '.join(closed_form_prior_types())} (GaussianPrior: Normal, LaplacePrior: "
        "Laplace; a prior of bounded support gives KL = inf)"
    )


def _no_closed_form_error(prior: Prior) -> NotImplementedError:
    """The error of the KL functions asked for a closed form that does not exist (torch's
    message, which named neither the prior nor the alternatives, is kept at the end)."""
    dist = type(prior.distribution()).__name__
    return NotImplementedError(
        f"{_no_closed_form_message(prior)}. (torch.distributions: No KL(p || q) is "
        f"implemented for p type Normal and q type {dist})"
    )


def resolve_kl_mode(kl: str, prior: Prior) -> str:
    """Validate a ``kl`` option and resolve ``"auto"`` to ``"closed_form"`` or ``"mc"``."""
    if kl not in KL_MODES:
        raise ValueError(f"unknown kl mode {kl!r}; accepted values: {', '.join(KL_MODES)}")
    closed = has_closed_form(prior)
    if kl == "auto":
        return "closed_form" if closed else "mc"
    if kl == "closed_form" and not closed:
        raise ValueError(_no_closed_form_message(prior))
    return kl


def closed_form_kl(
    mu: Tensor, sigma: Tensor, prior: Prior, log_sigma: Tensor | None = None
) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || prior), shaped like ``mu`` (nats)."""
    if log_sigma is None:
        log_sigma = torch.log(sigma)
    return _closed_form_terms_of(mu, sigma, log_sigma, prior)


def _closed_form_terms_of(mu: Tensor, sigma: Tensor, log_sigma: Tensor, prior: Prior) -> Tensor:
    """:func:`_closed_form_terms` for ``prior``; no closed form is an error naming the prior
    and the supported ones (torch's bare 'No KL(p || q) is implemented for p type Normal ...'
    named neither)."""
    try:
        return _closed_form_terms(mu, sigma, log_sigma, prior.distribution())
    except NotImplementedError:
        if has_closed_form(prior):
            raise
        raise _no_closed_form_error(prior) from None


def _closed_form_terms(mu: Tensor, sigma: Tensor, log_sigma: Tensor, p: D.Distribution) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || p) for the prior's distribution ``p`` (shape of mu)."""
    fn = _REGISTRY.get(type(p))
    if fn is not None:
        return fn(mu, sigma, log_sigma, p)
    return D.kl_divergence(D.Normal(mu, sigma, validate_args=False), p)


_LOG_SIGMA_SWITCH = -20.0  # below this rho, log(softplus(rho)) == rho to float precision


def softplus_and_log(rho: Tensor) -> tuple[Tensor, Tensor]:
    """sigma = softplus(rho) and log(sigma), both finite with finite gradients for any rho."""
    sigma = torch.nn.functional.softplus(rho)
    return sigma, log_softplus(rho, sigma)


def log_softplus(rho: Tensor, sigma: Tensor) -> Tensor:
    """log(sigma) for ``sigma = softplus(rho)``: ``rho`` itself below -20 (where they agree to
    float precision and log would underflow), else ``log(sigma)`` (clamped at the smallest
    normal number, which passes no gradient)."""
    tiny = torch.finfo(rho.dtype).tiny
    return torch.where(rho < _LOG_SIGMA_SWITCH, rho, torch.log(sigma.clamp_min(tiny)))


class _GaussianKLCtx(_kernels._Ctx):
    fast: bool
    loc: float
    inv_var: float


class _GaussianKLSum(torch.autograd.Function):
    """sum_j mask_j KL(N(mu_j, sigma_j^2) || N(loc, scale^2)), sigma = softplus(rho), fused.

    The elementwise autograd graph of the closed form costs ~15 passes over the weights forward
    and as many backward (issue 8: ~20 ms at 2.4M weights). Here the forward is two dot products
    and one log-sum, and the backward writes the closed-form gradients directly:

        d/dmu  = g (mu - loc) / scale^2
        d/drho = g (sigma / scale^2 - dlog(sigma)/dsigma) * sigmoid(rho)

    with ``dlog(sigma)/drho = sigmoid(rho) / sigma`` (1 below rho = -20, where log sigma is
    taken as rho: same as :func:`log_softplus`, so values and gradients are those of the
    elementwise formula). ``sigma`` may be passed in (the forward pass's softplus, detached) to
    save a softplus; gradients always flow to ``rho`` through the formula above.
    """

    @staticmethod
    def forward(
        ctx: _GaussianKLCtx,
        mu: Tensor,
        rho: Tensor,
        sigma: Tensor | None,
        mask: Tensor | None,
        loc: float,
        scale: float,
    ) -> Tensor:
        if sigma is None:
            sigma = torch.nn.functional.softplus(rho)
        inv_var = 1.0 / (scale * scale)
        d = mu if loc == 0.0 else mu - loc
        # Fast path (no mask, every rho >= -20, the usual case): log(sigma) needs no guard.
        fast = mask is None and _all_above_switch(rho)
        if fast:
            sq = torch.dot(sigma.reshape(-1), sigma.reshape(-1)) + torch.dot(
                d.reshape(-1), d.reshape(-1)
            )
            kl = 0.5 * inv_var * sq - torch.log(sigma).sum() + rho.numel() * (math.log(scale) - 0.5)
        else:
            log_sigma = log_softplus(rho, sigma)
            term = (sigma * sigma + d * d) * (0.5 * inv_var) - log_sigma + (math.log(scale) - 0.5)
            kl = (term if mask is None else term * mask).sum()
        ctx.save_for_backward(mu, rho, sigma, mask)
        ctx.fast = fast
        ctx.loc, ctx.inv_var = loc, inv_var
        return kl

    @staticmethod
    def backward(
        ctx: _GaussianKLCtx, g: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        mu, rho, sigma, mask = ctx.saved_tensors
        inv_var: float = ctx.inv_var
        if torch.is_grad_enabled():
            # create_graph=True (double backward, hessian): the closed form's gradients written
            # with autograd from mu and rho, so that their own derivatives exist (the formulas
            # below have no graph through sigma, which is passed in detached)
            gm2, gr2 = _gaussian_kl_grads2(ctx, mu, rho, mask, g)
            return gm2, gr2, None, None, None, None
        if ctx.fast and _kernels.get_kernels() == "compile":
            # one fused loop instead of ~6 passes (bbb.kernels)
            gm, gr = _kernels.gaussian_kl_grads(mu, rho, sigma, g, ctx.loc, inv_var)
            return gm, gr, None, None, None, None
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            d = mu if ctx.loc == 0.0 else mu - ctx.loc
            grad_mu = d * (g * inv_var)
            if mask is not None:
                grad_mu.mul_(mask)
        if ctx.needs_input_grad[1]:
            sig = torch.sigmoid(rho)
            if ctx.fast:
                # (1/sigma - sigma/scale^2) * sigmoid(rho) * (-g): 4 passes
                t = torch.reciprocal(sigma).add_(sigma, alpha=-inv_var).mul_(sig)
                # a backward batched by vmap (bbb.kernels._batched): g has a batch dimension
                # that t lacks, so t cannot take the product in place
                grad_rho = t * (-g) if _kernels._batched(g) else t.mul_(-g)
            else:
                tiny = torch.finfo(rho.dtype).tiny
                dlog = torch.where(
                    rho < _LOG_SIGMA_SWITCH, 1.0, sig / sigma.clamp_min(tiny) * (sigma > tiny)
                )
                grad_rho = (sigma * sig * inv_var - dlog) * g
                if mask is not None:
                    grad_rho.mul_(mask)
        return grad_mu, grad_rho, None, None, None, None


def _gaussian_kl_grads2(
    ctx: _GaussianKLCtx,
    mu: Tensor,
    rho: Tensor,
    mask: Tensor | None,
    g: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """:class:`_GaussianKLSum`'s gradients with a graph (``create_graph=True``)."""
    needs = ctx.needs_input_grad[:2]
    wrt = [t for t, need in zip((mu, rho), needs, strict=True) if need]
    with torch.enable_grad():
        sigma, log_sigma = softplus_and_log(rho)
        d = mu - ctx.loc
        term = (sigma * sigma + d * d) * (0.5 * ctx.inv_var) - log_sigma
        kl = (term if mask is None else term * mask).sum()
        got = iter(torch.autograd.grad(kl, wrt, g, create_graph=True, allow_unused=True))
    grad_mu = next(got) if needs[0] else None
    return grad_mu, next(got) if needs[1] else None


def _gaussian_kl_ops(
    mu: Tensor, rho: Tensor, mask: Tensor | None, loc: float, scale: float
) -> Tensor:
    """:class:`_GaussianKLSum`'s value as plain differentiable operations (its guarded
    formula: the same terms, with log(sigma) from :func:`log_softplus`), for torch.func."""
    sigma, log_sigma = softplus_and_log(rho)
    d = mu - loc
    term = (sigma * sigma + d * d) * (0.5 / (scale * scale)) - log_sigma + (math.log(scale) - 0.5)
    return (term if mask is None else term * mask).sum()


def closed_form_kl_sum(
    mu: Tensor,
    rho: Tensor,
    prior: Prior,
    *,
    sigma: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """sum_j mask_j KL(N(mu_j, softplus(rho_j)^2) || prior), a scalar that backpropagates.

    Args:
        mu, rho: posterior parameters (shape W).
        prior: the prior; gradients also reach its parameters, if it has learnable ones.
        sigma: ``softplus(rho)`` (shape W) if already computed (its graph is not used:
            gradients reach ``rho`` directly).
        mask: optional 0/1 mask (shape W): masked weights contribute nothing (pruning).

    Returns:
        A scalar in :func:`kl_dtype` of ``mu.dtype`` (float32 for float16/bfloat16
        parameters, whose terms and sum are computed in float32).

    A Gaussian prior with fixed hyper-parameters goes through a fused autograd function
    (:class:`_GaussianKLSum`); other priors, and a Gaussian with learnable hyper-parameters,
    through the elementwise :func:`closed_form_kl` and autograd.
    """
    if tuple(rho.shape) != tuple(mu.shape) or (mask is not None and mask.shape != mu.shape):
        # a mask of another shape was broadcast (or summed over a larger shape): wrong KL
        got = f"rho {tuple(rho.shape)}" + ("" if mask is None else f", mask {tuple(mask.shape)}")
        raise ValueError(
            f"closed_form_kl_sum: rho and mask must be shaped like mu {tuple(mu.shape)}, got {got}"
        )
    if mu.dtype in LOW_PRECISION_DTYPES:
        # differentiable casts: gradients flow back to the low-precision parameters
        mu, rho, sigma = mu.float(), rho.float(), None  # sigma recomputed in float32
    p = None
    loc_scale: tuple[float, float] | None = None
    # inside torch.func transforms, hyper-parameters that are the transform's tensors (vmap
    # over an ensemble's stacked buffers) have no float value: the elementwise formula
    held = _kernels._functorch_active() and prior._hyper_transformed()
    if type(prior) is GaussianPrior and not prior._parameters and not held:
        # the built-in Gaussian prior's fixed values as floats: no distribution object and
        # no read of its buffers (a device sync per layer and step on a GPU)
        loc_scale = prior._value("mean"), prior._value("sigma")
    else:
        p = prior.distribution()
        if type(prior) is LaplacePrior and prior.scale.dtype != mu.dtype:
            # a float16/bfloat16 prior's hyper-parameters at their exact values in the KL's
            # float32 (their rounding moved each weight's term, ~34 nats over 60k weights)
            p = D.Laplace(prior._hyper("loc", mu), prior._hyper("scale", mu), validate_args=False)
        if (
            type(p) is D.Normal
            and p.loc.dim() == 0
            and p.scale.dim() == 0
            # learnable hyper-parameters: the fused function would convert them to Python
            # floats and drop their gradients
            and not _requires_grad(p.loc, p.scale)
            and not (_kernels._functorch_active() and _transformed(p.loc, p.scale))
        ):
            loc_scale = float(p.loc), float(p.scale)
    if loc_scale is not None:
        m = None if mask is None else mask.to(mu.dtype)
        if _kernels._functorch_active():
            # inside torch.func transforms (grad, vmap, jacrev, jacfwd, hessian): the fused
            # function has no setup_context (RuntimeError) and reads rho's minimum back (data-
            # dependent control flow, which vmap refuses); the elementwise formula it fuses,
            # as plain operations, which every transform takes (derivatives of any order)
            return _gaussian_kl_ops(mu, rho, m, *loc_scale)
        s = None if sigma is None else sigma.detach()
        return _GaussianKLSum.apply(mu, rho, s, m, *loc_scale)
    assert p is not None
    _check_prior_shape(p, prior, mu.shape)
    sig, log_sigma = softplus_and_log(rho)
    try:
        term = _closed_form_terms(mu, sig, log_sigma, p)
    except NotImplementedError:
        if has_closed_form(prior):
            raise
        raise _no_closed_form_error(prior) from None
    return (term if mask is None else term * mask.to(term.dtype)).sum()


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


_MC_FIRST_ORDER = (
    "bbb: the Monte Carlo KL's gradients are first-order only (written in closed form "
    "without a graph); for a second derivative (create_graph=True: double backward, hessian, "
    "gradient penalties) sum the elementwise bbb.kl.mc_kl yourself, or use the closed-form KL"
)


class _MCKLCtx(_kernels._Ctx):
    prior: Prior
    fast: bool


class _MCKLSum(torch.autograd.Function):
    """(1/S) sum_{s,j} mask_j [log q(w_sj) - log p(w_sj)] at ``w = mu + sigma * eps``, fused.

    ``log_p`` is ``(1/S) sum_{s,j} mask_j log p(w_sj)``, computed by the caller outside this
    function (:func:`mc_kl_sum`), so that autograd takes its gradient to the prior's learnable
    hyper-parameters, if any (here: d/dlog_p = -g); with a fixed prior it has no graph.

    The elementwise autograd graph of the Monte Carlo KL costs ~25 passes over the weights for
    the scale-mixture prior (logaddexp and its backward; issue 8, and most of a bandit update
    in issue 6). Here the forward is a dot product, a log-sum and the prior's log-density sum,
    and the backward writes the pathwise gradients directly, with ``s = -d log p(w) / dw``:

        d/dmu  = g mean_s(s)
        d/drho = g (mean_s(s eps) sigmoid(rho) - dlog(sigma)/drho)

    (log q(w) along the path ``w = mu + sigma eps`` is ``-eps^2/2 - log sigma - log(2 pi)/2``,
    so its gradient is only through ``log sigma``). ``dlog(sigma)/drho`` follows
    :func:`log_softplus` (1 below rho = -20). Values and gradients equal those of the
    elementwise :func:`mc_kl` summed and averaged over the S samples.
    """

    @staticmethod
    def forward(
        ctx: _MCKLCtx,
        mu: Tensor,
        rho: Tensor,
        sigma: Tensor,
        eps: Tensor,
        w: Tensor,
        mask: Tensor | None,
        prior: Prior,
        log_p: Tensor,
    ) -> Tensor:
        num_samples = eps.shape[0]
        fast = mask is None and _all_above_switch(rho)
        if fast:
            e = eps.reshape(-1)
            log_q = (
                torch.dot(e, e) * (-0.5 / num_samples)
                - torch.log(sigma).sum()
                - rho.numel() * _HALF_LOG_2PI
            )
        else:
            log_sigma = log_softplus(rho, sigma)
            lq = (eps * eps).sum(0) * (-0.5 / num_samples) - log_sigma - _HALF_LOG_2PI
            if mask is not None:
                lq = lq * mask
            log_q = lq.sum()
        ctx.save_for_backward(rho, sigma, eps, w, mask, mu)
        ctx.prior = prior
        ctx.fast = fast
        return log_q - log_p

    @staticmethod
    def backward(ctx: _MCKLCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        rho, sigma, eps, w, mask, mu = ctx.saved_tensors
        grad_log_p = -g if ctx.needs_input_grad[7] else None
        with torch.no_grad():  # closed-form gradients: no graph
            grad_mu, grad_rho = _MCKLSum._grads(ctx, rho, sigma, eps, w, mask, g)
        # create_graph=True: a second derivative of these gradients is refused, not zero
        grad_mu, grad_rho = _kernels.first_order_only(
            _MC_FIRST_ORDER, (grad_mu, grad_rho), (mu, rho)
        )
        return grad_mu, grad_rho, None, None, None, None, None, grad_log_p

    @staticmethod
    def _grads(
        ctx: _MCKLCtx,
        rho: Tensor,
        sigma: Tensor,
        eps: Tensor,
        w: Tensor,
        mask: Tensor | None,
        g: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        if ctx.fast and _kernels.get_kernels() == "compile":
            # score, both gradients and the sample mean in one fused loop (bbb.kernels)
            return _kernels.mc_kl_grads(ctx.prior, w, eps, rho, sigma, g)
        num_samples = eps.shape[0]
        score = ctx.prior.grad_log_prob(w).neg_()  # (S, *W): d(-log p)/dw
        grad_mu = grad_rho = None
        scale = g / num_samples
        # a backward batched by vmap (bbb.kernels._batched): g, so scale, has a batch
        # dimension that the sums lack; they cannot take the product in place
        batched = _kernels._batched(g)
        if ctx.needs_input_grad[0]:
            grad_mu = score.sum(0) * scale if batched else score.sum(0).mul_(scale)
            if mask is not None:
                grad_mu.mul_(mask)
        if ctx.needs_input_grad[1]:
            sig = torch.sigmoid(rho)
            if ctx.fast:
                dlog = sig / sigma
            else:
                tiny = torch.finfo(rho.dtype).tiny
                dlog = torch.where(
                    rho < _LOG_SIGMA_SWITCH, 1.0, sig / sigma.clamp_min(tiny) * (sigma > tiny)
                )
            sums = score.mul_(eps).sum(0)
            grad_rho = (sums * scale if batched else sums.mul_(scale)).mul_(sig).sub_(dlog * g)
            if mask is not None:
                grad_rho.mul_(mask)
        return grad_mu, grad_rho


def _check_mc_shapes(
    mu: Tensor, rho: Tensor, eps: Tensor, w: Tensor | None, mask: Tensor | None
) -> None:
    """Refuse noise (or a sample, or a mask) not shaped (S, *W) (mask: W) for parameters W.

    ``eps`` shaped like ``mu`` (no sample dimension) was read as ``mu.shape[0]`` samples and
    broadcast: the estimate came out silently wrong (negative, for a KL)."""
    shape = tuple(mu.shape)
    if tuple(rho.shape) != shape:
        raise ValueError(f"mc_kl_sum: mu {shape} and rho {tuple(rho.shape)} differ in shape")
    if eps.dim() != mu.dim() + 1 or tuple(eps.shape[1:]) != shape or eps.shape[0] < 1:
        raise ValueError(
            f"mc_kl_sum: eps must be (S, *W) = (S, {', '.join(map(str, shape))}) for "
            f"parameters of shape {shape}, got {tuple(eps.shape)} (add a leading sample "
            "dimension for one sample: eps[None])"
        )
    if w is not None and tuple(w.shape) != tuple(eps.shape):
        raise ValueError(
            f"mc_kl_sum: the weight sample w must be shaped like eps {tuple(eps.shape)}, "
            f"got {tuple(w.shape)}"
        )
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"mc_kl_sum: mask must be shaped like mu {shape}, got {tuple(mask.shape)}")


def mc_kl_sum(
    mu: Tensor,
    rho: Tensor,
    eps: Tensor,
    prior: Prior,
    *,
    sigma: Tensor | None = None,
    w: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Monte Carlo KL summed over weights and averaged over samples, a scalar that backpropagates.

    Args:
        mu, rho: posterior parameters (shape W); ``sigma = softplus(rho)``.
        eps: standard normal noise (S, *W) of the S weight samples ``w = mu + sigma * eps``.
        prior: the prior (its ``log_prob`` and ``grad_log_prob`` are used).
        sigma: ``softplus(rho)`` if already computed (detached: gradients reach ``rho`` by the
            closed-form backward of :class:`_MCKLSum`).
        w: the weight sample if already built (detached), else built here.
        mask: optional 0/1 mask (shape W): masked weights contribute nothing (pruning).

    Returns:
        A scalar in :func:`kl_dtype` of ``mu.dtype`` (float32 for float16/bfloat16
        parameters, whose terms and sum are computed in float32).

    Same value and gradients as ``mc_kl(w, eps, log_sigma, prior)`` masked, summed and divided
    by S, in a few passes (see :class:`_MCKLSum`). Gradients also reach the prior's learnable
    hyper-parameters, if any (through its ``log_prob`` at the detached sample).
    """
    _check_mc_shapes(mu, rho, eps, w, mask)
    if type(prior) not in _SCALAR_PRIORS:  # the built-in priors' values are scalars
        _check_prior_shape(prior.distribution(), prior, mu.shape)
    if mu.dtype in LOW_PRECISION_DTYPES:
        # differentiable casts: gradients flow back to the low-precision parameters; the
        # forward's sample w is kept (upcast), sigma is recomputed in float32
        mu, rho, eps, sigma = mu.float(), rho.float(), eps.float(), None
        w = None if w is None else w.float()
    m = None if mask is None else mask.to(mu.dtype)
    if _kernels._functorch_active():
        # inside torch.func transforms: plain operations (see closed_form_kl_sum)
        return _mc_kl_ops(mu, rho, eps, prior, w, m)
    sigma = torch.nn.functional.softplus(rho.detach()) if sigma is None else sigma.detach()
    if w is None:
        with torch.no_grad():
            if m is None:
                w = torch.addcmul(mu, sigma, eps)
            else:
                w = torch.addcmul(mu * m, sigma * m, eps)
    w = w.detach()
    num_samples = eps.shape[0]
    # (1/S) sum log p(w), outside the fused function: its graph (if the prior has learnable
    # hyper-parameters; none otherwise) carries their gradients
    if m is None:
        log_p = _kernels.mc_log_prob_sum(prior, w) / num_samples
    else:
        log_p = (prior.log_prob(w).sum(0) * m).sum() / num_samples
    return _MCKLSum.apply(mu, rho, sigma, eps, w, m, prior, log_p)


def _mc_kl_ops(
    mu: Tensor, rho: Tensor, eps: Tensor, prior: Prior, w: Tensor | None, mask: Tensor | None
) -> Tensor:
    """:class:`_MCKLSum`'s value as plain differentiable operations, for torch.func.

    The sample's gradient is the pathwise one, through ``mu + sigma * eps`` (the layer's
    ``w``, if given, keeps its value: the path's value is added and taken off again, so the
    estimate is the one at the forward pass's sample), and the log-density is the prior's
    ``log_prob``, so that derivatives of any order exist and learnable hyper-parameters get
    theirs."""
    sigma, log_sigma = softplus_and_log(rho)
    if mask is None:
        path = torch.addcmul(mu, sigma, eps)
    else:
        path = torch.addcmul(mu * mask, sigma * mask, eps)
    if w is not None:
        path = w.detach() + (path - path.detach())
    terms = gaussian_log_q(eps, log_sigma) - prior.log_prob(path)
    if mask is not None:
        terms = terms * mask
    return terms.sum() / eps.shape[0]
