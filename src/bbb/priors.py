"""Priors over weights: Gaussian, the paper's scale mixture of two Gaussians, and Laplace.

Each prior is a small ``nn.Module`` whose hyper-parameters are buffers (so they travel with
``state_dict`` and ``.to(device/dtype)``) and which exposes a ``torch.distributions`` object
through :meth:`Prior.distribution`. The KL code (:mod:`bbb.kl`) uses that object to look up a
closed form; the Monte Carlo KL uses :meth:`Prior.log_prob`.

All priors are zero-centred by default and factorised over weights. The built-in priors are
fixed (not learned). A prior with learnable hyper-parameters is a :class:`Prior` subclass
that holds them as ``nn.Parameter`` objects and builds :meth:`Prior.distribution` from them;
both KL modes (closed form and Monte Carlo) backpropagate to them.

A prior shared by several layers (``bbb.models.bayes_mlp(..., prior=p)``) is one object with
one value per hyper-parameter, stored under each layer's key of ``state_dict()``. A state
dict that gives those keys two different values is refused on loading, naming both keys,
whichever key differs from the model's own values (the prior then keeps its value). The
tensors of the model's own ``state_dict()`` are its buffers (as torch's are its parameters and
buffers): editing one of those keys in place (``sd["0.prior.sigma"].fill_(0.5)``) changes the
shared prior itself, so every layer's key then reads 0.5, and loading the dict back is
accepted. To give the layers different priors, build them with one prior each.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch import distributions as D

__all__ = ["Prior", "GaussianPrior", "ScaleMixturePrior", "LaplacePrior", "make_prior"]

_P = TypeVar("_P", bound="Prior")


def _number(name: str, value: object, what: str) -> float:
    """``value`` as a float; a string, a bool or anything ``float()`` refuses is a ValueError
    naming the argument (a string such as "0.1" was read as a number, None or a tensor of
    several values failed in float()'s words without naming it)."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _positive(name: str, value: float) -> float:
    value = _number(name, value, "a finite positive number")
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


def _finite(name: str, value: float) -> float:
    value = _number(name, value, "a finite number")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _like(hyper: Tensor, w: Tensor) -> Tensor:
    """Hyper-parameter ``hyper`` in the floating dtype of ``w`` (the same tensor where they
    agree, or where ``w`` is not floating)."""
    if hyper.dtype == w.dtype or not w.is_floating_point():
        return hyper
    return hyper.to(w.dtype)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, computed on the CPU: under ``torch.device("meta")``
    or ``torch.set_default_device("meta")`` a tensor without an explicit device had no value
    (a CPU layer's forward raised 'Tensor.item() cannot be called on meta tensors'), and on
    a GPU default device each call was a transfer and a sync."""
    return float(torch.tensor(value, dtype=dtype, device="cpu"))


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (batched by ``vmap``, tracked by
    ``grad``): its value cannot be read back as a Python float there. True for any tensor
    in a ``torch.compile``d region, where reading a float breaks the graph (and dynamo
    cannot trace these two tests)."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_gradtrackingtensor(t)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of the same memory at the same place (a buffer and
    the detached copy of it that ``state_dict()`` returns)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.data_ptr() != 0


#: per prior, the load in progress (its error list, the object torch shares among one
#: load_state_dict's calls), the values it gave, by name: (value, key prefix), and the
#: prior's own before that load copied any, by name: (buffer value, exact value) (see
#: Prior._conflicting_shared_values)
_LOADS: weakref.WeakKeyDictionary[
    Prior, tuple[list[str], dict[str, tuple[float, str]], dict[str, tuple[float, float]]]
] = weakref.WeakKeyDictionary()


class Prior(nn.Module):
    """Base class: a factorised prior p(w) = prod_j p(w_j) over a weight tensor.

    A subclass implements :meth:`distribution` (and, for speed, may override :meth:`log_prob`
    and :meth:`grad_log_prob`). Its hyper-parameters may be learnable: held as
    ``nn.Parameter`` objects (they are then parameters of every layer using the prior) and
    used by :meth:`distribution`/:meth:`log_prob` as tensors, the KL of a layer backpropagates
    to them::

        class LearnedScale(bbb.Prior):
            def __init__(self) -> None:
                super().__init__()
                self.log_s = nn.Parameter(torch.zeros(()))

            def distribution(self) -> D.Normal:
                return D.Normal(0.0, self.log_s.exp())

    (A Normal prior with learnable hyper-parameters takes the elementwise closed form, not the
    fused one, which needs fixed values.)
    """

    def distribution(self) -> D.Distribution:
        """The scalar (batch shape ``()``) ``torch.distributions`` object of one weight."""
        raise NotImplementedError

    def log_prob(self, w: Tensor) -> Tensor:
        """Elementwise log-density (nats) of weights ``w`` (any shape; result has that shape)."""
        return self.distribution().log_prob(w)

    def grad_log_prob(self, w: Tensor) -> Tensor:
        """Elementwise derivative d log p(w) / dw, shaped like ``w`` (no graph).

        Used by the fused Monte Carlo KL (:func:`bbb.kl.mc_kl_sum`), whose backward formula
        needs it. This default differentiates :meth:`log_prob` with autograd; the built-in
        priors override it with their closed forms.
        """
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # inside a torch.func transform (vmap over stacked priors, grad), which refuses
            # requires_grad_ and autograd.grad: its own derivative of the same sum
            return torch.func.grad(lambda x: self.log_prob(x).sum())(w)
        with torch.enable_grad():
            x = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return g

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Draw weights of the given shape from the prior."""
        return self.distribution().sample(torch.Size(shape))

    def _buffer(self, name: str, value: float) -> None:
        # The exact value is kept as a Python float so that a conversion to float64 (a layer
        # built with dtype=torch.float64, or model.double()) restores all its digits.
        if not hasattr(self, "_exact"):
            self._exact: dict[str, float] = {}
        self._exact[name] = float(value)
        buf = torch.tensor(value, dtype=torch.get_default_dtype())
        self.register_buffer(name, buf)
        # seen as it is (the exact value rounded): a first read while another tensor is
        # swapped in (functional_call) is then remembered as a swap (see _refresh)
        if not buf.is_inference():  # (whose version is not tracked: read every time)
            self.__dict__.setdefault("_seen", {})[name] = (buf, buf._version)

    def _hyper_transformed(self) -> bool:
        """Whether a hyper-parameter buffer is a ``torch.func`` transform's tensor: an ensemble
        of layers stacked by ``torch.func.stack_module_state`` and run under ``vmap`` (one
        prior value per member), or a buffer differentiated by ``torch.func.grad``. The fast
        paths that read the values as Python floats (:meth:`_value`) cannot be used then
        (vmap raised on ``.item()``); the tensors are used instead.

        Also true in a ``torch.compile``d region (a compiled training step): the tensors
        are then read by the graph, so an in-place edit of a buffer between steps is seen
        without a recompilation, and the checks that decide whether a buffer changed
        (:meth:`_refresh`: its version counter and ``is_inference``) and whether it is a
        transform's tensor, which dynamo cannot trace, are skipped (they broke the graph
        several times per layer and step). There a float16/bfloat16 prior's hyper-parameters
        enter the KL at their values rounded to that dtype, not at their exact values."""
        if torch.compiler.is_compiling():
            return True
        if torch._C._functorch.peek_interpreter_stack() is None:  # no transform running
            return False
        return any(
            buf is not None and _transformed(buf)
            for buf in (self._buffers.get(n) for n in getattr(self, "_exact", {}))
        )

    def _hyper(self, name: str, like: Tensor) -> Tensor:
        """Hyper-parameter ``name`` as a tensor in the floating dtype of ``like``: the buffer
        itself where the dtypes agree, else its exact value (:meth:`_value`) filled in that
        dtype on ``like``'s device (``torch.full``: no transfer).

        A float16/bfloat16 prior's buffer converted to the float32 of the KL's sum carried
        its rounding into every weight's term (sigma = 0.1 held as 0.10009765625: ~20 nats
        over 60k weights for the Monte Carlo KL's Gaussian log-density, ~34 for the Laplace
        closed form), while the gradients used the exact value."""
        t = getattr(self, name)
        if (
            t.dtype == like.dtype
            or not like.is_floating_point()
            or name not in self._buffers
            or t.is_meta
            or self._hyper_transformed()
        ):
            return _like(t, like)
        return torch.full((), self._value(name), dtype=like.dtype, device=like.device)

    def _value(self, name: str) -> float:
        """A hyper-parameter as a Python float: the exact value given to the constructor while
        the buffer still holds it (rounded to the buffer's dtype), else the buffer's value.

        The buffer is read only after it has changed (replaced, or modified in place: its
        version counter moved), so the fast paths that call this every step do not read a
        device tensor (no host sync on a GPU) until then.
        """
        if name in self._parameters:
            # the fast paths of the built-in priors read their fixed values from here
            raise TypeError(
                f"{type(self).__name__}.{name} has been made an nn.Parameter, but the "
                f"built-in {type(self).__name__} treats its hyper-parameters as fixed; for a "
                "learnable prior subclass bbb.Prior and build distribution() from your "
                "parameters"
            )
        self._refresh(name)
        return self._exact[name]

    def _refresh(self, name: str) -> None:
        """Re-read buffer ``name`` if it changed since last seen: an in-place edit
        (``prior.sigma.fill_(0.5)``) or a new tensor replaces the exact value, unless the buffer
        holds that value rounded to its dtype. (An edit through ``.data`` is not seen: it does
        not move the version counter.)

        The buffer seen before the latest one is remembered with its exact value: a buffer
        put back unchanged (``torch.func.functional_call`` swaps in the tensors it is given
        and restores the prior's afterwards) regains it. Before, the swapped-in value replaced
        the exact one, and the restored buffer then gave its rounded value (a float32
        prior's 0.1 became 0.10000000149011612 for good: ``.double()`` no longer gave 0.1).
        """
        buf = self._buffers[name]
        assert buf is not None
        if buf.is_meta:  # no value to read (shapes only): the exact value stands
            return
        # the version of an inference tensor is not tracked: read it every time
        version = -1 if buf.is_inference() else buf._version
        seen: dict[str, tuple[Tensor, int]] = self.__dict__.setdefault("_seen", {})
        mark = seen.get(name)
        if mark is not None and mark[0] is buf and mark[1] == version >= 0:
            return
        left: dict[str, tuple[Tensor, int, float]] = self.__dict__.setdefault("_left", {})
        back = left.get(name)
        if mark is not None:
            left[name] = (mark[0], mark[1], self._exact[name])
        if back is not None and back[0] is buf and back[1] == version >= 0:
            self._exact[name] = back[2]
        else:
            current = float(buf)
            if current != _rounded(self._exact[name], buf.dtype):
                self._exact[name] = current
        seen[name] = (buf, version)

    def _shown(self, name: str) -> float:
        """Hyper-parameter ``name`` for the repr: the tensor's value, or on the meta device
        (no value to read: ``.item()`` raises) the constructor's."""
        t = getattr(self, name)
        if t.is_meta:
            return getattr(self, "_exact", {}).get(name, math.nan)
        return t.item()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        bad = self._invalid_hyper_parameters(state_dict, prefix)
        bad += self._conflicting_shared_values(state_dict, prefix, error_msgs)
        if bad:
            # refused before anything is copied (a negative sigma loaded silently, and kl()
            # then failed with a bare 'math domain error' or returned NaN)
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Loaded hyper-parameters replace the constructor's, unless the loaded value is the
        # exact one rounded to the checkpoint's dtype (then the exact digits are kept).
        for name, exact in getattr(self, "_exact", {}).items():
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if float(value) != _rounded(exact, value.dtype):
                self._exact[name] = float(value)
            buf = self._buffers.get(name)
            if (
                buf is not None
                and buf.dtype == torch.float64
                and not buf.is_meta
                and not buf.is_inference()
                and float(buf) != self._exact[name]
            ):
                # a float32 checkpoint's rounded value in a float64 model: the buffer regains
                # the exact digits, as .double() gives them (the forward of a Monte Carlo KL
                # read the rounded buffer while its gradient used the exact value)
                with torch.no_grad():
                    buf.fill_(self._exact[name])
            if buf is not None and not buf.is_meta and not buf.is_inference():
                # decided here, with the checkpoint's dtype: _refresh need not re-read it
                self.__dict__.setdefault("_seen", {})[name] = (buf, buf._version)

    def _conflicting_shared_values(
        self, state_dict: dict[str, Tensor], prefix: str, error_msgs: list[str]
    ) -> list[str]:
        """Messages for a prior that one ``load_state_dict`` reaches under several prefixes
        (shared by several layers) with different values: torch copied each into the one
        buffer, the last silently winning (the first layer's KL then used the last layer's
        prior).

        The values compared are those the state dict held when the load began. The model's
        own ``state_dict()`` holds the prior's buffer itself (detached, same storage) under
        each of its keys: replacing one key by another tensor and loading gave two values,
        but the first layer's copy wrote through to the other key, which then read as equal
        (the load was accepted, the replaced value won). A key that holds the buffer is read
        as the buffer was before this load (and a refused load leaves the prior as it was).
        Editing such a key in place (``sd[k].fill_(v)``) is no load at all: it changes the
        shared prior itself, as torch's ``state_dict()`` tensors change any parameter or
        buffer; every key then reads ``v`` and loading it back is accepted (one prior, one
        value)."""
        record = _LOADS.get(self)
        if record is None or record[0] is not error_msgs:  # a new load_state_dict call
            record = (error_msgs, {}, self._values_now())
            _LOADS[self] = record
        given, before = record[1], record[2]
        bad = []
        for name in getattr(self, "_exact", {}):
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.dim() != 0 or value.is_meta:
                continue
            buf = self._buffers.get(name)
            aliased = buf is not None and name in before and _same_memory(value, buf)
            v = before[name][0] if aliased else float(value)
            first = given.setdefault(name, (v, prefix))
            if first[0] != v:
                bad.append(
                    f"{type(self).__name__} is shared by several layers ({first[1]}* and "
                    f"{prefix}*), but the state dict gives its {name} two values: "
                    f"{first[1]}{name} = {first[0]!r}, {prefix}{name} = {v!r}; load it into a "
                    "model whose layers each have their own prior"
                )
        if bad:
            # an earlier layer's copy of this load may have written a value: the refused
            # prior keeps the one it had
            self._restore(before)
        return bad

    def _values_now(self) -> dict[str, tuple[float, float]]:
        """The built-in hyper-parameters' current values, by name: (the buffer's value, the
        exact value); those with a value to read only (0-d, not on the meta device)."""
        values = {}
        exact: dict[str, float] = getattr(self, "_exact", {})
        for name in exact:
            buf = self._buffers.get(name)
            if buf is not None and not buf.is_meta and buf.dim() == 0:
                values[name] = (float(buf), exact[name])
        return values

    @torch.no_grad()
    def _restore(self, values: dict[str, tuple[float, float]]) -> None:
        """Put back the hyper-parameters :meth:`_values_now` returned where they changed."""
        for name, (value, exact) in values.items():
            buf = self._buffers[name]
            if buf is not None and not buf.is_inference() and float(buf) != value:
                buf.fill_(value)
                self._exact[name] = exact

    #: hyper-parameters that must be positive, and those that must lie in (0, 1), checked
    #: when a state dict is loaded (the constructors check their arguments)
    _POSITIVE: tuple[str, ...] = ()
    _UNIT_INTERVAL: tuple[str, ...] = ()

    def _invalid_hyper_parameters(self, state_dict: dict[str, Tensor], prefix: str) -> list[str]:
        """Messages for the built-in hyper-parameters of ``state_dict`` that the constructor
        would refuse (non-finite, non-positive scales, ``pi`` outside (0, 1)); 0-d values only.
        """
        bad = []
        for name in getattr(self, "_exact", {}):
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.dim() != 0 or value.is_meta:
                continue  # a shape mismatch is reported by torch
            v = float(value)
            if not math.isfinite(v):
                bad.append(f"{type(self).__name__} {prefix}{name} must be finite, got {v!r}")
            elif name in self._POSITIVE and v <= 0.0:
                bad.append(f"{type(self).__name__} {prefix}{name} must be positive, got {v!r}")
            elif name in self._UNIT_INTERVAL and not 0.0 < v < 1.0:
                bad.append(f"{type(self).__name__} {prefix}{name} must lie in (0, 1), got {v!r}")
        return bad

    def _apply(self: _P, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _P:
        names = [n for n in getattr(self, "_exact", {}) if n not in self._parameters]
        was_meta = set()
        for name in names:  # an edited buffer's value, not the stale exact one, is converted
            buf = self._buffers[name]
            if buf is not None and buf.is_meta:
                was_meta.add(name)
            else:
                self._refresh(name)
        super()._apply(fn, recurse)
        for name in names:
            buf = self._buffers[name]
            if buf is None or buf.is_meta:
                continue
            value = self._exact[name]
            # float64 regains the exact digits; a buffer materialised from the meta device
            # (to_empty) holds no value yet: it gets the prior's
            if name in was_meta or (buf.dtype == torch.float64 and float(buf) != value):
                setattr(self, name, torch.tensor(value, dtype=buf.dtype, device=buf.device))
        return self


class GaussianPrior(Prior):
    """p(w) = N(w; mean, sigma^2) for every weight.

    Args:
        sigma: standard deviation (> 0).
        mean: location (default 0).
    """

    _POSITIVE = ("sigma",)

    sigma: Tensor
    mean: Tensor

    def __init__(self, sigma: float = 1.0, mean: float = 0.0) -> None:
        super().__init__()
        self._buffer("sigma", _positive("GaussianPrior sigma", sigma))
        self._buffer("mean", _finite("GaussianPrior mean", mean))

    def distribution(self) -> D.Normal:
        return D.Normal(self.mean, self.sigma, validate_args=False)

    def log_prob(self, w: Tensor) -> Tensor:
        # the hyper-parameters in w's dtype: float32 weights of a float16 layer (bbb.kl sums
        # its KL in float32) would otherwise get log(sigma) rounded to float16
        mean, sigma = self._hyper("mean", w), self._hyper("sigma", w)
        z = (w - mean) / sigma
        return -0.5 * z * z - torch.log(sigma) - 0.5 * math.log(2 * math.pi)

    def grad_log_prob(self, w: Tensor) -> Tensor:
        if self._hyper_transformed():
            # inside a torch.func transform that holds the buffers (vmap over stacked priors):
            # their values are no Python floats there (float() raised); the tensors, out of
            # place (an in-place op on an unbatched tensor cannot take a batched operand)
            t_mean, t_sigma = _like(self.mean, w), _like(self.sigma, w)
            return (w - t_mean) * (-1.0 / (t_sigma * t_sigma))
        mean, sigma = self._value("mean"), self._value("sigma")
        return (w - mean).mul_(-1.0 / (sigma * sigma))

    def extra_repr(self) -> str:
        return f"sigma={self._shown('sigma'):.4g}, mean={self._shown('mean'):.4g}"


def mixture_clamp(p1: float, p2: float) -> float:
    """Bound on the log-ratio u of a scale mixture's components, for its score.

    ``p1``, ``p2``: the components' precisions 1/sigma1^2, 1/sigma2^2. Clamping u to +-bound
    floors the smaller responsibility at exp(-bound), and the score multiplies that floor by
    the larger precision: with bound = max(80, 40 + |log(p2 / p1)|) its error stays below
    e^-40 relative for any sigma2 / sigma1, and the bound stays 80 (no exp in float32's
    denormal range) while sigma2 / sigma1 lies within e^-20..e^20.
    """
    return max(80.0, 40.0 + abs(math.log(p2 / p1)))


class ScaleMixturePrior(Prior):
    """The scale mixture of Blundell et al. (2015), eq. 7:

    p(w) = pi N(w; 0, sigma1^2) + (1 - pi) N(w; 0, sigma2^2), usually sigma1 > sigma2.

    The log-density is computed with ``logsumexp`` so that a tiny ``sigma2`` (e.g. e^-8) neither
    underflows nor produces NaN gradients. There is no closed-form KL from a Gaussian to this
    prior; ``kl="auto"`` therefore uses the Monte Carlo estimate.

    Args:
        pi: mixture weight of the first component, in (0, 1).
        sigma1, sigma2: standard deviations of the two components (> 0).
    """

    _POSITIVE = ("sigma1", "sigma2")
    _UNIT_INTERVAL = ("pi",)

    pi: Tensor
    sigma1: Tensor
    sigma2: Tensor

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> None:
        super().__init__()
        pi = _number("ScaleMixturePrior pi", pi, "a number in the open interval (0, 1)")
        if not (0.0 < pi < 1.0):
            raise ValueError(
                f"ScaleMixturePrior pi must lie in the open interval (0, 1), got {pi!r}"
            )
        self._buffer("pi", pi)
        self._buffer("sigma1", _positive("ScaleMixturePrior sigma1", sigma1))
        self._buffer("sigma2", _positive("ScaleMixturePrior sigma2", sigma2))

    def distribution(self) -> D.MixtureSameFamily:
        mix = D.Categorical(probs=torch.stack([self.pi, 1 - self.pi]), validate_args=False)
        comp = D.Normal(
            torch.zeros_like(self.pi).expand(2),
            torch.stack([self.sigma1, self.sigma2]),
            validate_args=False,
        )
        return D.MixtureSameFamily(mix, comp, validate_args=False)

    def _constants(self) -> tuple[float, float, float, float]:
        """log(pi / sigma1 / sqrt(2 pi)), log((1 - pi) / sigma2 / sqrt(2 pi)), 1/sigma1^2, 1/sigma2^2."""
        pi, s1, s2 = self._value("pi"), self._value("sigma1"), self._value("sigma2")
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        return (
            math.log(pi) - math.log(s1) - half_log_2pi,
            math.log1p(-pi) - math.log(s2) - half_log_2pi,
            1.0 / (s1 * s1),
            1.0 / (s2 * s2),
        )

    def _components(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The two weighted component log-densities log(pi N1(w)) and log((1-pi) N2(w))."""
        if self._hyper_transformed():
            # inside a torch.func transform that holds the buffers (vmap over an ensemble's
            # stacked priors): the same constants from the tensors, out of place
            pi, s1, s2 = (_like(t, w) for t in (self.pi, self.sigma1, self.sigma2))
            half_log_2pi = 0.5 * math.log(2 * math.pi)
            w2 = w * w
            return (
                w2 * (-0.5 / (s1 * s1)) + (torch.log(pi) - torch.log(s1) - half_log_2pi),
                w2 * (-0.5 / (s2 * s2)) + (torch.log1p(-pi) - torch.log(s2) - half_log_2pi),
            )
        c1, c2, p1, p2 = self._constants()
        w2 = w * w
        return (w2 * (-0.5 * p1)).add_(c1), (w2 * (-0.5 * p2)).add_(c2)

    def log_prob(self, w: Tensor) -> Tensor:
        if w.dtype in (torch.float16, torch.bfloat16):
            # in float32, returned in w's dtype: in float16 the precision 1 / sigma2^2 (e^12 at
            # the default sigma2) rounds to inf, so the gradient at w = 0 (a pruned weight)
            # was NaN (inf * 0), and the constants' rounding moved the value by ~30 ulps
            return self.log_prob(w.float()).to(w.dtype)
        return torch.logaddexp(*self._components(w))

    def grad_log_prob(self, w: Tensor) -> Tensor:
        if w.dtype == torch.float16:
            # in float32, returned in float16: the precision 1 / sigma2^2 (e^12 at the default
            # sigma2) exceeds float16's range, which made add_(alpha=p2) raise
            return self.grad_log_prob(w.float()).to(w.dtype)
        # d/dw log p = -w (r1 / sigma1^2 + r2 / sigma2^2), r the components' responsibilities,
        # both taken as sigmoids of u = log(pi N1(w)) - log((1 - pi) N2(w)) (no 1 - r
        # cancellation when sigma2 is tiny and 1 / sigma2^2 is huge). u is clamped to
        # +-mixture_clamp(p1, p2) (80 for every sigma2 / sigma1 above e^-20): beyond it the
        # smaller responsibility changes nothing, while exp(-|u|) in the denormal range would
        # make the sigmoids ~100x slower on x86 (3x the whole bandit update, issue 6).
        if self._hyper_transformed():
            return self._grad_log_prob_tensors(w)
        c1, c2, p1, p2 = self._constants()
        bound = mixture_clamp(p1, p2)
        u = (w * w).mul_(0.5 * (p2 - p1)).add_(c1 - c2).clamp_(-bound, bound)
        r1 = torch.sigmoid(u)
        r2 = torch.sigmoid(u.neg_())
        return r1.mul_(p1).add_(r2, alpha=p2).mul_(w).neg_()

    def _grad_log_prob_tensors(self, w: Tensor) -> Tensor:
        """:meth:`grad_log_prob` from the hyper-parameter tensors, out of place: inside a
        ``torch.func`` transform that holds the buffers (vmap over stacked priors), where
        their values are no Python floats (:meth:`_constants` raised)."""
        pi, s1, s2 = (_like(t, w) for t in (self.pi, self.sigma1, self.sigma2))
        p1, p2 = 1.0 / (s1 * s1), 1.0 / (s2 * s2)
        log_s1, log_s2 = torch.log(s1), torch.log(s2)
        # c1 - c2 of _constants (its log(sqrt(2 pi)) terms cancel) and mixture_clamp's bound
        dc = torch.log(pi) - log_s1 - torch.log1p(-pi) + log_s2
        bound = (40.0 + 2.0 * (log_s1 - log_s2).abs()).clamp_min(80.0)
        u = w * w * (0.5 * (p2 - p1)) + dc
        u = torch.minimum(torch.maximum(u, -bound), bound)
        return -(torch.sigmoid(u) * p1 + torch.sigmoid(-u) * p2) * w

    def extra_repr(self) -> str:
        return (
            f"pi={self._shown('pi'):.4g}, sigma1={self._shown('sigma1'):.4g}, "
            f"sigma2={self._shown('sigma2'):.4g}"
        )


class LaplacePrior(Prior):
    """p(w) = Laplace(w; loc, scale) = exp(-|w - loc| / scale) / (2 scale).

    A Gaussian posterior has a closed-form KL to it (``torch.distributions`` registers it).
    """

    _POSITIVE = ("scale",)

    scale: Tensor
    loc: Tensor

    def __init__(self, scale: float = 1.0, loc: float = 0.0) -> None:
        super().__init__()
        self._buffer("scale", _positive("LaplacePrior scale", scale))
        self._buffer("loc", _finite("LaplacePrior loc", loc))

    def distribution(self) -> D.Laplace:
        return D.Laplace(self.loc, self.scale, validate_args=False)

    def log_prob(self, w: Tensor) -> Tensor:
        # in w's dtype (see GaussianPrior.log_prob)
        loc, scale = self._hyper("loc", w), self._hyper("scale", w)
        return -(w - loc).abs() / scale - torch.log(2 * scale)

    def grad_log_prob(self, w: Tensor) -> Tensor:
        if self._hyper_transformed():
            # the tensors inside a torch.func transform (see GaussianPrior.grad_log_prob)
            return torch.sign(w - _like(self.loc, w)) * (-1.0 / _like(self.scale, w))
        return torch.sign(w - self._value("loc")).mul_(-1.0 / self._value("scale"))

    def extra_repr(self) -> str:
        return f"scale={self._shown('scale'):.4g}, loc={self._shown('loc'):.4g}"


PRIOR_NAMES = ("gaussian", "scale_mixture", "laplace")


def make_prior(name: str, **kwargs: float) -> Prior:
    """Build a prior from its name (``"gaussian"``, ``"scale_mixture"``, ``"laplace"``).

    Keyword arguments are the prior's constructor arguments (``sigma``; ``pi, sigma1, sigma2``;
    ``scale``).
    """
    if not isinstance(name, str):
        raise ValueError(
            f"prior name must be a string, one of {', '.join(PRIOR_NAMES)}; got {name!r}"
        )
    key = name.lower().replace("-", "_")
    if key in ("gaussian", "normal"):
        return GaussianPrior(**kwargs)
    if key in ("scale_mixture", "mixture"):
        return ScaleMixturePrior(**kwargs)
    if key == "laplace":
        return LaplacePrior(**kwargs)
    raise ValueError(
        f"unknown prior {name!r}; accepted values: {', '.join(PRIOR_NAMES)} "
        "('normal' and 'mixture' are taken for gaussian and scale_mixture)"
    )
