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
Calibration of that mixture predictive: :func:`pit_values` (the exact predictive CDF at
each target), :func:`interval_coverage` (central intervals from the exact mixture
quantiles), :func:`regression_calibration_data` / :func:`regression_calibration_error`
(the calibration curve of Kuleshov et al., 2018), :func:`crps` (closed form, target
units), :func:`regression_calibration_report` and :func:`plot_regression_calibration`.
Multi-output targets are judged per output dimension (its marginal predictive) and pooled
over the B * D (example, output) pairs; the per-output values are kept too.

Every function validates its inputs and raises ``TypeError`` (not a tensor, wrong dtype) or
``ValueError`` (wrong shape - the actual shape is named in the message -, NaN/inf values,
probabilities that do not sum to 1, labels out of range, non-positive variances).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .predictive import ClassificationPrediction, RegressionPrediction

__all__ = [
    "CALIBRATION_ERROR_KINDS",
    "DEFAULT_COVERAGE_LEVELS",
    "PROB_SUM_ATOL",
    "IntervalCoverage",
    "RegressionCalibrationData",
    "ReliabilityData",
    "accuracy",
    "auroc",
    "brier",
    "classification_report",
    "crps",
    "error",
    "expected_calibration_error",
    "gaussian_log_likelihood",
    "interval_coverage",
    "mixture_gaussian_log_likelihood",
    "nll",
    "pit_values",
    "plot_regression_calibration",
    "plot_reliability_diagram",
    "regression_calibration_data",
    "regression_calibration_error",
    "regression_calibration_report",
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
    if x.is_meta:
        # a meta tensor has a shape but no values: every check below failed deep inside
        # torch ("Tensor.item() cannot be called on meta tensors")
        raise ValueError(
            f"{name} is a meta tensor (shape {_shape(x)}, no values): metrics need values; "
            "run the model on a real device (cpu or cuda), e.g. after model.to_empty(device=...) "
            "and loading its weights"
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
    # at most 2 for probabilities that sum to 1; float32 ones sum to 1 only up to rounding
    # (a confident wrong softmax scored 2.000000000000001), so the bound is applied here
    return min((p - onehot).pow(2).sum(dim=1).mean().item(), 2.0)


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


def _check_mixture(
    means: object, vars: object, target: object, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (S, B, D) means/vars and (B, D)/(B,) target for the function named ``fn``;
    return float64 3-D/2-D tensors, the targets on the predictions' device (see
    :func:`_on_predictions_device`). Every function of a mixture predictive checks its
    inputs here."""
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
    return _on_predictions_device(mu, var, y2, fn)


def _on_predictions_device(
    mu: Tensor, var: Tensor, y: Tensor, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mu, var, y)`` with the targets ``y`` moved to the device of the means ``mu``, as
    :meth:`bbb.RegressionPrediction.log_prob` does (targets on the CPU, predictions on the
    model's device); variances on another device than the means are refused, naming ``fn``.
    Before, ``regression_report`` and ``mixture_gaussian_log_likelihood`` did neither (torch's
    "Expected all tensors to be on the same device", or rmse's "target is on cpu")."""
    if var.device != mu.device:
        raise ValueError(f"{fn}: vars is on {var.device} but means is on {mu.device}")
    return mu, var, y.to(mu.device)


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
    mu, var, y = _check_mixture(means, vars, target, "mixture_gaussian_log_likelihood")
    return _mixture_log_likelihood(mu, var, y, y_scale)


def _mixture_log_likelihood(mu: Tensor, var: Tensor, y: Tensor, y_scale: float) -> float:
    """:func:`mixture_gaussian_log_likelihood` of checked float64 ``(S, B, D)`` ``mu`` and
    ``var`` and ``(B, D)`` ``y`` on one device (nats per example)."""
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
    _check_y_scale(y_scale)
    mu, var, y = _regression_inputs(means, vars, target, "regression_report")
    return {
        "rmse": rmse(mu.mean(dim=0), y) * y_scale,
        "log_likelihood": _mixture_log_likelihood(mu, var, y, y_scale),
    }


def _report_inputs(
    means: object, vars: object, target: object, fn: str = "regression_report"
) -> tuple[object, object, object]:
    """(means, vars, target) of either call form of :func:`regression_report` (or of the
    regression function named ``fn``, which takes the same two forms)."""
    from .predictive import ClassificationPrediction, RegressionPrediction

    if isinstance(means, ClassificationPrediction):
        raise TypeError(
            f"{fn} got a ClassificationPrediction: use "
            "classification_report(pred, labels) for a classifier's predictions"
        )
    if isinstance(means, RegressionPrediction):
        if vars is not None and target is not None:
            raise TypeError(
                f"{fn}(pred, target, ...): with a RegressionPrediction the "
                "variances come from pred.sample_variances; pass the target once and the "
                "options (y_scale, ...) by keyword"
                if fn != "regression_report"
                else "regression_report(pred, target, y_scale=...): with a RegressionPrediction "
                "the variances come from pred.sample_variances; pass the target once and "
                "y_scale by keyword"
            )
        y = target if vars is None else vars
        if y is None:
            raise TypeError(f"{fn}(pred, target) needs the targets")
        return means.sample_means, means.sample_variances, y
    missing = [name for name, v in (("vars", vars), ("target", target)) if v is None]
    if missing:
        raise TypeError(
            f"{fn}(means, vars, target) is missing {' and '.join(missing)} (or "
            f"pass the RegressionPrediction of bbb.predict: {fn}(pred, target))"
        )
    return means, vars, target


# --------------------------------------------------------------------------------------
# regression: calibration of the predictive distribution
# --------------------------------------------------------------------------------------

#: Nominal levels of the central predictive intervals that :func:`interval_coverage` and
#: :func:`regression_calibration_report` check by default.
DEFAULT_COVERAGE_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)

#: The scalar summaries of a regression calibration curve (see
#: :meth:`RegressionCalibrationData.calibration_error`).
CALIBRATION_ERROR_KINDS: tuple[str, ...] = ("mean_absolute", "root_mean_square", "max")

# elements of float64 work per chunk of the quantile solver and of the CRPS (each temporary
# of that many float64 values takes 32 MiB)
_CHUNK_ELEMENTS = 1 << 22


def _regression_inputs(
    means: object, vars: object, target: object, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated float64 ``(S, B, D)`` means and variances and ``(B, D)`` targets (on the
    means' device) from either call form (tensors, or a :class:`bbb.RegressionPrediction` and
    the targets), for the function named ``fn``."""
    means_in, vars_in, target_in = _report_inputs(means, vars, target, fn=fn)
    return _check_mixture(means_in, vars_in, target_in, fn)


def _check_probability_levels(levels: object, name: str, *, sort: bool) -> Tensor:
    """``levels`` (a probability or a sequence/1-D tensor of them, each in the open interval
    (0, 1), no repeats) as a float64 CPU tensor; sorted when ``sort``."""
    if isinstance(levels, Tensor):
        _require_tensor(levels, name)  # not a meta tensor
        if levels.dim() > 1 or levels.dtype.is_complex or levels.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a probability or a 1-D sequence of probabilities in (0, 1), "
                f"got a tensor of shape {_shape(levels)} and dtype {levels.dtype}"
            )
        values: list[object] = list(levels.detach().cpu().reshape(-1).tolist())
    elif isinstance(levels, numbers.Real) and not isinstance(levels, bool):
        values = [levels]
    elif isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(
            f"{name} must be a probability or a sequence of probabilities in (0, 1), got {levels!r}"
        )
    else:
        values = list(levels)
    ok = all(
        isinstance(p, numbers.Real) and not isinstance(p, bool) and 0.0 < float(p) < 1.0
        for p in values
    )
    if not values or not ok:
        raise ValueError(
            f"{name} must be probabilities in the open interval (0, 1) (e.g. "
            f"{list(DEFAULT_COVERAGE_LEVELS)}), got {levels!r}"
        )
    t = torch.tensor([float(p) for p in values], dtype=torch.float64)  # type: ignore[arg-type]
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} must not repeat a level, got {levels!r}")
    return torch.sort(t).values if sort else t


def _calibration_grid(levels: int | Sequence[float] | Tensor) -> Tensor:
    """The grid of probabilities of a calibration curve: ``j / (n + 1)``, ``j = 1..n`` for an
    integer ``n``, else the given probabilities, sorted."""
    if isinstance(levels, numbers.Integral) and not isinstance(levels, bool):
        if levels < 1:
            raise ValueError(
                "levels must be a positive number of grid points (the grid is "
                f"j / (levels + 1), j = 1..levels) or a sequence of probabilities in (0, 1), "
                f"got {levels!r}"
            )
        n = int(levels)
        return torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    return _check_probability_levels(levels, "levels", sort=True)


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or kind not in CALIBRATION_ERROR_KINDS:
        raise ValueError(
            f"kind must be one of {', '.join(repr(k) for k in CALIBRATION_ERROR_KINDS)}, "
            f"got {kind!r}"
        )
    return kind


def _mixture_cdf(mu: Tensor, sd: Tensor, y: Tensor) -> Tensor:
    """``(1/S) sum_s Phi((y - mu_s) / sd_s)``: the equal-weight Gaussian mixture's CDF at
    ``y``; ``mu``/``sd`` ``(S, ...)``, ``y`` broadcastable to ``mu.shape[1:]``."""
    return torch.special.ndtr((y - mu) / sd).mean(0)


def _mixture_quantiles(mu: Tensor, var: Tensor, q: Tensor) -> Tensor:
    """Exact quantiles ``(Q, B, D)`` of the per-(b, d) equal-weight mixtures of the Gaussians
    ``N(mu[s, b, d], var[s, b, d])`` at the probabilities ``q`` ``(Q,)`` in [0, 1].

    Float64 root finding of ``log T(x) = log t``, with ``T`` the mixture's tail probability on
    the side of the smaller tail (the CDF below the median, the survival function above it,
    by ``log_ndtr`` and log-sum-exp: both tails keep their relative precision) and
    ``t = min(q, 1 - q)``, by Chandrupatla's bracketing method (inverse quadratic
    interpolation where it is safe, bisection otherwise; superlinear, never leaves the
    bracket). The bracket is ``[min_s, max_s] (mu_s + sd_s * Phi^-1(q))``: at the smallest
    component quantile every component CDF, hence the mixture's, is <= q, at the largest
    >= q. The first point tried in it is the quantile of the moment-matched Gaussian (close
    to the root for a near-Gaussian mixture, where the iterations are fewest). Each
    iteration costs O(S) per (level, example, output) still unsolved (solved ones leave the
    work arrays); about 10 reach float64 resolution (at most 100). ``q = 0`` and ``q = 1``
    give -inf and +inf. Where the mixture has no density over an interval of x
    (well-separated components) any root in it may be returned. The (level, example,
    output) problems are processed in chunks bounding each work array to about
    :data:`_CHUNK_ELEMENTS` values.
    """
    q = q.to(device=mu.device, dtype=torch.float64)
    S, B, D = mu.shape
    Q = q.numel()
    out = torch.empty((Q, B, D), dtype=torch.float64, device=mu.device)
    inner = (q > 0) & (q < 1)
    out[q == 0] = -math.inf
    out[q == 1] = math.inf
    if not bool(inner.any()):
        return out
    qi = q[inner]
    Qi = qi.numel()
    n_cols = B * D
    # (B D, S): each mixture's components contiguous, so that every reduction over them
    # runs in the same order whatever the other problems solved with it (a quantile does not
    # depend on the other levels asked for); one float64 copy of each input
    mu_f = torch.empty((n_cols, S), dtype=torch.float64, device=mu.device)
    mu_f.copy_(mu.reshape(S, n_cols).T)
    sd_f = torch.empty((n_cols, S), dtype=torch.float64, device=mu.device)
    sd_f.copy_(var.reshape(S, n_cols).T).sqrt_()
    # the moment-matched Gaussian of each mixture: its mean and standard deviation
    mean = mu_f.mean(1)
    spread = (sd_f.pow(2).mean(1) + mu_f.var(1, correction=0)).sqrt()
    # per level: +1 the lower tail (the CDF), -1 the upper tail (the survival function)
    level_sign = torch.where(qi > 0.5, -1.0, 1.0).to(torch.float64)
    level_log_t = torch.minimum(qi, 1.0 - qi).log()
    level_z = torch.special.ndtri(qi)
    eps = torch.finfo(torch.float64).eps
    log_s = math.log(S)
    solved = torch.empty(Qi * n_cols, dtype=torch.float64, device=mu.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, S))
    for start in range(0, Qi * n_cols, chunk):
        # problem p: level p // n_cols, column (example, output) p % n_cols
        pid = torch.arange(
            start, min(start + chunk, Qi * n_cols), device=mu.device, dtype=torch.long
        )
        lvl, col = pid // n_cols, pid % n_cols
        sign, log_t, z = level_sign[lvl], level_log_t[lvl], level_z[lvl]

        # each unsolved problem's components (n, S), and sign / sd: the tail's argument is
        # (x - m) * w (kept alongside the state, compacted with it, not gathered per step)
        m_c = mu_f[col]
        sd_c = sd_f[col]
        w_c = sign.unsqueeze(1) / sd_c

        def f(x: Tensor, m_c: Tensor, w_c: Tensor, sign: Tensor, log_t: Tensor) -> Tensor:
            # sign * (log T(x) - log t): increasing in x, zero at the quantile
            u = (x.unsqueeze(1) - m_c).mul_(w_c)
            log_tail = torch.logsumexp(torch.special.log_ndtr(u), dim=1) - log_s
            return sign * (log_tail - log_t)

        comp = m_c + sd_c * z.unsqueeze(1)  # (n, S): each component's own quantile
        lo, hi = comp.amin(1), comp.amax(1)
        del comp
        flo = f(lo, m_c, w_c, sign, log_t)
        fhi = f(hi, m_c, w_c, sign, log_t)
        # Chandrupatla's a (the newest point), b (the other end of the bracket), c (the
        # point before); the first point tried is the moment-matched Gaussian's quantile
        a, fa, b, fb = hi, fhi, lo, flo
        guess = torch.minimum(hi, torch.maximum(lo, mean[col] + spread[col] * z))
        t = torch.nan_to_num((guess - a) / (b - a), nan=0.5)
        best_a = fa.abs() < fb.abs()
        x = torch.where(best_a, a, b)
        # x is known to about eps / density: eps times the components' spread near 0
        atol = 2 * eps * sd_c.mean(1)
        del sd_c
        done = (a == b) | (fa == 0) | (fb == 0)
        local = pid - start  # where each unsolved problem's answer goes in this chunk
        result = torch.empty_like(x)
        result[local[done]] = x[done]
        keep = ~done
        a, fa, b, fb, x, atol = a[keep], fa[keep], b[keep], fb[keep], x[keep], atol[keep]
        c, fc = a.clone(), fa.clone()
        m_c, w_c, sign, log_t = m_c[keep], w_c[keep], sign[keep], log_t[keep]
        local, t = local[keep], t[keep]
        for _ in range(100):
            if local.numel() == 0:
                break
            xt = a + t * (b - a)
            ft = f(xt, m_c, w_c, sign, log_t)
            same = torch.sign(ft) == torch.sign(fa)
            # same side as a: c <- a; else c <- b, b <- a; then a <- xt
            c, fc = torch.where(same, a, b), torch.where(same, fa, fb)
            b, fb = torch.where(same, b, a), torch.where(same, fb, fa)
            a, fa = xt, ft
            better_a = fa.abs() < fb.abs()
            x = torch.where(better_a, a, b)
            fm = torch.where(better_a, fa, fb)
            tlim = (2 * eps * x.abs() + atol) / (b - c).abs()
            done = (fm == 0) | (tlim > 0.5)
            if bool(done.any()):
                result[local[done]] = x[done]
                keep = ~done
                a, fa, b, fb, c, fc = a[keep], fa[keep], b[keep], fb[keep], c[keep], fc[keep]
                x, atol, tlim = x[keep], atol[keep], tlim[keep]
                m_c, w_c, sign, log_t = m_c[keep], w_c[keep], sign[keep], log_t[keep]
                local = local[keep]
            xi = (a - b) / (c - b)
            phi = (fa - fb) / (fc - fb)
            iqi = (phi * phi < xi) & ((1 - phi) * (1 - phi) < 1 - xi)
            t_iqi = fa / (fb - fa) * fc / (fb - fc) + (c - a) / (b - a) * fa / (fc - fa) * fb / (
                fc - fb
            )
            t = torch.where(iqi, t_iqi, 0.5)
            t = torch.minimum(1 - tlim, torch.maximum(tlim, t))
            t = torch.nan_to_num(t, nan=0.5)
        result[local] = x  # not converged in 100 iterations: the best point found
        solved[start : start + result.numel()] = result
    out[inner] = solved.view(Qi, B, D)
    return out


def pit_values(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Probability integral transform: the predictive CDF at each target, exactly.

    For the Monte-Carlo mixture predictive (S equal-weight Gaussians per example and output)
    the value for example ``b`` and output ``d`` is

        ``PIT[b, d] = (1/S) * sum_s Phi((y[b, d] - mu[s, b, d]) / sqrt(var[s, b, d]))``

    (``Phi`` the standard normal CDF), the CDF of output ``d``'s marginal predictive, which
    for a mixture of diagonal Gaussians is the mixture of the components' marginals. For a
    calibrated predictive the PIT values of independent targets are Uniform(0, 1): a
    U-shaped histogram means over-confident (too narrow) predictions, a hump in the middle
    under-confident ones, a slope a biased mean. Scale-free: normalised or original units
    give the same values.

    Two call forms, as :func:`regression_report`: ``pit_values(pred, target)`` with the
    :class:`bbb.RegressionPrediction` of :func:`bbb.predict`, or
    ``pit_values(means, vars, target)`` with tensors.

    Args:
        means: per-sample predictive means, shape ``(S, B, D)`` (or ``(S, B)`` for D = 1);
            or a :class:`bbb.RegressionPrediction`.
        vars: per-sample predictive variances, same shape, strictly positive (with a
            prediction: the target, when given positionally).
        target: targets, shape ``(B, D)`` or ``(B,)`` (the latter only for D = 1).

    Returns:
        ``(B, D)`` float64 tensor of values in ``[0, 1]``, on the inputs' device.
    """
    mu, var, y = _regression_inputs(means, vars, target, "pit_values")
    return _mixture_cdf(mu, var.sqrt(), y.unsqueeze(0))


@dataclass(frozen=True)
class IntervalCoverage:
    """Observed coverage and mean width of central predictive intervals.

    The central interval at level ``a`` is ``[F^-1((1 - a) / 2), F^-1((1 + a) / 2)]`` with
    ``F`` the (exact) predictive mixture CDF of an output. A target lies in it exactly when
    its PIT value lies in ``[(1 - a) / 2, (1 + a) / 2]``; that is how coverage is counted.

    Attributes:
        levels: ``(L,)`` nominal levels, in the order given.
        coverage: ``(L,)`` fraction of the ``B * D`` (example, output) pairs whose target lies
            in the interval (pooled over the outputs).
        coverage_per_output: ``(L, D)`` the same fraction per output dimension.
        mean_width: ``(L,)`` mean interval width over examples and outputs, in the targets'
            original units (normalised width times ``y_scale``).
        mean_width_per_output: ``(L, D)`` mean width per output dimension, original units.
        n_examples: B, the number of examples.

    All tensors are ``float64`` on the CPU.
    """

    levels: Tensor
    coverage: Tensor
    coverage_per_output: Tensor
    mean_width: Tensor
    mean_width_per_output: Tensor
    n_examples: int

    def standard_error(self) -> Tensor:
        """``(L,)`` binomial standard error ``sqrt(a (1 - a) / B)`` of one output's coverage
        for a calibrated predictive (independent examples): the noise to judge a gap
        ``coverage_per_output - levels`` by."""
        return (self.levels * (1.0 - self.levels) / self.n_examples).sqrt()

    def as_dict(self) -> dict[str, float]:
        """``{"coverage_<100 a>": coverage}`` for each level ``a`` (``coverage_90`` for 0.9,
        ``coverage_99.5`` for 0.995), pooled over the outputs."""
        return {
            _level_key("coverage", a): c
            for a, c in zip(self.levels.tolist(), self.coverage.tolist(), strict=True)
        }


def _level_key(prefix: str, level: float) -> str:
    """``"<prefix>_<100 level>"``: ``coverage_90`` for 0.9, ``coverage_99.5`` for 0.995,
    ``coverage_12.345678`` for 0.12345678 (every digit to 1e-10 percent: distinct levels give
    distinct keys; ``:g``'s 6 significant digits gave 0.9 and 0.9000001 one key)."""
    return f"{prefix}_{round(100.0 * level, 10):.15g}"


def interval_coverage(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    levels: float | Sequence[float] | Tensor = DEFAULT_COVERAGE_LEVELS,
    y_scale: float = 1.0,
) -> IntervalCoverage:
    """Coverage of the central predictive intervals at the nominal ``levels``.

    Uses the exact quantiles of the mixture predictive (:meth:`bbb.RegressionPrediction.
    quantiles` with ``method="exact"``), not Monte-Carlo draws: O(S B D) work per level and
    root-finding iteration for each (level, example, output) still unsolved (5 levels,
    S = 100, D = 1: about 0.75 s of one CPU core for B = 2000, 6 s for B = 10000; D = 3
    triples it). Multi-output targets: every
    output dimension has its own marginal interval; ``coverage`` pools the ``B * D``
    (example, output) pairs and ``coverage_per_output`` keeps them apart. For a calibrated
    predictive ``coverage_per_output[l, d]`` is within a few :meth:`IntervalCoverage.
    standard_error` of ``levels[l]``; well below it means over-confident intervals.

    Two call forms, as :func:`regression_report`: ``interval_coverage(pred, target, ...)`` or
    ``interval_coverage(means, vars, target, ...)``.

    Args:
        means: per-sample means ``(S, B, D)`` (or ``(S, B)``), or a
            :class:`bbb.RegressionPrediction`.
        vars: per-sample variances, same shape, strictly positive (with a prediction: the
            target, when given positionally).
        target: targets ``(B, D)`` or ``(B,)``.
        levels: nominal levels, each in the open interval (0, 1), no repeats (a number or a
            sequence); default :data:`DEFAULT_COVERAGE_LEVELS` = 0.5, 0.8, 0.9, 0.95, 0.99.
        y_scale: normalisation scale of the targets (> 0): widths are multiplied by it, so
            they are in original units when the inputs are normalised. Coverage is
            scale-free.

    Returns:
        An :class:`IntervalCoverage`.
    """
    mu, var, y = _regression_inputs(means, vars, target, "interval_coverage")
    lv = _check_probability_levels(levels, "levels", sort=False)
    keys: dict[str, float] = {}
    for a in lv.tolist():
        other = keys.setdefault(_level_key("coverage", a), a)
        if other != a:
            raise ValueError(
                f"levels {other!r} and {a!r} differ by less than 1e-12: they are one level "
                f"(one report key, {_level_key('coverage', a)!r}); pass it once"
            )
    _check_y_scale(y_scale)
    pit = _mixture_cdf(mu, var.sqrt(), y.unsqueeze(0)).cpu()  # (B, D)
    lo_p, hi_p = (1.0 - lv) / 2.0, (1.0 + lv) / 2.0
    inside = (pit.unsqueeze(0) >= lo_p.view(-1, 1, 1)) & (pit.unsqueeze(0) <= hi_p.view(-1, 1, 1))
    inside = inside.to(torch.float64)  # (L, B, D)
    bounds = _mixture_quantiles(mu, var, torch.cat([lo_p, hi_p])).cpu()  # (2L, B, D)
    width = (bounds[lv.numel() :] - bounds[: lv.numel()]) * y_scale  # (L, B, D)
    return IntervalCoverage(
        levels=lv,
        coverage=inside.mean(dim=(1, 2)),
        coverage_per_output=inside.mean(dim=1),
        mean_width=width.mean(dim=(1, 2)),
        mean_width_per_output=width.mean(dim=1),
        n_examples=int(y.shape[0]),
    )


@dataclass(frozen=True)
class RegressionCalibrationData:
    """A regression calibration curve (Kuleshov, Fenner and Ermon, ICML 2018).

    For each probability ``p_j`` of a grid, the observed fraction of targets at or below the
    predicted ``p_j``-quantile, i.e. of PIT values ``<= p_j`` (the same event). A calibrated
    predictive gives ``observed ~ expected``; below the diagonal at small ``p`` and above it
    at large ``p`` (an S shape) means too wide intervals, the reverse too narrow ones.

    Attributes:
        expected: ``(P,)`` the grid ``p_j``, increasing, in (0, 1).
        observed: ``(P,)`` observed fraction, pooled over the ``B * D`` (example, output)
            pairs.
        observed_per_output: ``(P, D)`` observed fraction per output dimension.
        pit: ``(B, D)`` the PIT values the curve is computed from (see :func:`pit_values`).
        n_examples: B.

    All tensors are ``float64`` on the CPU.
    """

    expected: Tensor
    observed: Tensor
    observed_per_output: Tensor
    pit: Tensor
    n_examples: int

    @property
    def n_levels(self) -> int:
        """Number of grid points P."""
        return int(self.expected.numel())

    def calibration_error(self, kind: str = "mean_absolute") -> float:
        """Deviation of the pooled curve from the diagonal, over the grid (a fraction).

        ``kind`` is one of :data:`CALIBRATION_ERROR_KINDS`:

        - ``"mean_absolute"``: ``(1/P) sum_j |observed_j - p_j|`` (on the default even grid,
          the area between the curve and the diagonal, the "miscalibration area");
        - ``"root_mean_square"``: ``sqrt((1/P) sum_j (observed_j - p_j)^2)``; Kuleshov et al.'s
          ``cal = sum_j (p_j - observed_j)^2`` (weights 1) is ``P`` times its square;
        - ``"max"``: ``max_j |observed_j - p_j|`` (a Kolmogorov-Smirnov distance of the PIT
          values from uniform, on the grid).

        0 for perfect calibration; for a calibrated predictive of B independent examples each
        term is binomial noise of standard error ``sqrt(p (1 - p) / B)``.
        """
        return float(_curve_error(self.observed - self.expected, _check_kind(kind), dim=0))

    def calibration_error_per_output(self, kind: str = "mean_absolute") -> Tensor:
        """``(D,)`` :meth:`calibration_error` of each output dimension's own curve."""
        gap = self.observed_per_output - self.expected.unsqueeze(1)
        return _curve_error(gap, _check_kind(kind), dim=0)

    def standard_error(self) -> Tensor:
        """``(P,)`` binomial standard error ``sqrt(p (1 - p) / B)`` of one output's observed
        fraction for a calibrated predictive of B independent examples."""
        return (self.expected * (1.0 - self.expected) / self.n_examples).sqrt()


def _curve_error(gap: Tensor, kind: str, dim: int) -> Tensor:
    if kind == "mean_absolute":
        return gap.abs().mean(dim=dim)
    if kind == "root_mean_square":
        return gap.pow(2).mean(dim=dim).sqrt()
    return gap.abs().amax(dim=dim)


def regression_calibration_data(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    levels: int | Sequence[float] | Tensor = 99,
) -> RegressionCalibrationData:
    """Calibration curve of a regression predictive (Kuleshov et al., 2018).

    ``observed_j`` = fraction of targets with ``y <= F^-1(p_j)`` (``F`` the exact mixture
    CDF), computed as the fraction of PIT values ``<= p_j``: O(S B D) work, no quantile
    search. Multi-output targets: each output has its own marginal curve
    (``observed_per_output``); ``observed`` pools all ``B * D`` pairs.

    Two call forms, as :func:`regression_report`.

    Args:
        means: per-sample means ``(S, B, D)`` (or ``(S, B)``), or a
            :class:`bbb.RegressionPrediction`.
        vars: per-sample variances, same shape, strictly positive (with a prediction: the
            target, when given positionally).
        target: targets ``(B, D)`` or ``(B,)``.
        levels: the grid: a positive integer ``n`` for ``p_j = j / (n + 1)``, ``j = 1..n``
            (default 99: 0.01, 0.02, ..., 0.99), or probabilities in (0, 1) (sorted here).

    Returns:
        A :class:`RegressionCalibrationData`.
    """
    mu, var, y = _regression_inputs(means, vars, target, "regression_calibration_data")
    grid = _calibration_grid(levels)
    pit = _mixture_cdf(mu, var.sqrt(), y.unsqueeze(0)).cpu()
    below = (pit.unsqueeze(0) <= grid.view(-1, 1, 1)).to(torch.float64)  # (P, B, D)
    return RegressionCalibrationData(
        expected=grid,
        observed=below.mean(dim=(1, 2)),
        observed_per_output=below.mean(dim=1),
        pit=pit,
        n_examples=int(y.shape[0]),
    )


def regression_calibration_error(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    levels: int | Sequence[float] | Tensor = 99,
    kind: str = "mean_absolute",
) -> float:
    """Scalar calibration error of a regression predictive, pooled over the outputs.

    ``regression_calibration_data(..., levels).calibration_error(kind)``; ``kind`` one of
    :data:`CALIBRATION_ERROR_KINDS` (``"mean_absolute"``, ``"root_mean_square"``,
    ``"max"``). A fraction in [0, 1], 0 for perfect calibration.
    """
    _check_kind(kind)
    data = regression_calibration_data(means, vars, target, levels=levels)
    return data.calibration_error(kind)


def _gaussian_abs_moment(m: Tensor, v: Tensor) -> Tensor:
    """``E|X|`` for ``X ~ N(m, v)`` (elementwise, broadcasting; ``v > 0``):
    ``m (2 Phi(m / sd) - 1) + 2 sd phi(m / sd) = m erf(w) + sqrt(2 / pi) sd exp(-w^2)`` with
    ``w = m / (sd sqrt(2))`` (the erf form: one special function, about 4x faster than
    ``ndtr``; the inputs are not modified)."""
    sd = v.sqrt()
    w = (m / sd).mul_(1.0 / math.sqrt(2.0))
    out = torch.erf(w).mul_(m)
    return out.add_(w.square_().neg_().exp_().mul_(sd).mul_(math.sqrt(2.0 / math.pi)))


def crps(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    y_scale: float = 1.0,
) -> float:
    """Continuous ranked probability score of the mixture predictive, in closed form.

    ``CRPS(F, y) = integral (F(x) - 1{x >= y})^2 dx = E|X - y| - E|X - X'| / 2`` with X, X'
    independent draws from F. For the equal-weight mixture of S Gaussians (Grimit et al.,
    2006):

        ``CRPS = (1/S) sum_s A(y - mu_s, var_s) - 1/(2 S^2) sum_{s,t} A(mu_s - mu_t,
        var_s + var_t)``,

    ``A(m, v) = E|N(m, v)|``. The pair term costs O(S^2 B D) time; the examples are processed
    in chunks so that memory stays at about 2^22 float64 values per work array whatever
    B (S = 100, D = 1: about 0.4 s of one CPU core for B = 2000, 2 s for B = 10000; the time
    grows as S^2 B D). Lower is better; for S = 1
    it is the Gaussian CRPS ``sd (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))``.

    Two call forms, as :func:`regression_report`.

    Args:
        means: per-sample means ``(S, B, D)`` (or ``(S, B)``), or a
            :class:`bbb.RegressionPrediction`.
        vars: per-sample variances, same shape, strictly positive (with a prediction: the
            target, when given positionally).
        target: targets ``(B, D)`` or ``(B,)``.
        y_scale: normalisation scale of the targets (> 0): with normalised inputs the score
            is multiplied by it (the CRPS is in the units of y), so it is in original units.

    Returns:
        Mean CRPS over examples and output dimensions (each output's marginal predictive),
        in the targets' original units (>= 0).
    """
    mu, var, y = _regression_inputs(means, vars, target, "crps")
    _check_y_scale(y_scale)
    S, B, D = mu.shape
    # the pair term is symmetric in (s, t): the S (S - 1) / 2 pairs s < t, twice, plus the
    # diagonal A(0, 2 var_s) = 2 sqrt(var_s / pi)
    i, j = torch.triu_indices(S, S, offset=1, device=mu.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, (i.numel() + S) * D))
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for start in range(0, B, rows):
        m = mu[:, start : start + rows]
        v = var[:, start : start + rows]
        t = y[start : start + rows]
        spread = _gaussian_abs_moment(t.unsqueeze(0) - m, v).sum(0) / S  # (b, D)
        diag = (2.0 / math.sqrt(math.pi)) * v.sqrt().sum(0)
        off = _gaussian_abs_moment(m[i] - m[j], v[i] + v[j]).sum(0) if S > 1 else 0.0
        pair = (diag + 2.0 * off) / (S * S)  # (b, D)
        total = total + (spread - 0.5 * pair).sum()
    return (total / (B * D)).item() * y_scale


