"""Convert between ordinary and Bayesian networks.

- :func:`bayesianize`: replace ``nn.Linear`` / ``nn.Conv1d/2d/3d`` /
  ``nn.ConvTranspose1d/2d/3d`` inside a model by their
  Bayesian counterparts, optionally starting mu at the trained weights (and sigma in
  proportion to them: ``rho_init="moped"``); ``include`` / ``exclude`` convert only some
  layers (a Bayesian last layer on a pretrained feature extractor).
- :func:`to_deterministic`: export the mean network (mu, pruning applied) as plain ``torch.nn``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any, TypeAlias, cast

import torch
from torch import nn

from .nn.conv import BayesConv1d, BayesConv2d, BayesConv3d, _BayesConvNd
from .nn.conv_transpose import (
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    _BayesConvTransposeNd,
)
from .nn.embedding import BayesEmbedding
from .nn.linear import BayesLinear
from .nn.module import BayesModule, rho_init_range
from .nn.recurrent import BayesGRU, BayesLSTM, _BayesRNNBase
from .priors import Prior

__all__ = ["LayerSelector", "bayesianize", "convertible_layers", "to_deterministic"]

LayerSelector: TypeAlias = "str | Sequence[str] | Callable[[str, nn.Module], bool]"
"""What ``bayesianize``'s ``include`` and ``exclude`` take: one module-name pattern, a list of
them, or a predicate ``(qualified_name, module) -> bool`` (see :func:`bayesianize`)."""

# rho_init="moped": sigma = delta * |w|, at least this (a weight of exactly 0, a bias left at
# its initial 0, would otherwise get sigma = 0 and rho = -inf); softplus^-1(1e-8) = -18.4
MOPED_MIN_SIGMA = 1e-8
MOPED_DEFAULT_DELTA = 0.1

_CONV_PAIRS: tuple[tuple[type[nn.Module], type[_BayesConvNd]], ...] = (
    (nn.Conv1d, BayesConv1d),
    (nn.Conv2d, BayesConv2d),
    (nn.Conv3d, BayesConv3d),
)
_CONV_TRANSPOSE_PAIRS: tuple[tuple[type[nn.Module], type[_BayesConvTransposeNd]], ...] = (
    (nn.ConvTranspose1d, BayesConvTranspose1d),
    (nn.ConvTranspose2d, BayesConvTranspose2d),
    (nn.ConvTranspose3d, BayesConvTranspose3d),
)


class _PriorPerDtype:
    """The prior for a new layer of each dtype: ``prior`` itself for the first dtype, a copy
    of it (as given, before any conversion) for each further one.

    A layer converts its prior to its own dtype in place, so one prior object shared by
    layers of several dtypes would end in the last layer's dtype (a float64 layer would get
    float16-rounded hyper-parameters from a float16 one). Layers of one dtype share one prior.
    """

    def __init__(self, prior: Prior | None) -> None:
        self._given = prior
        # copied before the first layer converts ``prior`` (a float16 round trip loses digits)
        self._template = copy.deepcopy(prior)
        self._by_dtype: dict[torch.dtype | None, Prior] = {}

    def __call__(self, dtype: torch.dtype | None) -> Prior | None:
        """The prior for a new layer of ``dtype`` (``None``: the default dtype)."""
        if self._given is None or self._template is None:
            return None  # each layer builds its own default prior
        if dtype not in self._by_dtype:
            first = not self._by_dtype
            self._by_dtype[dtype] = self._given if first else copy.deepcopy(self._template)
        return self._by_dtype[dtype]


def _bayes_for(
    module: nn.Module,
    kwargs: dict[str, Any],
    init_from_weights: bool,
    prior_for: _PriorPerDtype,
    moped_delta: float | None = None,
) -> nn.Module | None:
    """The Bayesian layer replacing ``module``, or None if it is not convertible. With
    ``moped_delta`` (``rho_init="moped"``, needs ``init_from_weights``) rho is set so that
    sigma = ``moped_delta * |w|`` (at least :data:`MOPED_MIN_SIGMA`) for weight and bias."""
    if not _convertible(module, embeddings=True, recurrent=True):
        return None
    if type(module) is nn.LSTM or type(module) is nn.GRU:
        return _bayes_recurrent_for(module, kwargs, init_from_weights, prior_for, moped_delta)
    w = getattr(module, "weight", None)
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    if isinstance(w, torch.Tensor):
        device, dtype = w.device, w.dtype
    kwargs = {**kwargs, "prior": prior_for(dtype), "device": device, "dtype": dtype}
    if type(module) is nn.Embedding:
        return _bayes_embedding_for(module, kwargs, init_from_weights, moped_delta)
    new: BayesLinear | _BayesConvNd | _BayesConvTransposeNd | None = None
    if type(module) is nn.Linear:
        new = BayesLinear(
            module.in_features, module.out_features, module.bias is not None, **kwargs
        )
    elif getattr(module, "transposed", False):
        for torch_cls, bayes_t in _CONV_TRANSPOSE_PAIRS:
            if type(module) is torch_cls:
                assert isinstance(module, nn.modules.conv._ConvTransposeNd)
                # (the layer's sizes are tuples of ints; its padding is never a string)
                new = bayes_t(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size,
                    stride=module.stride,
                    padding=cast("tuple[int, ...]", module.padding),
                    output_padding=module.output_padding,
                    groups=module.groups,
                    bias=module.bias is not None,
                    dilation=module.dilation,
                    padding_mode=module.padding_mode,
                    **kwargs,
                )
    else:
        for torch_cls, bayes_cls in _CONV_PAIRS:
            if type(module) is torch_cls:
                assert isinstance(module, nn.modules.conv._ConvNd)
                new = bayes_cls(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size,
                    stride=module.stride,
                    padding=module.padding,
                    dilation=module.dilation,
                    groups=module.groups,
                    bias=module.bias is not None,
                    padding_mode=module.padding_mode,
                    **kwargs,
                )
    if new is None:
        return None
    if init_from_weights:
        # only these exact types reach here (_convertible)
        assert isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        with torch.no_grad():
            new.weight_mu.copy_(module.weight)
            if module.bias is not None and new.bias_mu is not None:
                new.bias_mu.copy_(module.bias)
            if moped_delta is not None:
                new.weight_rho.copy_(moped_rho(module.weight, moped_delta))
                if module.bias is not None and new.bias_rho is not None:
                    new.bias_rho.copy_(moped_rho(module.bias, moped_delta))
    _carry_over(
        module, new, {"weight": ("weight_mu", "weight_rho"), "bias": ("bias_mu", "bias_rho")}
    )
    return new


def _bayes_recurrent_for(
    module: nn.LSTM | nn.GRU,
    kwargs: dict[str, Any],
    init_from_weights: bool,
    prior_for: _PriorPerDtype,
    moped_delta: float | None,
) -> nn.Module:
    """The :class:`bbb.BayesLSTM` / :class:`bbb.BayesGRU` replacing ``module`` (its sizes and
    options, device, dtype and train/eval mode; see :meth:`bbb.BayesLSTM.from_torch`)."""
    w = module.weight_ih_l0
    assert isinstance(w, torch.Tensor)  # (torch types module attributes as Tensor | Module)
    cls = BayesLSTM if type(module) is nn.LSTM else BayesGRU
    delta = moped_delta
    rho = None if delta is None else (lambda t: moped_rho(t, delta))
    return cls.from_torch(
        module,
        init_from_weights=init_from_weights,
        moped_rho=rho,
        **{**kwargs, "prior": prior_for(w.dtype), "device": w.device, "dtype": w.dtype},
    )


def _bayes_embedding_for(
    module: nn.Embedding,
    kwargs: dict[str, Any],
    init_from_weights: bool,
    moped_delta: float | None,
) -> BayesEmbedding:
    """The :class:`bbb.BayesEmbedding` replacing ``module`` (its sizes, ``padding_idx`` and
    ``scale_grad_by_freq``; ``kwargs``: the layer options, prior, device and dtype). With
    ``init_from_weights`` mu starts at the table (and, with ``moped_delta``, sigma at
    ``moped_delta * |w|``); the padding row's output stays zero whatever its weights."""
    new = BayesEmbedding(
        module.num_embeddings,
        module.embedding_dim,
        padding_idx=module.padding_idx,
        scale_grad_by_freq=module.scale_grad_by_freq,
        **kwargs,
    )
    if init_from_weights:
        with torch.no_grad():
            new.weight_mu.copy_(module.weight)
            if moped_delta is not None:
                new.weight_rho.copy_(moped_rho(module.weight, moped_delta))
    _carry_over(module, new, {"weight": ("weight_mu", "weight_rho")})
    return new


