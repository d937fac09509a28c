"""Elementwise kernels of the weight sample and the KL: eager, ``torch.compile`` or native C.

The fused KL functions of :mod:`bbb.kl` write their gradients in closed form, but in eager
PyTorch each arithmetic operation is still one pass over all weights (2.4M at MLP 784-1200-1200):
the scale-mixture Monte Carlo KL's backward is ~10 passes, the Gaussian closed form's ~4.
``torch.compile`` fuses each kernel into one loop (issue 8). The random numbers are drawn
outside (``torch.compile`` of in-kernel random numbers on CPU was slower, issue 8), so the
compiled kernels compute exactly the eager formulas, to float rounding.

Backends (a process-wide setting, :func:`set_kernels`; ``bbb train --kernels compile``):

- ``"eager"`` (default): plain PyTorch operations, no compilation.
- ``"compile"``: each kernel is compiled on first use (a few seconds per kernel and weight
  shape, once per process) and reused. Where compilation fails (no C++ compiler, an
  unsupported platform, dtype or device), a warning says so once per kernel and argument
  types (dtypes, devices, ranks), naming them and why, and the eager kernel runs for those
  argument types from then on, the compiled one for the others (where ``torch.compile``
  itself raises, for all): training never stops because of the backend.
- ``"native"``: a small C library (:mod:`bbb._native`, built once with the system C compiler,
  under a second, and cached) draws the weight noise (Threefry-2x32-20 counters and the
  Box-Muller transform, vectorized: 2-5x faster than ``torch.randn`` on CPU) for every Bayesian
  layer on float32 CPU tensors, and for the closed-form Gaussian-prior KL or the scale
  mixture's Monte Carlo KL computes the weight sample, softplus and KL in one pass and both
  gradients in one more (:func:`native_prior`; first-order gradients only). The noise has the same
  distribution as ``torch.randn``'s (i.i.d. N(0, 1)) and is a function of ``torch.manual_seed``,
  but not the same numbers. Where the library cannot be built (no C compiler), one warning says
  why and the eager kernels are used.

Only the common fast paths are compiled (no pruning mask, every rho >= -20); other cases, and
priors without a kernel here (a user-defined :class:`~bbb.priors.Prior`), run eagerly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from . import _native
from .priors import GaussianPrior, LaplacePrior, Prior, ScaleMixturePrior, mixture_clamp

__all__ = [
    "KERNEL_BACKENDS",
    "get_kernels",
    "set_kernels",
    "use_kernels",
    "failures",
    "native_ready",
    "native_fusable",
    "native_prior",
    "native_sample_and_kl",
    "native_layer_sample_and_kl",
    "NativeLayerOutputs",
    "gaussian_kl_grads",
    "mc_log_prob_sum",
    "mc_kl_grads",
]

KERNEL_BACKENDS = ("eager", "compile", "native")

_backend = "eager"


def _check(name: str) -> str:
    if name not in KERNEL_BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r}; accepted values: {', '.join(KERNEL_BACKENDS)}"
        )
    return name


def get_kernels() -> str:
    """The current kernel backend (``"eager"``, ``"compile"`` or ``"native"``)."""
    return _backend


def set_kernels(name: str) -> None:
    """Choose the kernel backend (one of :data:`KERNEL_BACKENDS`), process-wide.

    ``"native"`` builds the C library on first use; where that fails, a ``RuntimeWarning``
    says why and the eager kernels run instead.
    """
    global _backend
    _backend = _check(name)
    if name == "native":
        native_ready()


@contextlib.contextmanager
def use_kernels(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside, restore the previous one after (also
    when the body raises, or when choosing ``name`` does: ``"native"``'s warning that the
    library is unavailable, raised as an error under ``-W error``).

    The setting is process-wide, not per thread: two threads inside ``use_kernels`` at once
    see each other's choice, and the one that leaves last restores what the other had
    chosen. Choose the backend once, before starting threads."""
    previous = get_kernels()
    try:
        set_kernels(name)
        yield
    finally:
        set_kernels(previous)


_Signature = tuple[object, ...]


def _signature(args: tuple[Any, ...]) -> _Signature:
    """What a compiled kernel is specialized on, as far as a compilation failure can depend on
    it: each tensor's dtype, device and number of dimensions (sizes are dynamic), each bool's
    value (a branch), each other argument's type."""
    return tuple(
        (a.dtype, a.device, a.dim()) if isinstance(a, Tensor) else a if isinstance(a, bool)
        else type(a)
        for a in args
    )  # fmt: skip


def _describe(sig: _Signature) -> str:
    def one(x: object) -> str:
        if isinstance(x, tuple):
            dtype, device, dim = x
            return f"{str(dtype).removeprefix('torch.')} {dim}-d on {device}"
        return repr(x) if isinstance(x, bool) else getattr(x, "__name__", str(x))

    return ", ".join(one(x) for x in sig)


