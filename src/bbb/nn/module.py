"""``BayesModule``: the shared machinery of every Bayesian layer.

A Bayesian layer holds a factorised Gaussian posterior q(w) = N(mu, sigma^2) over its weight
and bias, with ``sigma = softplus(rho)`` (``weight_mu``, ``weight_rho``, ``bias_mu``,
``bias_rho`` parameters), a prior (a :class:`bbb.priors.Prior` submodule), a gradient
estimator and a KL mode. Subclasses only say how the weights act on the input (``op``).

Sampling modes (per layer; set them for a whole model with :func:`sampling`):

- ``"sample"`` (default): fresh noise at every forward pass, drawn by the layer's estimator.
- ``"mean"``: use ``mu``: a deterministic network (the "mean network").
- ``"frozen"``: draw one weight sample and keep it across calls until :func:`resample`; always
  weight-space (local noise cannot be frozen), as Thompson sampling needs. What is kept is the
  noise ``eps`` of ``w = mu + sigma * eps`` (shape (S, *W)), drawn at the first frozen pass
  from torch's global generator.

Saving and loading: ``state_dict()`` holds the posterior (``mu``, ``rho``, the pruning mask if
pruned, the prior's hyper-parameters), not the sampling mode nor the frozen sample, so that a
checkpoint loads into any model built the same way. A model loaded from it draws its own
frozen sample at its first frozen pass: the same one as the original's under the same
``torch.manual_seed`` before that pass. ``copy.deepcopy``, ``pickle`` and ``torch.save(model)``
keep the sample and the mode. A pruned layer loads an unpruned state of itself (every key of
its own but ``weight_mask``) as unpruned: the mask is dropped; a state with only some of its
keys (``strict=False``) leaves the mask alone. A layer that holds a frozen sample keeps its
noise across ``load_state_dict`` (as across an optimizer step): its weights are then the
loaded posterior's at that noise; call :func:`resample` for a new one.

Several Monte Carlo samples in one pass: inside :func:`vectorized_samples` (used by
:class:`bbb.ELBO` and :func:`bbb.predict`), a layer receives a batch of ``S * B`` rows, the S
copies of the batch stacked in front, and uses a different weight sample for each block.

The KL divergence of the latest forward pass is computed on demand by :meth:`BayesModule.kl`
(and summed over a model by :func:`kl_divergence`), so prediction pays nothing for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels as _kernels
from .. import kl as _kl
from ..priors import GaussianPrior, Prior
from . import estimators as est
from . import noise as _rand
from .stacking import repeat_samples

__all__ = [
    "BayesModule",
    "SAMPLING_MODES",
    "MU_INITS",
    "kl_divergence",
    "bayes_modules",
    "sampling",
    "set_sampling",
    "resample",
    "shared_weight_samples",
    "vectorized_samples",
]

SAMPLING_MODES = ("sample", "mean", "frozen")
_UNSEEN = itertools.count(-2, -1)
# BayesModule._param_versions inside a compiled region: a key that is never current
_UNKNOWN_VERSIONS: tuple[int, ...] = (-1,)
MU_INITS = ("paper", "fan_in")
_M = TypeVar("_M", bound="BayesModule")


def _exporting_or_tracing() -> bool:
    """Whether the forward runs under torch.export or torch.jit.trace (not torch.compile,
    whose side effects on the module are applied: a frozen sample drawn there is kept)."""
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(exporting is not None and exporting()) or torch.jit.is_tracing()


def _is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool (``True`` is an ``int`` subclass)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real number (Python or NumPy int/float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(owner: str, name: str, value: object) -> int:
    """``value`` as an ``int`` if it is a positive integer, else a ``ValueError`` naming
    ``owner`` (the layer) and the argument ``name``. Bools are rejected (``True`` would
    otherwise pass as 1)."""
    # (_is_int has checked the type, which mypy cannot see: the casts)
    if not _is_int(value) or int(cast(numbers.Integral, value)) < 1:
        hint = " (a bool is not accepted)" if isinstance(value, bool) else ""
        raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}{hint}")
    return int(cast(numbers.Integral, value))


def check_flag(owner: str, name: str, value: object) -> bool:
    """``value`` as a Python ``bool`` if it is ``True``/``False`` or NumPy's
    ``np.True_``/``np.False_``, else a ``ValueError`` naming ``owner`` (the layer), the argument
    ``name`` and what is accepted. The on/off arguments of every Bayesian layer (``bias``,
    ``batch_first``, ...) go through it. torch's layers take any value by its truth; a truthy
    non-bool is refused here because it is more often a mistake than a choice (``bias="no"``
    or ``bias="False"`` would give the layer a bias)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(
        f"{owner} {name} must be True or False, got {value!r} of type {type(value).__name__} "
        "(accepted: a bool or a numpy.bool_)"
    )


def _range(name: str, value: object, accepted: str) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers with low <= high, or a ValueError naming
    ``name``, what was given and what is ``accepted``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        got = f"{value!r}"
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            got += f" (a sequence of length {len(value)})"
        raise ValueError(f"{name} must be {accepted}, got {got}")
    if not all(_is_real(v) for v in value):
        raise ValueError(f"{name} must be {accepted}, got {value!r} (entries must be numbers)")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"init ranges must have low <= high, got {name}={value!r}")
    return low, high


_MU_INIT_ACCEPTED = (
    f"one of {', '.join(map(repr, MU_INITS))} or a (low, high) tuple of two finite numbers"
)
_RHO_INIT_ACCEPTED = "a finite number or a (low, high) tuple of two finite numbers"


def mu_init_range(mu_init: object, fan_in: int) -> tuple[float, float]:
    """The uniform range ``(low, high)`` of a ``mu_init`` option (see
    :meth:`BayesModule.reset_parameters`); a ValueError naming ``mu_init`` if it is invalid."""
    if isinstance(mu_init, str):
        if mu_init == "paper":
            return -0.2, 0.2
        if mu_init == "fan_in":
            bound = 1.0 / max(fan_in, 1) ** 0.5
            return -bound, bound
        raise ValueError(
            f"unknown mu_init {mu_init!r}; accepted values: {', '.join(MU_INITS)} "
            "or a (low, high) tuple"
        )
    return _range("mu_init", mu_init, _MU_INIT_ACCEPTED)


def rho_init_range(rho_init: object) -> tuple[float, float]:
    """The uniform range ``(low, high)`` of a ``rho_init`` option (a constant ``c`` gives
    ``(c, c)``); a ValueError naming ``rho_init`` if it is invalid."""
    if _is_real(rho_init):
        value = float(cast(numbers.Real, rho_init))
        if not math.isfinite(value):
            raise ValueError(f"rho_init must be finite, got {rho_init!r}")
        return value, value
    return _range("rho_init", rho_init, _RHO_INIT_ACCEPTED)


def _softplus_and_log(rho: Tensor) -> tuple[Tensor, Tensor]:
    """sigma = softplus(rho) and log(sigma), both finite with finite gradients for any rho."""
    return _kl.softplus_and_log(rho)


