"""``BayesConvTranspose1d/2d/3d``: transposed convolutions with a factorised Gaussian posterior.

Same arguments as ``torch.nn.ConvTranspose1d/2d/3d`` (``stride``, ``padding``,
``output_padding``, ``groups``, ``bias``, ``dilation``, ``padding_mode="zeros"``) plus
``prior``, ``estimator``, ``kl``, ``mu_init`` and ``rho_init`` (see :class:`bbb.BayesLinear`).
The weight has torch's transposed layout ``(in_channels, out_channels / groups, *kernel_size)``
and the bias ``(out_channels,)``, so ``weight_mu`` and ``bias_mu`` load from, and export to,
an ``nn.ConvTranspose*d``'s ``weight`` and ``bias`` unchanged (:func:`bbb.bayesianize`,
:func:`bbb.to_deterministic`). ``forward(x, output_size=...)`` chooses among the output sizes
a strided layer can produce, as ``nn.ConvTranspose*d.forward`` does.

Several weight samples in one pass (:func:`bbb.vectorized_samples`, used by :class:`bbb.ELBO`
and :func:`bbb.predict`) are folded into the channel groups of a single transposed
convolution, as :class:`bbb.BayesConv2d` does.

Note on ``estimator="local"``: each output of a transposed convolution is a sum in which each
weight appears at most once, so local reparameterisation gives every output exactly the mean
and variance of weight-space sampling, but draws outputs independently across positions,
whereas positions that share a weight are correlated under weight-space sampling: an
approximation, as for convolutions. ``"reparam"`` and ``"flipout"`` are exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..priors import Prior
from .conv import _SpatialBayesModule
from .module import _is_int, check_flag, check_float_dtype

__all__ = [
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "OutputSizeError",
]

PADDING_MODES = ("zeros",)
_CONV_T: dict[int, Callable[..., Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}
_SPATIAL: dict[int, str] = {1: "L", 2: "H, W", 3: "D, H, W"}


def _size_entries(output_size: object) -> list[int | torch.SymInt] | None:
    """The entries of a ``forward(..., output_size=...)`` argument as ints, or None when it
    is not a size: a sequence of integers (``torch.Size`` included, with the symbolic sizes
    of ``x.shape`` under ``torch.export`` with dynamic shapes, kept symbolic) or a 1-D
    integer tensor or NumPy array, the forms ``nn.ConvTranspose*d.forward`` takes."""
    if isinstance(output_size, Tensor) or type(output_size).__module__ == "numpy":
        shape = getattr(output_size, "shape", None)
        if shape is None or len(shape) != 1:
            return None
        output_size = cast("Tensor", output_size).tolist()
    if isinstance(output_size, (str, bytes)) or not isinstance(output_size, Sequence):
        return None
    values: list[int | torch.SymInt] = []
    for v in output_size:
        if isinstance(v, torch.SymInt):
            values.append(v)  # int() would fix the exported graph to the example's size
        elif _is_int(v):
            values.append(int(cast(numbers.Integral, v)))
        else:
            return None
    return values


class OutputSizeError(ValueError, RuntimeError):
    """An input too small for a transposed convolution's padding (an output size below 1).

    A ``ValueError`` (bad input) that is also a ``RuntimeError``, the type of the error torch
    raised for it before the layers checked it (code catching that still catches this)."""


class _BayesConvTransposeNd(_SpatialBayesModule):
    """The shared implementation of :class:`BayesConvTranspose1d`, ``2d`` and ``3d``.

    Args:
        in_channels, out_channels: channels of the input and of the output (both divisible
            by ``groups``).
        kernel_size, stride, dilation: positive ints, or one per spatial dimension.
        padding: a non-negative int, or one per spatial dimension: ``dilation * (k - 1) -
            padding`` zeros are added to each side of the input, as ``nn.ConvTranspose*d``
            (the strings ``"same"``/``"valid"`` of convolutions are not defined here).
        output_padding: a non-negative int, or one per spatial dimension, each smaller than
            the stride or the dilation of its dimension: extra rows added to one side of the
            output (to pick among the output sizes a strided layer can produce; or pass
            ``output_size`` to :meth:`forward`).
        groups: blocked connections from input to output channels, as torch.
        bias: whether the layer has a Bayesian bias (shape (out_channels,)).
        padding_mode: ``"zeros"``, the only mode torch defines for transposed convolutions.
        prior, estimator, kl, rho_init, device, dtype: as :class:`bbb.BayesLinear`.
        mu_init: as :class:`bbb.BayesLinear`; the default ``"fan_in"`` draws mu from
            U(-1/sqrt(f), 1/sqrt(f)) with f = (out_channels / groups) * prod(kernel_size), the
            scale ``nn.ConvTranspose*d`` initialises its weights with (torch counts the
            weight's second dimension as its fan-in).

    Shapes: input (N, in_channels, *spatial) -> output (N, out_channels, *spatial'), with
    ``spatial'[i] = (spatial[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] *
    (kernel_size[i] - 1) + output_padding[i] + 1``. Parameters: ``weight_mu``, ``weight_rho``
    of shape (in_channels, out_channels / groups, *kernel_size); ``bias_mu``, ``bias_rho`` of
    shape (out_channels,).
    """

    _dim: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        output_padding: int | tuple[int, ...] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, ...] = 1,
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
        name = type(self).__name__
        in_channels, out_channels, groups = self._channels(in_channels, out_channels, groups)
        bias = check_flag(name, "bias", bias)
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"{name}: unknown padding_mode {padding_mode!r} (torch defines transposed "
                f"convolutions with zero padding only); accepted values: "
                f"{', '.join(PADDING_MODES)}"
            )
        check_float_dtype(name, dtype)
        if isinstance(padding, str):
            raise ValueError(
                f"{name} padding must be a non-negative int or a tuple of {self._dim} of them, "
                f"got {padding!r} (the strings 'same' and 'valid' of convolutions are not "
                "defined for transposed convolutions, as in torch)"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: tuple[int, ...] = self._ntuple("kernel_size", kernel_size, 1)
        self.stride: tuple[int, ...] = self._ntuple("stride", stride, 1)
        self.padding: tuple[int, ...] = self._ntuple("padding", padding, 0)
        self.dilation: tuple[int, ...] = self._ntuple("dilation", dilation, 1)
        self.output_padding: tuple[int, ...] = self._ntuple("output_padding", output_padding, 0)
        for i, (p, s, d) in enumerate(
            zip(self.output_padding, self.stride, self.dilation, strict=True)
        ):
            if p >= max(s, d):
                raise ValueError(
                    f"{name} output_padding must be smaller than the stride or the dilation "
                    f"in each dimension, got output_padding={self.output_padding} with "
                    f"stride={self.stride}, dilation={self.dilation} (dimension {i}: "
                    f"{p} >= max({s}, {d}))"
                )
        self.groups = groups
        self.padding_mode = padding_mode
        # output_padding of the current call (forward's output_size), else None
        self._call_output_padding: tuple[int, ...] | None = None
        weight_shape = (in_channels, out_channels // groups, *self.kernel_size)
        # torch's fan-in of a transposed convolution's weight (kaiming_uniform on dim 1)
        fan_in = (out_channels // groups) * math.prod(self.kernel_size)
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
            bias_size=out_channels,
        )

    def output_shape(
        self, input_size: Sequence[int], output_padding: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """The spatial output size for spatial input size ``input_size`` (``_dim`` ints):
        ``(in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1`` per
        dimension (``output_padding`` None: the layer's). Sizes of another length are a
        ValueError naming the layer's number of spatial dimensions."""
        pad_out = self.output_padding if output_padding is None else output_padding
        d = self._dim
        for arg, value in (("input_size", input_size), ("output_padding", pad_out)):
            if not isinstance(value, Sequence) or len(value) != d:
                # (it was Python's "zip() argument 2 is longer than argument 1")
                raise ValueError(
                    f"{type(self).__name__}.output_shape {arg} must be a sequence of {d} "
                    f"int{'s' if d > 1 else ''} (one per spatial dimension: {_SPATIAL[d]}), "
                    f"got {value!r}"
                )
        return tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, s, p, d, k, op in zip(
                input_size,
                self.stride,
                self.padding,
                self.dilation,
                self.kernel_size,
                pad_out,
                strict=True,
            )
        )

    def _output_padding_for(
        self, x: Tensor, output_size: object, batched: bool = True
    ) -> tuple[int, ...]:
        """The output_padding that gives spatial size ``output_size`` for the batched input
        ``x`` (checked by :meth:`_check_input`), or a ValueError that says which sizes this
        input can give. ``batched`` False: the caller's input was unbatched (``x`` is its
        ``unsqueeze(0)``), whose ``output_size`` has a channel entry but no batch entry in
        front of the spatial ones, as ``nn.ConvTranspose*d`` takes it."""
        name, d = type(self).__name__, self._dim
        lead = 2 if batched else 1  # the non-spatial entries: (N, C_out) or (C_out)
        leading = "N, C_out" if batched else "C_out"
        accepted = (
            f"a sequence of {d} positive ints (the spatial size {_SPATIAL[d]}) or of {d + lead} "
            f"({leading}, {_SPATIAL[d]}) as torch.Size gives it, or a 1-D integer tensor or "
            "array of them"
        )
        if not batched:
            accepted += " (the input is unbatched: no batch entry)"
        values = _size_entries(output_size)
        if values is None or len(values) not in (d, d + lead):
            raise ValueError(f"{name} output_size must be {accepted}, got {output_size!r}")
        if len(values) == d + lead:
            # the batch entry is not checked: inside bbb.vectorized_samples the layer sees the
            # S copies of the batch, S * N rows
            if values[lead - 1] != self.out_channels:
                raise ValueError(
                    f"{name} output_size {tuple(values)} gives {values[lead - 1]} channels, but "
                    f"the layer has out_channels={self.out_channels}"
                )
            values = values[lead:]
        spatial_in = tuple(x.shape[2:])
        smallest = self.output_shape(spatial_in, (0,) * d)
        # as nn.ConvTranspose*d: output_padding 0 .. stride - 1
        largest = tuple(m + s - 1 for m, s in zip(smallest, self.stride, strict=True))
        if not all(lo <= v <= hi for v, lo, hi in zip(values, smallest, largest, strict=True)):
            ranges = ", ".join(f"{lo}..{hi}" for lo, hi in zip(smallest, largest, strict=True))
            raise ValueError(
                f"{name}: requested an output size of {tuple(values)}, but an input of spatial "
                f"size {spatial_in} gives sizes in ({ranges}) per dimension (output_padding "
                "0 .. stride - 1, as nn.ConvTranspose*d)"
            )
        # (a symbolic size under torch.export stays one: torch.SymInt computes as an int)
        return cast(
            "tuple[int, ...]", tuple(v - lo for v, lo in zip(values, smallest, strict=True))
        )

    # ----------------------------------------------------------------- forward and ops
    def forward(self, x: Tensor, output_size: Sequence[int] | Tensor | None = None) -> Tensor:
        """Apply the layer to ``x`` (N, in_channels, *spatial) -> (N, out_channels,
        *spatial'), or to an unbatched ``x`` (in_channels, *spatial) -> (out_channels,
        *spatial') as ``nn.ConvTranspose*d`` does (the batch of one ``x.unsqueeze(0)``, removed
        from the output; refused inside :func:`bbb.vectorized_samples` with S > 1, whose
        samples are stacked along the batch dimension).

        ``output_size``: the spatial output size wanted (``_dim`` ints, or ``_dim + 2`` with
        the batch and channel entries in front, ``_dim + 1`` with the channel entry for an
        unbatched input, as ``nn.ConvTranspose*d.forward`` takes it:
        a sequence such as ``skip.shape``, symbolic under ``torch.export`` with dynamic
        shapes, or a 1-D integer tensor or array);
        it sets ``output_padding`` for this call only (the layer's ``output_padding`` is then
        not used). A size outside those this input can give is a ValueError naming the range.
        Inside :func:`bbb.vectorized_samples`, ``x`` is (S * N, ...) as for every layer.
        """
        if self._unbatched(x):
            return self._forward_batched(x.unsqueeze(0), output_size, False).squeeze(0)
        return self._forward_batched(x, output_size, True)

    def _forward_batched(
        self, x: Tensor, output_size: Sequence[int] | Tensor | None, batched: bool
    ) -> Tensor:
        """:meth:`forward` on the batched ``x`` (N, in_channels, *spatial); ``batched``: as
        :meth:`_output_padding_for`."""
        if output_size is None:
            return super().forward(x)
        self._check_input(x)
        pad_out = self._output_padding_for(x, output_size, batched)
        previous = self._call_output_padding
        self._call_output_padding = pad_out
        try:
            return super().forward(x)
        finally:
            self._call_output_padding = previous

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        pad_out = self._call_output_padding
        if pad_out is None:
            pad_out = self.output_padding
        spatial = tuple(x.shape[2:])
        out = self.output_shape(spatial, pad_out)
        if min(out) < 1:
            self._refuse_empty_output(spatial, out, pad_out)
        return _CONV_T[self._dim](
            x,
            w,
            b,
            stride=self.stride,
            padding=self.padding,
            output_padding=pad_out,
            groups=groups,
            dilation=self.dilation,
        )

    def _refuse_empty_output(
        self, spatial: tuple[int, ...], out: tuple[int, ...], pad_out: tuple[int, ...]
    ) -> None:
        """An :class:`OutputSizeError` for an input of spatial size ``spatial`` whose output
        size ``out``
        (``output_padding`` ``pad_out``) is below 1 in some dimension: torch's "Output size is
        too small" named neither the padding nor the input size that works."""
        need = tuple(
            1 + max(0, -(-(2 * p - d * (k - 1) - op) // s))
            for s, p, d, k, op in zip(
                self.stride, self.padding, self.dilation, self.kernel_size, pad_out, strict=True
            )
        )
        raise OutputSizeError(
            f"{type(self).__name__}: an input of spatial size {spatial} gives an output of size "
            f"{out} ((in - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + "
            f"output_padding + 1 with stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, kernel_size={self.kernel_size}, "
            f"output_padding={pad_out}): the padding removes more than the layer produces; "
            f"give an input of spatial size at least {need}, or lower the padding"
        )

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """One weight ``w`` (in, out / groups, *k) and bias ``b`` (out,) applied to ``x``
        (N, in, *spatial)."""
        try:
            return self._conv(x, w, b, self.groups)
        except RuntimeError:
            s = self.num_samples
            if s < 2 or x.shape[0] % s:
                raise
            # the S stacked copies of the batch (the mean path inside vectorized_samples):
            # torch's error in the shape of one copy, the user's
            self._replay_per_sample(x[: x.shape[0] // s], w, b)
            raise

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        """S weights ``w`` (S, in, out / groups, *k) and biases ``b`` (S, out) applied to the
        S blocks of ``x`` (S * B, in, *spatial): one transposed convolution with S * groups
        groups."""
        # (S*B, C, *sp) -> (B, S*C, *sp); the weights (S, C, O/g, *k) -> (S*C, O/g, *k): input
        # channel s*C + j and weight row s*C + j fall in group s*groups + j // (C / groups),
        # whose outputs are channels s*O + ..., unfolded to (S*B, O, *sp')
        s = num_samples
        sb, c, *spatial = x.shape
        b_rows = sb // s
        xs = x.reshape(s, b_rows, c, *spatial).transpose(0, 1).reshape(b_rows, s * c, *spatial)
        ws = w.reshape(s * w.shape[1], *w.shape[2:])
        bs = None if b is None else b.reshape(-1)
        try:
            y = self._conv(xs, ws, bs, s * self.groups)
        except RuntimeError:
            # torch's error names the folded shape the user never built: the first sample's
            # transposed convolution on the user's (B, C, ...), whose error is raised instead
            self._replay_per_sample(xs[:, :c], w[0], None if b is None else b[0])
            raise
        o = self.out_channels
        out_spatial = y.shape[2:]
        return y.reshape(b_rows, s, o, *out_spatial).transpose(0, 1).reshape(sb, o, *out_spatial)

    def _replay_per_sample(self, x: Tensor, w: Tensor, b: Tensor | None) -> None:
        """After a failed call on S stacked samples: the same call on one sample's input
        ``x``; its error, if it fails too, is raised in place of the stacked call's."""
        try:
            self._conv(x, w, b, self.groups)
        except RuntimeError as err:
            raise err from None

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Flipout's signs: one per example and channel, shared over positions (they share
        the weights): (N, C_in, 1, ...) and (N, C_out, 1, ...)."""
        ones = (1,) * self._dim
        return (x.shape[0], x.shape[1], *ones), (y_shape[0], y_shape[1], *ones)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if any(p != 0 for p in self.output_padding):
            s += f", output_padding={self.output_padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias_mu is None:
            s += ", bias=False"
        return s + ", " + super().extra_repr()


class BayesConvTranspose1d(_BayesConvTransposeNd):
    """Bayesian ``nn.ConvTranspose1d``: input (N, C_in, L) -> output (N, C_out, L').

    Weight (C_in, C_out / groups, k); see :class:`_BayesConvTransposeNd` for the arguments.
    """

    _dim = 1


class BayesConvTranspose2d(_BayesConvTransposeNd):
    """Bayesian ``nn.ConvTranspose2d``: input (N, C_in, H, W) -> output (N, C_out, H', W').

    Weight (C_in, C_out / groups, kH, kW); see :class:`_BayesConvTransposeNd` for the
    arguments.
    """

    _dim = 2


class BayesConvTranspose3d(_BayesConvTransposeNd):
    """Bayesian ``nn.ConvTranspose3d``: input (N, C_in, D, H, W) -> output
    (N, C_out, D', H', W').

    Weight (C_in, C_out / groups, kD, kH, kW); see :class:`_BayesConvTransposeNd` for the
    arguments.
    """

    _dim = 3