class _Kernel:
    """An eager function and its compiled twin, compiled lazily.

    A failure to compile for one argument signature (:func:`_signature`: dtypes, devices,
    ranks, flags) makes that signature run eagerly, with one warning that names it and why;
    the other signatures stay compiled. Only where ``torch.compile`` itself is unavailable
    (it raises before compiling anything) does every signature run eagerly."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed: dict[_Signature, str] = {}  # signature -> why it failed
        self._broken: str | None = None  # torch.compile unavailable: why
        _ALL.append(self)

    @property
    def failed(self) -> str | None:
        """Why compiling failed so far ("; " between signatures), or None."""
        whys = ([] if self._broken is None else [self._broken]) + list(self._failed.values())
        return "; ".join(whys) or None

    @failed.setter
    def failed(self, value: str | None) -> None:
        # None forgets every failure (compiling is tried again); a message marks the kernel
        # failed for every signature
        self._failed = {}
        self._broken = value

    def __call__(self, *args: Any) -> Any:
        # compiled only under "compile": the "native" backend is no licence to run
        # torch.compile (seconds per kernel, or a warning without a C++ compiler)
        if _backend != "compile":
            return self.fn(*args)
        if self._broken is not None or (self._failed and _signature(args) in self._failed):
            return self.fn(*args)
        if self._compiled is None:
            try:
                # dynamic: one compiled loop serves every weight count (inputs are flattened)
                self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            except Exception as err:  # noqa: BLE001 - no torch.compile here: eager, say so once
                self._broken = f"{type(err).__name__}: {err}"[:300]
                warnings.warn(
                    f"bbb kernels: torch.compile failed for {self.fn.__name__} "
                    f"({self._broken}); using the eager kernel from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return self.fn(*args)
        try:
            return self._compiled(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure: fall back, say so once
            sig = _signature(args)
            why = f"{type(err).__name__}: {err}"[:300]
            self._failed[sig] = f"({_describe(sig)}) {why}"
            warnings.warn(
                f"bbb kernels: torch.compile failed for {self.fn.__name__} with arguments "
                f"({_describe(sig)}): {why}; using the eager kernel for these argument types "
                "(dtypes, devices, ranks) from now on, the compiled one for the others",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args)


_ALL: list[_Kernel] = []
_native_warned = False


def failures() -> dict[str, str]:
    """Kernels that failed to build in this process (name -> error, with the argument types
    it failed for), which run eagerly (for those argument types)."""
    out = {k.fn.__name__.lstrip("_"): why for k in _ALL if (why := k.failed) is not None}
    native = _native.error()
    if native is not None:
        out["native"] = native
    return out


def _functorch_active() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _batched(g: Tensor) -> bool:
    """Whether a backward runs batched by vmap, with ``g`` its upstream gradient: inside a
    ``torch.func`` transform (``torch.func.vmap`` of ``torch.autograd.grad``), or under the
    legacy vmap of ``torch.autograd.grad(..., is_grads_batched=True)`` (and
    ``jacobian``/``hessian`` with ``vectorize=True``), which leaves no interpreter on the stack
    but a batched ``g``. There ``g`` has a batch dimension that tensors computed from the
    saved ones lack: those cannot take a product with it in place."""
    # the two queries bound once (this runs in every backward of the fused KLs: ~0.1 us)
    return (_peek is not None and _peek() is not None) or _is_legacy_batched(g)


_peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
_is_legacy_batched: Callable[[Tensor], bool] = getattr(
    torch._C._functorch, "is_legacy_batchedtensor", lambda g: False
)


def native_ready() -> bool:
    """Whether the ``"native"`` backend is selected and its library is usable (False inside
    ``torch.func`` transforms, where the eager kernels run).

    Builds the library on first call; a failure is reported once as a ``RuntimeWarning``
    (:func:`failures` keeps the message) and the eager kernels are used from then on.
    """
    global _native_warned
    if _backend != "native":
        return False
    if _native.available():
        # not inside torch.func transforms (vmap, grad, jacrev, functional per-sample
        # gradients): the native node cannot run there (RuntimeError: an autograd.Function
        # without setup_context) and the native noise would be one plain draw for a whole
        # vmap batch (randomness="different" silently ignored, "error" bypassed); eager
        # kernels and torch.randn do what the transform asks
        return not _functorch_active()
    if not _native_warned:
        _native_warned = True
        warnings.warn(
            f"bbb kernels: the native library is not available ({_native.error()}); "
            "using the eager kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# ----------------------------------------------------------------------------- second order
class _Ctx(FunctionCtx):
    """The ``ctx`` of an autograd.Function as it is at runtime, for the type checker only
    (never instantiated): what torch's ``FunctionCtx`` stub leaves out, and, in subclasses,
    the attributes each Function stores on it."""

    saved_tensors: tuple[Any, ...]  # a Tensor each, or None where None was saved
    needs_input_grad: tuple[bool, ...]

    if TYPE_CHECKING:  # torch saves None too; its stub takes Tensors only

        def save_for_backward(self, *tensors: Tensor | None) -> None: ...


class _FirstOrderCtx(_Ctx):
    message: str


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through; differentiating them raises ``message`` (see
    :func:`first_order_only`).

    A new-style Function (forward without ctx, :meth:`setup_context`) with a generated vmap
    rule: it runs inside ``torch.func`` transforms, e.g. a backward batched by vmap
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``),
    where an old-style one raised a RuntimeError that it needs ``setup_context``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message: str, sources: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in tensors[sources:])

    @staticmethod
    def setup_context(ctx: _FirstOrderCtx, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx: _FirstOrderCtx, *_: Tensor) -> tuple[None, ...]:
        raise RuntimeError(ctx.message)


def first_order_only(
    message: str, grads: tuple[Tensor | None, ...], sources: tuple[Tensor | None, ...] = ()
) -> tuple[Tensor | None, ...]:
    """The gradients a fused backward computed, refused for a second derivative.

    Inside a backward pass, grad mode is on only with ``create_graph=True`` (double backward,
    ``torch.autograd.functional.hessian``, gradient penalties). A fused node's gradients are
    written in closed form without a graph, so their own derivatives would be silently missing
    (zero), or, where the upstream gradient needs no grad, the result would not even require
    grad and a penalty built from it would add nothing to the loss. Here they are returned
    through a node that hangs on ``sources`` (the node's inputs: mu, rho) and whose backward
    raises ``message``: first-order use is unchanged, a second derivative is a clear error.
    """
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    if _is_legacy_batched(present[0]):
        # torch.autograd.grad(..., is_grads_batched=True, create_graph=True): its (legacy)
        # vmap drops the graph of an autograd.Function's outputs, so the refusing node would
        # be lost and a second derivative silently missing; refused here instead
        raise RuntimeError(
            f"{message} (here is_grads_batched=True with create_graph=True, which cannot "
            "carry the refusal to the second derivative: use create_graph=False, or "
            "torch.func.vmap over torch.autograd.grad)"
        )
    anchors = [t for t in sources if t is not None and t.requires_grad]
    if not anchors:
        anchors = [torch.zeros((), requires_grad=True)]  # the outputs still require grad
    out = iter(_FirstOrderOnly.apply(message, len(anchors), *anchors, *present))
    return tuple(None if g is None else next(out) for g in grads)


# ----------------------------------------------------------------------------- closed form
_SWITCH = -20.0  # log(softplus(rho)) taken as rho below it, as bbb.kl.log_softplus


def _kl_grads(
    mu: Tensor, rho: Tensor, sigma: Tensor, sig: Tensor, g: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor]:
    # d/dmu = g (mu - loc) / s^2; d/drho = g (sigma sigmoid(rho) / s^2 - dlog(sigma)/drho),
    # dlog(sigma)/drho = sigmoid(rho) / sigma (1 below rho = -20); sig = sigmoid(rho)
    dlog = torch.where(rho < _SWITCH, 1.0, sig / sigma)
    return (mu - loc) * (g * inv_var), (sigma * sig * inv_var - dlog) * g


def _gaussian_kl_grads(
    mu: Tensor, rho: Tensor, sigma: Tensor, g: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor]:
    return _kl_grads(mu, rho, sigma, torch.sigmoid(rho), g, loc, inv_var)


_K_GAUSSIAN_KL = _Kernel(_gaussian_kl_grads)


def gaussian_kl_grads(
    mu: Tensor, rho: Tensor, sigma: Tensor, g: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor]:
    """Gradients of ``g * sum KL(N(mu, sigma^2) || N(loc, 1 / inv_var))`` w.r.t. mu and rho.

    ``sigma = softplus(rho)`` (shape W, like mu and rho), ``g`` the upstream scalar gradient.
    The fast path of :class:`bbb.kl._GaussianKLSum` (no mask, rho >= -20).
    """
    shape = mu.shape
    gm, gr = _K_GAUSSIAN_KL(mu.reshape(-1), rho.reshape(-1), sigma.reshape(-1), g, loc, inv_var)
    return gm.view(shape), gr.view(shape)


# ----------------------------------------------------------------------------- Monte Carlo
# Each prior's kernels take the flattened sample w (S, n), eps (S, n), rho and sigma (n,) and
# the prior's constants as floats. score = -d log p(w) / dw.


def _mixture_log_prob_sum(w: Tensor, c1: float, c2: float, h1: float, h2: float) -> Tensor:
    w2 = w * w
    return torch.logaddexp(w2 * h1 + c1, w2 * h2 + c2).sum()


def _mixture_grads(
    w: Tensor, eps: Tensor, rho: Tensor, sigma: Tensor, g: Tensor, c: float, p1: float, p2: float
) -> tuple[Tensor, Tensor]:
    # responsibilities as sigmoids of u = log(pi N1) - log((1 - pi) N2), clamped as in
    # ScaleMixturePrior.grad_log_prob (no denormal exp, exact for any sigma2 / sigma1)
    bound = mixture_clamp(p1, p2)
    u = (w * w * (0.5 * (p2 - p1)) + c).clamp(-bound, bound)
    score = (torch.sigmoid(u) * p1 + torch.sigmoid(-u) * p2) * w
    return _mc_grads(score, eps, rho, sigma, g)


def _gaussian_prior_log_prob_sum(w: Tensor, loc: float, inv_var: float, c: float) -> Tensor:
    d = w - loc
    return (d * d).sum() * (-0.5 * inv_var) + c * w.numel()


def _gaussian_prior_grads(
    w: Tensor, eps: Tensor, rho: Tensor, sigma: Tensor, g: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor]:
    return _mc_grads((w - loc) * inv_var, eps, rho, sigma, g)


def _laplace_grads(
    w: Tensor, eps: Tensor, rho: Tensor, sigma: Tensor, g: Tensor, loc: float, inv_b: float
) -> tuple[Tensor, Tensor]:
    return _mc_grads(torch.sign(w - loc) * inv_b, eps, rho, sigma, g)


def _mc_grads(
    score: Tensor, eps: Tensor, rho: Tensor, sigma: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    # d/dmu = g mean_s(score); d/drho = g (mean_s(score eps) sigmoid(rho) - sigmoid(rho)/sigma)
    scale = g / score.shape[0]
    sig = torch.sigmoid(rho)
    grad_mu = score.sum(0) * scale
    grad_rho = (score * eps).sum(0) * scale * sig - sig / sigma * g
    return grad_mu, grad_rho


_K_MIX_LOGP = _Kernel(_mixture_log_prob_sum)
_K_MIX_GRADS = _Kernel(_mixture_grads)
_K_GAUSS_LOGP = _Kernel(_gaussian_prior_log_prob_sum)
_K_GAUSS_GRADS = _Kernel(_gaussian_prior_grads)
_K_LAPLACE_GRADS = _Kernel(_laplace_grads)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _flat(t: Tensor, num_samples: int) -> Tensor:
    return t.reshape(num_samples, -1)


def mc_log_prob_sum(prior: Prior, w: Tensor) -> Tensor:
    """``prior.log_prob(w).sum()`` for a weight sample ``w`` of any shape (a scalar)."""
    if _backend == "compile" and type(prior) is ScaleMixturePrior:
        c1, c2, p1, p2 = prior._constants()
        return _K_MIX_LOGP(w.reshape(-1), c1, c2, -0.5 * p1, -0.5 * p2)
    if _backend == "compile" and type(prior) is GaussianPrior:
        s, loc = prior._value("sigma"), prior._value("mean")
        c = -math.log(s) - _HALF_LOG_2PI
        return _K_GAUSS_LOGP(w.reshape(-1), loc, 1.0 / (s * s), c)
    return prior.log_prob(w).sum()


def mc_kl_grads(
    prior: Prior, w: Tensor, eps: Tensor, rho: Tensor, sigma: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``g * mean_s sum_j [log q(w_sj) - log p(w_sj)]`` w.r.t. mu and rho.

    ``w = mu + sigma * eps`` and ``eps`` are (S, *W), ``rho`` and ``sigma = softplus(rho)``
    are W-shaped. The fast path of :class:`bbb.kl._MCKLSum` (no mask, rho >= -20).
    """
    shape, num_samples = rho.shape, eps.shape[0]
    wf, ef = _flat(w, num_samples), _flat(eps, num_samples)
    rf, sf = rho.reshape(-1), sigma.reshape(-1)
    kind = type(prior) if _backend == "compile" else None
    if kind is ScaleMixturePrior:
        assert isinstance(prior, ScaleMixturePrior)
        c1, c2, p1, p2 = prior._constants()
        gm, gr = _K_MIX_GRADS(wf, ef, rf, sf, g, c1 - c2, p1, p2)
    elif kind is GaussianPrior:
        s = prior._value("sigma")
        gm, gr = _K_GAUSS_GRADS(wf, ef, rf, sf, g, prior._value("mean"), 1.0 / (s * s))
    elif kind is LaplacePrior:
        gm, gr = _K_LAPLACE_GRADS(
            wf, ef, rf, sf, g, prior._value("loc"), 1.0 / prior._value("scale")
        )
    else:
        gm, gr = _mc_grads(prior.grad_log_prob(wf).neg_(), ef, rf, sf, g)
    return gm.view(shape), gr.view(shape)


# ----------------------------------------------------------------------------- sample + KL
# One autograd node for a layer's weight posterior under the closed-form Gaussian-prior KL:
# forward sigma = softplus(rho), the tensor the estimator needs (reparam: the weight sample
# mu + sigma eps; flipout: the perturbation sigma eps; local: the variance sigma^2) and the KL;
# backward both parameters' gradients from the estimator's and the KL's upstream gradients in
# one loop. Eager autograd spends ~15 passes over the weights on the same work (softplus,
# addcmul, their backward, the KL's passes, and summing the two gradients of mu and of rho).

ESTIMATOR_OUTPUTS = ("reparam", "flipout", "local")


def _kl_terms(mu: Tensor, rho: Tensor, sigma: Tensor, loc: float, inv_var: float) -> Tensor:
    log_sigma = torch.where(rho < _SWITCH, rho, torch.log(sigma))
    d = mu - loc
    return (sigma * sigma + d * d) * (0.5 * inv_var) - log_sigma


def _fwd_reparam(
    mu: Tensor, rho: Tensor, eps: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor, Tensor]:
    sigma = torch.nn.functional.softplus(rho)
    return mu + sigma * eps, _kl_terms(mu, rho, sigma, loc, inv_var).sum(), sigma


def _fwd_flipout(
    mu: Tensor, rho: Tensor, eps: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor, Tensor]:
    sigma = torch.nn.functional.softplus(rho)
    return sigma * eps, _kl_terms(mu, rho, sigma, loc, inv_var).sum(), sigma


def _fwd_local(
    mu: Tensor, rho: Tensor, eps: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor, Tensor]:
    sigma = torch.nn.functional.softplus(rho)
    return sigma * sigma, _kl_terms(mu, rho, sigma, loc, inv_var).sum(), sigma


def _bwd(
    mu: Tensor,
    rho: Tensor,
    sigma: Tensor,
    dt_dsigma: Tensor,
    g_t: Tensor,
    g_kl: Tensor,
    with_mu: bool,
    loc: float,
    inv_var: float,
) -> tuple[Tensor, Tensor]:
    sig = torch.sigmoid(rho)
    grad_mu, grad_rho = _kl_grads(mu, rho, sigma, sig, g_kl, loc, inv_var)
    grad_rho = grad_rho + g_t * dt_dsigma * sig
    if with_mu:
        grad_mu = grad_mu + g_t
    return grad_mu, grad_rho


def _bwd_eps(
    mu: Tensor, rho: Tensor, sigma: Tensor, eps: Tensor, g_t: Tensor, g_kl: Tensor,
    with_mu: bool, loc: float, inv_var: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _bwd(mu, rho, sigma, eps, g_t, g_kl, with_mu, loc, inv_var)


def _bwd_var(
    mu: Tensor, rho: Tensor, sigma: Tensor, g_t: Tensor, g_kl: Tensor, loc: float, inv_var: float
) -> tuple[Tensor, Tensor]:
    return _bwd(mu, rho, sigma, 2.0 * sigma, g_t, g_kl, False, loc, inv_var)


_K_FWD = {
    "reparam": _Kernel(_fwd_reparam),
    "flipout": _Kernel(_fwd_flipout),
    "local": _Kernel(_fwd_local),
}
_K_BWD_EPS = _Kernel(_bwd_eps)
_K_BWD_VAR = _Kernel(_bwd_var)


class _SampleKLCtx(_Ctx):
    kind: str
    loc: float
    inv_var: float
    shape: torch.Size


class _SampleKL(torch.autograd.Function):
    """(t, KL) from (mu, rho); see :func:`sample_and_kl`."""

    @staticmethod
    def forward(
        ctx: _SampleKLCtx,
        mu: Tensor,
        rho: Tensor,
        eps: Tensor | None,
        kind: str,
        loc: float,
        inv_var: float,
        const: float,
    ) -> tuple[Tensor, Tensor]:
        shape = mu.shape
        mf, rf = mu.reshape(-1), rho.reshape(-1)
        ef = mf if eps is None else eps.reshape(-1)  # local: no noise (a placeholder)
        t, kl, sigma = _K_FWD[kind](mf, rf, ef, loc, inv_var)
        # mu and rho themselves too: a double backward recomputes from them (_sample_kl_grads2)
        ctx.save_for_backward(mf, rf, sigma, None if eps is None else ef, mu, rho)
        ctx.kind, ctx.loc, ctx.inv_var, ctx.shape = kind, loc, inv_var, shape
        return t.view(shape), kl + const

    @staticmethod
    def backward(ctx: _SampleKLCtx, g_t: Tensor, g_kl: Tensor) -> tuple[Tensor | None, ...]:
        mf, rf, sigma, ef, mu, rho = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that have a graph
            gm2, gr2 = _sample_kl_grads2(ctx, mu, rho, ef, g_t, g_kl)
            return gm2, gr2, None, None, None, None, None, None
        gt = g_t.reshape(-1)
        if ctx.kind == "local":
            gm, gr = _K_BWD_VAR(mf, rf, sigma, gt, g_kl, ctx.loc, ctx.inv_var)
        else:
            with_mu = ctx.kind == "reparam"
            gm, gr = _K_BWD_EPS(mf, rf, sigma, ef, gt, g_kl, with_mu, ctx.loc, ctx.inv_var)
        return gm.view(ctx.shape), gr.view(ctx.shape), None, None, None, None, None, None


def _sample_kl_grads2(
    ctx: _SampleKLCtx, mu: Tensor, rho: Tensor, ef: Tensor | None, g_t: Tensor, g_kl: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """:class:`_SampleKL`'s gradients with ``create_graph=True``: the same formulas written
    with autograd from mu and rho, so that their own derivatives (a double backward) exist."""
    from .kl import softplus_and_log  # bbb.kl imports this module

    wrt = [t for t, need in zip((mu, rho), ctx.needs_input_grad[:2], strict=True) if need]
    with torch.enable_grad():
        sigma, log_sigma = softplus_and_log(rho)
        d = mu - ctx.loc
        kl = ((sigma * sigma + d * d) * (0.5 * ctx.inv_var) - log_sigma).sum()
        if ctx.kind == "local":
            t = sigma * sigma
        else:
            assert ef is not None
            t = sigma * ef.view(ctx.shape)
            t = mu + t if ctx.kind == "reparam" else t
        got = iter(
            torch.autograd.grad(
                (t, kl), wrt, (g_t.view(ctx.shape), g_kl), create_graph=True, allow_unused=True
            )
        )
    needs = ctx.needs_input_grad
    grad_mu = next(got) if needs[0] else None
    return grad_mu, next(got) if needs[1] else None


def sample_and_kl(
    kind: str, mu: Tensor, rho: Tensor, eps: Tensor | None, prior: GaussianPrior
) -> tuple[Tensor, Tensor]:
    """A weight posterior's estimator tensor and its closed-form KL, in one autograd node.

    Args:
        kind: ``"reparam"`` (returns ``mu + sigma * eps``), ``"flipout"`` (``sigma * eps``) or
            ``"local"`` (``sigma^2``; ``eps`` unused), with ``sigma = softplus(rho)``.
        mu, rho: the posterior's parameters (shape W); eps: standard normal noise (shape W).
        prior: a :class:`~bbb.priors.GaussianPrior`.

    Returns:
        ``(t, kl)``: t of shape W, and ``sum KL(N(mu, sigma^2) || prior)`` in nats (a scalar);
        both backpropagate to mu and rho. Values and gradients equal those of the unfused
        layer (:func:`bbb.kl.closed_form_kl_sum` and the estimator's own operations).
    """
    if kind not in ESTIMATOR_OUTPUTS:
        raise ValueError(f"unknown kind {kind!r}; accepted values: {', '.join(ESTIMATOR_OUTPUTS)}")
    s, loc = prior._value("sigma"), prior._value("mean")
    const = mu.numel() * (math.log(s) - 0.5)
    if _functorch_active():
        # inside torch.func transforms (vmap, grad): the fused node has no setup_context
        # (RuntimeError); the same formulas as plain operations, which the transforms take
        return _sample_and_kl_ops(kind, mu, rho, eps, loc, 1.0 / (s * s), const)
    out: tuple[Tensor, Tensor] = _SampleKL.apply(mu, rho, eps, kind, loc, 1.0 / (s * s), const)
    return out


def _sample_and_kl_ops(
    kind: str, mu: Tensor, rho: Tensor, eps: Tensor | None, loc: float, inv_var: float,
    const: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`sample_and_kl` without the fused node (autograd through each operation)."""
    from .kl import softplus_and_log  # bbb.kl imports this module

    sigma, log_sigma = softplus_and_log(rho)
    d = mu - loc
    kl = ((sigma * sigma + d * d) * (0.5 * inv_var) - log_sigma).sum() + const
    if kind == "local":
        return sigma * sigma, kl
    assert eps is not None
    t = sigma * eps.view(mu.shape)
    return (mu + t if kind == "reparam" else t), kl


# ----------------------------------------------------------------------------- native
_NONE3 = (None, None, None)
_NATIVE_FIRST_ORDER = (
    "bbb native kernels: their gradients are first-order only (the backward is C code, "
    "once_differentiable); a second derivative through a Bayesian layer (create_graph=True: "
    "double backward, hessian, gradient penalties) needs bbb.set_kernels('eager')"
)


_NATIVE_BATCHED = (
    "bbb native kernels: their backward is C code, which cannot run batched by vmap "
    "(torch.autograd.grad(..., is_grads_batched=True), jacobian or hessian with "
    "vectorize=True, torch.func.vmap over torch.autograd.grad); batched gradients need "
    "bbb.set_kernels('eager')"
)


class _NativeCtx(_Ctx):
    kind: str
    prior: _native.NativePrior
    used: list[bool]
    shapes: list[torch.Size]


class _NativeSampleKL(torch.autograd.Function):
    """A layer's native node: from the weights' (mu, rho) and optionally the bias's, the
    estimator's tensors, one KL (weights' plus bias's), the noise and the mean-path aliases;
    see :func:`native_layer_sample_and_kl`.

    One autograd node for both parameter pairs instead of one per pair: a node's fixed cost
    (the Function's bookkeeping, its backward's dispatch, adding the two KLs) is most of a small
    layer's step (issue 8). Each pair still has its own C call and its own noise key, drawn in
    the order weights then bias, so the numbers are those of two separate nodes.
    The mean-path outputs, with ``mean_path``, are mu itself passed through the node: a layer
    that builds its mean path from them (flipout, local) hands that path's gradient of mu to
    this node's backward, which adds it in its own pass over the weights; otherwise autograd
    would sum mu's two gradients in one more pass (issue 8).
    """

    @staticmethod
    def forward(
        ctx: _NativeCtx,
        mu: Tensor,
        rho: Tensor,
        mu_b: Tensor | None,
        rho_b: Tensor | None,
        kind: str,
        prior: _native.NativePrior,
        const: float,
        used: list[bool],
        samples: int,
        mean_path: bool,
    ) -> tuple[Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not zeros
        pairs = [(mu, rho)] if mu_b is None or rho_b is None else [(mu, rho), (mu_b, rho_b)]
        saved: list[Tensor | None] = []
        outs: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        kl_t = None
        noise: list[Tensor] = []
        for m, r in pairs:
            shape = m.shape
            mf, rf = m.detach().reshape(-1), r.detach().reshape(-1)
            t, kl, sigma, eps = _native.sample_kl_fwd(kind, mf, rf, prior, samples)
            saved += [mf, rf, sigma, eps]
            # the KL of each pair rounded to the parameters' dtype, then added: as two nodes
            part = m.new_tensor(kl + const * m.numel())
            kl_t = part if kl_t is None else kl_t + part
            lead = (t.shape[0],) if t.dim() == 2 else ()  # several weight samples: (S, *W)
            eps_out = None
            if eps is not None:
                eps_out = eps.view(*((eps.shape[0],) if eps.dim() == 2 else ()), *shape)
                noise.append(eps_out)
            # mean path: an alias of mu, no copy
            outs.append(
                (t.view(*lead, *shape), eps_out, m.detach().view(shape) if mean_path else None)
            )
        ctx.mark_non_differentiable(*noise)  # one call: a second would replace the first's
        # the inputs last: a refused second order hangs on them (first_order_only)
        ctx.save_for_backward(*saved, *(t for pair in pairs for t in pair))
        ctx.kind, ctx.prior, ctx.used = kind, prior, used
        ctx.shapes = [m.shape for m, _ in pairs]
        (t, eps_w, mu_w), (tb, eps_b, mu_b_out) = outs[0], outs[-1] if len(outs) > 1 else _NONE3
        return t, tb, kl_t, eps_w, eps_b, mu_w, mu_b_out

    @staticmethod
    def backward(
        ctx: _NativeCtx,
        g_t: Tensor | None,
        g_tb: Tensor | None,
        g_kl: Tensor | None,
        _g_eps: Tensor | None,
        _g_eps_b: Tensor | None,
        g_mu: Tensor | None,
        g_mu_b: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        try:
            with torch.no_grad():  # C gradients: no graph (a second order is refused below)
                grads = _NativeSampleKL._grads(ctx, g_t, g_tb, g_kl, g_mu, g_mu_b)
        except RuntimeError as err:  # checked only on failure: no cost in a training step
            upstream = [g for g in (g_t, g_tb, g_kl, g_mu, g_mu_b) if g is not None]
            if upstream and _batched(upstream[0]):
                raise RuntimeError(_NATIVE_BATCHED) from err
            raise
        inputs = ctx.saved_tensors[4 * len(ctx.shapes) :]
        grads = first_order_only(_NATIVE_FIRST_ORDER, grads, inputs)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def _grads(
        ctx: _NativeCtx,
        g_t: Tensor | None,
        g_tb: Tensor | None,
        g_kl: Tensor | None,
        g_mu: Tensor | None,
        g_mu_b: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        ctx.used[0] = True  # its saved tensors are freed now: BayesModule.kl() recomputes
        gkl = 0.0 if g_kl is None else float(g_kl)
        grads: list[Tensor | None] = [None, None, None, None]
        for i, shape in enumerate(ctx.shapes):  # weights, then the bias (if any)
            gt_i, gm_i = (g_t, g_mu) if i == 0 else (g_tb, g_mu_b)
            mf, rf, sigma, eps = saved[4 * i : 4 * i + 4]
            n = mf.numel()
            rows = 1 if ctx.kind == "local" or eps is None or eps.dim() == 1 else eps.shape[0]
            gt = mf.new_zeros(rows * n) if gt_i is None else gt_i.reshape(-1)
            gm, gr = _native.sample_kl_bwd(
                ctx.kind, mf, rf, sigma, eps, gt, gkl, ctx.prior,
                None if gm_i is None else gm_i.reshape(-1),
            )  # fmt: skip
            grads[2 * i], grads[2 * i + 1] = gm.view(shape), gr.view(shape)
        return tuple(grads)


def native_prior(prior: Prior, kl_mode: str) -> tuple[_native.NativePrior, float] | None:
    """The native kernels' description of ``prior`` with ``kl_mode`` and the KL's constant
    (added to their sum per weight), or None where they have no kernel for it.

    Covered: :class:`~bbb.priors.GaussianPrior` with the closed-form KL, and
    :class:`~bbb.priors.ScaleMixturePrior` with the Monte Carlo KL while 1 / sigma2^2 stays
    within float32's range next to 1 / sigma1^2 (sigma2 / sigma1 >= e^-30; beyond it the eager
    kernels keep the narrow component's score exact).
    """
    if kl_mode == "closed_form" and type(prior) is GaussianPrior:
        s, loc = prior._value("sigma"), prior._value("mean")
        return ("gaussian", loc, 1.0 / (s * s)), math.log(s) - 0.5
    if kl_mode == "mc" and type(prior) is ScaleMixturePrior:
        c1, c2, p1, p2 = prior._constants()
        if 0.5 * abs(math.log(p2 / p1)) > 30.0 or max(p1, p2) > 1e30:
            return None
        return ("mixture", c1, c2, p1, p2), 0.0
    return None


def native_fusable(mu: Tensor) -> bool:
    """Whether :func:`native_sample_and_kl` takes a layer with weight means ``mu``: the native
    backend is usable and ``mu`` is a contiguous float32 CPU tensor."""
    return native_ready() and _native.supports(mu)


def native_sample_and_kl(
    kind: str,
    mu: Tensor,
    rho: Tensor,
    prior: Prior,
    kl_mode: str = "closed_form",
    used: list[bool] | None = None,
    samples: int = 1,
    mean_path: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`sample_and_kl` with the noise drawn inside the native kernel, for the priors and
    KL modes of :func:`native_prior`.

    Returns ``(t, kl, eps, mu_alias)``: the estimator's tensor (shape W), the KL in nats
    (closed form, or the single-sample Monte Carlo estimate at ``w = mu + sigma * eps``), the
    standard normal noise drawn (shape W; for ``"local"``, None with the closed form, the KL's
    own sample with the Monte Carlo KL), and, with ``mean_path`` (``"flipout"`` and
    ``"local"``), mu for the layer's mean path (else None): mu's values, no copy, whose
    gradient goes through this node, whose backward adds it to the KL's and the estimator's
    in its own pass over the weights (one pass fewer than autograd summing mu's two
    gradients). ``samples`` > 1 (reparam, flipout): t and eps get a leading dimension of that
    many weight samples, and a Monte Carlo KL is their average (local ignores it). ``used``:
    a one-element list set to True when the node's backward has run (its graph is then freed;
    the layers recompute their KL after that). Gradients are first-order only (the backward
    is C code). Requires :func:`native_fusable`.
    """
    out = native_layer_sample_and_kl(
        kind, mu, rho, None, None, prior, kl_mode, used, samples, mean_path
    )
    return out.t, out.kl, out.eps, out.mu


class NativeLayerOutputs(NamedTuple):
    """What :func:`native_layer_sample_and_kl` returns (bias entries None without a bias)."""

    t: Tensor  # the weights' estimator tensor: shape W, or (S, *W) for S > 1 weight samples
    t_b: Tensor | None  # the bias's, likewise
    kl: Tensor  # the KL of weights and bias together, nats (a scalar)
    eps: Tensor | None  # the weights' noise, shaped like t (see native_sample_and_kl)
    eps_b: Tensor | None
    mu: Tensor | None  # with mean_path: the weights' mu through the node (else None)
    mu_b: Tensor | None


def native_layer_sample_and_kl(
    kind: str,
    mu: Tensor,
    rho: Tensor,
    mu_b: Tensor | None,
    rho_b: Tensor | None,
    prior: Prior,
    kl_mode: str = "closed_form",
    used: list[bool] | None = None,
    samples: int = 1,
    mean_path: bool = False,
) -> NativeLayerOutputs:
    """:func:`native_sample_and_kl` for a layer's weights and bias (``mu_b``, ``rho_b``; both
    None for a layer without bias) in one autograd node: the same tensors, noise and
    gradients as two calls (weights first), and one KL, their sum, at about half the fixed
    cost per layer (issue 8). Requires :func:`native_fusable` for each tensor.
    """
    if kind not in ESTIMATOR_OUTPUTS:
        raise ValueError(f"unknown kind {kind!r}; accepted values: {', '.join(ESTIMATOR_OUTPUTS)}")
    if mean_path and kind == "reparam":
        raise ValueError("native_sample_and_kl: 'reparam' has no separate mean path")
    spec = native_prior(prior, kl_mode)
    if spec is None:
        raise ValueError(
            f"the native kernels have no {kl_mode!r} KL for {type(prior).__name__} "
            "(they take GaussianPrior with 'closed_form' and ScaleMixturePrior with 'mc')"
        )
    if (mu_b is None) != (rho_b is None):
        raise ValueError("native_layer_sample_and_kl: give both mu_b and rho_b, or neither")
    args, const_per_weight = spec
    # the C code reads contiguous float32 CPU memory: a strided parameter (a transposed or
    # sliced rho, a bias mu sliced from a larger tensor) is copied, its gradient flowing
    # back through the copy; a parameter of another dtype or device is a clear error
    named = (("weight_mu", mu), ("weight_rho", rho), ("bias_mu", mu_b), ("bias_rho", rho_b))
    for name, t in named:
        if t is not None and not (t.dtype == torch.float32 and t.is_cpu):
            raise ValueError(
                f"native_layer_sample_and_kl: {name} must be a float32 CPU tensor, got "
                f"{t.dtype} on {t.device} (a layer's parameters share one dtype and device)"
            )
    mu_c, rho_c, mu_bc, rho_bc = (
        t if t is None or t.is_contiguous() else t.contiguous() for t in (mu, rho, mu_b, rho_b)
    )
    out = _NativeSampleKL.apply(
        mu_c, rho_c, mu_bc, rho_bc, kind, args, const_per_weight,
        [False] if used is None else used, samples, mean_path,
    )  # fmt: skip
    return NativeLayerOutputs(*out)