@dataclass
class _Record:
    """What the latest forward pass leaves for the KL: noise and, where computed, the sample."""

    eps_w: Tensor | None = None  # (S, *W)
    eps_b: Tensor | None = None  # (S, O)
    w: Tensor | None = None  # (S, *W) weight sample, when the estimator built it
    b: Tensor | None = None  # (S, O)
    # softplus(rho) of the forward pass (unmasked), reused by the KL: one softplus per step
    # instead of two (~5 ms at 2.4M weights, issue 8). It, the weight sample w and kl_w are
    # valid only while the parameters are unchanged: ``param_versions`` holds each mu's and
    # rho's identity and in-place version counter at the forward pass (an optimizer step or
    # load_state_dict bumps the counter), checked by BayesModule._cached_sigmas and kl().
    sigma_w: Tensor | None = None
    sigma_b: Tensor | None = None
    param_versions: tuple[int, ...] = ()
    # the weights' closed-form KL, computed by the forward pass in the same autograd node as
    # the estimator's tensor (bbb.kernels.sample_and_kl, kernels backend "compile")
    kl_w: Tensor | None = None
    kl_all: bool = False  # kl_w is the whole layer's KL, bias included (native kernels)
    kl_mode: str | None = None  # the KL mode kl_w was computed with
    # the prior kl_w was computed with (BayesModule._prior_key): a prior replaced or edited in
    # place since the forward makes kl() recompute (it returned the old prior's KL)
    prior_key: tuple[int, ...] = ()
    # native node: [True] once its backward has run (kl_w's graph is freed; kl() recomputes)
    kl_used: list[bool] | None = None
    # a frozen sample used in another dtype than it was drawn in: (eps_w, eps_b) as drawn
    drawn: tuple[Tensor, Tensor | None] | None = None


_RECORD_TENSORS = ("eps_w", "eps_b", "w", "b", "sigma_w", "sigma_b")


def _outside_inference(rec: _Record) -> _Record:
    """``rec`` with its tensors made under ``torch.inference_mode`` cloned into ordinary
    ones (the same values), for use with autograd outside it; ``rec`` itself if it has none.

    Inference tensors cannot be saved for backward: a forward pass under inference_mode
    followed by kl(), or by a frozen-mode pass with autograd, raised torch's 'Inference
    tensors cannot be saved for backward'.
    """
    changed = {}
    for name in _RECORD_TENSORS:
        t = getattr(rec, name)
        if t is not None and t.is_inference():
            changed[name] = t.clone()
    return dataclasses.replace(rec, **changed) if changed else rec


def check_input_dtype(name: str, x: Tensor, dtype: torch.dtype) -> None:
    """Refuse an input ``x`` whose dtype is not the parameters' ``dtype``, for the layer
    ``name``; a floating input under autocast passes (autocast casts it). A device type that
    autocast does not know (``meta``: shape inference) has it off: torch's
    ``is_autocast_enabled`` raised "unknown device type for autocast" there instead of this
    error."""
    if x.dtype != dtype and not (x.is_floating_point() and est._autocast_on(x.device.type)):
        raise ValueError(
            f"{name} expected a {dtype} input (the dtype of its parameters), got {x.dtype}; "
            f"convert the input (x.to({dtype})) or the model (model.to(dtype))"
        )


