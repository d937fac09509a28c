"""Plots written into run directories (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .likelihoods import Gaussian, Likelihood

__all__ = ["learning_curves", "regression_band", "figure"]


def figure(*args: Any, **kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg canvas (no global backend change, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def learning_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss, NLL and KL and the validation metrics against the epoch, as an image
    at ``path`` (parent directories are created)."""
    path = Path(path)
    if not history:
        raise ValueError("learning_curves: the history is empty (no epoch to plot)")
    epochs = [r["epoch"] for r in history]
    fig = figure(figsize=(10, 3.5))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for key in ("loss", "nll"):
        ax1.plot(epochs, [r.get(key) for r in history], label=f"train {key}")
    ax1.set_xlabel("epoch")
    ax1.set_title("objective per example")
    ax1.legend()
    ax2.plot(epochs, [r.get("kl") for r in history], color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_title("KL(q || p) (nats)")
    val_keys = [k for k in history[-1] if k.startswith("val_")]
    for k in val_keys:
        ax3.plot(epochs, [r.get(k) for r in history], label=k)
    ax3.set_xlabel("epoch")
    ax3.set_title("validation")
    if val_keys:
        ax3.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # as plot_reliability_diagram does
    fig.savefig(path, dpi=110)
    return path


@torch.no_grad()
def regression_band(
    model: nn.Module,
    likelihood: Likelihood,
    train: TensorDataset,
    path: str | Path,
    *,
    x_range: tuple[float, float] = (-0.2, 1.2),
    num_samples: int = 200,
    baseline: nn.Module | None = None,
    truth: Any = None,
    title: str = "Bayes by Backprop: predictive median, 50% and 95% bands",
) -> dict[str, Any]:
    """Plot a 1-D regression's median, interquartile and 95% bands over ``x_range``.

    The shaded bands are quantiles of the network output f(x; w) over weight samples w ~ q
    (epistemic uncertainty, as in Blundell et al. 2015, Figure 5); dashed lines mark the 95%
    band of the full predictive distribution of y (observation noise included).
    The model may be on any device (the grid is evaluated there); the returned tensors are on
    the CPU. Returns the grid, the output quantiles and the predictive quantiles (len 5, G) so
    callers can report band widths. ``baseline`` (a plain network drawn for comparison) is
    evaluated in eval mode and left in the train/eval modes it came in (each submodule's).
    The image is written to ``path`` (parent directories are created).
    """
    from .predictive import RegressionPrediction, predict

    if not isinstance(likelihood, Gaussian):
        # (an assert, gone under python -O, where the plot failed later with no reason given)
        raise TypeError(
            "regression_band plots a regression model: likelihood must be a bbb.Gaussian, got "
            f"{type(likelihood).__name__}"
        )
    p = next(model.parameters())
    grid = torch.linspace(*x_range, 400, dtype=p.dtype).unsqueeze(-1)
    pred = predict(model, grid.to(p.device), likelihood=likelihood, num_samples=num_samples)
    assert isinstance(pred, RegressionPrediction)
    # the quantiles on the CPU (numpy for matplotlib; the seeded draws are device-independent)
    pred = RegressionPrediction(pred.sample_means.cpu(), pred.sample_variances.cpu())
    gen = torch.Generator().manual_seed(0)
    levels = [0.025, 0.25, 0.5, 0.75, 0.975]
    q = pred.quantiles(levels, include_noise=False)[..., 0]
    qy = pred.quantiles(levels, num_draws=10, generator=gen)[..., 0]
    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    xs = grid[:, 0].numpy()
    ax.fill_between(xs, q[0].numpy(), q[4].numpy(), color="C0", alpha=0.2, label="95% band")
    ax.fill_between(xs, q[1].numpy(), q[3].numpy(), color="C0", alpha=0.35, label="interquartile")
    ax.plot(xs, q[2].numpy(), color="C0", label="median")
    ax.plot(xs, qy[0].numpy(), "C0--", lw=0.8, label="95% predictive (with noise)")
    ax.plot(xs, qy[4].numpy(), "C0--", lw=0.8)
    x_train, y_train = (t.cpu() for t in train.tensors)
    ax.scatter(
        x_train[:, 0].numpy(),
        y_train.reshape(len(y_train), -1)[:, 0].numpy(),
        s=6,
        color="k",
        alpha=0.6,
        label="training data",
    )
    if truth is not None:
        ax.plot(xs, truth(grid)[:, 0].numpy(), "k--", lw=1, label="noise-free curve")
    if baseline is not None:
        modes = [(m, m.training) for m in baseline.modules()]  # each submodule's, given back
        baseline.eval()  # its curve without dropout
        try:
            b = next(baseline.parameters())
            y_plain = baseline(grid.to(b.device, b.dtype))[:, 0].cpu()
        finally:
            for m, mode in modes:
                m.training = mode
        ax.plot(xs, y_plain.numpy(), color="C3", lw=1.5, label="plain network")
    lo = float(y_train.min()) - 1.0
    hi = float(y_train.max()) + 1.0
    ax.set_ylim(lo, hi)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as plot_reliability_diagram does
    fig.savefig(Path(path), dpi=120)
    return {"grid": grid, "quantiles": q, "predictive_quantiles": qy}