def _warn_nonzero_padding_rows(model: nn.Module, chosen: Callable[[nn.Module], bool]) -> None:
    """A UserWarning naming the chosen ``nn.Embedding`` layers of ``model`` whose padding row
    is not zero (``nn.Embedding.from_pretrained(table, padding_idx=i)`` keeps the table's row
    i): ``nn.Embedding`` returns that row at the padding positions, :class:`bbb.BayesEmbedding`
    returns zeros there (as its docstring says), so the converted model computes another
    function at those positions, and :func:`to_deterministic` gives a zero row back."""
    import warnings

    found = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Embedding) and chosen(m) and m.padding_idx is not None):
            continue
        row = m.weight[m.padding_idx]
        if not row.is_meta and bool(row.detach().ne(0).any()):
            found.append(f"{name or '<model>'!r} (padding_idx={m.padding_idx})")
    if found:
        warnings.warn(
            "bayesianize(embeddings=True, init_from_weights=True): these embeddings have a "
            f"padding row that is not zero: {', '.join(found)}. nn.Embedding returns that row "
            "at padding positions; bbb.BayesEmbedding returns zeros there (its padding row is "
            "left out of the posterior), so the converted model's outputs differ at those "
            "positions (to_deterministic gives a zero padding row). Zero the row first "
            "(with torch.no_grad(): emb.weight[emb.padding_idx].zero_()) to silence this, or "
            "exclude the layer (exclude=[...])",
            UserWarning,
            stacklevel=3,
        )


def moped_rho(w: torch.Tensor, delta: float) -> torch.Tensor:
    """rho with ``softplus(rho) = max(delta * |w|, MOPED_MIN_SIGMA)``, elementwise.

    The MOPED initialisation (Krishnan et al., AAAI 2020) of a posterior whose mean starts
    at trained weights ``w`` (any shape; the result has ``w``'s shape, dtype and device):
    each weight's standard deviation is a fraction ``delta`` of its magnitude. Computed in
    float64 (the inverse softplus ``s + log(-expm1(-s))``, exact for small and large ``s``)
    and rounded once to ``w``'s dtype.
    """
    sigma = (w.detach().to(torch.float64).abs() * delta).clamp_min(MOPED_MIN_SIGMA)
    return (sigma + torch.log(-torch.expm1(-sigma))).to(w.dtype)


def _check_moped_delta(rho_init: object, moped_delta: object) -> float | None:
    """The MOPED fraction to use (None unless ``rho_init="moped"``), or a ValueError."""
    if rho_init != "moped" or not isinstance(rho_init, str):
        if moped_delta is not None:
            raise ValueError(
                f"moped_delta={moped_delta!r} is only used with rho_init='moped' (sigma = "
                f"moped_delta * |w|), got rho_init={rho_init!r}"
            )
        return None
    if moped_delta is None:
        return MOPED_DEFAULT_DELTA
    if (
        isinstance(moped_delta, bool)
        or not isinstance(moped_delta, numbers.Real)
        or not math.isfinite(float(moped_delta))
        or float(moped_delta) <= 0
    ):
        raise ValueError(
            f"moped_delta must be a finite number above 0 (sigma = moped_delta * |w|; "
            f"{MOPED_DEFAULT_DELTA} when None), got {moped_delta!r}"
        )
    return float(moped_delta)


