"""Likelihoods p(y | x, w): how a network's output becomes a distribution over targets.

A likelihood turns the outputs of S weight samples, shape (S, B, ...), into per-sample,
per-example log-likelihoods (S, B) for the ELBO, and into a predictive summary
(:mod:`bbb.predictive`) with the aleatoric/epistemic split.

- :class:`Categorical`: the network outputs logits (B, C); targets are class indices (B,).
- :class:`Gaussian`: regression with ``noise="fixed"`` (a given sigma), ``"learned"`` (one
  homoscedastic sigma per output dimension, a parameter of this module: give the ELBO's
  parameters to the optimizer too) or ``"heteroscedastic"`` (the network outputs the mean and
  the log-variance: (B, 2 D), means first). Targets are (B, D), or (B,) when D = 1.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Likelihood", "Categorical", "Gaussian", "NOISE_MODELS"]

NOISE_MODELS = ("fixed", "learned", "heteroscedastic")
_LOG_2PI = math.log(2 * math.pi)


def _check_finite(name: str, t: Tensor) -> None:
    # a meta tensor holds no values to check (reading its flag raised "Tensor.item() cannot
    # be called on meta tensors")
    if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values")


class Likelihood(nn.Module):
    """Base class. ``output``: (S, B, ...) network outputs of S weight samples."""

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """log p(target | output) per sample and example, shape (S, B) (nats)."""
        raise NotImplementedError


class Categorical(Likelihood):
    """Softmax classification: ``output`` are logits (S, B, C); targets (B,) in [0, C).

    Targets outside [0, C) are refused with a ValueError, except in a ``torch.compile``d
    region (a compiled training step), where that data-dependent check is skipped: there
    such a target reaches ``cross_entropy``, which raises its own error on the CPU and a
    device-side assertion on a GPU. The shape and dtype checks are made everywhere.
    """

    def check_target(self, output: Tensor, target: Tensor) -> None:
        if output.dim() != 3:
            raise ValueError(
                f"Categorical expects logits of shape (B, C) from the model, got {tuple(output.shape[1:])}"
            )
        if target.dim() != 1 or target.shape[0] != output.shape[1]:
            raise ValueError(
                f"Categorical expects integer targets of shape ({output.shape[1]},), "
                f"got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f"Categorical targets must be integer class indices, got {target.dtype}"
            )
        num_classes = output.shape[-1]
        if num_classes < 2:
            # one logit: log_softmax is 0 whatever it is, so the data term was 0 and the
            # network trained on the KL alone, silently (predict refused it already)
            raise ValueError(
                f"Categorical needs logits of at least 2 classes, but the model outputs "
                f"{num_classes} value per example: for regression use bbb.Gaussian(...); for "
                "two classes output 2 logits"
            )
        # one read of the device (a host sync on a GPU) per minibatch; min and max on failure;
        # none for a meta tensor, which holds no values ("cannot be called on meta tensors"),
        # nor in a torch.compile'd region, where the data-dependent test broke the graph
        # (and torch.compile(step, fullgraph=True) failed); see the class docstring
        if (
            not torch.compiler.is_compiling()
            and target.numel()
            and not target.is_meta
            and bool(((target < 0) | (target >= num_classes)).any())
        ):
            raise ValueError(
                f"Categorical targets must lie in [0, {num_classes}), got values in "
                f"[{int(target.min())}, {int(target.max())}]"
            )

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """log softmax(output)[target] per sample and example, (S, B), nats.

        float16/bfloat16 logits are evaluated in float32 (the result is float32), as
        :class:`Gaussian` does: in bfloat16 the log-softmax was off by up to ~0.05 nats per
        example (float16: ~0.01).
        """
        self.check_target(output, target)
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        s, b, c = output.shape
        # cross_entropy takes int64 (or uint8) indices only: int16/int32 labels are widened
        nll = F.cross_entropy(output.reshape(s * b, c), target.long().repeat(s), reduction="none")
        return -nll.reshape(s, b)

    def extra_repr(self) -> str:
        return ""


class Gaussian(Likelihood):
    """Gaussian regression likelihood.

    Args:
        noise: ``"fixed"``, ``"learned"`` or ``"heteroscedastic"`` (see the module docstring).
        sigma: the noise standard deviation for ``"fixed"``, and the initial value for
            ``"learned"`` (in the units of the (normalised) targets).
        output_dim: number of target dimensions D (needed for ``"learned"``; checked otherwise).
        min_variance: a floor added to the heteroscedastic variance exp(log_var) for stability.
    """

    log_sigma: Tensor
    noise: str
    output_dim: int
    min_variance: float

    def __init__(
        self,
        noise: str = "fixed",
        sigma: float = 1.0,
        output_dim: int = 1,
        min_variance: float = 1e-6,
    ) -> None:
        super().__init__()
        if noise not in NOISE_MODELS:
            hint = (
                f" (the noise sd is sigma: Gaussian(sigma={noise!r}))"
                if isinstance(noise, (int, float)) and not isinstance(noise, bool)
                else ""
            )
            raise ValueError(
                f"unknown noise {noise!r}; accepted values: {', '.join(NOISE_MODELS)}{hint}"
            )
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"Gaussian sigma must be a finite positive number, got {sigma!r}")
        # any integer type (Python, NumPy), not a bool
        if (
            isinstance(output_dim, bool)
            or not isinstance(output_dim, numbers.Integral)
            or output_dim < 1
        ):
            raise ValueError(f"Gaussian output_dim must be a positive integer, got {output_dim!r}")
        output_dim = int(output_dim)
        if not math.isfinite(float(min_variance)) or min_variance < 0:
            raise ValueError(
                f"Gaussian min_variance must be a finite number >= 0, got {min_variance!r}"
            )
        self.noise = noise
        self.output_dim = output_dim
        self.min_variance = float(min_variance)
        init = torch.full((output_dim,), math.log(sigma))
        if noise == "learned":
            self.log_sigma = nn.Parameter(init)
        else:
            self.register_buffer("log_sigma", init)

    @property
    def sigma(self) -> Tensor:
        """The homoscedastic noise standard deviation (D,) (fixed or learned)."""
        return self.log_sigma.exp()

    def mean_and_variance(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """Split outputs (S, B, D or 2D) into the mean (S, B, D) and noise variance (S, B, D).

        The variance has the outputs' device and dtype, a fixed or learned noise's too
        (whatever device and dtype this module is on). A variance beyond the dtype's range (a
        log-variance above ~88.7 in float32) is Inf here; :meth:`log_prob` works in log space
        and stays finite.
        """
        mean, log_var, heteroscedastic = self._split(output)
        if heteroscedastic:
            return mean, log_var.exp() + self.min_variance
        return mean, log_var.exp()

    def mean_and_log_variance(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """The mean (S, B, D) and the log of the noise variance (S, B, D), in the outputs'
        device and dtype; heteroscedastic: log(exp(log_var) + min_variance), without exp."""
        mean, log_var, heteroscedastic = self._split(output)
        if heteroscedastic and self.min_variance > 0:
            floor = log_var.new_tensor(math.log(self.min_variance))
            log_var = torch.logaddexp(log_var, floor)
        return mean, log_var

    def _split(self, output: Tensor) -> tuple[Tensor, Tensor, bool]:
        """(mean, log-variance before the min_variance floor, heteroscedastic?)."""
        if output.dim() == 2:  # (S, B) from a model with a squeezed single output
            output = output.unsqueeze(-1)
        if output.dim() != 3:
            # (B, T, D) outputs would make log_prob (S, B, T), and the ELBO's mean over it
            # would weigh the data term 1/T against the KL: refuse instead
            raise ValueError(
                "Gaussian expects the model to output (B, D) or (B,) per weight sample, got "
                f"{tuple(output.shape[1:])}; flatten extra dimensions into D"
            )
        d = output.shape[-1]
        if self.noise == "heteroscedastic":
            if d % 2:
                raise ValueError(
                    "heteroscedastic Gaussian expects the model to output 2*D values per example "
                    f"(means, then log-variances), got {d}"
                )
            if d // 2 != self.output_dim:
                raise ValueError(
                    f"heteroscedastic Gaussian with output_dim={self.output_dim} expects "
                    f"{2 * self.output_dim} outputs per example (means, then log-variances), "
                    f"got {d}; pass output_dim={d // 2} if the targets have {d // 2} dimensions"
                )
            mean, log_var = output.split(d // 2, dim=-1)
            return mean, log_var, True
        if d != self.output_dim:
            raise ValueError(
                f"Gaussian(noise={self.noise!r}) expects {self.output_dim} output(s) per example, got {d}"
            )
        # on the outputs' device and in their dtype (expand_as moved neither: the variances of
        # a model on another device than this module stayed on this module's, or crashed)
        log_var = 2 * self.log_sigma.to(device=output.device, dtype=output.dtype)
        return output, log_var.expand_as(output), False

    def _target(self, mean: Tensor, target: Tensor) -> Tensor:
        if target.dtype == torch.bool or target.is_complex():
            # a bool target failed in torch's words ('Subtraction ... with a bool tensor'),
            # a complex one gave a complex log-likelihood and loss
            raise ValueError(
                f"Gaussian targets must be real numbers (a floating or integer tensor), "
                f"got {target.dtype}"
            )
        _check_finite("Gaussian target", target)
        if target.dim() == 1:
            target = target.unsqueeze(-1)
        if target.shape != mean.shape[1:]:
            raise ValueError(
                f"Gaussian target shape {tuple(target.shape)} does not match the model's mean "
                f"shape {tuple(mean.shape[1:])}"
            )
        return target

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """log N(target; mean, var) summed over the D outputs, (S, B), nats.

        float16/bfloat16 outputs are evaluated in float32 (the result is float32): in float16
        exp(log_var) overflows above 11.1 and (target - mean)**2 / var above 65504 (a residual
        of 3 at sigma = 0.01), which made the log-likelihood -inf.
        """
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        mean, log_var = self.mean_and_log_variance(output)
        target = self._target(mean, target)
        # in log space: exp(log_var) overflowed float32 above log_var = 88.7 (a -inf
        # log-likelihood, a NaN gradient); the residual is scaled before it is squared, so a
        # residual above 1.8e19 (whose square overflows float32) stays finite too
        z = (target - mean) * torch.exp(-0.5 * log_var)
        lp = -0.5 * (_LOG_2PI + log_var + z * z)
        return lp.sum(-1)

    def extra_repr(self) -> str:
        # the noise model's values, as the constructor takes them: sigma (the current one of a
        # learned noise) for fixed/learned noise, the variance floor for heteroscedastic noise
        if self.noise == "heteroscedastic":
            value = f"min_variance={self.min_variance:g}"
        else:
            value = f"sigma={_format_values(self.log_sigma)}"
        return f"noise={self.noise!r}, {value}, output_dim={self.output_dim}"


def _format_values(log_sigma: Tensor, shown: int = 4) -> str:
    """exp(log_sigma) for a repr: one number when all are equal, else a (shortened) list."""
    if log_sigma.is_meta:  # no values to show (deferred initialisation)
        return "?"
    values = log_sigma.detach().exp().cpu().tolist()
    if len(set(values)) == 1:
        return f"{values[0]:.4g}"
    text = ", ".join(f"{v:.4g}" for v in values[:shown])
    more = f", ... ({len(values)} values)" if len(values) > shown else ""
    return f"[{text}{more}]"
