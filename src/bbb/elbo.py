"""The minibatch ELBO of Bayes by Backprop, on a per-example scale.

For a minibatch of B examples out of a data set of N, with S weight samples w_s ~ q:

    loss = (1 / (S B)) sum_s sum_b -log p(y_b | x_b, w_s)  +  beta * pi_i * KL(q || p) / B

``nll`` is the first term (mean over samples and examples), ``kl`` is KL(q || p) in nats for
the whole network (closed form, or a Monte Carlo estimate: averaged over the S weight samples
of the pass for weight-space sampling and flipout; the local estimator draws no weights, so
its estimate uses one weight sample drawn for the KL alone) and the KL weight
``beta * pi_i / B`` depends on the weighting scheme:

- ``"uniform"``: pi_i = B / N, so the KL term is KL / N. Multiplied by B and summed over the M
  minibatches of an epoch, the loss is exactly the full-data negative ELBO (and the epoch's
  mean loss per example is that divided by N).
- ``"blundell"``: pi_i = 2^(M-i) / (2^M - 1) for minibatch i = 1..M of the epoch (Blundell et
  al. 2015, eq. 9), computed as 2^-i / (1 - 2^-M) so M = 391 does not overflow. The weights sum
  to 1 over an epoch: early minibatches carry most of the KL.
- ``beta`` (``kl_scale``): a constant (1 is the true ELBO) or a schedule of the optimisation
  step (annealing, e.g. :func:`linear_annealing`). The ELBO counts its calls (minibatches):
  with gradient accumulation over k minibatches per optimizer step, pass
  ``accumulation_steps=k`` (the schedule then sees calls // k) and divide each loss by k.

Dividing by B keeps the loss on the scale of an ordinary mean loss, so learning rates behave as
in deterministic training; multiply by N to get the negative ELBO of the whole data set.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch import Tensor, nn

from .likelihoods import Likelihood
from .nn.module import BayesModule, bayes_modules, kl_divergence, vectorized_samples
from .nn.stacking import repeat_samples
from .predictive import _model_output

__all__ = ["ELBO", "ELBOResult", "KL_WEIGHTINGS", "blundell_weight", "linear_annealing"]

KL_WEIGHTINGS = ("uniform", "blundell")


def blundell_weight(batch_index: int, num_batches: int) -> float:
    """pi_i = 2^(M-i) / (2^M - 1) for the 0-based minibatch ``batch_index`` (i = index + 1)."""
    # any integer type: Python, NumPy or a 0-d integer tensor (not a bool)
    num_batches = _positive_int("num_batches", num_batches)
    try:
        if isinstance(batch_index, bool):
            raise TypeError
        batch_index = operator.index(batch_index)
    except TypeError:
        raise ValueError(f"batch_index must be an integer, got {batch_index!r}") from None
    if not 0 <= batch_index < num_batches:
        raise ValueError(f"batch_index must lie in [0, {num_batches}), got {batch_index!r}")
    i = batch_index + 1
    # 2^-i / (1 - 2^-M); 2^-i underflows to 0.0 (not an error) for i > ~1074, which is the
    # correct limit of a vanishing weight.
    return math.ldexp(1.0, -i) / -math.expm1(-num_batches * math.log(2.0))


def linear_annealing(
    warmup_steps: int, start: float = 0.0, end: float = 1.0
) -> Callable[[int], float]:
    """A KL scale that rises linearly from ``start`` to ``end`` over ``warmup_steps`` steps."""
    warmup_steps = _positive_int("warmup_steps", warmup_steps)
    for name, value in (("start", start), ("end", end)):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ValueError(f"linear_annealing: {name} must be a finite number, got {value!r}")
        if value < 0:
            # accepted here, it failed only when the ELBO reached a step whose KL scale was
            # negative
            raise ValueError(f"linear_annealing: {name} must be >= 0 (a KL scale), got {value!r}")

    def schedule(step: int) -> float:
        t = min(step / warmup_steps, 1.0)
        return start + (end - start) * t

    return schedule


def _uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a batch-norm layer of ``model`` normalises by the statistics of the batch it is
    given (training mode, or no running statistics kept): such a layer mixes the rows of a
    batch, so the S weight samples of one vectorized pass would share its mean and variance."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        for m in model.modules()
    )


def _sharded_bayes_layer(model: nn.Module) -> str | None:
    """The name of a Bayesian layer of ``model`` whose parameters are held sharded by FSDP
    now (``"<model>"`` for ``model`` itself), or None.

    FSDP2 (``fully_shard``) gives a layer its gathered parameters for its forward and, by
    default, puts its shards (``DTensor`` parameters) back after it; FSDP1
    (``FullyShardedDataParallel``, ``FULL_SHARD``) frees the gathered flat parameter. Costs
    nothing unless torch's FSDP or DTensor modules have been imported.
    """
    dtensor_mod = sys.modules.get("torch.distributed.tensor")
    fsdp_mod = sys.modules.get("torch.distributed.fsdp")
    if dtensor_mod is None and fsdp_mod is None:
        return None
    dtensor = getattr(dtensor_mod, "DTensor", None)
    fsdp1 = getattr(fsdp_mod, "FullyShardedDataParallel", None)

    def name(layer: nn.Module) -> str:
        return next((n for n, m in model.named_modules() if m is layer and n), "<model>")

    if dtensor is not None:
        for m in bayes_modules(model):
            if any(isinstance(p, dtensor) for p in m.parameters(recurse=False)):
                return name(m)
    if fsdp1 is not None:
        for unit in model.modules():
            if not isinstance(unit, fsdp1):
                continue
            handle: Any = getattr(unit, "_handle", None)
            if handle is None:
                continue
            try:
                resharded = handle.needs_unshard()
                owners = [info.module for info in handle.flat_param._param_infos]
            except (AttributeError, RuntimeError):  # another torch release's internals
                continue
            if not resharded:
                continue
            for m in owners:
                if isinstance(m, BayesModule):
                    return name(m)
    return None


def _check_unsharded(model: nn.Module) -> None:
    """Refuse a KL that would be computed on FSDP shards (see :func:`_sharded_bayes_layer`).

    Before, the KL of a layer wrapped by ``fully_shard`` (default ``reshard_after_forward``)
    failed in DTensor's words ("Cannot flatten unevenly sharded tensor", "got mixed
    torch.Tensor and DTensor"), and that of a ``FullyShardedDataParallel`` unit failed on
    a parameter fragment or read freed memory (a segmentation fault).
    """
    name = _sharded_bayes_layer(model)
    if name is None:
        return
    from .train.distributed import DistributedError

    raise DistributedError(
        f"ELBO: the Bayesian layer {name!r} holds only this rank's FSDP shard of its "
        "parameters after the model's forward pass, and its KL needs them whole (the ELBO "
        "computes the KL after the forward). Shard the Bayesian layers so that they stay "
        "gathered until the backward pass - fully_shard(layer, reshard_after_forward=False) "
        "(FSDP1: sharding_strategy=ShardingStrategy.SHARD_GRAD_OP) - or apply fully_shard "
        "to the root alone, which keeps its parameters gathered: "
        "fully_shard(bbb.train.distributed.ELBOStep(model, elbo))"
    )


def _positive_int(name: str, value: object) -> int:
    """``value`` as a Python int if it is a positive integer of any integer type (Python,
    NumPy, 0-d integer tensor); bools and everything else are refused, naming ``name``."""
    if not isinstance(value, bool):
        try:
            n = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if n > 0:
                return n
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ELBOResult:
    """Output of :class:`ELBO`: all on the per-example scale described in the module doc."""

    loss: Tensor  # scalar to backpropagate: nll + kl_weight * kl
    nll: Tensor  # scalar, mean negative log-likelihood over samples and examples (nats)
    kl: Tensor  # scalar, KL(q || p) of the whole network (nats)
    kl_weight: float  # beta * pi_i / B
    output: Tensor  # (S, B, ...) model outputs


# A pytree node (its fields the children), so that torch's tree utilities see the tensors
# inside it. DistributedDataParallel(static_graph=True) routes a forward's output tensors,
# found with torch.utils._pytree, through the autograd node that launches the first
# iteration's gradient all-reduce: an ELBOResult was one opaque leaf, that all-reduce never
# ran, and the ranks' parameters diverged after the first step, silently.
_pytree.register_dataclass(ELBOResult, serialized_type_name="bbb.elbo.ELBOResult")


def _warn_not_sampling(model: nn.Module) -> None:
    """Warn when a training step runs with Bayesian layers in the "mean" or "frozen" mode (left
    over from an evaluation or a Thompson-sampling decision): the likelihood then sees the mean
    network, or the same weight sample at every step, and only the KL moves sigma; it trained
    so, silently."""
    modes = {m.mode for m in bayes_modules(model)} - {"sample"}
    if modes:
        warnings.warn(
            f"ELBO: a training step with Bayesian layers in sampling mode "
            f"{' and '.join(repr(m) for m in sorted(modes))}: the likelihood sees "
            + ("the mean network" if modes == {"mean"} else "fixed weights")
            + ", not fresh weight samples, so the result is no posterior; train in the "
            "default 'sample' mode (bbb.set_sampling(model, 'sample'), or leave the "
            "bbb.sampling(...) block)",
            RuntimeWarning,
            stacklevel=3,
        )


class ELBO(nn.Module):
    """Negative ELBO per example for a minibatch (see the module docstring for the formula).

    Args:
        likelihood: :class:`bbb.Categorical` or :class:`bbb.Gaussian`.
        dataset_size: N, the number of training examples (required: the KL scale depends on it;
            under ``torch.distributed``, the global size, not a rank's share).
        num_samples: S weight samples per step, evaluated in one vectorized forward pass
            (S stacked copies of the minibatch). A model whose batch-norm layers normalise by
            the batch's statistics (``nn.BatchNorm*`` in training mode) runs one pass per
            sample instead, so that each sample is normalised by its own statistics (one
            vectorized pass pooled them over the S samples, which changed the objective);
            its running statistics are then updated once per sample. Other layers that mix
            the rows of a batch are not detected: the model must treat examples independently.
        kl_weighting: ``"uniform"`` or ``"blundell"``.
        kl_scale: beta, a float >= 0 or a callable ``step -> float`` (annealing). The step
            counter (a buffer, saved in ``state_dict``) advances by one at each call made in
            training mode with gradients enabled: it counts ELBO calls (minibatches), not
            optimizer steps; the schedule is given ``step // accumulation_steps``.
        accumulation_steps: k, the minibatches whose gradients are accumulated into one
            optimizer step (1, the default, and what :class:`bbb.train.Trainer` does: one step
            per minibatch). With k > 1 a ``kl_scale`` schedule sees the optimizer step
            (calls // k), so ``linear_annealing(warmup)`` warms up over ``warmup`` optimizer
            steps; left at 1 it would count the k calls of each step and warm up k times
            faster (the same as ``linear_annealing(warmup * k)`` with k = 1). Either way,
            divide each minibatch's loss by k before ``backward()`` so that the accumulated
            gradient is that of the mean loss.
        shared_prefix: with S > 1, call the model on the B inputs themselves and let each
            Bayesian layer make the S copies of what it receives
            (``vectorized_samples(..., batch_size=B)``): the deterministic layers before the
            first Bayesian layer (a frozen feature extractor under a Bayesian head) then run
            once per example, not S times. The loss is the same up to rounding, as long as
            nothing before the first Bayesian layer is random (dropout in training mode is then
            shared by the S samples) and no skip connection goes around it (a shape error).
            Off by default (the copies are made at the input, as before). Not used on the path
            that runs one pass per sample (batch-norm layers in training mode).

    Call ``elbo(model, x, y, batch_index=i, num_batches=M)``; ``batch_index``/``num_batches``
    are required for ``"blundell"`` only. The inputs ``x`` are not scanned for NaN or Inf (a
    check that raised on one data-parallel rank would leave the others waiting in their
    all-reduce): a non-finite input gives a non-finite loss, which :class:`bbb.train.Trainer`
    reports with the epoch, the step and whether the minibatch's inputs or targets hold NaN
    or Inf, after agreeing on it across ranks.
    """

    step: Tensor
    # for type checkers only (no attribute is set): nn.Module's __call__ returns Any, and
    # ``elbo(model, x, y)`` runs :meth:`forward`, which returns an ELBOResult
    __call__: Callable[..., ELBOResult]

    def __init__(
        self,
        likelihood: Likelihood,
        dataset_size: int,
        *,
        num_samples: int = 1,
        kl_weighting: str = "uniform",
        kl_scale: float | Callable[[int], float] = 1.0,
        accumulation_steps: int = 1,
        shared_prefix: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(likelihood, Likelihood):
            raise TypeError(
                f"likelihood must be a bbb Likelihood (Categorical, Gaussian), got {type(likelihood).__name__}"
            )
        self.likelihood = likelihood
        # validated by the properties' setters, in this order (also when set later)
        self.dataset_size = dataset_size
        self.num_samples = num_samples
        self.accumulation_steps = accumulation_steps
        self.kl_weighting = kl_weighting
        self.kl_scale = kl_scale
        self.shared_prefix = shared_prefix
        # Data-parallel replicas whose gradients are averaged (set by
        # bbb.train.distributed.wrap_elbo; a Trainer sets it for the duration of each of its
        # training epochs, and restores it after): the "blundell" weight divides by the
        # global batch, replicas * B.
        self.replicas = 1
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def dataset_size(self) -> int:
        """N, the number of training examples the KL is weighed against (a positive integer).

        It may be changed between fits (an active-learning round that grows the training
        set): a value that is not a positive integer (0, 20.5, True, None) is refused here,
        naming ``dataset_size``, rather than failing later inside a training step. NumPy and
        0-d tensor integers are accepted, stored as a Python ``int``.
        """
        return self._dataset_size

    @dataset_size.setter
    def dataset_size(self, value: int) -> None:
        self._dataset_size = _positive_int("dataset_size", value)

    # The other settings are validated when set too: a later assignment (a callback that
    # changes kl_scale, a typo in kl_weighting) was used as given: a negative kl_scale
    # rewarded a large KL, any kl_weighting other than "uniform" was read as "blundell".

    @property
    def num_samples(self) -> int:
        """S, the weight samples per step (a positive integer)."""
        return self._num_samples

    @num_samples.setter
    def num_samples(self, value: int) -> None:
        self._num_samples = _positive_int("num_samples", value)

    @property
    def shared_prefix(self) -> bool:
        """Whether the layers before the first Bayesian layer run once per example (see the
        class docstring)."""
        return self._shared_prefix

    @shared_prefix.setter
    def shared_prefix(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"shared_prefix must be True or False, got {value!r}")
        self._shared_prefix = value

    @property
    def accumulation_steps(self) -> int:
        """k, the minibatches per optimizer step (see the class docstring)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self._accumulation_steps = _positive_int("accumulation_steps", value)

    @property
    def kl_weighting(self) -> str:
        """``"uniform"`` or ``"blundell"``."""
        return self._kl_weighting

    @kl_weighting.setter
    def kl_weighting(self, value: str) -> None:
        if not isinstance(value, str) or value not in KL_WEIGHTINGS:
            raise ValueError(
                f"unknown kl_weighting {value!r}; accepted values: {', '.join(KL_WEIGHTINGS)}"
            )
        self._kl_weighting = value

    @property
    def kl_scale(self) -> float | Callable[[int], float]:
        """beta: a float >= 0, or a callable ``step -> float`` (annealing)."""
        # a schedule that is an nn.Module is registered as a submodule (nn.Module's
        # __setattr__ does so without calling this property's setter)
        module = self._modules.get("kl_scale")
        return module if module is not None else self._kl_scale

    @kl_scale.setter
    def kl_scale(self, value: float | Callable[[int], float]) -> None:
        if not callable(value):
            given = value
            try:
                # a string ("0.5") was read as a number, None or "abc" failed in float()'s
                # words without naming kl_scale; a bool is refused as elsewhere
                if isinstance(given, (str, bytes, bool)):
                    raise TypeError
                value = float(given)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"kl_scale must be a finite number >= 0, got {given!r} (or a callable: "
                    "step -> number, for annealing)"
                )
        self._kl_scale = value

    def kl_weight(self, batch_size: int, batch_index: int | None, num_batches: int | None) -> float:
        """beta * pi_i / B for this minibatch, a Python float.

        A ``kl_scale`` schedule may return any real number (Python, NumPy) or a one-element
        tensor (read as a float, without gradient); anything else is a ValueError.
        """
        if callable(self.kl_scale):
            # the optimizer step: ELBO calls // accumulation_steps (see the class docstring)
            step = int(self.step) // self._accumulation_steps
            value = self.kl_scale(step)
            beta = math.nan
            if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
                beta = float(value.detach())
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                beta = float(value)
            if not (math.isfinite(beta) and beta >= 0):
                raise ValueError(
                    f"kl_scale({step}) returned {value!r}; it must be a finite number >= 0"
                )
        else:
            beta = self.kl_scale
        if self._kl_weighting == "uniform":
            return beta / self._dataset_size
        if batch_index is None or num_batches is None:
            raise ValueError("kl_weighting='blundell' needs batch_index and num_batches")
        return beta * blundell_weight(batch_index, num_batches) / (batch_size * self.replicas)

    def forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        batch_index: int | None = None,
        num_batches: int | None = None,
    ) -> ELBOResult:
        """Evaluate the objective on a minibatch ``x`` (B, ...), ``y`` (B, ...)."""
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"ELBO needs {name} as one tensor (B, ...), got {type(t).__name__}")
        b = x.shape[0] if x.dim() else 0
        if b == 0:
            raise ValueError(f"ELBO needs a non-empty minibatch, got x of shape {tuple(x.shape)}")
        if y.dim() == 0 or y.shape[0] != b:
            raise ValueError(
                f"x has {b} examples but y has {y.shape[0] if y.dim() else 0} "
                f"(shapes {tuple(x.shape)}, {tuple(y.shape)})"
            )
        if b > self._dataset_size:
            raise ValueError(
                f"minibatch of {b} examples is larger than dataset_size={self._dataset_size}: "
                "dataset_size must be the number of training examples"
            )
        s = self._num_samples
        if s > 1 and _uses_batch_statistics(model):
            # a batch-norm layer normalising by its batch's statistics would pool the S
            # samples of a vectorized pass (S * B rows): one pass per sample instead, each
            # normalised by its own statistics, as S separate forward passes would be
            outs, kls = [], []
            for i in range(s):
                with vectorized_samples(model, 1):
                    outs.append(_model_output(model(x), b))
                    if i == 0:
                        _check_unsharded(model)
                    kls.append(kl_divergence(model))
            out = torch.stack(outs)
            kl = torch.stack(kls).mean()
        else:
            shared = self._shared_prefix and s > 1
            with vectorized_samples(model, s, batch_size=b if shared else None):
                out = _model_output(model(x if shared else repeat_samples(x, s)), s * b)
                out = out.reshape(s, b, *out.shape[1:])
                _check_unsharded(model)
                kl = kl_divergence(model)
        nll = -self.likelihood.log_prob(out, y).mean()
        weight = self.kl_weight(b, batch_index, num_batches)
        loss = nll + weight * kl
        if self.training and torch.is_grad_enabled():
            self.step += 1
            if model.training:
                _warn_not_sampling(model)
        return ELBOResult(loss=loss, nll=nll.detach(), kl=kl.detach(), kl_weight=weight, output=out)

    def extra_repr(self) -> str:
        acc = (
            ""
            if self.accumulation_steps == 1
            else f", accumulation_steps={self.accumulation_steps}"
        )
        if self._shared_prefix:
            acc += ", shared_prefix=True"
        return (
            f"dataset_size={self.dataset_size}, num_samples={self.num_samples}, "
            f"kl_weighting={self.kl_weighting!r}{acc}"
        )