def _check_rho_init(rho_init: object) -> None:
    """A ValueError listing every accepted value if ``rho_init`` is not one of them."""
    accepted = (
        "accepted values: a finite number, a (low, high) tuple of two finite numbers, or "
        "'moped' (sigma = moped_delta * |w|, with init_from_weights=True)"
    )
    if isinstance(rho_init, str):
        if rho_init != "moped":
            raise ValueError(f"unknown rho_init {rho_init!r}; {accepted}")
        return
    try:
        rho_init_range(rho_init)
    except ValueError as e:
        raise ValueError(f"{e}; {accepted}") from None


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]`` (``""``, the model itself: ``[""]``)."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _covered(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern matches ``name`` or the name of a module that contains it."""
    return any(fnmatchcase(a, p) for a in _ancestors(name) for p in patterns)


def _patterns_or_predicate(
    kind: str, value: object
) -> list[str] | Callable[[str, nn.Module], object] | None:
    """``include``/``exclude`` (``kind``) checked: None, a list of patterns, or a predicate."""
    if value is None:
        return None
    accepted = (
        f"{kind} must be None, a module-name pattern (str, fnmatch syntax), a list or tuple "
        "of patterns, or a callable (name, module) -> bool"
    )
    if isinstance(value, str):
        value = [value]
    elif callable(value) and not isinstance(value, nn.Module):
        return value
    if isinstance(value, (bytes, nn.Module)) or not isinstance(value, Sequence):
        raise TypeError(f"{accepted}, got {type(value).__name__}")
    patterns = list(value)
    if not patterns:
        raise ValueError(
            f"{kind} is empty: it selects no layer (pass None "
            + ("to convert every layer)" if kind == "include" else "to exclude none)")
        )
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{accepted}; the list holds {p!r} ({type(p).__name__})")
        if not p:
            raise ValueError(
                f"{kind} holds an empty pattern, which matches only the model itself; use "
                "'*' for every layer"
            )
    return patterns


def _named(module: nn.Module, name: str) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


def _listing(items: Sequence[str], limit: int = 40) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class _Selection:
    """Which layers :func:`bayesianize` converts, given its ``include`` and ``exclude``.

    A layer is converted when it is convertible (exactly ``nn.Linear``, ``nn.Conv1d/2d/3d``
    or ``nn.ConvTranspose1d/2d/3d``),
    ``include`` selects it (always, when ``include`` is None) and ``exclude`` does not:
    exclude wins. A pattern selects a layer when it matches (``fnmatch.fnmatchcase``) the
    layer's qualified name or that of a module containing it; a predicate is called as
    ``predicate(name, layer)`` on each convertible layer. A layer used in several places has
    several names: it is included if any of them is, excluded if any of them is.
    """

    def __init__(
        self,
        model: nn.Module,
        include: object,
        exclude: object,
        embeddings: bool = False,
        recurrent: bool = False,
    ) -> None:
        self.embeddings = embeddings  # nn.Embedding is convertible (bayesianize's option)
        self.recurrent = recurrent  # nn.LSTM / nn.GRU are convertible (bayesianize's option)
        self.include = _patterns_or_predicate("include", include)
        self.exclude = _patterns_or_predicate("exclude", exclude)
        self._kept: list[str] | None = None  # _names_kept's cache
        self._layers: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            if _convertible(m, embeddings, recurrent):
                self._layers.setdefault(id(m), (m, []))[1].append(name)
        self._candidates = [_named(m, names[0]) for m, names in self._layers.values()]
        everything = set(self._layers)
        included = everything if self.include is None else self._select(model, "include")
        excluded = set() if self.exclude is None else self._select(model, "exclude")
        chosen = included - excluded
        if not chosen and (self.include is not None or self.exclude is not None):
            what = (
                "every layer bayesianize can convert"
                if self.include is None
                else f"every layer include={self._shown(self.include)} selects"
            )
            raise ValueError(
                f"bayesianize: exclude={self._shown(self.exclude)} removes {what} "
                f"({_listing([self._candidates[i] for i, k in enumerate(self._layers) if k in included])}): "
                "nothing would be made Bayesian"
            )
        self.names = {n for k in chosen for n in self._layers[k][1]}
        self.ids = chosen

    @staticmethod
    def _shown(selector: object) -> str:
        if callable(selector):
            return str(getattr(selector, "__qualname__", type(selector).__name__))
        return repr(selector[0] if isinstance(selector, list) and len(selector) == 1 else selector)

    def _select(self, model: nn.Module, kind: str) -> set[int]:
        selector = self.include if kind == "include" else self.exclude
        assert selector is not None
        if callable(selector):
            chosen = set()
            for key, (m, names) in self._layers.items():
                for name in names:
                    verdict = selector(name, m)
                    if not _is_bool(verdict):
                        raise TypeError(
                            f"bayesianize: the {kind} predicate must return True or False, "
                            f"got {verdict!r} for layer {name or '<model>'!r}"
                        )
                    if verdict:
                        chosen.add(key)
            if not chosen:
                raise ValueError(
                    f"bayesianize: the {kind} predicate {self._shown(selector)} returned False "
                    f"for every layer it can convert ({_listing(self._candidates)})"
                    + (": nothing would be made Bayesian" if kind == "include" else "")
                )
            return chosen
        chosen = set()
        for pattern in selector:
            hits = {
                key
                for key, (_, names) in self._layers.items()
                if any(_covered(n, [pattern]) for n in names)
            }
            if not hits and not (kind == "exclude" and self._names_kept(model, pattern)):
                raise ValueError(self._no_match(model, kind, pattern))
            chosen |= hits
        return chosen

    def _names_kept(self, model: nn.Module, pattern: str) -> bool:
        """Whether ``pattern`` covers a weight layer bayesianize cannot convert (an
        ``nn.Embedding``): excluding it on purpose silences the warning that names it."""
        if self._kept is None:
            self._kept = [name for name, _ in _left_deterministic(model)]
        return any(_covered(name, [pattern]) for name in self._kept)

    def _no_match(self, model: nn.Module, kind: str, pattern: str) -> str:
        matched = [
            f"{name or '<model>'} ({type(m).__name__}"
            + (", already Bayesian)" if isinstance(m, BayesModule) else ")")
            for name, m in model.named_modules()
            if fnmatchcase(name, pattern)
        ]
        found = (
            f"; it matches {_listing(matched, 10)}, which is not, and holds no, nn.Linear, "
            "nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d"
            if matched
            else f"; it matches no module of {type(model).__name__}"
        )
        if not self.embeddings and any(
            type(m) is nn.Embedding
            for name, m in model.named_modules()
            if _covered(name, [pattern])
        ):
            found += " (pass embeddings=True to convert nn.Embedding to bbb.BayesEmbedding)"
        return (
            f"bayesianize: {kind} pattern {pattern!r} matches no layer bayesianize converts"
            f"{found}. The layers it can convert: {_listing(self._candidates)} (patterns are "
            "fnmatch patterns on the names model.named_modules() gives; a module's name "
            "selects every layer inside it)"
        )

    def in_scope(self, name: str) -> bool:
        """Whether a module that is not convertible, named ``name``, lies where the user
        asked for Bayesian layers (so that leaving it deterministic deserves a warning)."""
        if self.include is not None and (
            callable(self.include) or not _covered(name, self.include)
        ):
            return False
        return not (
            self.exclude is not None and not callable(self.exclude) and _covered(name, self.exclude)
        )

    def in_model(self, model: nn.Module) -> Callable[[nn.Module], bool]:
        """The selection as a test on the modules of ``model`` (the given model, or its deep
        copy: the same names)."""
        ids = {id(m) for n, m in model.named_modules(remove_duplicate=False) if n in self.names}
        embeddings, recurrent = self.embeddings, self.recurrent
        return lambda m: id(m) in ids and _convertible(m, embeddings, recurrent)


