"""``BayesLSTM`` and ``BayesGRU``: recurrent layers with a factorised Gaussian posterior.

The Bayesian counterparts of ``torch.nn.LSTM`` and ``torch.nn.GRU``, with their interface
(``input_size``, ``hidden_size``, ``num_layers``, ``bias``, ``batch_first``, ``dropout``,
``bidirectional``; ``forward(x, hx)`` returning ``(output, h_n)`` or ``(output, (h_n, c_n))``).

Each layer and direction holds its posterior in one :class:`BayesRecurrentWeights` (a
:class:`bbb.nn.BayesModule`): the weight ``[W_ih | W_hh]`` of shape (G * hidden_size,
in + hidden_size) and the bias ``[b_ih | b_hh]`` of shape (2 * G * hidden_size,), with G = 4
gates for the LSTM (torch's order i, f, g, o) and 3 for the GRU (r, z, n). Sampling modes,
pruning, the KL, compact export and the model-level helpers (:func:`bbb.sampling`,
:func:`bbb.vectorized_samples`, :func:`bbb.shared_weight_samples`) see those submodules
like any other Bayesian layer.

One weight sample per sequence pass, shared by all time steps (Fortunato et al. 2017,
"Bayesian Recurrent Neural Networks"): a weight that changed from one step to the next would
not be one network. The estimators keep that property:

- ``"reparam"``: one weight sample per forward pass (per Monte Carlo sample inside
  :func:`bbb.vectorized_samples`), shared by the batch and by every time step.
- ``"flipout"`` (Wen et al. 2018): one shared perturbation per pass, and random signs per
  example drawn once per sequence and reused at every step, so each example's weights are
  ``mu + (sigma * eps) * (s r^T)``, fixed across time: exactly a weight-space sample for each
  example, decorrelated across the examples of the batch.
- ``"local"`` is refused: local reparameterisation samples pre-activations independently at
  every use of the weights, which here would be a new network at every time step.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..priors import Prior
from .estimators import _autocast_on, rademacher
from .module import (
    BayesModule,
    _is_real,
    _Record,
    check_flag,
    check_float_dtype,
    check_input_dtype,
    positive_int,
)
from .stacking import repeat_samples

__all__ = ["BayesLSTM", "BayesGRU", "BayesRecurrentWeights", "RECURRENT_ESTIMATORS"]

RECURRENT_ESTIMATORS = ("reparam", "flipout")
"""The estimators :class:`BayesLSTM` and :class:`BayesGRU` accept."""

_LOCAL_REFUSED = (
    "estimator 'local' (local reparameterisation) samples the pre-activations independently "
    "at every use of the weights, which in a recurrent layer is every time step: each step "
    "would see another network, not one weight sample shared by the sequence. Accepted "
    "values: 'reparam', 'flipout' (flipout's per-example signs are drawn once per sequence "
    "and keep each example's weights fixed across time)"
)


def _check_estimator(owner: str, estimator: object) -> str:
    if estimator == "local":
        raise ValueError(f"{owner}: {_LOCAL_REFUSED}")
    if estimator not in RECURRENT_ESTIMATORS:
        raise ValueError(
            f"{owner}: unknown estimator {estimator!r}; accepted values: "
            f"{', '.join(RECURRENT_ESTIMATORS)} ('local' is refused for recurrent layers)"
        )
    return str(estimator)


# the methods a recurrent layer's output comes from: a subclass overriding one of them computes
# a function its plain nn.LSTM / nn.GRU (to_torch) would not reproduce
_COMPUTING_METHODS = (
    "forward",
    "_forward",
    "_blocks_forward",
    "_finish",
    "_torch_forward",
    "_loop",
    "_direction",
)

# the options held by each layer and direction's cell that the recurrent layer sets on all of
# them (__setattr__): a new prior replaces every cell's (and re-resolves kl="auto" for it)
_CELL_OPTIONS = ("estimator", "kl_mode", "mode", "prior")


class _Drawn(NamedTuple):
    """The weights one :class:`BayesRecurrentWeights` gives to one sequence pass.

    ``kind``: ``"one"``: ``w`` (G*H, in+H) and ``b`` (2*G*H,) used by every row;
    ``"batched"``: ``w`` (S, G*H, in+H) and ``b`` (S, 2*G*H), one per block of B rows;
    ``"flipout"``: the mean ``w``, ``b`` and the perturbation ``dw`` ((G*H, in+H), or
    (S, G*H, in+H) for S samples) and ``db``.
    """

    kind: str
    w: Tensor
    b: Tensor | None
    dw: Tensor | None
    db: Tensor | None
    samples: int


class BayesRecurrentWeights(BayesModule):
    """The posterior of one layer and direction of a :class:`BayesLSTM` / :class:`BayesGRU`.

    ``weight_mu``/``weight_rho``: (gates * hidden_size, input_size + hidden_size), the input
    weight ``W_ih`` in the first ``input_size`` columns and the recurrent weight ``W_hh`` in
    the rest; ``bias_mu``/``bias_rho``: (2 * gates * hidden_size,), ``b_ih`` then ``b_hh``.
    Built by the recurrent layer, which calls it once per forward pass for the weights of
    that pass (see the module docstring); it is not called on data itself.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gates: int,
        bias: bool,
        *,
        owner: str,
        prior: Prior | None,
        estimator: str,
        kl: str,
        mu_init: str | tuple[float, float],
        rho_init: float | tuple[float, float],
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.gates = gates
        self._owner = owner
        self._drawn: _Drawn | None = None
        self._init_posterior(
            (gates * hidden_size, input_size + hidden_size),
            bias,
            prior=prior,
            estimator=_check_estimator(owner, estimator),
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
            # torch's recurrent layers: U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))
            fan_in=hidden_size,
            device=device,
            dtype=dtype,
            bias_size=2 * gates * hidden_size,
        )

    def __setattr__(self, name: str, value: object) -> None:
        if name == "estimator" and "_owner" in self.__dict__:
            _check_estimator(self.__dict__["_owner"], value)
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError(
            f"BayesRecurrentWeights holds the posterior of one layer of a {self._owner} and is "
            f"not applied to data itself: call the {self._owner}"
        )

    def draw(self, rows: int) -> _Drawn:
        """The weights of one sequence pass over ``rows`` rows (S * B inside
        :func:`bbb.vectorized_samples`), drawn by this layer's mode and estimator and recorded
        for :meth:`kl` (once per pass)."""
        s = self.num_samples
        if self.mode == "sample" and self.estimator == "flipout":
            if rows % s != 0:
                raise ValueError(
                    f"{self._owner}: batch of {rows} rows is not a multiple of num_samples={s}"
                )
            post, s_w, s_b = self._posterior_and_sigmas()
            versions = self._param_versions()
            noise = self._noise(s, self.weight_mu)
            assert noise.eps_w is not None
            self._record = _Record(
                noise.eps_w, noise.eps_b, sigma_w=s_w, sigma_b=s_b, param_versions=versions
            )
            one = s == 1
            dw = post.w_sigma * (noise.eps_w[0] if one else noise.eps_w)
            db = None
            if post.b_sigma is not None and noise.eps_b is not None:
                db = post.b_sigma * (noise.eps_b[0] if one else noise.eps_b)
            return _Drawn("flipout", post.w_mu, post.b_mu, dw, db, s)
        # the base class's forward (modes, frozen samples, fused kernels, the record for
        # kl()) on a carrier of ``rows`` rows: its estimator hands the weights to op/op_batched
        carrier = self.weight_mu.new_zeros(()).expand(rows, 1)
        self._drawn = None
        try:
            BayesModule.forward(self, carrier)
            drawn = self._drawn
        finally:
            self._drawn = None
        assert drawn is not None
        return drawn

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Keep one weight ``w`` (G*H, in+H) and bias ``b`` for the pass (see :meth:`draw`)."""
        self._drawn = _Drawn("one", w, b, None, None, 1)
        return x

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        """Keep S weights ``w`` (S, G*H, in+H) and biases ``b`` (S, 2*G*H) for the pass."""
        self._drawn = _Drawn("batched", w, b, None, None, num_samples)
        return x

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:  # pragma: no cover - flipout is drawn above
        raise RuntimeError("BayesRecurrentWeights draws flipout's signs per sequence itself")

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, hidden_size={self.hidden_size}, gates={self.gates}, "
            + super().extra_repr()
        )


def _lin(x: Tensor, w: Tensor, b: Tensor | None, samples: int) -> Tensor:
    """``x @ w^T + b`` for ``x`` (N, ..., k): one weight (O, k) for all rows, or S weights
    (S, O, k) and biases (S, O) for the S blocks of N = S * B rows."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    xs = x.reshape(samples, -1, x.shape[-1])
    wt = w.transpose(1, 2)
    y = torch.bmm(xs, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xs, wt)
    return y.reshape(*x.shape[:-1], w.shape[1])


