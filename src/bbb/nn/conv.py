"""``BayesConv1d/2d/3d``: convolutions with a factorised Gaussian posterior.

Same arguments as ``torch.nn.ConvNd`` plus ``prior``, ``estimator``, ``kl``, ``mu_init`` and
``rho_init`` (see :class:`bbb.BayesLinear`). Several weight samples in one pass are folded into
the channel groups of a single convolution. An unbatched input (C_in, *spatial) is taken as
torch takes it (as the batch of one ``x.unsqueeze(0)``), except inside
:func:`bbb.vectorized_samples` with several samples, which are stacked along the batch
dimension an unbatched input lacks.

Note on ``estimator="local"``: local reparameterisation samples each output from a Gaussian with
the right mean and variance, but independently across output positions, whereas positions that
share a weight are correlated under weight-space sampling. For convolutions it is therefore an
approximation (a popular and effective one); ``"reparam"`` and ``"flipout"`` are exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _reverse_repeat_tuple

from ..priors import Prior
from .module import BayesModule, _is_int, positive_int
from .stacking import identical_blocks

__all__ = ["BayesConv1d", "BayesConv2d", "BayesConv3d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SPATIAL: dict[int, str] = {1: "L", 2: "H, W", 3: "D, H, W"}


def spatial_tuple(owner: str, dim: int, arg: str, value: object, minimum: int) -> tuple[int, ...]:
    """``value`` (an int, or one int per spatial dimension) as a tuple of ``dim`` ints, each
    >= ``minimum``; a ValueError naming the layer ``owner``, ``arg`` and what is accepted
    otherwise (the convolutions' and transposed convolutions' size arguments)."""
    accepted = f"an int or a tuple of {dim} int{'s' if dim > 1 else ''} (one per spatial dimension)"
    if _is_int(value):
        values: tuple[object, ...] = (value,) * dim
    elif isinstance(value, (tuple, list)):
        if len(value) != dim:
            raise ValueError(
                f"{owner} {arg} must be {accepted}, got {value!r} of length {len(value)}"
            )
        values = tuple(value)
    else:
        raise ValueError(f"{owner} {arg} must be {accepted}, got {value!r}")
    # (_is_int checks the type, which mypy cannot see: the casts)
    if not all(_is_int(v) and int(cast(numbers.Integral, v)) >= minimum for v in values):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{owner} {arg} must be {kind} integers, got {value!r}")
    return tuple(int(cast(numbers.Integral, v)) for v in values)


class _SpatialBayesModule(BayesModule):
    """What the convolutions and transposed convolutions share: their size arguments read as
    one int per spatial dimension, and the input: (N, C_in, *spatial), or unbatched
    (C_in, *spatial) as ``nn.ConvNd`` and ``nn.ConvTransposeNd`` take it (see
    :meth:`_unbatched`)."""

    _dim: int = 2
    in_channels: int

    def _channels(
        self, in_channels: object, out_channels: object, groups: object
    ) -> tuple[int, int, int]:
        """The channel counts and groups as positive ints, both counts divisible by groups;
        a ValueError naming the layer and the value otherwise."""
        name = type(self).__name__
        c_in = positive_int(name, "in_channels", in_channels)
        c_out = positive_int(name, "out_channels", out_channels)
        g = positive_int(name, "groups", groups)
        if c_in % g or c_out % g:
            raise ValueError(
                f"{name}: in_channels ({c_in}) and out_channels ({c_out}) must be "
                f"divisible by groups ({g})"
            )
        return c_in, c_out, g

    def _ntuple(self, arg: str, value: object, minimum: int) -> tuple[int, ...]:
        return spatial_tuple(type(self).__name__, self._dim, arg, value, minimum)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` (N, in_channels, *spatial) -> (N, out_channels,
        *spatial'), or to an unbatched ``x`` (in_channels, *spatial) -> (out_channels,
        *spatial') as ``nn.ConvNd`` does (the batch of one ``x.unsqueeze(0)``, removed from
        the output: the same result, random draws included). Inside
        :func:`bbb.vectorized_samples` with S > 1, ``x`` is (S * N, ...): an unbatched input
        is refused there (see :meth:`_unbatched`)."""
        if self._unbatched(x):
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def _unbatched(self, x: Tensor) -> bool:
        """Whether ``x`` is an unbatched input (in_channels, *spatial), which the layer runs
        as the batch of one ``x.unsqueeze(0)`` (as torch). False for any other number of
        dimensions (:meth:`_check_input` judges those). A ``(_dim + 1)``-D input is a
        ValueError when it is not one: inside :func:`bbb.vectorized_samples` with
        num_samples S > 1 (the S samples are stacked along the batch dimension, which an
        unbatched input lacks: the rule of ``BayesLinear``'s 1-D and the recurrent layers'
        2-D inputs), for a one-channel layer given N > 1 rows of one channel each (MNIST's
        (N, 28, 28): ``x.unsqueeze(1)``), or with another number of channels."""
        d, c, s = self._dim, self.in_channels, self.num_samples
        if x.dim() != d + 1:
            return False
        spatial = ", ".join(["..."] * d)
        if self._lacks_channel(x):
            raise self._shape_error(
                x,
                f"(N, {c}, {spatial})",
                f"a {d + 2}-D input (N, C_in, {_SPATIAL[d]}) is needed, got {d + 1}-D "
                "(N inputs of one channel need a channel dimension: x.unsqueeze(1))",
            )
        if s > 1:
            # the user's input: one block of repeat_samples' S copies (bbb.predict, bbb.ELBO)
            per = x.shape[0] // s if identical_blocks(x) == s else x.shape[0]
            given = f" (your input: {(per, *x.shape[1:])})" if per != x.shape[0] else ""
            raise ValueError(
                f"{type(self).__name__}: an unbatched (C_in, {_SPATIAL[d]}) input cannot hold "
                f"the {s} Monte Carlo samples of bbb.vectorized_samples (used by bbb.predict and "
                f"bbb.ELBO), which are stacked along dim 0 (received {tuple(x.shape)}){given}; "
                "give a batch of one: x.unsqueeze(0)"
            )
        if x.shape[0] != c:
            raise self._shape_error(
                x,
                f"(N, {c}, {spatial}) or unbatched ({c}, {spatial})",
                f"dimension 0 of an unbatched input (C_in, {_SPATIAL[d]}) must be "
                f"in_channels={c}, got {x.shape[0]}",
            )
        return True

    def _check_input(self, x: Tensor) -> None:
        d, c = self._dim, self.in_channels
        if x.dim() != d + 2 or x.shape[1] != c:
            spatial = ", ".join(["..."] * d)
            if x.dim() != d + 2:
                problem = (
                    f"a {d + 2}-D input (N, C_in, {_SPATIAL[d]}) or an unbatched {d + 1}-D one "
                    f"(C_in, {_SPATIAL[d]}) is needed, got {x.dim()}-D"
                )
            else:
                problem = f"dimension 1 (channels) must be in_channels={c}, got {x.shape[1]}"
            raise self._shape_error(x, f"(N, {c}, {spatial})", problem)

    def _lacks_channel(self, x: Tensor) -> bool:
        """Whether the ``(_dim + 1)``-D ``x`` given to a one-channel layer is N > 1 inputs
        without their channel dimension (MNIST's (N, 28, 28)) rather than one unbatched input
        (1, *spatial) (inside :func:`bbb.vectorized_samples`, N counted per sample)."""
        s = self.num_samples
        lead = x.shape[0] // s if s > 1 and x.shape[0] % s == 0 else x.shape[0]
        return self.in_channels == 1 and lead != 1