def _is_bool(value: object) -> bool:
    """A Python or NumPy bool (a predicate's answer)."""
    t = type(value)
    return t is bool or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))


def _carry_over(old: nn.Module, new: nn.Module, params: dict[str, tuple[str, ...]]) -> None:
    """Give ``new`` the state of ``old`` that a freshly built module would not have: its
    train/eval mode, and ``requires_grad=False`` on the new parameters ``params[name]`` of
    every parameter ``name`` of ``old`` that was frozen (a frozen layer stays frozen)."""
    new.train(old.training)
    for old_name, new_names in params.items():
        p = getattr(old, old_name, None)
        if not isinstance(p, torch.Tensor) or p.requires_grad:
            continue
        for new_name in new_names:
            q = getattr(new, new_name, None)
            if isinstance(q, torch.Tensor):
                q.requires_grad_(False)


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _hooked(model: nn.Module, replaced: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the modules that ``replaced`` selects and that carry forward/backward hooks
    (on the module or on one of its own parameters): a conversion builds new modules, so
    those hooks would no longer run."""
    names = []
    for name, m in model.named_modules():
        if not replaced(m):
            continue
        on_module = any(getattr(m, d, None) for d in _HOOK_DICTS)
        on_params = any(getattr(p, "_backward_hooks", None) for p in m.parameters(recurse=False))
        if on_module or on_params:
            names.append(name or "<model>")
    return names


def _convertible(module: nn.Module, embeddings: bool = False, recurrent: bool = False) -> bool:
    """Whether :func:`bayesianize` replaces ``module`` (exact types: ``nn.Linear``,
    ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``; ``nn.Embedding`` with
    ``embeddings=True``; ``nn.LSTM`` and ``nn.GRU`` with ``recurrent=True``)."""
    if embeddings and type(module) is nn.Embedding:
        return True
    if recurrent and (type(module) is nn.LSTM or type(module) is nn.GRU):
        return True
    if type(module) is nn.Linear:
        return True
    if any(type(module) is t for t, _ in _CONV_TRANSPOSE_PAIRS):
        return True
    return any(type(module) is t for t, _ in _CONV_PAIRS) and not getattr(
        module, "transposed", False
    )


def _tied(model: nn.Module, replaced: Callable[[nn.Module], bool] = _convertible) -> list[str]:
    """``"a.weight = b.weight"`` for each parameter of a layer :func:`bayesianize` converts
    that is also a parameter of another module (weights tied between two modules: each new
    layer gets its own posterior, so the tie is lost)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    ties = []
    for m in model.modules():
        if not replaced(m):
            continue
        for p in m.parameters(recurse=False):
            names = owners.get(id(p), [])
            if len(names) > 1:
                ties.append(" = ".join(names))
                owners[id(p)] = []  # named once
    return ties


def bayesianize(
    model: nn.Module,
    *,
    include: LayerSelector | None = None,
    exclude: LayerSelector | None = None,
    prior: Prior | None = None,
    estimator: str = "reparam",
    kl: str = "auto",
    init_from_weights: bool = False,
    mu_init: str | tuple[float, float] = "fan_in",
    rho_init: float | tuple[float, float] | str = (-5.0, -4.0),
    moped_delta: float | None = None,
    embeddings: bool = False,
    recurrent: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Replace the ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` layers
    of ``model`` (every one, or those ``include`` / ``exclude`` choose) by Bayesian layers
    (:class:`bbb.BayesLinear`, :class:`bbb.BayesConv2d`, :class:`bbb.BayesConvTranspose2d`,
    ...: the same sizes, strides, paddings, output paddings, dilations and groups).

    Args:
        model: any ``nn.Module`` (the module itself may be a Linear/Conv).
        include: the layers to convert (default: every convertible layer). One module-name
            pattern or a list of them, matched with ``fnmatch.fnmatchcase`` against the
            qualified names ``model.named_modules()`` gives (``"head"``, ``"features.0"``,
            ``"blocks.*.fc"``, ``"[0-2]"``); a pattern matching a module selects every
            layer inside it (``"head"`` selects ``head.0`` and ``head.2`` of a head
            ``nn.Sequential``). Or a predicate ``include(name, layer) -> bool``, called on
            each convertible layer (``lambda name, m: m.out_features == 10``).
        exclude: the layers to leave deterministic, in the same forms. Exclude wins: a layer
            is converted when include selects it and exclude does not (``include="blocks",
            exclude="blocks.0.*"``). A layer used in several places (several names) is
            included if any of its names is, excluded if any is.
            Every pattern, and each predicate, must select at least one convertible layer,
            and together they must leave at least one: otherwise a ``ValueError`` lists the
            layers that can be converted (a misspelt name must not give a deterministic
            network, or a fully Bayesian one), and names what a pattern matched instead (an
            ``nn.Embedding``, a layer already Bayesian). A non-bool predicate answer (a
            forgotten ``return``) is a ``TypeError``.
        prior, estimator, kl: passed to every new layer. One prior object is shared by all
            layers of one dtype (priors hold no trainable state) and converted to it; layers
            of another dtype (a model with float64 and float16 layers) share a copy of the
            prior as given, converted to theirs.
        init_from_weights: start mu at the existing weights and biases (fine-tuning a trained
            network); otherwise mu is initialised by ``mu_init`` (default fan-in scaled).
        rho_init: the posterior's initial rho (sigma = softplus(rho)): a constant, a
            ``(low, high)`` uniform range (default (-5, -4): sigma of 0.007-0.018), or
            ``"moped"`` (needs ``init_from_weights=True``): each weight's and bias's sigma is
            ``moped_delta * |w|`` of its trained value ``w`` (at least
            :data:`MOPED_MIN_SIGMA` = 1e-8, so that a zero weight gets a finite rho), the
            MOPED initialisation of Krishnan et al. (AAAI 2020) for fine-tuning a pretrained
            network. A layer's ``reset_parameters()`` re-draws from the constructor default
            (-5, -4), as it re-draws mu at random.
        moped_delta: the fraction of ``rho_init="moped"``, a finite number above 0 (None:
            0.1, the paper's choice); given with another ``rho_init`` it is a ``ValueError``.
            (A prior centred on the pretrained weights is not offered: bbb's priors have one
            scalar location for all weights of a layer.)
        embeddings: also convert ``nn.Embedding`` layers (exactly that type) to
            :class:`bbb.BayesEmbedding` (the same sizes, ``padding_idx`` and
            ``scale_grad_by_freq``; with ``init_from_weights`` mu starts at the table).
            ``False`` (default): embeddings stay deterministic and are named in the warning
            (a pretrained table of a large vocabulary is often kept as it is). An embedding
            with ``max_norm`` or ``sparse=True``, which ``BayesEmbedding`` refuses, is then a
            ``ValueError`` naming it (exclude it, or drop those options).
        recurrent: also convert ``nn.LSTM`` and ``nn.GRU`` layers (exactly those types) to
            :class:`bbb.BayesLSTM` / :class:`bbb.BayesGRU` (the same sizes, ``num_layers``,
            ``bias``, ``batch_first``, ``dropout`` and ``bidirectional``; with
            ``init_from_weights`` mu starts at the trained weights). ``estimator="local"``
            is then a ``ValueError`` (a recurrent layer cannot keep local noise fixed across
            time steps), as is an ``nn.LSTM`` with ``proj_size``, named. ``False``
            (default): they stay deterministic and are named in the warning.
        inplace: modify ``model`` instead of a deep copy.

    Returns the converted model. Other modules (activations, norms) are kept; a warning names
    every weight layer left deterministic (subclasses of ``nn.Linear`` / ``nn.ConvNd`` /
    ``nn.ConvTransposeNd`` such as parametrized or lazy layers and attention projections,
    ``nn.Bilinear``, embeddings) among those ``include`` patterns cover and
    ``exclude`` patterns do not (none with an ``include`` predicate): their weights get no
    posterior and no KL. A model with no layer to convert (and none already Bayesian) is an
    error.

    Each new layer keeps the replaced layer's device, dtype and train/eval mode, and a frozen
    weight (or bias) stays frozen: its ``mu`` and ``rho`` get ``requires_grad=False`` (with
    ``init_from_weights=False`` a warning says its mu then stays at random values). Layers
    left deterministic keep their parameters, frozen or not (freeze a pretrained body with
    ``p.requires_grad_(False)`` before or after: the ELBO, ``Trainer``, ``predict``,
    ``prune_by_snr``, ``save_compact`` and ``to_deterministic`` work on such a partly
    Bayesian network). A module used in several places becomes one Bayesian layer used in
    all of them. What a new module cannot keep is named in a warning: forward/backward hooks
    registered on a replaced layer (or its parameters), and a weight tied between two
    modules (each layer gets its own posterior, so they are no longer tied).
    """
    _check_rho_init(rho_init)
    delta = _check_moped_delta(rho_init, moped_delta)
    if delta is not None and not init_from_weights:
        raise ValueError(
            "rho_init='moped' sets sigma = moped_delta * |w| from the trained weights w and "
            "needs init_from_weights=True (mu starts at those weights)"
        )
    if not isinstance(embeddings, bool):
        raise ValueError(f"embeddings must be True or False, got {embeddings!r}")
    if not isinstance(recurrent, bool):
        raise ValueError(f"recurrent must be True or False, got {recurrent!r}")
    selection = _Selection(model, include, exclude, embeddings, recurrent)
    chosen = selection.in_model(model)
    if recurrent:
        rnns = [
            name or "<model>"
            for name, m in model.named_modules()
            if isinstance(m, (nn.LSTM, nn.GRU)) and chosen(m)
        ]
        if rnns and estimator == "local":
            raise ValueError(
                f"bayesianize(recurrent=True, estimator='local'): the recurrent layers "
                f"{', '.join(rnns)} cannot use local reparameterisation, which samples the "
                "pre-activations anew at every use of the weights (every time step: a new "
                "network at each step); accepted estimators for them: 'reparam', 'flipout' "
                "(or exclude them, or convert them in a second bayesianize call)"
            )
        projected = [
            f"{name or '<model>'} (proj_size={m.proj_size})"
            for name, m in model.named_modules()
            if isinstance(m, nn.LSTM) and chosen(m) and m.proj_size
        ]
        if projected:
            raise ValueError(
                "bayesianize(recurrent=True): bbb.BayesLSTM does not support proj_size, which "
                f"these LSTMs use: {', '.join(projected)}; exclude them (exclude=[...])"
            )
    if embeddings:
        refused = [
            f"{name or '<model>'} ("
            + ", ".join(
                f"{k}={getattr(m, k)!r}"
                for k, bad in (("max_norm", m.max_norm is not None), ("sparse", m.sparse))
                if bad
            )
            + ")"
            for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and chosen(m) and (m.max_norm is not None or m.sparse)
        ]
        if refused:
            raise ValueError(
                f"bayesianize(embeddings=True): bbb.BayesEmbedding supports neither max_norm nor "
                f"sparse=True, which these embeddings use: {', '.join(refused)}; exclude them "
                "(exclude=[...]) or build them without those options"
            )
        if init_from_weights:
            _warn_nonzero_padding_rows(model, chosen)
    # before the copy: copy.deepcopy drops the hooks of parameters
    hooked = _hooked(model, chosen)
    tied = _tied(model, chosen)
    buffers = _own_buffers(model, chosen)
    frozen = [
        name or "<model>"
        for name, m in model.named_modules()
        if chosen(m) and not all(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if not inplace:
        model = _copy(model, "bayesianize")
        chosen = selection.in_model(model)
    kwargs: dict[str, Any] = {
        "estimator": estimator,
        "kl": kl,
        "mu_init": mu_init,
        # moped: drawn from the default range, then replaced (a valid constructor value)
        "rho_init": (-5.0, -4.0) if delta is not None else rho_init,
    }
    model = _convert(model, kwargs, init_from_weights, _PriorPerDtype(prior), chosen, delta)
    # (a convertible layer left deterministic was left so by include/exclude: on purpose)
    kept = [
        _describe(name, m)
        for name, m in _left_deterministic(model)
        if not _convertible(m, embeddings, recurrent) and selection.in_scope(name)
    ]
    if not any(isinstance(m, BayesModule) for m in model.modules()):
        found = f"; it has these layers with weights: {', '.join(kept)}" if kept else ""
        if not recurrent and any(type(m) in (nn.LSTM, nn.GRU) for m in model.modules()):
            found += " (recurrent=True converts nn.LSTM/nn.GRU to bbb.BayesLSTM/bbb.BayesGRU)"
        raise ValueError(
            f"bayesianize found no nn.Linear or nn.Conv1d/2d/3d in {type(model).__name__} "
            "(nor nn.ConvTranspose1d/2d/3d): nothing was made Bayesian (it converts those "
            f"exact types){found}"
        )
    if kept:
        import warnings

        warnings.warn(
            f"bayesianize left these layers with weights deterministic: {', '.join(kept)}. It "
            "converts exactly nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (not "
            "their subclasses or parametrized versions, recurrent layers, attention's own projections or "
            "parameters of other modules; normalisation layers are kept on purpose); these "
            "weights get no posterior and no KL"
            + (
                " (exclude= silences this for the layers you leave deterministic on purpose)"
                if selection.include is None
                else ""
            )
            + (
                "; embeddings=True converts nn.Embedding to bbb.BayesEmbedding"
                if not embeddings and any(type(m) is nn.Embedding for m in model.modules())
                else ""
            )
            + (
                "; recurrent=True converts nn.LSTM/nn.GRU to bbb.BayesLSTM/bbb.BayesGRU"
                if not recurrent and any(type(m) in (nn.LSTM, nn.GRU) for m in model.modules())
                else ""
            ),
            UserWarning,
            stacklevel=2,
        )
    _warn_lost(hooked, tied, "bayesianize", buffers)
    if frozen and not init_from_weights:
        import warnings

        warnings.warn(
            f"bayesianize kept these frozen layers frozen: {', '.join(frozen)}, but with "
            "init_from_weights=False their mu starts at random values that will not train; "
            "pass init_from_weights=True to start them at the trained weights",
            UserWarning,
            stacklevel=2,
        )
    return model


def convertible_layers(
    model: nn.Module, *, embeddings: bool = False, recurrent: bool = False
) -> list[str]:
    """The qualified names (as ``model.named_modules()`` gives them; ``""`` for the model
    itself) of the layers :func:`bayesianize` can convert, in registration order: what its
    ``include`` / ``exclude`` choose among. The last one is often the output layer
    (``bayesianize(model, include=convertible_layers(model)[-1])`` for a Bayesian last
    layer), but registration order need not be the order of the forward pass: check it.
    ``embeddings=True``: ``nn.Embedding`` layers too, as ``bayesianize(..., embeddings=True)``
    converts them; ``recurrent=True``: ``nn.LSTM`` and ``nn.GRU`` too."""
    return [name for name, m in model.named_modules() if _convertible(m, embeddings, recurrent)]


def _own_buffers(model: nn.Module, replaced: Callable[[nn.Module], bool]) -> list[str]:
    """``"layer.buffer"`` for each buffer registered on a layer that ``replaced`` selects (a
    plain ``nn.Linear`` / ``nn.ConvNd`` has none: a user's scale or mask; the new layer has no
    such buffer, so it would be dropped without a word)."""
    return [
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if replaced(m)
        for b, _ in m.named_buffers(recurse=False)
    ]


# modules with weights that bayesianize keeps deterministic on purpose (documented)
_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _left_deterministic(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a converted ``model`` whose weights stay deterministic, the user may
    expect converted: every module outside a Bayesian layer that holds parameters of its own
    (subclassed, parametrized or lazy Linear/Conv, embeddings, nn.LSTM/GRU/RNN and their
    cells, nn.MultiheadAttention's in-projection, a custom module's ``nn.Parameter``), except
    normalisation layers."""
    from torch.nn.utils import parametrize

    from .likelihoods import Likelihood

    # a Bayesian layer's parts (its prior), a parametrization's (the layer is named) and a
    # likelihood's (a learned noise is no weight)
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, (BayesModule, Likelihood)):
            skip.update(id(x) for x in m.modules())
        elif parametrize.is_parametrized(m):
            held = m.parametrizations
            assert isinstance(held, nn.Module)  # a ModuleDict on every parametrized module
            skip.update(id(x) for x in held.modules())
    return [
        (name, m)
        for name, m in model.named_modules()
        if id(m) not in skip
        and not isinstance(m, _NORM_LAYERS)
        and (
            isinstance(m, _WEIGHT_LAYERS)
            or any(True for _ in m.parameters(recurse=False))
            or isinstance(m, nn.modules.lazy.LazyModuleMixin)
        )
    ]


def _describe(name: str, module: nn.Module) -> str:
    """``name (Type)`` of a layer left deterministic; a module that is neither a weight layer
    nor one of torch's names its parameters instead (``name.scale (MyBlock)``)."""
    if isinstance(module, _WEIGHT_LAYERS) or type(module).__module__.startswith("torch."):
        return f"{name or '<model>'} ({type(module).__name__})"
    params = [_prefix_of(name) + p for p, _ in module.named_parameters(recurse=False)]
    return f"{', '.join(params) or name or '<model>'} ({type(module).__name__})"


def _prefix_of(name: str) -> str:
    return f"{name}." if name else ""


def _copy(model: nn.Module, caller: str) -> nn.Module:
    """``copy.deepcopy(model)``, or a TypeError that says what to do when the model cannot be
    copied (``torch.nn.utils.weight_norm``'s computed weight is not a leaf tensor)."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as e:
        if "deepcopy" not in str(e):
            raise
        remedy = (
            "pass inplace=True to convert the model itself"
            if caller == "bayesianize"
            else "torch.nn.utils.parametrizations.weight_norm replaces the deprecated "
            "torch.nn.utils.weight_norm and can be copied"
        )
        raise TypeError(
            f"{caller} works on a copy of the model, and the model cannot be copied: {e} ({remedy})"
        ) from e


def _warn_lost(
    hooked: list[str], tied: list[str], caller: str, buffers: Sequence[str] = ()
) -> None:
    """Warn that the hooks of the replaced layers ``hooked``, the ties ``tied`` and the
    buffers ``buffers`` registered on replaced layers are lost."""
    import warnings

    if buffers:
        warnings.warn(
            f"{caller} replaced layers that had buffers of their own: {', '.join(buffers)}. "
            "The new layers do not have them (register them again on the converted model if "
            "your code reads them)",
            UserWarning,
            stacklevel=3,
        )

    if hooked:
        warnings.warn(
            f"{caller} replaced layers that had hooks: {', '.join(hooked)}. The new layers do "
            "not carry them (register the hooks again on the converted model)",
            UserWarning,
            stacklevel=3,
        )
    if tied:
        warnings.warn(
            f"{caller} untied weights shared between modules: {'; '.join(tied)}. Each "
            "converted layer has parameters of its own (use one module in several places to "
            "share a layer)",
            UserWarning,
            stacklevel=3,
        )


# weight layers a user may expect to be converted; bayesianize names those it leaves alone
_WEIGHT_LAYERS = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
)


def _convert(
    model: nn.Module,
    kwargs: dict[str, Any],
    init_from_weights: bool,
    prior_for: _PriorPerDtype,
    chosen: Callable[[nn.Module], bool] = _convertible,
    moped_delta: float | None = None,
) -> nn.Module:
    """``model`` with its layers that ``chosen`` selects replaced (``model`` itself when it
    is one)."""

    def make(m: nn.Module) -> nn.Module | None:
        if not chosen(m):
            return None
        return _bayes_for(m, kwargs, init_from_weights, prior_for, moped_delta)

    top = make(model)
    if top is not None:
        return top
    _replace_layers(model, make)
    return model


def _replace_layers(
    module: nn.Module,
    make: Callable[[nn.Module], nn.Module | None],
    memo: dict[int, tuple[nn.Module, nn.Module]] | None = None,
) -> None:
    """Replace, in place and at any depth, every submodule for which ``make`` returns a new
    module. A module used in several places (tied weights) gets the same new module at each
    (``named_children`` lists it once: the later places would keep the old one); ``memo``
    keeps the old module alive so its ``id`` stays its own."""
    memo = {} if memo is None else memo
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) in memo:
            setattr(module, name, memo[id(child)][1])
            continue
        new = make(child)
        if new is not None:
            memo[id(child)] = (child, new)
            setattr(module, name, new)
        else:
            _replace_layers(child, make, memo)


# the layers to_deterministic replaces, each with the class whose forward it reproduces
_DETERMINISTIC_BASES: tuple[type[BayesModule], ...] = (
    BayesLinear,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesEmbedding,
)


def _overrides(module: BayesModule) -> str | None:
    """``"op() of BayesLinear"``: the method (``forward``, ``op``, ``_conv``, ...) by which
    ``module``'s class, a subclass of a layer :func:`to_deterministic` converts, computes
    another function than that layer; ``None`` when it computes the same (a subclass that only sets defaults
    or adds attributes)."""
    base = next((b for b in _DETERMINISTIC_BASES if isinstance(module, b)), None)
    if base is None:
        return None
    cls = type(module)
    for name in _COMPUTING_METHODS:
        if hasattr(base, name) and getattr(cls, name) is not getattr(base, name):
            return f"{name}() of {base.__name__}"
    return None


# the methods a converted layer's mean output is computed with (those its class has): a
# subclass overriding one computes a function the plain torch layer would not reproduce (a
# subclass scaling the output of _conv was converted silently when only forward and op counted)
_COMPUTING_METHODS = ("forward", "op", "_conv", "_lookup", "_lookup_blocks", "_output_padding_for")


def _deterministic_for(module: nn.Module) -> nn.Module | None:
    if isinstance(module, _BayesRNNBase):
        # the nn.LSTM / nn.GRU of the mean weights (a subclass overriding forward: TypeError)
        return module.to_torch()
    if isinstance(module, BayesModule) and (changed := _overrides(module)) is not None:
        # a user's subclass with a forward or op of its own (an output scale, a residual):
        # the plain layer would compute the parent's function, silently other numbers
        raise TypeError(
            f"to_deterministic cannot convert {type(module).__name__}: it overrides "
            f"{changed}, which a plain torch layer would not reproduce; use "
            "bbb.sampling(model, 'mean') for its mean network"
        )
    if isinstance(module, BayesEmbedding):
        return _deterministic_embedding(module)
    if not isinstance(module, (BayesLinear, _BayesConvNd, _BayesConvTransposeNd)):
        if isinstance(module, BayesModule):
            # e.g. BayesLinearEnsemble: no plain PyTorch layer computes it; leaving it in
            # place would leave a sampling layer in the "deterministic" copy
            raise TypeError(
                f"to_deterministic cannot convert {type(module).__name__} (it converts "
                "BayesLinear, BayesConv1d/2d/3d and BayesConvTranspose1d/2d/3d); use "
                "bbb.sampling(model, 'mean') for its "
                "mean network"
            )
        return None
    w = module.weight_mu.detach()
    if module.weight_mask is not None:
        w = w * module.weight_mask
    factory = {"device": w.device, "dtype": w.dtype}
    bias_mu = module.bias_mu
    bias = bias_mu is not None
    new: nn.Linear | nn.modules.conv._ConvNd
    if isinstance(module, BayesLinear):
        new = nn.Linear(module.in_features, module.out_features, bias, **factory)
    elif isinstance(module, _BayesConvTransposeNd):
        # the layer's sizes are tuples of _dim ints, as that class takes them
        cls_t: Callable[..., nn.modules.conv._ConvTransposeNd] = {
            1: nn.ConvTranspose1d,
            2: nn.ConvTranspose2d,
            3: nn.ConvTranspose3d,
        }[module._dim]
        new = cls_t(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            output_padding=module.output_padding,
            groups=module.groups,
            bias=bias,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
            **factory,
        )
    else:
        # the layer's sizes are tuples of _dim ints, as that class takes them
        cls: Callable[..., nn.modules.conv._ConvNd] = {
            1: nn.Conv1d,
            2: nn.Conv2d,
            3: nn.Conv3d,
        }[module._dim]
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
            padding_mode=module.padding_mode,
            **factory,
        )
    with torch.no_grad():
        new.weight.copy_(w)
        if bias_mu is not None:
            assert new.bias is not None  # built with bias=True
            new.bias.copy_(bias_mu)
    _carry_over(module, new, {"weight_mu": ("weight",), "bias_mu": ("bias",)})
    return new


def _deterministic_embedding(module: BayesEmbedding) -> nn.Embedding:
    """The ``nn.Embedding`` of ``module``'s mean table (pruning applied, the padding row
    zero as the Bayesian layer's output there always is)."""
    w = module.weight_mu.detach()
    if module.weight_mask is not None:
        w = w * module.weight_mask
    new = nn.Embedding(
        module.num_embeddings,
        module.embedding_dim,
        padding_idx=module.padding_idx,
        scale_grad_by_freq=module.scale_grad_by_freq,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if module.padding_idx is not None:
            new.weight[module.padding_idx].zero_()
    _carry_over(module, new, {"weight_mu": ("weight",)})
    return new


def to_deterministic(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every Bayesian layer replaced by its mean network.

    Weights are ``weight_mu`` (times the pruning mask), biases ``bias_mu``: the same function
    as ``bbb.sampling(model, "mean")``, as plain ``nn.Linear``/``nn.ConvNd`` modules. Each
    keeps the Bayesian layer's train/eval mode, and a frozen ``weight_mu`` (``bias_mu``) gives a
    frozen ``weight`` (``bias``); hooks registered on a replaced layer are named in a warning
    (the new modules do not carry them).

    A ``torch.compile``d model (or submodule) gives its network uncompiled (state dict keys
    without ``_orig_mod.``, ready for ``torch.export`` or TorchScript; compile the copy again
    if wanted). A subclass of a Bayesian layer that overrides ``forward`` or ``op`` is a
    ``TypeError`` (a plain layer would compute another function), as are the Bayesian layers
    no plain layer computes (``BayesLinearEnsemble``).
    """
    from .train.trainer import _plain_module

    # a torch.compile wrapper: its network (as save_compact does). A copy of the wrapper
    # was a compiled module that torch.jit.script refuses ("... got Sequential") and whose
    # state dict keys start with "_orig_mod." (not loadable into the plain architecture).
    model = _plain_module(model)
    hooked = _hooked(
        model,
        lambda m: isinstance(
            m, (BayesLinear, _BayesConvNd, _BayesConvTransposeNd, BayesEmbedding, _BayesRNNBase)
        ),
    )
    # one memo for the whole model: a layer used inside and outside a compiled submodule
    # stays one layer
    memo: dict[int, tuple[nn.Module, nn.Module]] = {}

    def make(module: nn.Module) -> nn.Module | None:
        inner = _plain_module(module)
        if inner is module:
            return _deterministic_for(module)
        # a compiled submodule (model.body = torch.compile(body)): its converted network
        new = _deterministic_for(inner)
        if new is None:
            _replace_layers(inner, make, memo)
        return inner if new is None else new

    top = _deterministic_for(model)
    if top is None:
        top = _copy(model, "to_deterministic")
        _replace_layers(top, make, memo)
    _warn_lost(hooked, [], "to_deterministic")
    return top