def _as_lstm_kernel_output(t: Tensor) -> Tensor:
    """``t`` (an LSTM output or final state, any shape) in the dtype torch's LSTM kernel
    returns under the current autocast: autocast casts that kernel (``mkldnn_rnn_layer`` on
    CPU) to its lower precision, so ``nn.LSTM`` returns output, ``h_n`` and ``c_n`` in the
    autocast dtype (float32 tensors only; float64 is not cast), whatever ``h_0``'s dtype.
    The Python loop keeps the state in ``h_0``'s dtype (as ``nn.LSTMCell`` and ``nn.GRU``,
    whose kernels autocast does not cast, do): cast here, flipout returned float32 where
    reparam returned bfloat16."""
    dev = t.device.type
    if t.dtype != torch.float32 or not _autocast_on(dev):
        return t
    return t.to(torch.get_autocast_dtype(dev))


# the dtypes autocast casts to its lower precision (not float64, not integers): an initial state
# in one of them may differ from float32 parameters under autocast
_AUTOCAST_CASTS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _cpu_float16_autocast(x: Tensor) -> bool:
    """Whether ``x`` is on the CPU under an autocast to float16."""
    return (
        x.device.type == "cpu"
        and _autocast_on("cpu")
        and torch.get_autocast_dtype("cpu") == torch.float16
    )