class _BayesConvNd(_SpatialBayesModule):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
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
        in_channels, out_channels, groups = self._channels(in_channels, out_channels, groups)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"{type(self).__name__}: unknown padding_mode {padding_mode!r}; accepted values: "
                f"{', '.join(_PADDING_MODES)}"
            )
        kernel_size = self._ntuple("kernel_size", kernel_size, 1)
        stride = self._ntuple("stride", stride, 1)
        dilation = self._ntuple("dilation", dilation, 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: tuple[int, ...] = kernel_size
        self.stride: tuple[int, ...] = stride
        self.dilation: tuple[int, ...] = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.padding: tuple[int, ...] | str
        self.padding, self._explicit_pad = self._padding(padding)
        weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        fan_in = (in_channels // groups) * math.prod(self.kernel_size)
        self._init_posterior(
            weight_shape,
            bias,
            prior=prior,
            estimator=estimator,
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
            fan_in=fan_in,
            device=device,
            dtype=dtype,
        )

    def _padding(self, padding: object) -> tuple[tuple[int, ...] | str, tuple[int, ...]]:
        """``padding`` as the layer keeps it (``"same"``, ``"valid"`` or one int per spatial
        dimension, in elements) and as ``F.pad`` takes it for the non-zero padding modes
        (before and after, last dimension first; ``"same"``: ``dilation * (kernel_size - 1)``
        per dimension, the odd one after, as torch). A ValueError naming the layer and every
        accepted form otherwise (``"same"`` with a stride above 1 too, as torch)."""
        name = type(self).__name__
        if not isinstance(padding, str):
            try:
                pads = self._ntuple("padding", padding, 0)
            except ValueError as err:
                raise ValueError(f"{err} (or one of the strings 'same', 'valid')") from None
            return pads, _reverse_repeat_tuple(pads, 2)
        if padding not in ("same", "valid"):
            raise ValueError(
                f"{name} padding string must be 'same' or 'valid', got {padding!r} (or give a "
                "non-negative int, or a tuple of them, one per spatial dimension)"
            )
        if padding == "valid":
            return padding, (0,) * (2 * self._dim)
        if any(s != 1 for s in self.stride):
            raise ValueError(
                f"{name}: padding='same' is not supported for strided convolutions "
                f"(stride={self.stride}), as in torch; give the padding as ints, or stride=1"
            )
        explicit: list[int] = []
        for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
            total = d * (k - 1)
            explicit += [total // 2, total - total // 2]
        return padding, tuple(explicit)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        conv = _CONV[self._dim]
        kwargs: dict[str, Any] = {
            "stride": self.stride,
            "dilation": self.dilation,
            "groups": groups,
        }
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_pad, mode=self.padding_mode)
            return conv(x, w, b, padding=0, **kwargs)
        return conv(x, w, b, padding=self.padding, **kwargs)

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        try:
            return self._conv(x, w, b, self.groups)
        except RuntimeError:
            s = self.num_samples
            if s < 2 or x.shape[0] % s:
                raise
            # x holds the S stacked copies of the batch (the mean path inside
            # bbb.vectorized_samples): torch's error in the shape of one copy, the user's
            self._replay_per_sample(x[: x.shape[0] // s], w, b)
            raise

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        # Fold the S samples into channel groups: (S*B, C, *sp) -> (B, S*C, *sp), one grouped
        # convolution with S*groups groups, then unfold (B, S*O, *sp') -> (S*B, O, *sp').
        s = num_samples
        sb, c, *spatial = x.shape
        b_rows = sb // s
        xs = x.reshape(s, b_rows, c, *spatial).transpose(0, 1).reshape(b_rows, s * c, *spatial)
        ws = w.reshape(s * w.shape[1], *w.shape[2:])
        bs = None if b is None else b.reshape(-1)
        try:
            y = self._conv(xs, ws, bs, s * self.groups)
        except RuntimeError:
            # torch's error names the folded shape (B, S * C, ...) the user never built: the
            # first sample's convolution on the user's (B, C, ...), whose error is raised
            # instead (only on this error path: nothing is paid when the call succeeds)
            self._replay_per_sample(xs[:, :c], w[0], None if b is None else b[0])
            raise
        o = self.out_channels
        out_spatial = y.shape[2:]
        return y.reshape(b_rows, s, o, *out_spatial).transpose(0, 1).reshape(sb, o, *out_spatial)

    def _replay_per_sample(self, x: Tensor, w: Tensor, b: Tensor | None) -> None:
        """After a failed convolution on S stacked samples: the same convolution on one
        sample's input ``x`` (the user's shape); its error, if it fails too, is raised in place
        of the stacked call's (whose shapes the user never built). Returns if it succeeds."""
        try:
            self._conv(x, w, b, self.groups)
        except RuntimeError as err:
            raise err from None

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # One sign per example and channel, shared over positions (they share the weights).
        ones = (1,) * self._dim
        return (x.shape[0], x.shape[1], *ones), (y_shape[0], y_shape[1], *ones)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias_mu is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + ", " + super().extra_repr()


class BayesConv1d(_BayesConvNd):
    """Bayesian ``nn.Conv1d``: input (N, C_in, L) -> output (N, C_out, L'); unbatched
    (C_in, L) -> (C_out, L') as torch."""

    _dim = 1


class BayesConv2d(_BayesConvNd):
    """Bayesian ``nn.Conv2d``: input (N, C_in, H, W) -> output (N, C_out, H', W'); unbatched
    (C_in, H, W) -> (C_out, H', W') as torch."""

    _dim = 2


class BayesConv3d(_BayesConvNd):
    """Bayesian ``nn.Conv3d``: input (N, C_in, D, H, W) -> output (N, C_out, D', H', W');
    unbatched (C_in, D, H, W) -> (C_out, D', H', W') as torch."""

    _dim = 3