def check_float_dtype(name: str, dtype: object, note: str = "") -> None:
    """A ValueError naming layer ``name`` unless ``dtype`` is None or a floating-point
    :class:`torch.dtype` (a complex one gave a posterior with a complex sigma = softplus(rho),
    silently; an integer one or a string failed inside ``nn.Module.to`` without the layer's
    name). ``note`` is added after "floating-point torch.dtype" (what the dtype is of)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return
    raise ValueError(
        f"{name} dtype must be a floating-point torch.dtype{note} (torch.float16, "
        f"torch.bfloat16, torch.float32 or torch.float64), got {dtype!r}"
    )


class BayesModule(nn.Module):
    """Base class of the Bayesian layers (factorised Gaussian posterior over weight and bias).

    Subclasses call :meth:`_init_posterior` and implement :meth:`op`, :meth:`op_batched` and
    :meth:`sign_shapes`.
    """

    weight_mu: nn.Parameter
    weight_rho: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_rho: nn.Parameter | None
    weight_mask: Tensor | None
    prior: Prior
    # inside vectorized_samples(model, S, batch_size=B): the B of the model's input, whose
    # rows a layer receiving exactly B of them repeats S times itself (see forward)
    _prefix_rows: int | None = None
    # ... and whether a Bayesian layer has made the S copies since the context was entered
    # (one flag shared by the model's layers): a layer that receives S * B rows before that
    # did not get them from a Bayesian layer's copies
    _prefix_copied: list[bool] | None = None

    def _init_posterior(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        *,
        prior: Prior | None,
        estimator: str,
        kl: str,
        mu_init: str | tuple[float, float],
        rho_init: float | tuple[float, float],
        fan_in: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        bias_size: int | None = None,
    ) -> None:
        """Create and initialise the posterior parameters (``weight_mu``/``weight_rho`` of
        ``weight_shape``, ``bias_mu``/``bias_rho`` of shape (``bias_size``,) when ``bias``).
        ``bias_size`` None: ``weight_shape[0]``, the output dimension of a layer whose weight
        is (out, ...); a transposed convolution's weight is (in, out / groups, *k) and gives
        its ``out_channels``."""
        check_float_dtype(type(self).__name__, dtype)
        bias = check_flag(type(self).__name__, "bias", bias)
        if estimator not in est.ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; accepted values: {', '.join(est.ESTIMATORS)}"
            )
        if prior is None:
            prior = GaussianPrior(1.0)
        if not isinstance(prior, Prior):
            raise TypeError(
                f"prior must be a bbb Prior (GaussianPrior, ScaleMixturePrior, LaplacePrior), "
                f"got {type(prior).__name__}"
            )
        if dtype is not None or device is not None:
            # The prior's hyper-parameters follow the layer's dtype and device (in place: a
            # prior object shared by several layers should be shared by layers of one dtype
            # and device). Without the device, device="meta" left them on the CPU, where
            # to_empty() (deferred initialisation) then filled them with uninitialised memory
            # (a prior sigma of 0: a KL of inf or a ZeroDivisionError), and device="cuda"
            # left CPU buffers in a CUDA model.
            prior = prior.to(device=device, dtype=dtype)
        # validated before any allocation, with errors that name the argument
        mu_init_range(mu_init, fan_in)
        rho_init_range(rho_init)
        self.estimator = estimator
        self.kl_mode = _kl.resolve_kl_mode(kl, prior)
        self.prior = prior
        # the kl option as given: "auto" is resolved again when the prior is replaced
        self._kl_request = kl
        self.mode = "sample"
        self.num_samples = 1
        self._fan_in = fan_in
        out = weight_shape[0] if bias_size is None else bias_size
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out, device=device, dtype=dtype))
            self.bias_rho = nn.Parameter(torch.empty(out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self.register_buffer("weight_mask", None)
        self._record: _Record | None = None
        self._frozen: _Record | None = None
        # the constructor's initialisation, re-applied by reset_parameters() without arguments
        self._mu_init = mu_init if isinstance(mu_init, str) else tuple(mu_init)
        # a number, else (checked by rho_init_range) a sequence of two numbers
        rho = rho_init if _is_real(rho_init) else tuple(cast("Sequence[float]", rho_init))
        self._rho_init = rho
        self.reset_parameters()

    # ----------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(
        self,
        mu_init: str | tuple[float, float] | None = None,
        rho_init: float | tuple[float, float] | None = None,
    ) -> None:
        """Initialise the posterior (every ``mu`` and ``rho``, weight and bias) in place.

        Args:
            mu_init: ``"paper"``: mu ~ U(-0.2, 0.2) (the layer of the paper's common
                implementation); ``"fan_in"``: mu ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
                scale of ``nn.Linear``/``nn.ConvNd``; or a ``(low, high)`` uniform range.
                ``None`` (default): the ``mu_init`` the layer was constructed with.
            rho_init: a constant, or a ``(low, high)`` uniform range for rho
                (sigma = softplus(rho); (-5, -4) gives sigma of about 0.007-0.018).
                ``None`` (default): the ``rho_init`` the layer was constructed with.

        Arguments given here apply to this call only (a later call without arguments
        re-applies the constructor's initialisation).
        """
        if mu_init is None:
            # layers pickled before the init was stored: the former default
            mu_init = getattr(self, "_mu_init", "fan_in")
        if rho_init is None:
            rho_init = getattr(self, "_rho_init", (-5.0, -4.0))
        low, high = mu_init_range(mu_init, self._fan_in)
        r_low, r_high = rho_init_range(rho_init)
        for mu, rho in self._pairs():
            mu.uniform_(low, high)
            rho.uniform_(r_low, r_high)

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        pairs: list[tuple[Tensor, Tensor]] = [(self.weight_mu, self.weight_rho)]
        if self.bias_mu is not None and self.bias_rho is not None:
            pairs.append((self.bias_mu, self.bias_rho))
        return pairs

    # ----------------------------------------------------------------- posterior access
    @property
    def weight_sigma(self) -> Tensor:
        """Posterior standard deviation of the weights, softplus(rho) (shape W)."""
        return F.softplus(self.weight_rho)

    @property
    def bias_sigma(self) -> Tensor | None:
        """Posterior standard deviation of the biases (shape (O,)), or None."""
        return None if self.bias_rho is None else F.softplus(self.bias_rho)

    def _posterior(self) -> est.Posterior:
        return self._posterior_and_sigmas()[0]

    def _param_versions(self) -> tuple[int, ...]:
        """The key that tells whether what a forward pass left for :meth:`kl` is current.

        For each mu and rho: its identity and in-place version counter (a replaced
        parameter, ``load_state_dict`` and most optimizers' steps move them), and the
        identity and version of its ``.grad``. The gradient's part catches what moves no
        version counter after a backward pass: fused optimizers (``torch.optim.Adam(
        fused=True)``, the trainer's Adam), which update the parameters in place without
        bumping it, and manual updates through ``.data`` (a backward pass creates or
        accumulates into ``.grad``, so a step that follows it is never missed). An edit
        through ``.data`` with no backward pass since the forward is not seen (see
        :meth:`kl`).

        Inside a ``torch.compile``d region the key is :data:`_UNKNOWN_VERSIONS`, which
        :meth:`_current` never takes as current: the identities and counters would be baked
        into the graph as constants, and dynamo guards on the gradient's identity, which
        recompiled the model at every training step (a new ``.grad`` after each backward;
        torch falls back to eager after 8). What a compiled forward leaves is then recomputed
        by :meth:`kl` from the current parameters (the Monte Carlo KL at the same noise).
        """
        if torch.compiler.is_compiling():
            return _UNKNOWN_VERSIONS
        key: list[int] = []
        for pair in self._pairs():
            for q in pair:
                # .grad of a non-leaf (a tensor swapped in by torch.func.functional_call)
                # would warn; such tensors are not updated by optimizers
                g = q.grad if q.is_leaf else None
                key += (id(q), q._version, id(g), -1 if g is None else g._version)
        return tuple(key)

    def _current(self, record: _Record) -> bool:
        """Whether what ``record`` (a forward pass's) holds was computed from the parameters
        as they are now; never in a compiled region, nor for a record left by one."""
        if torch.compiler.is_compiling():
            return False
        versions = record.param_versions
        return versions != _UNKNOWN_VERSIONS and versions == self._param_versions()

    def _prior_key(self) -> tuple[int, ...]:
        """The prior's identity and each of its tensors' identity and in-place version: what
        a KL computed by the forward pass (``kl_w``) depends on besides mu and rho. Empty in
        a compiled region, whose record is never current (:meth:`_current`)."""
        if torch.compiler.is_compiling():
            return ()
        prior = self.prior
        key = [id(prior)]
        for t in (*prior._buffers.values(), *prior._parameters.values()):
            if t is None:
                continue
            # an inference tensor tracks no version, so its edits cannot be seen: a number
            # never used before, so that no record's key matches (kl() recomputes)
            key += (id(t), next(_UNSEEN) if t.is_inference() else t._version)
        return tuple(key)

    def _cached_sigmas(self) -> list[Tensor | None]:
        """The forward pass's softplus(rho) of weight and bias, if no parameter has changed
        since (then the forward's weight sample is current too)."""
        rec = self._record
        if rec is None or rec.sigma_w is None or not self._current(rec):
            return [None, None]
        return [rec.sigma_w, rec.sigma_b]

    def _posterior_and_sigmas(self) -> tuple[est.Posterior, Tensor, Tensor | None]:
        """The (masked) posterior and the unmasked ``softplus(rho)`` of weight and bias."""
        sigma_w = F.softplus(self.weight_rho)
        w_mu: Tensor = self.weight_mu
        w_sigma = sigma_w
        if self.weight_mask is not None:
            w_mu = w_mu * self.weight_mask
            w_sigma = w_sigma * self.weight_mask
        sigma_b = None if self.bias_rho is None else F.softplus(self.bias_rho)
        return est.Posterior(w_mu, w_sigma, self.bias_mu, sigma_b), sigma_w, sigma_b

    # ----------------------------------------------------------------- the ops (subclasses)
    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def op_batched(
        self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:  # pragma: no cover - subclasses override
        pass

    def _shape_error(self, x: Tensor, expected: str, problem: str) -> ValueError:
        """A ValueError for an input of the wrong shape, in the caller's terms.

        Inside :func:`vectorized_samples` (``bbb.predict``, ``bbb.ELBO``) the layer receives the
        S Monte Carlo copies of the batch stacked along dim 0, (S * B, ...); the message then
        reports the per-sample shape (B, ...) and says that S samples are stacked (built only
        on the error path: the check itself costs nothing more).

        Args:
            x: the input the layer received.
            expected: the expected per-sample shape, e.g. ``"(N, ..., 4)"``.
            problem: what is wrong, e.g. ``"the last dimension must be in_features=4, got 5"``.
        """
        name = type(self).__name__
        shape = tuple(x.shape)
        s = self.num_samples
        if s > 1 and x.dim() >= 1 and shape[0] % s == 0:
            got = str((shape[0] // s, *shape[1:]))
            note = (
                f" (per Monte Carlo sample: this layer received {shape}, the {s} samples of "
                "bbb.vectorized_samples, as used by bbb.predict and bbb.ELBO, stacked along "
                "dim 0)"
            )
        elif s > 1:
            got = str(shape)
            note = (
                f" (inside bbb.vectorized_samples with {s} samples, as used by bbb.predict and "
                f"bbb.ELBO, the layer's input is {s} copies of the batch stacked along dim 0)"
            )
        else:
            got, note = str(shape), ""
        return ValueError(f"{name} expected input of shape {expected}, got {got}: {problem}{note}")

    # ----------------------------------------------------------------- forward
    def _noise(self, num_samples: int, like: Tensor) -> _Record:
        # bbb.nn.noise.randn: torch.randn's distribution, filled by all threads (issue 8)
        eps_w = _rand.randn(
            (num_samples, *self.weight_mu.shape), dtype=like.dtype, device=like.device
        )
        eps_b = None
        if self.bias_mu is not None:
            eps_b = torch.randn(
                (num_samples, self.bias_mu.shape[0]), dtype=like.dtype, device=like.device
            )
        return _Record(eps_w=eps_w, eps_b=eps_b)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x``; inside :func:`vectorized_samples`, ``x`` is (S * B, ...)
        (or (B, ...) with its ``batch_size=B``: the S copies are made here)."""
        num_samples = self.num_samples
        rows = self._prefix_rows
        if rows is not None and num_samples > 1 and x.dim() >= 1:
            # vectorized_samples(..., batch_size=B): the model was called on the B inputs
            # themselves, so the layers before this one ran once per example; the S copies
            # start here (marked identical: local/flipout compute their shared part once).
            # Before the input checks, which see (S * B, ...) as on every other path: a
            # BayesLinearEnsemble's (K, N, in) was refused here for lacking its S * K rows
            copied = self._prefix_copied
            if x.shape[0] == rows:
                x = repeat_samples(x, num_samples)
                if copied is not None:
                    copied[0] = True
            elif x.shape[0] != rows * num_samples:
                raise ValueError(
                    f"{type(self).__name__}: received {x.shape[0]} rows inside "
                    f"vectorized_samples(..., batch_size={rows}) with num_samples={num_samples}: "
                    f"expected {rows} (the batch, repeated here) or {rows * num_samples} (its "
                    "copies); a model that reshapes its rows (sequences flattened into the "
                    "batch) needs the copies from its input: leave shared_prefix off"
                )
            elif copied is not None and not copied[0]:
                # S * B rows before any Bayesian layer made the copies: the model made them
                # from its B inputs (a sequence of length S flattened into the batch), and
                # taking them for the S copies mixed the rows of different examples silently
                raise ValueError(
                    f"{type(self).__name__}: received {x.shape[0]} = {num_samples} x {rows} rows "
                    f"inside vectorized_samples(..., batch_size={rows}) before any Bayesian "
                    f"layer made the {num_samples} copies of the batch: the model made these "
                    "rows itself (a sequence of length num_samples flattened into the batch?) "
                    "and they would be taken for the copies; a model that reshapes its rows "
                    "needs the copies from its input: leave shared_prefix off"
                )
        self._check_input(x)
        check_input_dtype(type(self).__name__, x, self.weight_mu.dtype)
        if num_samples > 1 and x.shape[0] % num_samples != 0:
            raise ValueError(
                f"{type(self).__name__}: batch of {x.shape[0]} rows is not a multiple of "
                f"num_samples={num_samples} (inside vectorized_samples the S copies of the batch "
                "are stacked along the first dimension)"
            )
        mode = self.mode
        if mode == "mean":
            # no softplus: the mean network does not need sigma
            w_mu: Tensor = self.weight_mu
            if self.weight_mask is not None:
                w_mu = w_mu * self.weight_mask
            self._record = _Record()
            return self.op(x, w_mu, self.bias_mu)
        if self._fusable(mode, num_samples):
            return self._forward_fused(x, num_samples)
        post, s_w, s_b = self._posterior_and_sigmas()
        versions = self._param_versions()
        if mode == "frozen":
            noise = self._frozen
            if noise is None or noise.eps_w is None:
                if _exporting_or_tracing():
                    # drawn inside the trace, the sample would be a random node of the
                    # exported/traced graph, not kept by it: a new sample at every call
                    raise RuntimeError(
                        f"{type(self).__name__} is in 'frozen' mode without a frozen sample "
                        "while being exported or traced (torch.export, torch.jit.trace, "
                        "torch.onnx.export): the sample would be drawn anew at every call "
                        "of the exported model. Call the model once in frozen mode before "
                        "exporting (model(x)), which draws the sample that the export then "
                        "keeps as a constant; bbb.resample(model) only forgets the sample"
                    )
                noise = self._noise(num_samples, self.weight_mu)
                self._frozen = noise
            elif noise.eps_w.shape[0] != num_samples:
                # never replace the frozen sample behind the user's back (Thompson sampling
                # relies on it being kept until resample)
                raise ValueError(
                    f"{type(self).__name__} is in 'frozen' mode with {noise.eps_w.shape[0]} "
                    f"frozen weight sample(s), but this pass asks for num_samples={num_samples}; "
                    "call bbb.resample(model) to draw a new frozen sample, or use the same "
                    "num_samples"
                )
            like = self.weight_mu
            assert noise.eps_w is not None
            if noise.eps_w.dtype != like.dtype or noise.eps_w.device != like.device:
                # the layer was cast or moved (model.half(), .to(device)) since the sample was
                # drawn: the same sample, in the parameters' dtype and on their device. The
                # sample as drawn is kept beside a cast copy (``drawn``) and each later cast
                # starts from it: model.half().float() rounded the sample to float16 for good.
                dw, db = noise.drawn if noise.drawn is not None else (noise.eps_w, noise.eps_b)
                dw = dw.to(like.device)
                db = None if db is None else db.to(like.device)
                noise = self._frozen = _Record(
                    eps_w=dw.to(like.dtype),
                    eps_b=None if db is None else db.to(like.dtype),
                    drawn=None if dw.dtype == like.dtype else (dw, db),
                )
            assert noise.eps_w is not None
            if (
                not torch.compiler.is_compiling()  # (dynamo cannot trace is_inference)
                and noise.eps_w.is_inference()
                and not torch.is_inference_mode_enabled()
            ):
                # drawn under torch.inference_mode: the same sample, usable by autograd
                noise = self._frozen = _outside_inference(noise)
            elif torch.compiler.is_compiling() and torch.is_grad_enabled():
                assert noise.eps_w is not None
                # in a compiled region, where is_inference cannot be asked: a copy of the
                # sample for this pass (a sample drawn under torch.inference_mode, by the
                # compiled model or not, failed the next compiled pass with autograd:
                # 'Inference tensors cannot be saved for backward')
                noise = _Record(
                    eps_w=noise.eps_w.clone(),
                    eps_b=None if noise.eps_b is None else noise.eps_b.clone(),
                )
            assert noise.eps_w is not None
            y, w, b = est.reparam(self, x, post, noise.eps_w, noise.eps_b)
            self._record = _Record(noise.eps_w, noise.eps_b, w, b, s_w, s_b, versions)
            return y
        if self.estimator == "local":
            self._record = _Record(sigma_w=s_w, sigma_b=s_b, param_versions=versions)
            return est.local(self, x, post)
        noise = self._noise(num_samples, self.weight_mu)
        assert noise.eps_w is not None
        if self.estimator == "reparam":
            y, w, b = est.reparam(self, x, post, noise.eps_w, noise.eps_b)
            self._record = _Record(noise.eps_w, noise.eps_b, w, b, s_w, s_b, versions)
            return y
        self._record = _Record(
            noise.eps_w, noise.eps_b, sigma_w=s_w, sigma_b=s_b, param_versions=versions
        )
        return est.flipout(self, x, post, noise.eps_w, noise.eps_b)

    def _fusable(self, mode: str, num_samples: int) -> bool:
        """Whether the forward can use :func:`bbb.kernels.sample_and_kl` (compiled kernels:
        closed-form KL to a Gaussian prior) or :func:`bbb.kernels.native_sample_and_kl`
        (native kernels, float32 on CPU: that, or the Monte Carlo KL to the scale mixture):
        no pruning mask; compiled kernels take one weight sample per pass (any number for
        local), native kernels any number."""
        backend = _kernels.get_kernels()
        if backend == "eager" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            # Inside the user's torch.compile(model): the layer's plain formulas, which that
            # compilation fuses anyway. The fused nodes broke the graph there (the native
            # library's ctypes calls, the prior's version checks: 10-15 graph breaks for two
            # layers, and torch.compile(model, fullgraph=True) failed). Under torch.jit.trace
            # the fused autograd nodes were recorded as Python calls, which torch.jit.save
            # (and the legacy torch.onnx.export) refused: "Could not export Python function
            # call '_NativeSampleKL'"
            return False
        if backend == "compile":
            ok = (
                self.kl_mode == "closed_form"
                and type(self.prior) is GaussianPrior
                and (num_samples == 1 or self.estimator == "local")
            )
        elif backend == "native":  # any number of weight samples
            ok = _kernels.native_prior(self.prior, self.kl_mode) is not None
            ok = ok and _kernels.native_fusable(self.weight_mu)
        else:
            return False
        return (
            ok
            # under no_grad the fused node would leave a KL without a graph for a later kl()
            and torch.is_grad_enabled()
            and mode == "sample"
            and self.weight_mask is None
            # float16/bfloat16: the KL is summed in float32 by bbb.kl (the fused kernel sums
            # in the parameters' dtype, which overflows)
            and self.weight_mu.dtype not in _kl.LOW_PRECISION_DTYPES
        )

    def _forward_fused(self, x: Tensor, num_samples: int) -> Tensor:
        """The sampling forward with the weights' tensor and KL from one fused autograd node."""
        if _kernels.get_kernels() == "native":
            return self._forward_native(x, num_samples)
        versions = self._param_versions()
        pkey = self._prior_key()
        s_b = None if self.bias_rho is None else F.softplus(self.bias_rho)
        assert isinstance(self.prior, GaussianPrior)
        # w_sigma is not read by the estimators when their tensor is given (placeholder)
        post = est.Posterior(self.weight_mu, self.weight_mu, self.bias_mu, s_b)
        if self.estimator == "local":
            var, kl_w = _kernels.sample_and_kl(
                "local", self.weight_mu, self.weight_rho, None, self.prior
            )
            self._record = _Record(
                sigma_b=s_b, param_versions=versions, kl_w=kl_w, kl_mode="closed_form"
            )
            return est.local(self, x, post, w_var=var)
        noise = self._noise(num_samples, self.weight_mu)
        assert noise.eps_w is not None
        kind = self.estimator
        t, kl_w = _kernels.sample_and_kl(
            kind, self.weight_mu, self.weight_rho, noise.eps_w[0], self.prior
        )
        if kind == "reparam":
            y, w, b = est.reparam(self, x, post, noise.eps_w, noise.eps_b, w1=t)
            self._record = _Record(
                noise.eps_w, noise.eps_b, w, b, sigma_b=s_b, param_versions=versions, kl_w=kl_w,
                kl_mode="closed_form", prior_key=pkey,
            )  # fmt: skip
            return y
        self._record = _Record(
            noise.eps_w, noise.eps_b, sigma_b=s_b, param_versions=versions, kl_w=kl_w,
            kl_mode="closed_form", prior_key=pkey,
        )  # fmt: skip
        return est.flipout(self, x, post, noise.eps_w, noise.eps_b, dw1=t)

    def _forward_native(self, x: Tensor, num_samples: int = 1) -> Tensor:
        """:meth:`_forward_fused` with the native kernels: the weight's and the bias's
        estimator tensors, noise and KL from one native node."""
        versions = self._param_versions()
        pkey = self._prior_key()
        kind, mode = self.estimator, self.kl_mode
        used = [False]  # set by the node's backward: kl() then recomputes (graph freed)
        s = 1 if kind == "local" else num_samples
        # flipout, local: the mean path's mu comes through the node, whose backward adds that
        # gradient to the KL's in its own pass (one pass fewer); reparam's t carries it
        routed = kind != "reparam"
        # one node for weights and bias; kl_w is the layer's whole KL
        t, tb, kl_w, eps_w, eps_b, mu_w, mu_b = _kernels.native_layer_sample_and_kl(
            kind, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, self.prior, mode,
            used, s, routed,
        )  # fmt: skip
        if not routed:
            mu_w, mu_b = self.weight_mu, self.bias_mu
        assert mu_w is not None
        # the sigmas are not read by the estimators when their tensors are given (placeholders)
        post = est.Posterior(mu_w, mu_w, mu_b, mu_b)
        if kind == "local":
            # (with the Monte Carlo KL, eps_w is the KL's own sample: not the layer's noise)
            self._record = _Record(
                param_versions=versions,
                kl_w=kl_w,
                kl_all=True,
                kl_mode=mode,
                kl_used=used,
                prior_key=pkey,
            )
            return est.local(self, x, post, w_var=t, b_var=tb)
        assert eps_w is not None
        one = s == 1  # one sample: W-shaped tensors, else (S, *W) ones
        ew = eps_w.unsqueeze(0) if one else eps_w
        eb = None if eps_b is None else (eps_b.unsqueeze(0) if one else eps_b)
        if kind == "reparam":
            y, w, b = est.reparam(self, x, post, ew, eb, w1=t, b1=tb)
            self._record = _Record(
                ew, eb, w, b, param_versions=versions, kl_w=kl_w, kl_all=True, kl_mode=mode,
                kl_used=used, prior_key=pkey,
            )  # fmt: skip
            return y
        self._record = _Record(
            ew,
            eb,
            param_versions=versions,
            kl_w=kl_w,
            kl_all=True,
            kl_mode=mode,
            kl_used=used,
            prior_key=pkey,
        )
        return est.flipout(self, x, post, ew, eb, dw1=t, db1=tb)

    # ----------------------------------------------------------------- KL
    def kl(self) -> Tensor:
        """KL(q || p) in nats for the latest forward pass, a scalar that backpropagates.

        ``closed_form``: the exact sum over weights (pruned weights excluded). ``mc``: the
        estimate log q(w) - log p(w), averaged over the S weight samples of the latest pass.
        The weight sample is the one the forward pass used for ``reparam`` and ``flipout``
        (``w = mu + sigma * eps`` with flipout's shared ``eps``), and the frozen sample in
        ``frozen`` mode. The local estimator and the mean mode never draw weights: for them an
        independent weight sample is drawn for the KL alone.

        For float16/bfloat16 parameters the per-weight terms and their sum are computed in
        float32 (a sum over more than a few thousand weights exceeds float16's range) and the
        result is a float32 scalar; gradients still reach the low-precision parameters. For
        other dtypes the result has the parameters' dtype.

        What the forward pass left for the KL (its softplus, weight sample, or the KL of a
        fused kernel) is used only while the parameters are unchanged: kl() after an
        optimizer step (fused ones included), ``load_state_dict`` or an update through
        ``.data`` after a backward pass is that of the current parameters (the Monte Carlo KL
        at the same noise). An edit through ``.data`` with no backward pass since the forward
        moves nothing the layer can see cheaply: run a forward pass after it.
        """
        total = self.weight_mu.new_zeros((), dtype=_kl.kl_dtype(self.weight_mu.dtype))
        mask = self.weight_mask
        if (
            self._record is not None
            # in a compiled region (a kl() inside a compiled training step) the closed form
            # reads nothing of the record (it is never current there, _current), and dynamo
            # cannot trace these checks: they broke the graph once per layer. (The Monte
            # Carlo KL keeps them, a graph break per layer: a copy of the noise made in the
            # graph did not help, AOT autograd saved the inference tensor it was made from.)
            and not (torch.compiler.is_compiling() and self.kl_mode == "closed_form")
            and not torch.is_inference_mode_enabled()
        ):
            # a forward pass under torch.inference_mode left inference tensors, which autograd
            # cannot save: the same values as ordinary tensors (once; the record keeps them)
            self._record = _outside_inference(self._record)
        sigmas = self._cached_sigmas()
        record = self._record
        if (
            record is not None
            and record.kl_w is not None
            and record.kl_mode == self.kl_mode
            and record.prior_key == self._prior_key()
            and not (record.kl_used is not None and record.kl_used[0])
            and mask is None
            and self._current(record)
        ):
            # the weights' KL from the forward's fused node (bbb.kernels.sample_and_kl), or
            # the whole layer's (native_layer_sample_and_kl: closed form, or the Monte Carlo
            # KL at the pass's sample)
            total = record.kl_w
            if not record.kl_all and self.bias_mu is not None and self.bias_rho is not None:
                total = total + _kl.closed_form_kl_sum(
                    self.bias_mu, self.bias_rho, self.prior, sigma=record.sigma_b
                )
            return total
        if self.kl_mode == "closed_form":
            # Fused closed form for the Gaussian prior (bbb.kl.closed_form_kl_sum), reusing the
            # forward's softplus (detached: the KL's own backward formula reaches rho).
            for i, (mu, rho) in enumerate(self._pairs()):
                total = total + _kl.closed_form_kl_sum(
                    mu, rho, self.prior, sigma=sigmas[i], mask=mask if i == 0 else None
                )
            return total
        if record is None or record.eps_w is None:
            record = self._noise(1, self.weight_mu)
        eps_list = [record.eps_w, record.eps_b]
        # the forward's weight sample, unless mu or rho changed since (then it is rebuilt from
        # the same noise and the current parameters)
        current = self._current(record)
        samples = [record.w, record.b] if current else [None, None]
        for i, (mu, rho) in enumerate(self._pairs()):
            eps = eps_list[i]
            assert eps is not None
            # Fused estimate (bbb.kl.mc_kl_sum): the forward's sample and softplus are reused
            # (detached), gradients reach mu and rho through its closed-form backward.
            total = total + _kl.mc_kl_sum(
                mu,
                rho,
                eps,
                self.prior,
                sigma=sigmas[i],
                w=samples[i],
                mask=mask if i == 0 else None,
            )
        return total

    def __setattr__(self, name: str, value: object) -> None:
        if name == "prior" and "_kl_request" in self.__dict__:
            # a prior replaced after construction (layer.prior = ScaleMixturePrior(...)): the
            # kl option is resolved for it as the constructor would ("auto" stayed the old
            # prior's "closed_form", and kl() then failed advising kl="auto"); an invalid
            # replacement is refused before anything changes
            if not isinstance(value, Prior):
                raise TypeError(
                    "prior must be a bbb Prior (GaussianPrior, ScaleMixturePrior, LaplacePrior),"
                    f" got {type(value).__name__}"
                )
            mode = _kl.resolve_kl_mode(self._kl_request, value)
            super().__setattr__(name, value)
            # (torch hints Tensor | Module; nn.Module.__setattr__ stores any value)
            super().__setattr__("kl_mode", mode)  # type: ignore[arg-type]
            return
        if "_kl_request" in self.__dict__:
            # the options a forward pass dispatches on, set after construction: validated as
            # the constructor does (a typo ran silently: an unknown estimator as flipout, an
            # unknown mode as "sample", an unknown or "auto" kl_mode as the Monte Carlo KL)
            if name == "estimator" and value not in est.ESTIMATORS:
                raise ValueError(
                    f"unknown estimator {value!r}; accepted values: {', '.join(est.ESTIMATORS)}"
                )
            if name == "mode":
                _check_mode(value)
            if name == "kl_mode":
                # as the constructor's kl option: "auto" resolved for the prior, and kept as
                # the request that a replaced prior is resolved with ("closed_form" for a
                # prior without one is left for kl() to refuse, as before)
                if value not in _kl.KL_MODES:
                    raise ValueError(
                        f"unknown kl mode {value!r}; accepted values: {', '.join(_kl.KL_MODES)}"
                    )
                # (torch hints Tensor | Module; nn.Module.__setattr__ stores any value)
                super().__setattr__("_kl_request", value)  # type: ignore[arg-type]
                if value == "auto":
                    value = _kl.resolve_kl_mode("auto", self.prior)
        # torch's hint says Tensor | Module; nn.Module.__setattr__ stores any other value as
        # a plain attribute
        super().__setattr__(name, value)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- modes
    def resample(self) -> None:
        """Forget the frozen weight sample; the next forward in ``"frozen"`` mode draws anew
        (``load_state_dict`` does not: see the module docstring, "Saving and loading")."""
        self._frozen = None

    def set_sampling(self, mode: str) -> None:
        """Set this layer's sampling mode (``"sample"``, ``"mean"`` or ``"frozen"``)."""
        if mode not in SAMPLING_MODES:
            raise ValueError(
                f"unknown sampling mode {mode!r}; accepted values: {', '.join(SAMPLING_MODES)}"
            )
        self.mode = mode

    # ----------------------------------------------------------------- state dict
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight_mask"
        mask = state_dict.get(key)
        if key in state_dict and self.weight_mask is None:
            problem = self._loaded_mask_problem(key, mask)
            if problem is not None:
                # an error in torch's words (a None too, as torch refuses it for a pruned
                # layer); the key is then not reported as unexpected too
                error_msgs.append(problem)
                state_dict = {k: v for k, v in state_dict.items() if k != key}
            else:
                # in the parameters' dtype, as prune_by_snr makes it (a float32 checkpoint's
                # mask in a bfloat16 layer made its weights float32 and every forward fail)
                w = self.weight_mu
                self.weight_mask = torch.empty_like(
                    cast(Tensor, mask), device=w.device, dtype=w.dtype
                )
        elif key not in state_dict and self._holds_all_but_the_mask(state_dict, prefix):
            # an unpruned state of this layer. Only where the key is absent: a None under it
            # dropped the mask, then torch failed the load on the key as unexpected (a failed
            # load lost the mask); it is now torch's error for a non-tensor, the mask kept
            self.weight_mask = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._mask_like_weights()

    def _holds_all_but_the_mask(self, state_dict: Mapping[str, object], prefix: str) -> bool:
        """Whether ``state_dict`` holds every key of this layer's own state (``weight_mu``,
        ``weight_rho``, ``bias_mu`` and ``bias_rho`` if it has a bias; not its prior's) but
        the pruning mask: an unpruned state of the layer, whose load drops the layer's mask.

        A state with only some of them (a partial ``load_state_dict(..., strict=False)``, or
        one shard of a load in several calls with disjoint keys) leaves the mask alone: it
        was dropped as soon as ``weight_mu`` was there, so a mask loaded from an earlier shard
        with ``weight_rho`` was lost. A shard with all of them but not the mask cannot be told
        from an unpruned state: load a layer's mask with its weights or after them.
        """
        own = itertools.chain(self._parameters.items(), self._buffers.items())
        keys = [
            prefix + name
            for name, value in own
            if value is not None
            and name != "weight_mask"
            and name not in self._non_persistent_buffers_set
        ]
        return all(k in state_dict for k in keys)

    def _loaded_mask_problem(self, key: str, mask: object) -> str | None:
        """Why the state's ``mask`` (under ``key``) cannot be this unpruned layer's pruning
        mask, in torch's words, or None. It must be a tensor (a list or a NumPy array failed
        with an AttributeError or a TypeError of ``empty_like``, where torch names the key
        for a layer that has the buffer) of the weights' shape W (the mask multiplies the
        weights: any other shape is another layer's; it was loaded silently, and every later
        forward failed with a broadcast error)."""
        if not torch.overrides.is_tensor_like(mask):
            return (
                f'While copying the parameter named "{key}", expected torch.Tensor or '
                f"Tensor-like object from checkpoint but received {type(mask)}"
            )
        shape, w_shape = cast(Tensor, mask).shape, self.weight_mu.shape
        if shape != w_shape:
            return (
                f"size mismatch for {key}: copying a param with shape {shape} from "
                f"checkpoint, the shape in current model is {w_shape} (the weights')."
            )
        return None

    def _mask_like_weights(self) -> None:
        """Give the pruning mask (shape W, 0/1) the weights' dtype and device, as
        :func:`bbb.prune_by_snr` makes it, if it has others.

        After ``load_state_dict(..., assign=True)``: torch assigns each tensor of the state as
        it is, so the parameters take the state's dtype and device (as for ``nn.Linear``), and
        so did the mask, whatever the weights' were: a float32 checkpoint's mask with bfloat16
        weights (``weight_mu`` and ``weight_rho`` cast in the state) failed every forward with
        "self and mat2 must have the same dtype". The copy path (``assign=False``) already
        casts into the layer's mask; the mask's values are exact in any float dtype. Not onto
        "meta" weights (a partial load of the mask before the weights' would lose its values).
        """
        mask, w = self.weight_mask, self.weight_mu
        if mask is None or (w.is_meta and not mask.is_meta):
            return
        if mask.dtype != w.dtype or mask.device != w.device:
            self.weight_mask = mask.to(device=w.device, dtype=w.dtype)

    def _apply(self: _M, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _M:
        # .to(device/dtype), .double(), .half(), .cuda(), .cpu(), to_empty(): what the latest
        # forward left for kl() is on the old device and dtype and is not seen as stale (the
        # parameters keep their identity and version counter). Its noise is kept, moved like
        # the parameters (kl()'s Monte Carlo estimate stays at the same noise), the rest is
        # recomputed by kl(): before, kl() mixed the old tensors with the moved parameters
        # (a device-mismatch error after model.cpu() of a CUDA-trained model).
        result = super()._apply(fn, recurse)
        rec = self.__dict__.get("_record")
        like = self.weight_mu
        frozen = self.__dict__.get("_frozen")
        if (
            frozen is not None
            and frozen.eps_w is not None
            and frozen.eps_w.is_meta
            and not like.is_meta
        ):
            # a sample drawn on "meta" has no values: the next frozen pass draws one
            self._frozen = None
        if rec is not None and rec.eps_w is not None and rec.eps_w.is_meta and not like.is_meta:
            # a forward on "meta" (deferred initialisation) left noise without values, which
            # to_empty() failed to copy ("Cannot copy out of meta tensor"): kl() draws anew
            self._record = None
        elif rec is not None:
            self._record = _Record(
                eps_w=None if rec.eps_w is None else rec.eps_w.to(like),
                eps_b=None if rec.eps_b is None else rec.eps_b.to(like),
            )
        return result

    def __getstate__(self) -> dict[str, object]:
        # The record of the last forward holds non-leaf tensors of the autograd graph, which
        # copy.deepcopy and pickle refuse; it is transient, so copies start without it.
        # So is the state of a vectorized_samples context, which restores it on exit for the
        # layers it entered, never for a copy: a copy made inside one kept num_samples=S for
        # good (every later forward of B rows took them for S stacked copies, or failed as not
        # a multiple of S), and shared the context's flag list with the original.
        state = dict(super().__getstate__())
        state["_record"] = None
        state["num_samples"] = 1
        state.pop("_prefix_rows", None)  # the class defaults: None
        state.pop("_prefix_copied", None)
        return state

    def __prepare_scriptable__(self) -> nn.Module:
        # called by torch.jit.script on every submodule: a clear refusal instead of
        # TorchScript's "Unknown type annotation: 'nn.Parameter'"
        raise TypeError(
            f"{type(self).__name__} (a bbb Bayesian layer) cannot be compiled by "
            "torch.jit.script: its forward draws and records weight samples in Python. Use "
            "torch.compile(model) instead, or bbb.to_deterministic(model) for a plain "
            "network of the mean weights, which TorchScript accepts"
        )

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, kl={self.kl_mode!r}, mode={self.mode!r}"


# --------------------------------------------------------------------- model-level helpers
def bayes_modules(model: nn.Module) -> Iterator[BayesModule]:
    """All Bayesian layers inside ``model`` (including ``model`` itself)."""
    for m in model.modules():
        if isinstance(m, BayesModule):
            yield m


def refuse_sharded(layer: nn.Module, name: str, who: str) -> None:
    """A RuntimeError if ``layer`` holds FSDP-sharded (``DTensor``) parameters.

    Outside an FSDP module's forward its parameters are shards: a KL, an SNR or a compact
    export computed from them is a rank's part (a DTensor, or "Cannot flatten unevenly
    sharded tensor"). Free unless ``torch.distributed.tensor`` has been imported.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None or torch.compiler.is_compiling():
        return
    if any(isinstance(p, dtensor) for p in layer.parameters(recurse=False)):
        raise RuntimeError(
            f"{who}: {f'layer {name}' if name else 'a Bayesian layer'} holds FSDP-sharded "
            "parameters (this rank's "
            "shards, outside the FSDP module's forward); gather them first: "
            "root.unshard(), then the call, then root.reshard() (root: the module "
            "fully_shard wrapped)"
        )


def kl_divergence(model: nn.Module) -> Tensor:
    """Summed KL(q || p) (nats) of all Bayesian layers for the latest forward pass.

    A scalar tensor that backpropagates to every ``mu`` and ``rho`` (float32 for
    float16/bfloat16 layers, see :meth:`BayesModule.kl`). Zero (a tensor) for a model without
    Bayesian layers. Under FSDP, call it inside the sharded module's forward (as
    :class:`bbb.ELBO` does) or between its ``unshard()`` and ``reshard()``: on shards it is a
    RuntimeError.
    """
    total: Tensor | None = None
    for m in bayes_modules(model):
        refuse_sharded(m, "", "kl_divergence")
        k = m.kl()
        total = k if total is None else total + k
    if total is None:
        # in the parameters' dtype (float32 for float16/bfloat16, as kl() gives), float32 when
        # there are none: a float64 model's zero was float32
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        if p is None:
            return torch.zeros(())
        return torch.zeros((), device=p.device, dtype=_kl.kl_dtype(p.dtype))
    return total


def _check_mode(mode: object) -> None:
    if mode not in SAMPLING_MODES:
        raise ValueError(
            f"unknown sampling mode {mode!r}; accepted values: {', '.join(SAMPLING_MODES)}"
        )


def _warn_no_layers(model: nn.Module, call: str) -> None:
    """Warn that ``call`` (a model-level helper) has no effect on ``model``, which holds no
    Bayesian layer (a torch.jit.trace'd model, a to_deterministic copy, plain layers): it
    ran silently. Not when the helper is called by bbb itself (bbb.predict and bbb.ELBO
    accept deterministic baselines); the warning points at the user's line."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller == "bbb" or caller.startswith("bbb."):
        return
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        name += f" ({getattr(model, 'original_name', 'TorchScript')}, traced or scripted)"
    warnings.warn(
        f"bbb.{call} has no effect: the model ({name}) has no Bayesian layers (bbb "
        "BayesModule). A torch.jit.trace'd model, a bbb.to_deterministic copy and plain torch "
        "layers are deterministic; pass the model with BayesLinear/BayesConv layers",
        UserWarning,
        stacklevel=3,
    )


def _has_bayes(model: nn.Module) -> bool:
    return next(bayes_modules(model), None) is not None


def set_sampling(model: nn.Module, mode: str) -> None:
    """Set the sampling mode of every Bayesian layer in ``model`` (a warning if it has none)."""
    _check_mode(mode)
    if not _has_bayes(model):
        _warn_no_layers(model, f"set_sampling(model, {mode!r})")
    for m in bayes_modules(model):
        m.set_sampling(mode)


def sampling(model: nn.Module, mode: str) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: use ``mode`` in every Bayesian layer, restore the previous modes after.

    >>> with bbb.sampling(model, "mean"):
    ...     y = model(x)          # the mean network

    An unknown mode is a ValueError; a model without Bayesian layers gets a warning (the
    context then changes nothing).
    """
    _check_mode(mode)
    if not _has_bayes(model):
        _warn_no_layers(model, f"sampling(model, {mode!r})")
    return _sampling(model, mode)


@contextlib.contextmanager
def _sampling(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    layers = list(bayes_modules(model))
    previous = [m.mode for m in layers]
    try:
        for m in layers:
            m.set_sampling(mode)
        yield model
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.mode = p


def resample(model: nn.Module) -> None:
    """Draw new frozen weight samples (at the next forward) in every Bayesian layer (a
    warning if ``model`` has none)."""
    if not _has_bayes(model):
        _warn_no_layers(model, "resample(model)")
    for m in bayes_modules(model):
        m.resample()


def shared_weight_samples(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: weight-space sampling layers keep one set of weight samples across calls.

    Inside it, every Bayesian layer with the ``reparam`` estimator in ``"sample"`` mode draws
    its S weight samples at its first forward pass and reuses them for every later pass, so
    that sample s is one network across passes (e.g. the chunks of :func:`bbb.predict`).
    Layers in another mode, and ``local``/``flipout`` layers (which never give one network per
    sample: their noise is per row), are left alone. The previous modes and frozen samples are
    restored on exit. A model without Bayesian layers gets a warning.
    """
    if not _has_bayes(model):
        _warn_no_layers(model, "shared_weight_samples(model)")
    return _shared_weight_samples(model)


@contextlib.contextmanager
def _shared_weight_samples(model: nn.Module) -> Iterator[nn.Module]:
    layers = [m for m in bayes_modules(model) if m.mode == "sample" and m.estimator == "reparam"]
    saved = [(m.mode, m._frozen) for m in layers]
    try:
        for m in layers:
            m._frozen = None
            m.mode = "frozen"
        yield model
    finally:
        for m, (mode, frozen) in zip(layers, saved, strict=True):
            m.mode, m._frozen = mode, frozen


def vectorized_samples(
    model: nn.Module, num_samples: int, *, batch_size: int | None = None
) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: Bayesian layers treat their input as ``num_samples`` stacked copies.

    Inside it the model is called on S stacked copies of the batch (shape (S * B, ...);
    :func:`bbb.nn.stacking.repeat_samples` builds them), and each Bayesian layer uses S
    independent weight samples, one per block of B rows, in one batched operation.
    Non-Bayesian layers see an ordinary batch. :class:`bbb.ELBO` and :func:`bbb.predict` use
    this; call it yourself only for custom objectives, with ``repeat_samples(x, S)`` as the
    input (a local or flipout layer that receives it then computes what all samples share
    once per example: :mod:`bbb.nn.stacking`). A model without Bayesian layers gets a
    warning (its S copies would be identical), except from bbb's own callers.

    ``batch_size=B`` allows calling the model on the B inputs themselves, (B, ...): a
    Bayesian layer that receives exactly B rows repeats them S times (as
    ``repeat_samples``), so the deterministic layers before the first Bayesian layer run once
    per example instead of once per weight sample (a frozen feature extractor under a
    Bayesian head: S times less work there). The model must not combine a tensor from before
    a Bayesian layer with one from after it (a skip connection around the first Bayesian
    layer: a shape error for B > 1; for B = 1 the one row broadcasts against the S rows,
    which is the right result, since it is the same for every sample), and randomness
    before it (dropout in training mode) is shared by the S samples. A Bayesian layer
    receiving neither B nor S * B rows is an error, and so is one receiving S * B rows before
    any Bayesian layer has made the copies since the context was entered (rows the model made
    itself, e.g. a sequence of length S flattened into the batch: they would be taken for the
    copies). :class:`bbb.ELBO` and :func:`bbb.predict` enter the context once per forward
    pass, so that check covers each of their passes; in a context of your own it covers the
    first pass only.
    """
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if not _has_bayes(model):
        _warn_no_layers(model, f"vectorized_samples(model, {num_samples!r})")
    return _vectorized_samples(
        model, int(num_samples), None if batch_size is None else int(batch_size)
    )


@contextlib.contextmanager
def _vectorized_samples(
    model: nn.Module, num_samples: int, batch_size: int | None = None
) -> Iterator[nn.Module]:
    layers = list(bayes_modules(model))
    previous = [(m.num_samples, m._prefix_rows, m._prefix_copied) for m in layers]
    copied = None if batch_size is None else [False]
    try:
        for m in layers:
            m.num_samples = num_samples
            m._prefix_rows = batch_size
            m._prefix_copied = copied
        yield model
    finally:
        for m, (n, rows, was_copied) in zip(layers, previous, strict=True):
            m.num_samples = n
            m._prefix_rows = rows
            m._prefix_copied = was_copied