def regression_calibration_report(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    y_scale: float = 1.0,
    levels: float | Sequence[float] | Tensor = DEFAULT_COVERAGE_LEVELS,
) -> dict[str, float]:
    """Coverage, calibration error and CRPS of a regression predictive, at once.

    Two call forms, as :func:`regression_report` (which gives RMSE and log-likelihood).

    Returns:
        ``{"coverage_50": ..., "coverage_80": ..., ... (one per level, pooled over outputs,
        see :func:`interval_coverage`), "calibration_error": ... (mean absolute deviation of
        the calibration curve on the 99-point grid), "calibration_rmse": ... (its root mean
        square), "crps": ... (original units, see :func:`crps`)}``. Coverage and calibration
        errors are fractions in [0, 1].
    """
    mu, var, y = _regression_inputs(means, vars, target, "regression_calibration_report")
    _check_y_scale(y_scale)
    out = interval_coverage(mu, var, y, levels=levels, y_scale=y_scale).as_dict()
    data = regression_calibration_data(mu, var, y)
    out["calibration_error"] = data.calibration_error("mean_absolute")
    out["calibration_rmse"] = data.calibration_error("root_mean_square")
    out["crps"] = crps(mu, var, y, y_scale=y_scale)
    return out


def plot_regression_calibration(
    means: Tensor | RegressionPrediction,
    vars: Tensor | None = None,
    target: Tensor | None = None,
    *,
    path: str | os.PathLike[str],
    levels: int | Sequence[float] | Tensor = 99,
    n_bins: int = 20,
    title: str | None = None,
) -> Path:
    """Write a regression calibration plot (the counterpart of
    :func:`plot_reliability_diagram`) as a PNG file.

    The upper panel shows the calibration curve (observed vs expected fraction of targets
    below the predicted quantile; pooled over outputs, and one thin line per output when
    D > 1), the diagonal, and a band of +-2 binomial standard errors around it (where a
    calibrated predictive's curve of B independent examples lies), with the mean absolute
    calibration error in the legend. The lower panel is the histogram of the PIT values with
    the uniform density a calibrated predictive has. Matplotlib is imported lazily and drawn
    on the Agg canvas (no pyplot, no global backend change).

    Args:
        means, vars, target: as :func:`regression_calibration_data` (either call form).
        path: output file (keyword-only); parent directories are created.
        levels: the grid of the curve (see :func:`regression_calibration_data`).
        n_bins: number of equal-width bins of the PIT histogram (>= 1).
        title: optional figure title.

    Returns:
        The path written to, as a :class:`pathlib.Path`.
    """
    _check_n_bins(n_bins)
    data = regression_calibration_data(means, vars, target, levels=levels)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = data.expected.numpy()
    two_se = (2.0 * data.standard_error()).numpy()
    fig = Figure(figsize=(5.0, 6.0))
    FigureCanvasAgg(fig)
    ax, ax_hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]})
    ax.fill_between(
        p, p - two_se, p + two_se, color="gray", alpha=0.25, label="+-2 SE (calibrated)"
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    n_out = data.observed_per_output.shape[1]
    if n_out > 1:
        for d in range(n_out):
            ax.plot(p, data.observed_per_output[:, d].numpy(), lw=0.7, alpha=0.6)
    ax.plot(p, data.observed.numpy(), color="tab:blue", lw=2.0, label="observed")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("expected fraction below the predicted quantile")
    ax.set_ylabel("observed fraction")
    ax.legend(
        loc="upper left",
        title=f"calibration error = {100.0 * data.calibration_error():.2f}%",
        fontsize=8,
    )
    if title is not None:
        ax.set_title(title)
    ax_hist.hist(
        data.pit.reshape(-1).numpy(),
        bins=int(n_bins),
        range=(0.0, 1.0),
        density=True,
        color="gray",
        edgecolor="black",
    )
    ax_hist.axhline(1.0, color="tab:red", linestyle="--", lw=1.0)
    ax_hist.set_xlim(0.0, 1.0)
    ax_hist.set_xlabel("PIT value (predictive CDF at the target)")
    ax_hist.set_ylabel("density")
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


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