def _lstm_float16(
    x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], bias: bool, args: tuple[Any, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's LSTM kernel as a CPU autocast to float16 runs it, on float16 copies of its
    arguments outside autocast: autocast hands float16 to oneDNN's LSTM, which CPUs without
    float16 support lack (nn.LSTM fails with "could not create a primitive descriptor for the
    LSTM forward propagation primitive"); outside autocast torch takes oneDNN where the CPU
    has it and its own float16 LSTM elsewhere. ``args``: ``torch.lstm``'s (num_layers,
    dropout, train, bidirectional, batch_first). Returns output, h_n, c_n in float16."""

    def half(t: Tensor) -> Tensor:
        # what autocast casts: floating tensors other than float64
        return t.half() if t.is_floating_point() and t.dtype != torch.float64 else t

    with torch.autocast("cpu", enabled=False):
        out, hn, cn = torch.lstm(
            half(x), (half(h0), half(c0)), [half(p) for p in params], bias, *args
        )
    return out, hn, cn


class _BayesRNNBase(nn.Module):
    """What :class:`BayesLSTM` and :class:`BayesGRU` share (see their docstrings)."""

    _kind: ClassVar[str] = ""
    _gates: ClassVar[int] = 0
    _torch_cls: ClassVar[Callable[..., nn.RNNBase]]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        prior: Prior | None = None,
        estimator: str = "reparam",
        kl: str = "auto",
        mu_init: str | tuple[float, float] = "fan_in",
        rho_init: float | tuple[float, float] = (-5.0, -4.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size = positive_int(name, "input_size", input_size)
        self.hidden_size = positive_int(name, "hidden_size", hidden_size)
        self.num_layers = positive_int(name, "num_layers", num_layers)
        bias = check_flag(name, "bias", bias)
        batch_first = check_flag(name, "batch_first", batch_first)
        bidirectional = check_flag(name, "bidirectional", bidirectional)
        if not _is_real(dropout) or not 0.0 <= float(cast(numbers.Real, dropout)) <= 1.0:
            raise ValueError(
                f"{name} dropout must be a number in [0, 1] (the probability of zeroing an "
                f"output of each layer but the last, in training mode), got {dropout!r}"
            )
        check_float_dtype(name, dtype)
        _check_estimator(name, estimator)
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(cast(numbers.Real, dropout))
        self.bidirectional = bidirectional
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"{name}: dropout={self.dropout} acts between layers and has no effect with "
                "num_layers=1",
                UserWarning,
                stacklevel=3,
            )
        directions = 2 if bidirectional else 1
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.hidden_size * directions
            for d in range(directions):
                cell = BayesRecurrentWeights(
                    in_size,
                    self.hidden_size,
                    self._gates,
                    bias,
                    owner=name,
                    prior=prior,
                    estimator=estimator,
                    kl=kl,
                    mu_init=mu_init,
                    rho_init=rho_init,
                    device=device,
                    dtype=dtype,
                )
                self.add_module(f"l{layer}" + ("_reverse" if d else ""), cell)
        # from here on, the per-layer options set on the layer reach every cell (__setattr__)
        self._cells_built = True

    # ----------------------------------------------------------------- per-layer options
    def __setattr__(self, name: str, value: object) -> None:
        if name in _CELL_OPTIONS and self.__dict__.get("_cells_built", False):
            # the options each cell holds (as every Bayesian layer): set on every layer and
            # direction, validated by the cells (the first refuses a bad value before any
            # changes). Before, lstm.estimator = "flipout" and lstm.mode = "mean" set unused
            # attributes silently, and lstm.prior = p registered a stray "prior" submodule
            # (its keys in the state dict) while every cell kept its own prior.
            self._set_cell_option(name, value)
            return
        # (torch hints Tensor | Module; nn.Module.__setattr__ stores any other value)
        super().__setattr__(name, value)  # type: ignore[arg-type]

    def _set_cell_option(self, name: str, value: object) -> None:
        for _, cell in self.cells():
            setattr(cell, name, value)

    def _cell_option(self, name: str) -> Any:
        values = [getattr(cell, name) for _, cell in self.cells()]
        if any(v != values[0] for v in values[1:]):
            per_cell = ", ".join(f"{s}: {getattr(c, name)!r}" for s, c in self.cells())
            # (not an AttributeError, which nn.Module.__getattr__ would replace by "has no
            # attribute")
            raise ValueError(
                f"{type(self).__name__}.{name}: its layers differ ({per_cell}); read it per "
                f"layer (l0.{name}) or set it on the whole layer ({name} = ...)"
            )
        return values[0]

    @property
    def estimator(self) -> str:
        """The estimator of every layer and direction (``"reparam"`` or ``"flipout"``);
        setting it sets theirs (validated)."""
        return cast(str, self._cell_option("estimator"))

    @estimator.setter
    def estimator(self, value: str) -> None:
        self._set_cell_option("estimator", value)

    @property
    def kl_mode(self) -> str:
        """The KL mode of every layer and direction; setting it sets theirs (validated)."""
        return cast(str, self._cell_option("kl_mode"))

    @kl_mode.setter
    def kl_mode(self, value: str) -> None:
        self._set_cell_option("kl_mode", value)

    @property
    def mode(self) -> str:
        """The sampling mode of every layer and direction (``"sample"``, ``"mean"``,
        ``"frozen"``); setting it sets theirs (as :func:`bbb.set_sampling` does)."""
        return cast(str, self._cell_option("mode"))

    @mode.setter
    def mode(self, value: str) -> None:
        self._set_cell_option("mode", value)

    # ----------------------------------------------------------------- structure
    def cells(self) -> Iterator[tuple[str, BayesRecurrentWeights]]:
        """``(suffix, weights)`` per layer and direction in torch's order: ``("l0", ...)``,
        ``("l0_reverse", ...)``, ``("l1", ...)``; torch's ``weight_ih_l0`` is
        ``l0.weight_mu[:, :l0.input_size]``, ``weight_hh_l0`` the rest, ``bias_ih_l0``
        ``l0.bias_mu[:G*H]`` and ``bias_hh_l0`` ``l0.bias_mu[G*H:]``."""
        directions = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            for d in range(directions):
                suffix = f"l{layer}" + ("_reverse" if d else "")
                yield suffix, cast(BayesRecurrentWeights, getattr(self, suffix))

    def flatten_parameters(self) -> None:
        """Nothing to do (``nn.LSTM``'s cuDNN weight packing; accepted for code that calls it)."""

    # ----------------------------------------------------------------- conversion
    @classmethod
    def from_torch(
        cls,
        module: nn.Module,
        *,
        init_from_weights: bool = False,
        moped_rho: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> _BayesRNNBase:
        """The Bayesian layer of ``module`` (exactly ``nn.LSTM`` for :class:`BayesLSTM`,
        ``nn.GRU`` for :class:`BayesGRU`): the same sizes and options, its device, dtype and
        train/eval mode. ``kwargs``: the layer options (prior, estimator, kl, mu_init,
        rho_init). ``init_from_weights``: mu starts at the module's weights and biases;
        ``moped_rho``: a function of a trained weight giving its rho (MOPED). A frozen
        weight keeps its mu and rho frozen. An LSTM with ``proj_size`` is refused."""
        if type(module) is not cls._torch_cls:
            raise TypeError(
                f"{cls.__name__}.from_torch converts exactly nn.{cls._kind}, got "
                f"{type(module).__name__}"
            )
        assert isinstance(module, nn.RNNBase)
        if getattr(module, "proj_size", 0):
            raise ValueError(
                f"{cls.__name__} does not support proj_size (the LSTM has proj_size="
                f"{module.proj_size}); accepted value: 0"
            )
        w0 = module.weight_ih_l0
        kwargs = {"device": w0.device, "dtype": w0.dtype, **kwargs}
        new = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            module.bias,
            module.batch_first,
            float(module.dropout),
            module.bidirectional,
            **kwargs,
        )
        new.train(module.training)
        g = cls._gates * module.hidden_size
        for suffix, cell in new.cells():
            w_ih = getattr(module, f"weight_ih_{suffix}")
            w_hh = getattr(module, f"weight_hh_{suffix}")
            parts = [(w_ih, w_hh, cell.weight_mu, cell.weight_rho, cell.input_size)]
            if module.bias:
                assert cell.bias_mu is not None and cell.bias_rho is not None
                b_ih = getattr(module, f"bias_ih_{suffix}")
                b_hh = getattr(module, f"bias_hh_{suffix}")
                parts.append((b_ih, b_hh, cell.bias_mu, cell.bias_rho, g))
            for (ih, hh, mu, rho, split), kind in zip(parts, ("weight", "bias"), strict=False):
                with torch.no_grad():
                    if init_from_weights:
                        mu[..., :split].copy_(ih)
                        mu[..., split:].copy_(hh)
                        if moped_rho is not None:
                            rho[..., :split].copy_(moped_rho(ih))
                            rho[..., split:].copy_(moped_rho(hh))
                if not (ih.requires_grad and hh.requires_grad):
                    if ih.requires_grad or hh.requires_grad:
                        # one parameter holds both: it cannot be half frozen
                        frozen, free = ("ih", "hh") if hh.requires_grad else ("hh", "ih")
                        warnings.warn(
                            f"{cls.__name__}.from_torch: {kind}_{frozen}_{suffix} is frozen "
                            f"but {kind}_{free}_{suffix} is not; {cls.__name__} holds both in "
                            f"{suffix}.{kind}_mu (and {kind}_rho), which is frozen, so "
                            f"{kind}_{free}_{suffix} will not train either (unfreeze it with "
                            f"{suffix}.{kind}_mu.requires_grad_(True) and "
                            f"{suffix}.{kind}_rho.requires_grad_(True) to train both)",
                            UserWarning,
                            stacklevel=2,
                        )
                    mu.requires_grad_(False)
                    rho.requires_grad_(False)
        return new

    def to_torch(self) -> nn.RNNBase:
        """The ``nn.LSTM`` / ``nn.GRU`` of the mean weights (``weight_mu`` times the pruning
        mask, ``bias_mu``): the function of ``bbb.sampling(model, "mean")``, bit for bit on the
        same device (its forward calls the same kernel). Keeps the train/eval mode; a frozen
        ``weight_mu`` gives frozen weights. A subclass that overrides ``forward`` or one of the
        methods it computes with is a TypeError (the plain layer would compute another
        function)."""
        base = BayesLSTM if isinstance(self, BayesLSTM) else BayesGRU
        for method in _COMPUTING_METHODS:
            if getattr(type(self), method) is not getattr(base, method):
                raise TypeError(
                    f"to_deterministic cannot convert {type(self).__name__}: it overrides "
                    f"{method}() of {base.__name__}, which a plain nn.{self._kind} would not "
                    "reproduce; use bbb.sampling(model, 'mean') for its mean network"
                )
        first = self.l0
        assert isinstance(first, BayesRecurrentWeights)
        w0 = first.weight_mu
        new = self._torch_cls(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=w0.device,
            dtype=w0.dtype,
        )
        new.train(self.training)
        g = self._gates * self.hidden_size
        with torch.no_grad():
            for suffix, cell in self.cells():
                w = cell.weight_mu.detach()
                if cell.weight_mask is not None:
                    w = w * cell.weight_mask
                getattr(new, f"weight_ih_{suffix}").copy_(w[:, : cell.input_size])
                getattr(new, f"weight_hh_{suffix}").copy_(w[:, cell.input_size :])
                if cell.bias_mu is not None:
                    getattr(new, f"bias_ih_{suffix}").copy_(cell.bias_mu[:g])
                    getattr(new, f"bias_hh_{suffix}").copy_(cell.bias_mu[g:])
        for suffix, cell in self.cells():
            frozen_w = not cell.weight_mu.requires_grad
            frozen_b = cell.bias_mu is not None and not cell.bias_mu.requires_grad
            for kind, frozen in (("weight", frozen_w), ("bias", frozen_b)):
                if frozen:
                    getattr(new, f"{kind}_ih_{suffix}").requires_grad_(False)
                    getattr(new, f"{kind}_hh_{suffix}").requires_grad_(False)
        return new

    # ----------------------------------------------------------------- forward
    def _check_hidden(self, h: object, what: str, batch: int, rows: int, batched: bool) -> Tensor:
        """``h`` as (L*D, rows, H): given with ``batch`` rows (repeated to the S copies) or
        with ``rows``; a ValueError saying what is expected otherwise."""
        name = type(self).__name__
        layers = self.num_layers * (2 if self.bidirectional else 1)
        shape = (layers, batch, self.hidden_size) if batched else (layers, self.hidden_size)
        if not isinstance(h, Tensor):
            raise ValueError(f"{name}: {what} must be a tensor of shape {shape}, got {h!r}")
        if not batched:
            if tuple(h.shape) != shape:
                raise ValueError(
                    f"{name}: for an unbatched (2-D) input, {what} must have shape {shape} "
                    f"(num_layers * num_directions, hidden_size), got {tuple(h.shape)}"
                )
            h = h.unsqueeze(1)
        elif h.dim() != 3 or h.shape[0] != layers or h.shape[2] != self.hidden_size:
            raise ValueError(
                f"{name}: {what} must have shape {shape} (num_layers * num_directions, batch, "
                f"hidden_size), got {tuple(h.shape)}"
            )
        elif h.shape[1] != rows:
            if h.shape[1] != batch:
                raise ValueError(
                    f"{name}: {what} has batch size {h.shape[1]}, the input has {batch}: "
                    f"expected shape {shape}"
                )
            h = h.repeat(1, rows // batch, 1)
        first = self.l0
        assert isinstance(first, BayesRecurrentWeights)
        dtype = first.weight_mu.dtype
        if h.dtype != dtype and not (
            _autocast_on(h.device.type) and {h.dtype, dtype} <= _AUTOCAST_CASTS
        ):
            raise ValueError(
                f"{name}: {what} must have the parameters' dtype {dtype} (under autocast: "
                f"one of {', '.join(sorted(str(t) for t in _AUTOCAST_CASTS))}, the dtypes "
                f"autocast casts), got {h.dtype}"
            )
        return h

    def _rows_to_batch_first(self, x: Tensor) -> tuple[Tensor, int, int]:
        """The input as (N, T, in) batch-first rows with N = S * B (the S Monte Carlo copies
        in blocks of B along the batch dimension: dim 0, or dim 1 for ``batch_first=False``),
        and S and B; makes the copies itself inside ``vectorized_samples(..., batch_size=B)``
        when given the B inputs."""
        name = type(self).__name__
        first = self.l0
        assert isinstance(first, BayesRecurrentWeights)
        s = first.num_samples
        prefix = first._prefix_rows
        copied = first._prefix_copied
        bdim = 0 if self.batch_first else 1
        where = "dim 0" if self.batch_first else "dim 1 (batch_first=False: (T, B, in))"
        xb = x if self.batch_first else x.transpose(0, 1)
        n = xb.shape[0]
        if s > 1 and prefix is not None:
            if n == prefix:
                # the B inputs: the S copies start here
                xb = repeat_samples(xb, s)
                if copied is not None:
                    copied[0] = True
            elif n != prefix * s:
                raise ValueError(
                    f"{name}: received a batch of {n} along {where} inside "
                    f"vectorized_samples(..., batch_size={prefix}) with num_samples={s}: "
                    f"expected {prefix} (the batch, repeated here) or {prefix * s} (its copies)"
                )
            elif copied is not None and not copied[0]:
                raise ValueError(
                    f"{name}: received a batch of {n} = {s} x {prefix} along {where} inside "
                    f"vectorized_samples(..., batch_size={prefix}) before any Bayesian layer "
                    "made the copies of the batch; leave shared_prefix off"
                )
        if xb.shape[0] % s != 0:
            raise ValueError(
                f"{name}: batch of {xb.shape[0]} along {where} is not a multiple of "
                f"num_samples={s}: inside vectorized_samples (bbb.ELBO, bbb.predict) the S "
                "copies of the batch are stacked along the batch dimension"
                + (
                    " (the ELBO's (S * B, T, in) rows, transposed to (T, S * B, in) for a "
                    "batch_first=False layer)"
                    if bdim
                    else ""
                )
            )
        return xb, s, xb.shape[0] // s

    def _forward(
        self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Any]:
        """The forward pass of both layers (see :meth:`BayesLSTM.forward`)."""
        name = type(self).__name__
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(
                f"{name} does not accept a PackedSequence: pass the padded tensor (see "
                "torch.nn.utils.rnn.pad_packed_sequence); note that the final hidden state "
                "then includes the padding steps of shorter sequences: read each sequence's "
                "output at its last valid step instead of h_n"
            )
        if not isinstance(input, Tensor):
            raise ValueError(f"{name} expected a tensor input, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{name} expected a 3-D input ({'(B, T, input_size)' if self.batch_first else '(T, B, input_size)'}) "
                f"or a 2-D unbatched one (T, input_size), got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name} expected input with last dimension input_size={self.input_size}, got "
                f"shape {tuple(input.shape)}"
            )
        first = self.l0
        assert isinstance(first, BayesRecurrentWeights)
        dtype = first.weight_mu.dtype
        check_input_dtype(name, input, dtype)
        s = first.num_samples
        batched = input.dim() == 3
        if not batched:
            if s > 1:
                raise ValueError(
                    f"{name}: an unbatched (2-D) input cannot hold the {s} Monte Carlo samples "
                    "of bbb.vectorized_samples (bbb.predict, bbb.ELBO), stacked along dim 0; "
                    "give a batch of one: x.unsqueeze(0 if batch_first else 1)"
                )
            input = input.unsqueeze(0 if self.batch_first else 1)
        t_dim = 1 if self.batch_first else 0
        if input.shape[t_dim] == 0:
            raise ValueError(f"{name}: the sequence length must be at least 1, got 0")
        xb, s, b = self._rows_to_batch_first(input)
        rows = xb.shape[0]
        h0: Tensor | None = None
        c0: Tensor | None = None
        if hx is not None:
            if self._kind == "LSTM":
                # a list as nn.LSTM accepts it (its kernel takes a tensor list)
                if not (isinstance(hx, tuple | list) and len(hx) == 2):
                    raise ValueError(
                        f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got "
                        f"{type(hx).__name__}"
                        + (f" of length {len(hx)}" if isinstance(hx, tuple | list) else "")
                    )
                h0 = self._check_hidden(hx[0], "h_0", b, rows, batched)
                c0 = self._check_hidden(hx[1], "c_0", b, rows, batched)
            else:
                if isinstance(hx, tuple):
                    raise ValueError(f"{name}: hx must be one tensor h_0, got a tuple")
                h0 = self._check_hidden(hx, "h_0", b, rows, batched)
        # one draw per layer and direction per pass: the KL is counted once per forward
        cells = list(self.cells())
        drawn = [cell.draw(rows) for _, cell in cells]
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, rows, self.hidden_size)
        if h0 is None:
            h0 = xb.new_zeros(shape)
        if c0 is None and self._kind == "LSTM":
            c0 = xb.new_zeros(shape)
        lstm = self._kind == "LSTM"
        # inside torch.compile, torch.lstm's CPU kernel (mkldnn_rnn_layer) fails to trace with
        # autograd ("expected Tensor() for op: torch.ops.aten.mkldnn_rnn_layer.default"; an
        # nn.LSTM is skipped by dynamo instead): the Python loop, which compiles (fullgraph)
        kernel = not (lstm and torch.compiler.is_compiling())
        if kernel and all(d.kind == "one" for d in drawn):
            out, hn, cn = self._torch_forward(input if s == 1 else xb, s == 1, h0, c0, drawn)
            if s == 1:
                return self._finish(out, hn, cn, batched, None)
        elif kernel and lstm and all(d.kind != "flipout" for d in drawn):
            out, hn, cn = self._blocks_forward(xb, s, b, h0, c0, drawn)
        else:
            out, hn, cn = self._loop(xb, h0, c0, drawn)
        return self._finish(out, hn, cn, batched, (s, b))

    def _blocks_forward(
        self, x: Tensor, s: int, b: int, h0: Tensor, c0: Tensor | None, drawn: list[_Drawn]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """S weight samples without flipout (an LSTM): torch's recurrent kernel once per
        block of ``b`` rows with that block's sample (bit for bit ``nn.LSTM`` with those
        weights); 1.3-4x faster than the Python loop on CPU at S = 2-30 (torch's GRU kernel
        is slower than the loop there, so the GRU keeps the loop). ``x`` (S * B, T, in)
        batch-first; returns it batch-first with ``h_n`` (and ``c_n``) (L * D, S * B, H)."""
        outs: list[Tensor] = []
        hns: list[Tensor] = []
        cns: list[Tensor] = []
        for k in range(s):
            rows = slice(k * b, (k + 1) * b)
            block = [
                d
                if d.kind == "one"
                else _Drawn("one", d.w[k], None if d.b is None else d.b[k], None, None, 1)
                for d in drawn
            ]
            out, hn, cn = self._torch_forward(
                x[rows], False, h0[:, rows], None if c0 is None else c0[:, rows], block
            )
            outs.append(out)
            hns.append(hn)
            if cn is not None:
                cns.append(cn)
        return torch.cat(outs), torch.cat(hns, dim=1), torch.cat(cns, dim=1) if cns else None

    def _finish(
        self,
        out: Tensor,
        hn: Tensor,
        cn: Tensor | None,
        batched: bool,
        blocks: tuple[int, int] | None,
    ) -> tuple[Tensor, Any]:
        """The output in the caller's layout: ``out`` is in it already (``blocks`` None) or
        batch-first (N, T, D*H) with N = S * B (``blocks`` = (S, B)): (T, N, D*H) for
        ``batch_first=False``, the S copies in blocks of B along the batch dimension."""
        if blocks is not None and not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        if self._kind == "LSTM":
            assert cn is not None
            # the dtypes of nn.LSTM under autocast, whichever path computed them
            out, hn, cn = (_as_lstm_kernel_output(t) for t in (out, hn, cn))
            return out, (hn, cn)
        return out, hn

    def _torch_forward(
        self, x: Tensor, caller_layout: bool, h0: Tensor, c0: Tensor | None, drawn: list[_Drawn]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every layer with one weight for all rows: torch's own recurrent kernel (the same
        call as nn.LSTM / nn.GRU, bit for bit), input projection precomputed by it."""
        g = self._gates * self.hidden_size
        params: list[Tensor] = []
        for (_, cell), d in zip(self.cells(), drawn, strict=True):
            k = cell.input_size
            params += [d.w[:, :k].contiguous(), d.w[:, k:].contiguous()]
            if d.b is not None:
                params += [d.b[:g].contiguous(), d.b[g:].contiguous()]
        batch_first = self.batch_first if caller_layout else True
        args = (self.num_layers, self.dropout, self.training, self.bidirectional, batch_first)
        if self._kind == "LSTM":
            assert c0 is not None
            if _cpu_float16_autocast(x):
                return _lstm_float16(x, h0, c0, params, self.bias, args)
            out, hn, cn = torch.lstm(x, (h0, c0), params, self.bias, *args)
            return out, hn, cn
        out, hn = torch.gru(x, h0, params, self.bias, *args)
        return out, hn, None

    def _loop(
        self, x: Tensor, h0: Tensor, c0: Tensor | None, drawn: list[_Drawn]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The layers with S weight samples (one per block of B rows) or flipout's
        per-example perturbations: each layer's input projection for all time steps in one
        (batched) matrix product, then a loop over the recurrent part. ``x`` (N, T, in)."""
        directions = 2 if self.bidirectional else 1
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        cells = list(self.cells())
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                i = layer * directions + d
                cell = cells[i][1]
                out, h, c = self._direction(
                    x, h0[i], None if c0 is None else c0[i], drawn[i], cell.input_size, d == 1
                )
                outs.append(out)
                hs.append(h)
                if c is not None:
                    cs.append(c)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, torch.stack(hs), torch.stack(cs) if cs else None

    def _direction(
        self, x: Tensor, h: Tensor, c: Tensor | None, d: _Drawn, k: int, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer and direction over ``x`` (N, T, k) from ``h`` (and ``c``) (N, H):
        the outputs (N, T, H) and the final states."""
        g = self._gates * self.hidden_size
        s = d.samples
        w_ih, w_hh = d.w[..., :k], d.w[..., k:]
        b_ih = None if d.b is None else d.b[..., :g]
        b_hh = None if d.b is None else d.b[..., g:]
        if d.kind == "flipout":
            assert d.dw is not None
            n = x.shape[0]
            # per-example signs, drawn once per sequence and reused at every step: example
            # n's weight is mu + dW * (s_n r_n^T) at every step (one weight-space sample)
            r = rademacher((n, k + self.hidden_size), x)
            mean_i = F.linear(x, w_ih, b_ih)
            # the output signs in the projections' dtype (autocast's, under autocast): float32
            # signs promoted a bfloat16 state to float32 at every step (nn.GRU keeps h_0's)
            sgn = rademacher((n, g), mean_i)
            dw_ih, dw_hh = d.dw[..., :k], d.dw[..., k:]
            db_ih = None if d.db is None else d.db[..., :g]
            db_hh = None if d.db is None else d.db[..., g:]
            r_h = r[:, k:]
            gi = torch.addcmul(mean_i, _lin(x * r[:, None, :k], dw_ih, db_ih, s), sgn[:, None])

            def recurrent(h: Tensor) -> Tensor:
                return torch.addcmul(F.linear(h, w_hh, b_hh), _lin(h * r_h, dw_hh, db_hh, s), sgn)

        else:
            gi = _lin(x, w_ih, b_ih, s)

            def recurrent(h: Tensor) -> Tensor:
                return _lin(h, w_hh, b_hh, s)

        steps = x.shape[1]
        # the input projection of each step as its own tensor, split once: indexing gi[:, t]
        # at every step made each step's backward (SelectBackward) zero-fill and accumulate a
        # gradient the size of the whole (N, T, G*H) projection, T times per pass (quadratic
        # in the sequence length; 80% of an LSTM step at T = 100); unbind's backward stacks
        # the T gradients once
        gi_steps = gi.unbind(1)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        outs: list[Tensor | None] = [None] * steps
        lstm = self._kind == "LSTM"
        for t in order:
            gh = recurrent(h)
            if lstm:
                assert c is not None
                i_g, f_g, g_g, o_g = (gi_steps[t] + gh).chunk(4, dim=1)
                c = torch.sigmoid(f_g) * c + torch.sigmoid(i_g) * torch.tanh(g_g)
                h = torch.sigmoid(o_g) * torch.tanh(c)
            else:
                xr, xz, xn = gi_steps[t].chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r_g = torch.sigmoid(xr + hr)
                z_g = torch.sigmoid(xz + hz)
                n_g = torch.tanh(xn + r_g * hn)
                h = n_g + z_g * (h - n_g)
            outs[t] = h
        return torch.stack(cast("list[Tensor]", outs), dim=1), h, c

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


_DOC_COMMON = """
    Args:
        input_size: features of each time step of the input, a positive integer.
        hidden_size: features of the hidden state h, a positive integer.
        num_layers: stacked recurrent layers, a positive integer (default 1).
        bias: learn the biases ``b_ih`` and ``b_hh`` (default True).
        batch_first: input and output are (B, T, feature) instead of (T, B, feature); the
            hidden states are (num_layers * num_directions, B, hidden_size) either way.
        dropout: the probability of zeroing each output of every layer but the last, in
            training mode (as torch), a number in [0, 1] (default 0).
        bidirectional: add a layer running backwards over the sequence per layer; the output
            concatenates both directions (2 * hidden_size features).
        prior: a :class:`bbb.GaussianPrior`, :class:`bbb.ScaleMixturePrior` or
            :class:`bbb.LaplacePrior` (default ``GaussianPrior(1.0)``), for every weight.
        estimator: ``"reparam"`` (default: one weight sample per pass, shared by the batch
            and all time steps) or ``"flipout"`` (one shared perturbation per pass, random
            signs per example drawn once per sequence: each example's weights are fixed
            across time and have exactly the weight-space marginal). ``"local"`` is refused:
            it would sample a new network at every time step.
        kl: ``"auto"`` (closed form when the prior has one, else Monte Carlo),
            ``"closed_form"`` or ``"mc"``; the KL is counted once per forward pass.
        mu_init: ``"fan_in"`` (default: mu ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)),
            torch's initialisation of recurrent layers), ``"paper"`` (U(-0.2, 0.2)) or a
            ``(low, high)`` range.
        rho_init: constant or ``(low, high)`` uniform range for rho (default (-5, -4):
            sigma of 0.007-0.018).
        device, dtype: of the parameters (a floating dtype).

    One weight sample per sequence pass, shared by every time step (Fortunato et al. 2017):
    in ``"sample"`` mode each forward pass draws the weights once; ``"mean"`` uses mu (the
    same function as :meth:`to_torch`'s plain layer, bit for bit); ``"frozen"`` keeps one
    sample across calls until :func:`bbb.resample`. Inside :func:`bbb.vectorized_samples`
    (``bbb.ELBO``, ``bbb.predict``) S weight samples run in one vectorized pass: the S copies
    of the batch are stacked in blocks of B along the batch dimension, dim 0 for
    ``batch_first=True`` and dim 1, (T, S * B, in), for ``batch_first=False``: what a model
    that turns the ELBO's (S * B, T, in) rows time-major (``x.transpose(0, 1)``) hands the
    layer; the output and ``h_n`` are stacked the same way (``out[-1]`` and ``h_n[-1]`` are
    (S * B, H)). ``h_0`` may then have B or S * B rows; ``h_n`` has S * B, in blocks of B.

    Speed: when every layer uses one weight for the whole batch (mean and frozen modes,
    reparam with one sample) the pass is torch's own recurrent kernel; an LSTM with S weight
    samples (reparam, frozen) runs that kernel once per sample on its block of B rows (each
    block is ``nn.LSTM`` with its sample, bit for bit); otherwise (flipout, a GRU with S
    samples, an LSTM inside ``torch.compile``) each layer's input projection for all time
    steps is one (batched) matrix product and only the recurrent part loops over the steps
    in Python. Measured on one CPU thread (B = 32, T = 100, in = 32, H = 64, forward and
    backward, against torch's layer on the same rows, a loaded machine): reparam 1.0-1.3x
    (S = 1 and S = 4), flipout 1.8-4.5x (the loop).

    Parameters: one :class:`BayesRecurrentWeights` per layer and direction, named ``l0``,
    ``l0_reverse``, ``l1``, ... (torch's suffixes): ``l0.weight_mu`` is
    ``[weight_ih_l0 | weight_hh_l0]`` (G * hidden_size, in + hidden_size), ``l0.bias_mu``
    ``[bias_ih_l0, bias_hh_l0]`` (2 * G * hidden_size,). :meth:`to_torch` (and
    :func:`bbb.to_deterministic`) builds the plain layer of the means;
    ``bbb.bayesianize(model, recurrent=True)`` converts ``nn.LSTM``/``nn.GRU``.

    Autocast: every estimator and path returns the dtypes of the plain ``nn.LSTM`` /
    ``nn.GRU``: autocast casts torch's LSTM kernel, so a float32 LSTM returns output, h_n and
    c_n in the autocast dtype (under CPU float16 autocast the kernel runs on float16 copies,
    where oneDNN has no float16 LSTM); the GRU keeps ``h_0``'s dtype (float32 without one).

    A ``PackedSequence`` is refused (pad the sequences); ``proj_size`` is not supported.
"""


class BayesLSTM(_BayesRNNBase):
    """Bayesian ``nn.LSTM``: ``forward(input, (h_0, c_0)) -> (output, (h_n, c_n))``.

    Shapes: input (T, B, input_size) (``batch_first``: (B, T, input_size)) or unbatched
    (T, input_size); ``h_0``, ``c_0``, ``h_n``, ``c_n``: (num_layers * num_directions, B,
    hidden_size) ((num_layers * num_directions, hidden_size) unbatched; ``hx`` None: zeros);
    output (T, B, num_directions * hidden_size). The gates are torch's (i, f, g, o):
    ``c' = f * c + i * g``, ``h' = o * tanh(c')``.
    """

    __doc__ = (__doc__ or "") + _DOC_COMMON
    _kind = "LSTM"
    _gates = 4
    _torch_cls = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        prior: Prior | None = None,
        estimator: str = "reparam",
        kl: str = "auto",
        mu_init: str | tuple[float, float] = "fan_in",
        rho_init: float | tuple[float, float] = (-5.0, -4.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if proj_size != 0:
            raise ValueError(
                f"BayesLSTM does not support proj_size (got {proj_size!r}); accepted value: 0"
            )
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            prior=prior, estimator=estimator, kl=kl, mu_init=mu_init, rho_init=rho_init,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.proj_size = 0

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the sequence ``input`` from ``hx = (h_0, c_0)`` (zeros if None): ``(output,
        (h_n, c_n))`` (shapes in the class docstring)."""
        out, state = self._forward(input, hx)
        return out, cast("tuple[Tensor, Tensor]", state)


class BayesGRU(_BayesRNNBase):
    """Bayesian ``nn.GRU``: ``forward(input, h_0) -> (output, h_n)``.

    Shapes: input (T, B, input_size) (``batch_first``: (B, T, input_size)) or unbatched
    (T, input_size); ``h_0``, ``h_n``: (num_layers * num_directions, B, hidden_size)
    ((num_layers * num_directions, hidden_size) unbatched; None: zeros); output
    (T, B, num_directions * hidden_size). The gates are torch's (r, z, n):
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``.
    """

    __doc__ = (__doc__ or "") + _DOC_COMMON
    _kind = "GRU"
    _gates = 3
    _torch_cls = nn.GRU

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the sequence ``input`` from ``h_0`` (zeros if None): ``(output, h_n)``."""
        out, state = self._forward(input, hx)
        return out, cast(Tensor, state)
