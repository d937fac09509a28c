"""Predictive distributions: averaging over weight samples, and the uncertainty split.

:func:`predict` runs S weight samples in one vectorized pass per chunk of inputs and returns a
:class:`ClassificationPrediction` or a :class:`RegressionPrediction`:

- classification: predictive probabilities p(y|x) = mean_s softmax(f_s(x)); total uncertainty
  ``entropy`` = H[p(y|x)]; ``aleatoric`` = mean_s H[softmax(f_s(x))] (expected entropy);
  ``epistemic`` = entropy - aleatoric (the mutual information between y and w; computed in
  float64 as mean_s KL(softmax(f_s(x)) || p(y|x)), 0 where all samples agree). All in nats.
  ``log_probs`` = log p(y|x) by log-sum-exp of the samples' log-softmax (finite where the
  probabilities underflow); ``log_prob(y)`` reads it.
- regression: the mixture of S Gaussians N(mu_s(x), var_s(x)); ``mean`` = mean_s mu_s;
  ``aleatoric`` = mean_s var_s (noise); ``epistemic`` = variance over s of mu_s (population
  variance, 1/S); ``variance`` = aleatoric + epistemic (law of total variance).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast, overload

import torch
from torch import Tensor, nn

from .likelihoods import Categorical, Gaussian, Likelihood
from .nn.module import (
    _is_int,
    _is_real,
    _vectorized_samples,
    shared_weight_samples,
    vectorized_samples,
)
from .nn.stacking import repeat_samples

__all__ = [
    "QUANTILE_METHODS",
    "ClassificationPrediction",
    "RegressionPrediction",
    "Prediction",
    "predict",
    "sample_outputs",
]


#: How :meth:`RegressionPrediction.quantiles` computes the predictive quantiles of y:
#: Monte-Carlo draws (the default) or exact root finding on the mixture CDF.
QUANTILE_METHODS: tuple[str, ...] = ("draws", "exact")


def _entropy(p: Tensor) -> Tensor:
    """Entropy in nats over the last dimension, with 0 log 0 = 0 in every dtype (a clamp at
    1e-30 underflowed to 0 in float16, making a one-hot row's entropy NaN)."""
    return -torch.special.xlogy(p, p).sum(-1)


@dataclass
class ClassificationPrediction:
    """Predictive summary for classification. B examples, C classes, S samples."""

    probs: Tensor  # (B, C) predictive probabilities
    sample_probs: Tensor  # (S, B, C) per-sample probabilities
    # (B, C) log predictive probabilities, log (1/S) sum_s softmax(f_s), by log-sum-exp of the
    # samples' log-softmax (:func:`predict` fills it in): finite and accurate where ``probs``
    # underflows to 0 (a logit gap beyond ~100 in float32); None: log_prob uses log(probs)
    log_probs: Tensor | None = None

    def __post_init__(self) -> None:
        # A prediction built by hand (an MC-dropout or ensemble baseline's samples) with the
        # samples second, (B, S, C), gave entropy (B,) but aleatoric and epistemic of shape
        # (S,), averaged over the wrong axis (silently wrong numbers when B == S), and logits
        # passed for probabilities gave NaN uncertainties: refused here, naming the fix.
        for name in ("probs", "sample_probs", "log_probs"):
            value = getattr(self, name)
            if not (value is None and name == "log_probs") and not isinstance(value, Tensor):
                raise TypeError(
                    f"ClassificationPrediction: {name} must be a tensor, got {type(value).__name__}"
                )
        probs, sample = self.probs, self.sample_probs
        if probs.dim() != 2 or sample.dim() != 3 or sample.shape[1:] != probs.shape:
            hint = ""
            if (
                probs.dim() == 2
                and sample.dim() == 3
                and (sample.shape[0], sample.shape[2]) == tuple(probs.shape)
            ):
                hint = (
                    "; sample_probs looks batch-first (B, S, C): put the samples first, "
                    "torch.stack(per_sample_probs, dim=0) or sample_probs.transpose(0, 1)"
                )
            raise ValueError(
                "ClassificationPrediction: probs must be (B, C) and sample_probs (S, B, C), "
                "the S samples first (probs = sample_probs.mean(0)); got probs "
                f"{tuple(probs.shape)} and sample_probs {tuple(sample.shape)}{hint}"
            )
        if self.log_probs is not None and self.log_probs.shape != probs.shape:
            raise ValueError(
                f"ClassificationPrediction: log_probs must have the shape of probs "
                f"{tuple(probs.shape)}, got {tuple(self.log_probs.shape)}"
            )
        if not sample.is_meta and sample.is_floating_point():
            # NaN passes (a diverged model's predictions, which bbb.train.evaluate reports)
            outside = (sample < 0) | (sample > 1.0 + 1e-3)
            if bool(outside.any()):
                raise ValueError(
                    "ClassificationPrediction: sample_probs must be probabilities in [0, 1], "
                    f"got {float(sample[outside][0]):g}; for logits pass "
                    "torch.softmax(logits, dim=-1) (or use bbb.predict)"
                )

    @property
    def entropy(self) -> Tensor:
        """Total predictive entropy H[p(y|x)] (B,), nats."""
        return _entropy(self.probs)

    @property
    def aleatoric(self) -> Tensor:
        """Expected entropy mean_s H[p_s(y|x)] (B,), nats."""
        return _entropy(self.sample_probs).mean(0)

    @property
    def epistemic(self) -> Tensor:
        """Mutual information I[y; w | x] = entropy - aleatoric (B,), nats, >= 0.

        Computed in float64 as mean_s KL(p_s || p) (the same quantity, without the
        cancellation of a difference of two entropies): 0 exactly where all samples agree,
        and accurate where it is small (e.g. for ranking inputs in active learning).
        """
        sp = self.sample_probs.to(torch.float64)
        # the float64 mean of S equal values is that value exactly, so the KL terms vanish
        mean = sp.mean(0)
        mi = (torch.special.xlogy(sp, sp) - torch.special.xlogy(sp, mean)).sum(-1).mean(0)
        return mi.clamp_min(0.0).to(self.probs.dtype)

    @property
    def predicted(self) -> Tensor:
        """Most probable class (B,)."""
        return self.probs.argmax(-1)

    def log_prob(self, target: Tensor) -> Tensor:
        """Predictive log-probability (B,) of class indices ``target`` (B,), nats.

        ``target`` must hold integers in [0, C) (an integer tensor, or a float tensor of whole
        numbers); anything else is an error rather than a silent truncation. The log of the
        sample-averaged probability, from ``log_probs`` (log-sum-exp over the samples) when
        it is set; otherwise from ``probs``, floored at 1e-30 (-69 nats).
        """
        b, c = self.probs.shape
        if target.shape != (b,):
            raise ValueError(
                f"log_prob: targets must have shape (B,) = ({b},), got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex():
            if not bool((target == target.round()).all()):
                raise ValueError(
                    "log_prob: targets must be class indices (whole numbers), got non-integer "
                    f"values such as {float(target[target != target.round()][0]):g}"
                )
        elif target.dtype == torch.bool:
            raise ValueError("log_prob: targets must be class indices, got a bool tensor")
        idx = target.long()
        bad = (idx < 0) | (idx >= c)
        if bool(bad.any()):
            raise ValueError(
                f"log_prob: class indices must lie in [0, {c}), got {int(idx[bad][0])}"
            )
        idx = idx.to(self.probs.device).unsqueeze(-1)
        if self.log_probs is not None:
            return self.log_probs.gather(-1, idx).squeeze(-1)
        p = self.probs.gather(-1, idx).squeeze(-1)
        return torch.log(p.clamp_min(1e-30))


@dataclass
class RegressionPrediction:
    """Predictive summary for regression: a mixture of S Gaussians per example (B, D)."""

    sample_means: Tensor  # (S, B, D)
    sample_variances: Tensor  # (S, B, D) noise variance of each sample

    def __post_init__(self) -> None:
        # A hand-built prediction of mismatched shapes broadcast silently (means (S, B, D) with
        # variances (S, B) gave a (B, B) "variance"), and log-variances or negative values
        # passed for variances gave a lower total variance and NaN standard deviations:
        # refused here, naming the fix. NaN and Inf pass (a diverged model's predictions,
        # which the metrics report).
        for name in ("sample_means", "sample_variances"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"RegressionPrediction: {name} must be a tensor, got {type(value).__name__}"
                )
        means, variances = self.sample_means, self.sample_variances
        if means.dim() != 3 or variances.shape != means.shape:
            raise ValueError(
                "RegressionPrediction: sample_means and sample_variances must both be "
                f"(S, B, D), the S samples first; got {tuple(means.shape)} and "
                f"{tuple(variances.shape)} (for one output per example use (S, B, 1))"
            )
        if not variances.is_meta and variances.is_floating_point():
            negative = variances < 0
            if bool(negative.any()):
                raise ValueError(
                    "RegressionPrediction: sample_variances must be variances (>= 0), got "
                    f"{float(variances[negative][0]):g}; for log-variances pass their exp(), "
                    "for standard deviations their square"
                )

    @property
    def mean(self) -> Tensor:
        """Predictive mean (B, D)."""
        return self.sample_means.mean(0)

    @property
    def aleatoric(self) -> Tensor:
        """Expected noise variance mean_s var_s (B, D)."""
        return self.sample_variances.mean(0)

    @property
    def epistemic(self) -> Tensor:
        """Variance of the sample means over weight samples (B, D) (1/S normalisation)."""
        return self.sample_means.var(0, correction=0)

    @property
    def variance(self) -> Tensor:
        """Total predictive variance = aleatoric + epistemic (B, D)."""
        return self.aleatoric + self.epistemic

    @property
    def std(self) -> Tensor:
        """Total predictive standard deviation (B, D)."""
        return self.variance.sqrt()

    def _checked_target(self, target: object, who: str) -> Tensor:
        """``target`` (B, D) or (B,) as (B, D), refused when it is not a tensor of the
        predictions' shape or holds NaN/Inf (a NaN target made its example's value NaN,
        silently)."""
        if not isinstance(target, Tensor):
            raise TypeError(f"{who}: targets must be a tensor, got {type(target).__name__}")
        given = tuple(target.shape)
        if target.dim() == 1:
            target = target.unsqueeze(-1)
        if target.shape != self.sample_means.shape[1:]:
            b, d = self.sample_means.shape[1:]
            read = f" (given as {given})" if len(given) == 1 else ""
            raise ValueError(
                f"{who}: targets of shape {tuple(target.shape)}{read} do not match the "
                f"predictions' (B, D) = {(b, d)}; pass targets of shape {(b, d)}"
                + (f" or ({b},)" if d == 1 else "")
            )
        if (
            target.is_floating_point()
            and not target.is_meta
            and not bool(torch.isfinite(target).all())
        ):
            raise ValueError(f"{who}: targets contain NaN or Inf values")
        return target

    def log_prob(self, target: Tensor) -> Tensor:
        """Log-density (B,) of targets (B, D) or (B,) under the S-component mixture, nats.

        The joint density of the D outputs: log (1/S) sum_s prod_d N(y_d; mu_sd, var_sd).
        """
        m, v = self.sample_means, self.sample_variances
        # targets on the CPU, predictions on the model's device: moved, as
        # ClassificationPrediction.log_prob does (was "Expected all tensors to be on the same
        # device")
        target = self._checked_target(target, "log_prob").to(m.device)
        lp = -0.5 * (math.log(2 * math.pi) + v.log() + (target - m) ** 2 / v)
        s = m.shape[0]
        return torch.logsumexp(lp.sum(-1), dim=0) - math.log(s)

    def cdf(self, target: Tensor) -> Tensor:
        """Predictive CDF (B, D) at targets (B, D) or (B,): each output's marginal mixture,
        ``(1/S) sum_s Phi((y_d - mu_sd) / sd_sd)``, exactly (the PIT values of the targets;
        see :func:`bbb.metrics.pit_values`). Computed in float64, returned in the dtype of
        the sample means, on their device (targets elsewhere are moved)."""
        m = self.sample_means
        target = self._checked_target(target, "cdf")
        from .metrics import _mixture_cdf

        y = target.to(device=m.device, dtype=torch.float64)
        sd = self.sample_variances.to(torch.float64).sqrt()
        return _mixture_cdf(m.to(torch.float64), sd, y).to(m.dtype)

    def quantiles(
        self,
        q: float | Sequence[float] | Tensor,
        num_draws: int = 20,
        generator: torch.Generator | None = None,
        *,
        include_noise: bool = True,
        method: str = "draws",
    ) -> Tensor:
        """Quantiles (len(q), B, D) of the predictive distribution; (B, D) for a single q.

        ``q``: probabilities in [0, 1] (a number, a sequence, or a 0-d or 1-d tensor, like
        :func:`torch.quantile`'s). ``include_noise=True``: of the predictive mixture of
        y (each output's marginal), by ``method``, one of :data:`QUANTILE_METHODS`:

        - ``"draws"`` (default): estimated from ``num_draws`` (a positive integer) draws per
          weight sample with ``generator`` (a Monte-Carlo estimate: the CDF at it is off by
          about ``sqrt(q (1 - q) / (S num_draws))``);
        - ``"exact"``: the exact mixture quantile, by float64 root finding on the mixture CDF
          (safeguarded Newton, a few iterations of O(S B D) work per level; ``num_draws`` and
          ``generator`` are not used, no random numbers are drawn); q = 0 and 1 give -inf
          and +inf.

        ``False``: of the network's mean output over weight samples (the distribution of
        f(x; w), w ~ q: epistemic uncertainty only; the empirical quantile of the S means,
        by :func:`torch.quantile`, whatever ``method``).
        """
        if not isinstance(method, str) or method not in QUANTILE_METHODS:
            raise ValueError(
                f"quantiles: method must be one of "
                f"{', '.join(repr(k) for k in QUANTILE_METHODS)}, got {method!r}"
            )
        m, v = self.sample_means, self.sample_variances
        if isinstance(q, Tensor):
            # a tensor of probabilities, like torch.quantile's q (was refused as "not
            # probabilities", a 0-d one with "iteration over a 0-d tensor")
            if q.dim() > 1 or q.is_complex() or q.dtype == torch.bool:
                raise ValueError(
                    f"quantiles: q must be a probability or a 1-D sequence of probabilities, "
                    f"got a tensor of shape {tuple(q.shape)} and dtype {q.dtype}"
                )
            q = q.tolist()
        single = _is_real(q)
        # a real number (checked by _is_real, which mypy cannot see), else a sequence whose
        # items are checked next
        values = [cast(float, q)] if single else list(cast("Sequence[float]", q))
        if not values or not all(_is_real(p) and 0.0 <= p <= 1.0 for p in values):
            raise ValueError(f"quantiles: q must be probabilities in [0, 1], got {q!r}")
        if include_noise and method == "draws" and (not _is_int(num_draws) or num_draws < 1):
            raise ValueError(f"quantiles: num_draws must be a positive integer, got {num_draws!r}")
        qs = torch.tensor([float(p) for p in values], dtype=m.dtype, device=m.device)
        if single:
            qs = qs[0]
        if not include_noise:
            return torch.quantile(m, qs, dim=0)
        if method == "exact":
            from .metrics import _mixture_quantiles

            # the levels in float64 (a float32 0.95 is 0.949999988...)
            q64 = torch.tensor([float(p) for p in values], dtype=torch.float64)
            exact = _mixture_quantiles(m, v, q64).to(m.dtype)
            return exact[0] if single else exact
        eps = torch.randn(
            (num_draws, *m.shape), generator=generator, dtype=m.dtype, device=m.device
        )
        draws = (m + v.sqrt() * eps).reshape(-1, *m.shape[1:])
        return torch.quantile(draws, qs, dim=0)


Prediction = ClassificationPrediction | RegressionPrediction


def _model_output(out: object, rows: int) -> Tensor:
    """``out``, a model's output for an input of ``rows`` rows, checked to be a tensor with
    one row per input row (a tuple, a dict or a batch-reducing output otherwise failed deep
    inside with an AttributeError or a reshape error)."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model must return a tensor (one row per input row), got "
            f"{type(out).__name__}; wrap it so that forward returns the logits or outputs alone"
        )
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for an input of {rows} rows; it must "
            "keep the batch dimension first (one output row per input row)"
        )
    return out


# rows per forward pass of predict and sample_outputs by default (raised to S when S is larger)
_DEFAULT_MAX_ROWS = 65536


def sample_outputs(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    *,
    max_rows: int | None = None,
    shared_prefix: bool = False,
) -> Tensor:
    """Model outputs for ``num_samples`` weight samples, (S, B, ...), without gradients.

    Inputs are processed in chunks of at most ``max_rows // S`` examples, each chunk in one
    vectorized pass (S * chunk rows, so ``max_rows`` must be at least S: a pass holds the S
    samples of at least one input, and smaller is a ValueError; ``None``: 65536, or S where
    S is larger). With weight-space sampling (``reparam``) sample s is one
    network for all B inputs, across chunks too (:func:`bbb.nn.module.shared_weight_samples`);
    ``local`` and ``flipout`` draw their noise per row, so only per-input summaries (the
    predictive distribution of each input) are meaningful for them.

    ``shared_prefix=True``: each chunk's inputs are given to the model as they are and the
    first Bayesian layer makes the S copies (``vectorized_samples(..., batch_size=chunk)``),
    so the deterministic layers before it run once per input instead of S times (see
    :class:`bbb.ELBO`'s ``shared_prefix`` for what the model must allow).
    """
    if not isinstance(shared_prefix, bool):
        raise TypeError(f"shared_prefix must be True or False, got {shared_prefix!r}")
    # any integer type (Python, NumPy), not a bool
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if max_rows is None:
        max_rows = max(_DEFAULT_MAX_ROWS, int(num_samples))
    if not _is_int(max_rows) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    num_samples, max_rows = int(num_samples), int(max_rows)
    if max_rows < num_samples:
        # every pass runs all S samples (in "frozen" mode S is the number frozen): S rows,
        # one input's, is the smallest pass there is
        raise ValueError(
            f"max_rows ({max_rows}) must be at least num_samples ({num_samples}): each "
            "forward pass holds the num_samples copies of at least one input; raise max_rows "
            "or lower num_samples"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"predict needs the inputs as one tensor (B, ...), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"predict needs a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    chunk = max_rows // num_samples
    outs = []
    shared = shared_weight_samples(model) if x.shape[0] > chunk else contextlib.nullcontext()
    with torch.no_grad(), vectorized_samples(model, num_samples), shared:
        for start in range(0, x.shape[0], chunk):
            xb = x[start : start + chunk]
            b = xb.shape[0]
            if shared_prefix and num_samples > 1:
                with _vectorized_samples(model, num_samples, b):
                    out = model(xb)
            else:
                out = model(repeat_samples(xb, num_samples))
            out = _model_output(out, num_samples * b)
            outs.append(out.reshape(num_samples, b, *out.shape[1:]))
    return torch.cat(outs, dim=1)


def _warn_overflowed_variances(outputs: Tensor, var: Tensor) -> None:
    """Warn when finite outputs gave infinite noise variances (exp of a log-variance above
    ~88.7 overflows float32): the predictive variance, std and log_prob are then inf/-inf,
    which was silent."""
    overflowed = torch.isinf(var) & torch.isfinite(outputs).all(-1, keepdim=True)
    if bool(overflowed.any()):
        n = int(overflowed.any(0).any(-1).sum())
        warnings.warn(
            f"predict: the model's log-variance overflows {var.dtype} (exp above "
            f"{torch.finfo(var.dtype).max:.3g}) for {n} of {var.shape[1]} examples, so their "
            "variance, std and log_prob are inf/-inf; the model predicts an enormous noise "
            "there (check its training), or run it in float64 (model.double(), x.double())",
            RuntimeWarning,
            stacklevel=3,
        )


# The return type follows the likelihood, for type checkers: Gaussian gives a
# RegressionPrediction, Categorical (the default) a ClassificationPrediction.
@overload
def predict(
    model: nn.Module,
    x: Tensor,
    *,
    likelihood: Gaussian,
    num_samples: int = 100,
    max_rows: int | None = None,
    shared_prefix: bool = False,
) -> RegressionPrediction: ...


@overload
def predict(
    model: nn.Module,
    x: Tensor,
    *,
    likelihood: Categorical | None = None,
    num_samples: int = 100,
    max_rows: int | None = None,
    shared_prefix: bool = False,
) -> ClassificationPrediction: ...


@overload
def predict(
    model: nn.Module,
    x: Tensor,
    *,
    likelihood: Likelihood | None = None,
    num_samples: int = 100,
    max_rows: int | None = None,
    shared_prefix: bool = False,
) -> ClassificationPrediction | RegressionPrediction: ...


def predict(
    model: nn.Module,
    x: Tensor,
    *,
    likelihood: Likelihood | None = None,
    num_samples: int = 100,
    max_rows: int | None = None,
    shared_prefix: bool = False,
) -> ClassificationPrediction | RegressionPrediction:
    """Predictive distribution of ``model`` at inputs ``x`` (B, ...), averaged over samples.

    The model runs as it is: in its current sampling mode and its current train/eval mode.
    Call ``model.eval()`` first unless you mean otherwise: in training mode dropout stays
    active (Monte Carlo dropout, if that is what you want) and batch normalisation uses and
    updates the batch statistics, those of a pass's S * chunk rows (pooled over the S weight
    samples, unlike :class:`bbb.ELBO`, which normalises each sample by its own). The Bayesian
    layers sample their weights in both modes.

    Args:
        model: a network with Bayesian layers (in its current sampling mode: ``"sample"``
            draws fresh weights per sample; under ``bbb.sampling(model, "mean")`` all samples
            coincide; under ``"frozen"`` the frozen samples are used, so ``num_samples`` must
            equal the number frozen).
        x: inputs (B, ...).
        likelihood: :class:`bbb.Categorical` (default; the model outputs logits) or
            :class:`bbb.Gaussian` (regression; its noise model gives the aleatoric part).
        num_samples: S, the number of weight samples.
        max_rows: bound on S * chunk rows per forward pass (memory); at least S (one input's
            samples run in one pass), else a ValueError. ``None``: 65536, or S where S is
            larger.
        shared_prefix: run the deterministic layers before the first Bayesian layer once per
            input instead of S times (a frozen feature extractor under a Bayesian head); see
            :func:`sample_outputs`.
    """
    if likelihood is None:
        likelihood = Categorical()
    if not isinstance(likelihood, (Categorical, Gaussian)):
        # checked before the model runs (was: after all S samples of every input)
        hint = (
            f"; pass an instance, e.g. bbb.{likelihood.__name__}(...)"
            if isinstance(likelihood, type)
            else ""
        )
        name = likelihood.__name__ if isinstance(likelihood, type) else type(likelihood).__name__
        raise TypeError(
            f"predict supports Categorical and Gaussian likelihoods, got {name}"
            + (" (the class)" if isinstance(likelihood, type) else "")
            + hint
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"predict needs the inputs as one tensor (B, ...), got {type(x).__name__}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("predict: inputs contain NaN or Inf values")
    outputs = sample_outputs(model, x, num_samples, max_rows=max_rows, shared_prefix=shared_prefix)
    if isinstance(likelihood, Categorical):
        if outputs.dim() != 3:
            raise ValueError(
                f"Categorical predict expects logits (B, C) from the model, got {tuple(outputs.shape[1:])}"
            )
        if outputs.shape[-1] < 2:
            raise ValueError(
                "Categorical predict needs logits of at least 2 classes, but the model outputs "
                f"{outputs.shape[-1]} value per example: for regression pass "
                "likelihood=bbb.Gaussian(...)"
            )
        # float16/bfloat16 logits: probabilities in float32 (a low-precision softmax's rows sum
        # to 1 only within ~3e-3, which bbb.metrics refuse, and entropy - aleatoric cancels)
        low = outputs.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if low else None
        sample_probs = torch.softmax(outputs, dim=-1, dtype=dtype)
        # log (1/S) sum_s p_s, by log-sum-exp: the log of a mean of probabilities that
        # underflow (a wrong class at a logit gap of 200: p = 0, log p = -200) stays exact
        log_probs = torch.logsumexp(torch.log_softmax(outputs, dim=-1, dtype=dtype), dim=0)
        log_probs = log_probs - math.log(outputs.shape[0])
        return ClassificationPrediction(sample_probs.mean(0), sample_probs, log_probs)
    if isinstance(likelihood, Gaussian):
        if outputs.dtype in (torch.float16, torch.bfloat16):
            # float16/bfloat16 outputs: the mixture in float32 (exp(log_var) overflows float16
            # above log_var = 11.1, the sums over samples round at 3 digits, torch.quantile
            # takes float32/float64 only)
            outputs = outputs.float()
        with torch.no_grad():
            mean, var = likelihood.mean_and_variance(outputs)
        if not outputs.is_meta:
            _warn_overflowed_variances(outputs, var)
        return RegressionPrediction(mean, var)
    raise TypeError(
        f"predict supports Categorical and Gaussian likelihoods, got {type(likelihood).__name__}"
    )
