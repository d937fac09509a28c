"""Evaluation metrics for predictive distributions.

All functions here are pure functions on :class:`torch.Tensor` inputs; they hold no model
code and never modify their arguments. The two reports also take the prediction objects of
:func:`bbb.predict`: ``classification_report(pred, labels)`` and
``regression_report(pred, target)``. Scalar metrics are returned as Python ``float``.
Internally everything is computed in ``float64`` (on the inputs' device), so results do not
depend on the precision the model was run in.

Classification metrics take *predictive probabilities* ``probs`` of shape ``(B, C)`` (B
examples, C classes; each row a probability vector, e.g. the Monte-Carlo average of the
softmax outputs) and integer ``labels`` of shape ``(B,)`` with values in ``[0, C)``.

Regression metrics take predictive means/variances and targets of shape ``(B,)`` or
``(B, D)`` (a ``(B,)`` tensor is treated as ``(B, 1)``), or, for the Monte-Carlo mixture
predictive, per-sample means/variances of shape ``(S, B, D)`` (S posterior samples).

Every function validates its inputs and raises ``TypeError`` (not a tensor, wrong dtype) or
``ValueError`` (wrong shape - the actual shape is named in the message -, NaN/inf values,
probabilities that do not sum to 1, labels out of range, non-positive variances).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .predictive import ClassificationPrediction, RegressionPrediction

__all__ = [
    "PROB_SUM_ATOL",
    "ReliabilityData",
    "accuracy",
    "auroc",
    "brier",
    "classification_report",
    "error",
    "expected_calibration_error",
    "gaussian_log_likelihood",
    "mixture_gaussian_log_likelihood",
    "nll",
    "plot_reliability_diagram",
    "regression_report",
    "reliability_diagram_data",
    "rmse",
]

#: Absolute tolerance for ``|sum_c probs[b, c] - 1|`` (and for probabilities slightly
#: outside ``[0, 1]``) accepted by the classification metrics; for probabilities of a
#: low-precision dtype, its machine epsilon if that is larger (bfloat16: 2**-7).
PROB_SUM_ATOL: float = 1e-3

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


# what to pass instead of a prediction object given where a tensor is expected
_PREDICTION_HINTS = {
    "ClassificationPrediction": (
        "pass its .probs (or the whole prediction to classification_report(pred, labels))"
    ),
    "RegressionPrediction": (
        "pass its .sample_means and .sample_variances (or .mean for a point prediction), or "
        "the whole prediction to regression_report(pred, target)"
    ),
}


def _require_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        kind = type(x).__name__
        hint = _PREDICTION_HINTS.get(kind) if _is_prediction(x) else None
        raise TypeError(
            f"{name} must be a torch.Tensor, got {kind}" + (f": {hint}" if hint else "")
        )
    return x


def _is_prediction(x: object) -> bool:
    """Whether ``x`` is a :class:`bbb.ClassificationPrediction` or
    :class:`bbb.RegressionPrediction` (imported here: this module holds no model code)."""
    from .predictive import ClassificationPrediction, RegressionPrediction

    return isinstance(x, (ClassificationPrediction, RegressionPrediction))


def _require_finite(t: Tensor, name: str, *, allow_inf: bool = False) -> None:
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN values")
    if not allow_inf and torch.isinf(t).any():
        raise ValueError(f"{name} contains infinite values")


def _as_float64(x: object, name: str, *, allow_inf: bool = False) -> Tensor:
    """Check ``x`` is a real, finite tensor (``allow_inf``: +-inf allowed, NaN not) and
    return it as ``float64``."""
    t = _require_tensor(x, name)
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have a real numeric dtype, got {t.dtype}")
    t = t.detach().to(torch.float64)
    _require_finite(t, name, allow_inf=allow_inf)
    return t


def _check_classification(
    probs: object, labels: object, atol: float = PROB_SUM_ATOL
) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` (B, C) and ``labels`` (B,); return (float64 probs, int64 labels)."""
    p = _require_tensor(probs, "probs")
    y = _require_tensor(labels, "labels")
    if p.dim() != 2:
        raise ValueError(f"probs must have shape (B, C), got shape {_shape(p)}")
    if y.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got shape {_shape(y)}")
    B, C = p.shape
    if B == 0:
        raise ValueError(f"probs is empty (shape {_shape(p)}); need at least one example")
    if C == 0:
        raise ValueError(f"probs has no classes (shape {_shape(p)})")
    if y.shape[0] != B:
        raise ValueError(
            f"labels has shape {_shape(y)} but probs has shape {_shape(p)}; "
            f"expected labels of shape ({B},)"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if p.dtype.is_floating_point:
        # a bfloat16 softmax's rows sum to 1 only within its epsilon (2**-7; its values are
        # rounded to 8 significant bits): accept what the dtype can hold
        atol = max(atol, torch.finfo(p.dtype).eps)
    p = _as_float64(p, "probs")
    y = y.detach().to(device=p.device, dtype=torch.int64)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= C:
        raise ValueError(
            f"labels must be in range [0, {C}) for probs with {C} classes, "
            f"got values in [{lo}, {hi}]"
        )
    if (p < -atol).any() or (p > 1.0 + atol).any():
        raise ValueError(
            f"probs must lie in [0, 1], got values in [{p.min().item():.6g}, "
            f"{p.max().item():.6g}]. Pass probabilities (e.g. softmax outputs), not logits"
        )
    sums = p.sum(dim=1)
    dev = (sums - 1.0).abs()
    if (dev > atol).any():
        i = int(dev.argmax())
        raise ValueError(
            f"each row of probs must sum to 1 (atol={atol:g}); row {i} sums to "
            f"{sums[i].item():.6g}. Pass probabilities (e.g. softmax outputs), not logits"
        )
    return p, y


def _as_2d(t: Tensor, name: str) -> Tensor:
    """Treat (B,) as (B, 1); accept (B, D); reject anything else."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t
    raise ValueError(f"{name} must have shape (B,) or (B, D), got shape {_shape(t)}")


def _check_matching_2d(**tensors: object) -> list[Tensor]:
    """Validate tensors of shape (B,) or (B, D) that must agree after (B,) -> (B, 1)."""
    names = list(tensors)
    raw = [_as_float64(tensors[name], name) for name in names]
    out = [_as_2d(t, name) for t, name in zip(raw, names, strict=True)]
    ref = out[0]
    if ref.shape[0] == 0:
        raise ValueError(f"{names[0]} is empty (shape {_shape(raw[0])}); need B >= 1")
    for name, r, t in zip(names[1:], raw[1:], out[1:], strict=True):
        if t.shape != ref.shape:
            raise ValueError(
                f"shape mismatch: {names[0]} has shape {_shape(raw[0])} but {name} has "
                f"shape {_shape(r)} ((B,) is treated as (B, 1))"
            )
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {ref.device}")
    return out


def _require_positive(t: Tensor, name: str) -> None:
    if (t <= 0).any():
        raise ValueError(f"{name} must be strictly positive, got minimum {t.min().item():.6g}")


def _check_n_bins(n_bins: int) -> None:
    # any integer type (Python, NumPy), not a bool
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


# --------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class equals the label.

    Args:
        probs: predictive probabilities, shape ``(B, C)``; rows sum to 1.
        labels: integer class labels, shape ``(B,)``, values in ``[0, C)``.

    Returns:
        Accuracy as a fraction in ``[0, 1]`` (not a percentage). Ties in ``probs`` are
        broken by :func:`torch.argmax` (the first maximal class).
    """
    p, y = _check_classification(probs, labels)
    return (p.argmax(dim=1) == y).to(torch.float64).mean().item()


def error(probs: Tensor, labels: Tensor) -> float:
    """Classification error rate, ``1 - accuracy(probs, labels)``.

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.

    Returns:
        Fraction of misclassified examples in ``[0, 1]`` (not a percentage).
    """
    return 1.0 - accuracy(probs, labels)


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels under the predictive distribution.

    ``-(1/B) * sum_b log(max(probs[b, labels[b]], eps))``.

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.
        eps: lower clamp on the probability of the true class, in (0, 1), so that a zero
            probability gives the finite value ``-log(eps)`` (27.6 nats) instead of ``inf``.

    Returns:
        Mean NLL in nats per example (>= 0).
    """
    if not 0 < eps < 1:  # eps >= 1 would clamp every probability: a negative or zero NLL
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    p, y = _check_classification(probs, labels)
    p_true = p.gather(1, y.unsqueeze(1)).squeeze(1).clamp(min=eps)
    return (-p_true.log()).mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score.

    Convention (Brier 1950): for each example the squared error is **summed over classes**,
    ``sum_c (probs[b, c] - onehot(labels[b])_c)^2``, and then **averaged over examples**.
    The score therefore lies in ``[0, 2]``; a perfect one-hot prediction scores 0 and the
    uniform prediction scores ``(C - 1) / C``. (Some libraries divide additionally by C.)

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.

    Returns:
        Brier score (dimensionless, lower is better).
    """
    p, y = _check_classification(probs, labels)
    onehot = torch.nn.functional.one_hot(y, num_classes=p.shape[1]).to(p.dtype)
    return (p - onehot).pow(2).sum(dim=1).mean().item()


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin statistics for a reliability diagram (top-label confidence).

    Attributes:
        bin_edges: ``(n_bins + 1,)`` equally spaced edges ``0, 1/n_bins, ..., 1``. Bin ``i``
            is the interval ``(bin_edges[i], bin_edges[i + 1]]`` (bin 0 also contains 0).
        bin_confidence: ``(n_bins,)`` mean top-label confidence of the examples in each
            bin; NaN for empty bins.
        bin_accuracy: ``(n_bins,)`` fraction of correctly classified examples in each bin;
            NaN for empty bins.
        bin_count: ``(n_bins,)`` number of examples in each bin (int64); sums to B.

    All tensors are ``float64`` (``bin_count``: ``int64``) on the CPU.
    """

    bin_edges: Tensor
    bin_confidence: Tensor
    bin_accuracy: Tensor
    bin_count: Tensor

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(self.bin_count.numel())

    def ece(self) -> float:
        """Expected calibration error implied by these bins (see
        :func:`expected_calibration_error`)."""
        total = self.bin_count.sum()
        nonempty = self.bin_count > 0
        weights = self.bin_count[nonempty].to(torch.float64) / total
        gaps = (self.bin_accuracy[nonempty] - self.bin_confidence[nonempty]).abs()
        return (weights * gaps).sum().item()


def reliability_diagram_data(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityData:
    """Bin examples by top-label confidence into equal-width bins on ``[0, 1]``.

    The top-label confidence of example ``b`` is ``max_c probs[b, c]``; it is counted as
    correct when ``argmax_c probs[b, c] == labels[b]``. Bins are ``(i/n, (i+1)/n]``
    (Guo et al., 2017, "On Calibration of Modern Neural Networks"); for float32/float16
    probabilities an edge ``k/n`` is compared as it is stored in their dtype, so a confidence
    of exactly ``k/n`` (to the dtype's rounding) falls in bin ``k - 1`` whatever the dtype.

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.
        n_bins: number of equal-width bins (>= 1).

    Returns:
        A :class:`ReliabilityData` with per-bin edges, mean confidence, accuracy and count.
    """
    _check_n_bins(n_bins)
    n_bins = int(n_bins)
    p, y = _check_classification(probs, labels)
    src_dtype = probs.dtype
    conf, pred = p.max(dim=1)
    conf = conf.clamp(0.0, 1.0).cpu()
    correct = (pred == y).to(torch.float64).cpu()
    # k / n_bins by division (correctly rounded, like a confidence computed as k / n), not
    # linspace's start + k * step, which misplaces confidences lying exactly on an edge
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    inner = edges[1:-1]
    if src_dtype.is_floating_point and src_dtype != torch.float64:
        # a float32/float16 confidence k / n is stored as k / n rounded to its dtype (float32
        # 0.6 is 0.6000000238...): compare with the edges rounded the same way, so that it
        # falls in the bin (i/n, k/n] as in float64, not in the next one
        inner = inner.to(src_dtype).to(torch.float64)
    # bucketize with right=False: index i such that edges[i] < conf <= edges[i+1].
    idx = torch.bucketize(conf, inner.contiguous(), right=False)
    count = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    denom = count.to(torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    bin_conf = torch.where(count > 0, conf_sum / denom.clamp(min=1.0), nan)
    bin_acc = torch.where(count > 0, corr_sum / denom.clamp(min=1.0), nan)
    return ReliabilityData(
        bin_edges=edges, bin_confidence=bin_conf, bin_accuracy=bin_acc, bin_count=count
    )


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) of the top-label confidence.

    ``ECE = sum_i (|B_i| / B) * |acc(B_i) - conf(B_i)|`` over equal-width confidence bins
    ``B_i = (i/n_bins, (i+1)/n_bins]`` (Guo et al., 2017); empty bins contribute 0.

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.
        n_bins: number of equal-width bins (>= 1); 15 as in Guo et al.

    Returns:
        ECE as a fraction in ``[0, 1]`` (multiply by 100 for percent).
    """
    return reliability_diagram_data(probs, labels, n_bins=n_bins).ece()


def plot_reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram (accuracy vs confidence per bin) as a PNG file.

    The upper panel shows per-bin accuracy (bars), the gap to the mean confidence (hatched)
    and the diagonal of perfect calibration, with the ECE in the legend; the lower panel
    shows the number of examples per bin. Matplotlib is imported lazily and the figure is
    rendered with the non-interactive Agg canvas, without touching ``pyplot`` or the global
    backend.

    Args:
        probs: predictive probabilities, shape ``(B, C)``.
        labels: integer class labels, shape ``(B,)``.
        path: output file; parent directories are created if needed.
        n_bins: number of equal-width confidence bins.
        title: optional figure title.

    Returns:
        The path written to, as a :class:`pathlib.Path`.
    """
    data = reliability_diagram_data(probs, labels, n_bins=n_bins)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = data.bin_edges.numpy()
    width = float(edges[1] - edges[0])
    left = edges[:-1]
    nonempty = (data.bin_count > 0).numpy()
    acc = torch.nan_to_num(data.bin_accuracy, nan=0.0).numpy()
    conf = torch.nan_to_num(data.bin_confidence, nan=0.0).numpy()
    counts = data.bin_count.numpy()

    fig = Figure(figsize=(5.0, 6.0))
    FigureCanvasAgg(fig)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        left[nonempty],
        acc[nonempty],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    ax.bar(
        left[nonempty],
        (conf - acc)[nonempty],
        bottom=acc[nonempty],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", title=f"ECE = {100.0 * data.ece():.2f}%")
    if title is not None:
        ax.set_title(title)
    ax_hist.bar(left, counts, width=width, align="edge", color="gray", edgecolor="black")
    ax_hist.set_xlabel("confidence (top-label probability)")
    ax_hist.set_ylabel("count")
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


# --------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------


def rmse(mean: Tensor, target: Tensor) -> float:
    """Root-mean-squared error between predictions and targets.

    ``sqrt(mean_{b,d} (mean[b, d] - target[b, d])^2)`` - the mean runs over all examples
    and output dimensions (for D = 1 this is the usual RMSE).

    Args:
        mean: point predictions, shape ``(B,)`` or ``(B, D)``.
        target: targets, same shape as ``mean`` (``(B,)`` and ``(B, 1)`` are interchangeable).

    Returns:
        RMSE in the units of ``target``.
    """
    m, t = _check_matching_2d(mean=mean, target=target)
    return (m - t).pow(2).mean().sqrt().item()


def _gaussian_log_density(mean: Tensor, var: Tensor, target: Tensor) -> Tensor:
    """Elementwise ``log N(target; mean, var)`` (float64, broadcasting)."""
    return -0.5 * (_LOG_2PI + var.log() + (target - mean).pow(2) / var)


def gaussian_log_likelihood(mean: Tensor, var: Tensor, target: Tensor) -> float:
    """Mean over examples of the Gaussian log-likelihood of the targets.

    ``(1/B) * sum_b sum_d log N(target[b, d]; mean[b, d], var[b, d])`` - summed over output
    dimensions (a diagonal Gaussian), averaged over examples.

    Args:
        mean: predictive means, shape ``(B,)`` or ``(B, D)``.
        var: predictive variances (not standard deviations), same shape, strictly positive.
        target: targets, same shape.

    Returns:
        Log-likelihood in nats per example (higher is better), in the units of the inputs.
    """
    m, v, t = _check_matching_2d(mean=mean, var=var, target=target)
    _require_positive(v, "var")
    return _gaussian_log_density(m, v, t).sum(dim=1).mean().item()


def _check_mixture(means: object, vars: object, target: object) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (S, B, D) means/vars and (B, D)/(B,) target; return float64 3-D/2-D tensors."""
    mu = _as_float64(means, "means")
    var = _as_float64(vars, "vars")
    y = _as_float64(target, "target")
    two_d = mu.dim() == 2
    if two_d:  # (S, B) with scalar outputs
        mu = mu.unsqueeze(2)
    if var.dim() == 2:
        var = var.unsqueeze(2)
    if mu.dim() != 3:
        raise ValueError(f"means must have shape (S, B, D) or (S, B), got shape {_shape(mu)}")
    if var.shape != mu.shape:
        raise ValueError(
            f"vars must have the same shape as means {_shape(mu)}, got shape {_shape(var)}"
        )
    S, B, D = mu.shape
    if S == 0 or B == 0:
        raise ValueError(f"means is empty (shape {_shape(mu)}); need S >= 1 and B >= 1")
    y2 = _as_2d(y, "target")
    if y2.shape != (B, D):
        raise ValueError(
            f"target must have shape ({B}, {D})"
            + (f" or ({B},)" if D == 1 else "")
            + f" to match means of shape {_shape(mu)}, got shape {_shape(y)}"
            + (
                " (a 2-D means is read as (S, B): S weight samples of B scalar outputs; for"
                " one prediction per example, of shape (B, D), pass means.unsqueeze(0) and"
                " vars.unsqueeze(0))"
                if two_d
                else ""
            )
        )
    _require_positive(var, "vars")
    return mu, var, y2


def _check_y_scale(y_scale: float) -> None:
    # any real number type (Python, NumPy), not a bool
    if not (
        isinstance(y_scale, numbers.Real)
        and not isinstance(y_scale, bool)
        and math.isfinite(y_scale)
        and y_scale > 0
    ):
        raise ValueError(f"y_scale must be a finite positive number, got {y_scale!r}")


def mixture_gaussian_log_likelihood(
    means: Tensor, vars: Tensor, target: Tensor, y_scale: float = 1.0
) -> float:
    """Test log-likelihood of the Monte-Carlo mixture predictive (the standard UCI metric).

    With S posterior samples each giving a diagonal Gaussian ``N(mu_s, diag(var_s))``, the
    predictive is the equal-weight mixture and the metric is

        ``(1/B) * sum_b log( (1/S) * sum_s N(y_b; mu_{s,b}, diag(var_{s,b})) )``

    computed stably with ``logsumexp`` over s (the D output dims are summed inside each
    component, i.e. each sample is a joint D-dimensional Gaussian).

    Normalised targets: if the model was trained on ``y_norm = (y - m) / s``, pass
    ``means``, ``vars`` and ``target`` in *normalised* units and ``y_scale=s``. The result
    is then the log-likelihood in the *original* units of y: by the change of variables
    ``y = m + s * y_norm`` each output dimension contributes ``-log(s)``, so
    ``D * log(s)`` is subtracted. With ``y_scale=1`` the result is in the inputs' units.

    Args:
        means: per-sample predictive means, shape ``(S, B, D)`` (or ``(S, B)`` for D = 1).
        vars: per-sample predictive variances, same shape, strictly positive.
        target: targets, shape ``(B, D)`` or ``(B,)`` (the latter only for D = 1).
        y_scale: the standard deviation ``s`` used to normalise the targets (> 0).

    Returns:
        Mean log-likelihood in nats per example (higher is better).
    """
    _check_y_scale(y_scale)
    mu, var, y = _check_mixture(means, vars, target)
    S, _, D = mu.shape
    log_comp = _gaussian_log_density(mu, var, y.unsqueeze(0)).sum(dim=2)  # (S, B)
    log_mix = torch.logsumexp(log_comp, dim=0) - math.log(S)  # (B,)
    return (log_mix.mean() - D * math.log(y_scale)).item()


def regression_report(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    y_scale: float = 1.0,
) -> dict[str, float]:
    """RMSE of the mixture mean and mixture test log-likelihood.

    Two call forms: ``regression_report(means, vars, target, y_scale=1.0)`` with tensors, or
    ``regression_report(pred, target, y_scale=1.0)`` with the
    :class:`bbb.RegressionPrediction` that :func:`bbb.predict` returns (its
    ``sample_means`` and ``sample_variances`` are the means and vars; the same numbers).

    Args:
        means: per-sample predictive means, shape ``(S, B, D)`` (or ``(S, B)``); or a
            :class:`bbb.RegressionPrediction`.
        vars: per-sample predictive variances, same shape, strictly positive (with a
            prediction: the target, when given positionally).
        target: targets, shape ``(B, D)`` or ``(B,)``.
        y_scale: normalisation scale of the targets (see
            :func:`mixture_gaussian_log_likelihood`); inputs in normalised units.

    Returns:
        ``{"rmse": ..., "log_likelihood": ...}`` where ``rmse`` is the RMSE of the
        predictive mean ``(1/S) sum_s mu_s`` multiplied by ``y_scale`` (so in original
        units) and ``log_likelihood`` is
        ``mixture_gaussian_log_likelihood(means, vars, target, y_scale)`` (nats/example,
        original units).
    """
    means_in, vars_in, target_in = _report_inputs(means, vars, target)
    _check_y_scale(y_scale)
    mu, var, y = _check_mixture(means_in, vars_in, target_in)
    return {
        "rmse": rmse(mu.mean(dim=0), y) * y_scale,
        "log_likelihood": mixture_gaussian_log_likelihood(mu, var, y, y_scale=y_scale),
    }


def _report_inputs(means: object, vars: object, target: object) -> tuple[object, object, object]:
    """(means, vars, target) of :func:`regression_report`'s either call form."""
    from .predictive import ClassificationPrediction, RegressionPrediction

    if isinstance(means, ClassificationPrediction):
        raise TypeError(
            "regression_report got a ClassificationPrediction: use "
            "classification_report(pred, labels) for a classifier's predictions"
        )
    if isinstance(means, RegressionPrediction):
        if vars is not None and target is not None:
            raise TypeError(
                "regression_report(pred, target, y_scale=...): with a RegressionPrediction the "
                "variances come from pred.sample_variances; pass the target once and y_scale "
                "by keyword"
            )
        y = target if vars is None else vars
        if y is None:
            raise TypeError("regression_report(pred, target) needs the targets")
        return means.sample_means, means.sample_variances, y
    missing = [name for name, v in (("vars", vars), ("target", target)) if v is None]
    if missing:
        raise TypeError(
            f"regression_report(means, vars, target) is missing {' and '.join(missing)} (or "
            "pass the RegressionPrediction of bbb.predict: regression_report(pred, target))"
        )
    return means, vars, target


# --------------------------------------------------------------------------------------
# out-of-distribution detection
# --------------------------------------------------------------------------------------


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of the entries of a 1-D tensor, ties getting their average rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    start = torch.cumsum(counts, dim=0) - counts  # number of strictly smaller values
    return (start + (counts + 1.0) / 2.0)[inverse]


def auroc(scores_negative: Tensor, scores_positive: Tensor) -> float:
    """Area under the ROC curve for separating two sets of scores.

    The positive set is the one expected to score *higher* (e.g. predictive entropy of
    out-of-distribution inputs as positives vs in-distribution inputs as negatives). The
    result is computed exactly from ranks (Mann-Whitney U statistic):

        ``AUROC = P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg)``

    over all pairs, i.e. ties count as 1/2. Hence ``auroc(a, b) == 1 - auroc(b, a)``.

    Scores may be +-inf (e.g. an entropy or a log-variance that overflowed): they rank above
    (below) every finite score, and equal infinities are ties like any equal scores. NaN
    scores have no rank and are refused.

    Args:
        scores_negative: scores of the negative set, shape ``(N_neg,)``, N_neg >= 1.
        scores_positive: scores of the positive set, shape ``(N_pos,)``, N_pos >= 1.

    Returns:
        AUROC in ``[0, 1]``: 1 for perfect separation, 0.5 for chance/identical sets.
    """
    # +-inf is ranked like any score (was refused as "contains infinite values")
    neg = _as_float64(scores_negative, "scores_negative", allow_inf=True)
    pos = _as_float64(scores_positive, "scores_positive", allow_inf=True)
    for name, t in (("scores_negative", neg), ("scores_positive", pos)):
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (N,), got shape {_shape(t)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {_shape(t)})")
    if neg.device != pos.device:
        raise ValueError(f"scores_negative is on {neg.device} but scores_positive on {pos.device}")
    n_neg, n_pos = neg.numel(), pos.numel()
    both = torch.cat([neg, pos])
    raw_neg, raw_pos = scores_negative, scores_positive
    if not (raw_neg.dtype.is_floating_point or raw_pos.dtype.is_floating_point):
        # integer scores are ranked as integers: float64 holds them exactly only up to 2**53
        # (counts, hashes or timestamps in ns beyond it tied in float64, pulling the AUROC to 0.5)
        both = torch.cat(
            [raw_neg.detach().to(torch.int64), raw_pos.detach().to(neg.device, torch.int64)]
        )
    ranks = _average_ranks(both)
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2.0
    return (u / (n_neg * n_pos)).clamp(0.0, 1.0).item()


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------


def classification_report(
    probs: Tensor | ClassificationPrediction,
    labels: Tensor,
    n_bins: int = 15,
    log_probs: Tensor | None = None,
) -> dict[str, float]:
    """All classification metrics at once.

    Two call forms: ``classification_report(probs, labels, ...)`` with tensors, or
    ``classification_report(pred, labels, ...)`` with the
    :class:`bbb.ClassificationPrediction` that :func:`bbb.predict` returns (its ``probs``,
    and its ``log_probs`` for the exact NLL when it has them).

    Args:
        probs: predictive probabilities, shape ``(B, C)``; or a
            :class:`bbb.ClassificationPrediction`.
        labels: integer class labels, shape ``(B,)``.
        n_bins: number of ECE bins.
        log_probs: optional ``(B, C)`` log predictive probabilities computed without
            underflow (``bbb.predict(...).log_probs``, a log-sum-exp over the weight
            samples): the NLL is then exact, where :func:`nll` of ``probs`` clamps each
            probability at 1e-12 (at most 27.6 nats per example). They must be the log of
            ``probs`` (``exp(log_probs)`` within :data:`PROB_SUM_ATOL` of ``probs``; -inf
            where a probability is 0): logits or the log-probabilities of other examples
            are a ``ValueError``.

    Returns:
        ``{"error", "accuracy", "nll", "ece", "brier"}`` as floats; error, accuracy and ece
        are fractions in ``[0, 1]``, nll is in nats per example, brier as in :func:`brier`.
    """
    from .predictive import ClassificationPrediction, RegressionPrediction

    if isinstance(probs, RegressionPrediction):
        raise TypeError(
            "classification_report got a RegressionPrediction: use "
            "regression_report(pred, target) for a regression model's predictions"
        )
    if isinstance(probs, ClassificationPrediction):
        if log_probs is not None and probs.log_probs is not None:
            raise TypeError(
                "classification_report(pred, labels): the prediction holds its log_probs "
                "already; do not pass log_probs too"
            )
        if log_probs is None:
            log_probs = probs.log_probs
        probs = probs.probs
    _check_n_bins(n_bins)
    _check_classification(probs, labels)
    # each metric gets the original probabilities: their dtype sets the tolerance on the row
    # sums and places confidences on the bin edges
    acc = accuracy(probs, labels)
    if log_probs is None:
        nll_value = nll(probs, labels)
    else:
        lp = _check_log_probs(log_probs, probs)
        picked = lp.gather(1, labels.long().view(-1, 1).to(lp.device))
        nll_value = -float(picked.mean())
    return {
        "error": 1.0 - acc,
        "accuracy": acc,
        "nll": nll_value,
        "ece": expected_calibration_error(probs, labels, n_bins=n_bins),
        "brier": brier(probs, labels),
    }


def _check_log_probs(log_probs: object, probs: Tensor) -> Tensor:
    """``log_probs`` as float64, checked to be the log of ``probs`` (validated already)."""
    lp = _require_tensor(log_probs, "log_probs")
    if lp.shape != probs.shape:
        raise ValueError(
            f"log_probs must have the shape of probs {tuple(probs.shape)}, got {tuple(lp.shape)}"
        )
    if not lp.dtype.is_floating_point:
        raise TypeError(f"log_probs must be a floating-point tensor, got dtype {lp.dtype}")
    # the tolerance of the row sums of probs (see _check_classification), or log_probs' epsilon
    atol = max(PROB_SUM_ATOL, torch.finfo(lp.dtype).eps)
    if probs.dtype.is_floating_point:
        atol = max(atol, torch.finfo(probs.dtype).eps)
    lp = lp.detach().to(torch.float64)
    if torch.isnan(lp).any():
        raise ValueError("log_probs contains NaN values")
    # -inf is the log of a zero probability; anything above 0 is no log-probability
    p = probs.detach().to(device=lp.device, dtype=torch.float64)
    gap = (lp.exp() - p).abs()
    if (gap > atol).any() or (lp > atol).any():
        i = int(gap.amax(dim=1).argmax())
        raise ValueError(
            f"log_probs must be the log of probs (exp(log_probs) within {atol:g} of probs), "
            f"but row {i} of exp(log_probs) differs from it by up to "
            f"{gap[i].max().item():.6g} (log_probs in [{lp.min().item():.6g}, "
            f"{lp.max().item():.6g}]). Pass log predictive probabilities (e.g. "
            "bbb.predict(...).log_probs) of the same examples, not logits"
        )
    return lp
