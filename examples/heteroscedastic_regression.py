"""Heteroscedastic regression: a Bayesian MLP that learns how the noise grows with x.

The data are y = f(x) + sigma(x) * eps on x in [-1, 1], with a noise level sigma(x) that grows
linearly from 0.05 to 0.45. The network (``bbb.BayesLinear`` layers) outputs two numbers per
input, the predictive mean and the log-variance of the noise, for the likelihood
``bbb.Gaussian("heteroscedastic")``; it is trained with ``bbb.ELBO`` and ``bbb.train.Trainer``.

``bbb.predict`` then separates the two kinds of uncertainty on a grid that extends beyond the
data: the aleatoric variance (the learned noise, which should follow sigma(x)^2) and the
epistemic variance (the spread of the mean over weight samples, which should grow away from the
data). The script prints the learned noise standard deviation against the true one at a few x.

Outputs under ``--out`` (default ``runs/examples/heteroscedastic_regression``):

    regression.png   data, predictive mean, aleatoric and epistemic bands; learned vs true noise
    noise.json       learned and true noise at a few x, epistemic std inside/outside the data,
                     the best epoch's validation metrics ("val": rmse, log_likelihood, nll),
                     and the coverage of the central 50/90/95% predictive intervals on fresh
                     data ("test_coverage", on each half of the x range, with the learned
                     noise and with one noise level for every x)
    run/             the Trainer's run directory (metrics.jsonl, checkpoints, best.pt)

Usage::

    python examples/heteroscedastic_regression.py            # about 20 s on a laptop CPU
    python examples/heteroscedastic_regression.py --epochs 2 --n-train 400 --out /tmp/het
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.plots import figure
from bbb.train import Trainer, seed_everything

X_LOW, X_HIGH = -1.0, 1.0


def true_function(x: Tensor) -> Tensor:
    return torch.sin(3.0 * x) + 0.5 * x


def true_noise_std(x: Tensor) -> Tensor:
    """Grows linearly from 0.05 at x = -1 to 0.45 at x = 1."""
    return 0.05 + 0.2 * (x - X_LOW)


def make_data(n: int, generator: torch.Generator) -> TensorDataset:
    x = X_LOW + (X_HIGH - X_LOW) * torch.rand(n, 1, generator=generator)
    y = true_function(x) + true_noise_std(x) * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a bad value is one usage line, not a traceback
    from deep in the library or, for ``--samples``, one after the whole training has run)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Bayesian MLP with a heteroscedastic Gaussian likelihood on 1-D data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", default="runs/examples/heteroscedastic_regression", help="output directory"
    )
    p.add_argument("--n-train", type=positive_int, default=4000, help="training points")
    p.add_argument(
        "--n-test", type=positive_int, default=2000, help="fresh points for the coverage check"
    )
    p.add_argument("--hidden", type=positive_int, default=50, help="units per hidden layer")
    p.add_argument("--epochs", type=positive_int, default=60, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=200, help="minibatch size")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate")
    p.add_argument(
        "--samples", type=positive_int, default=500, help="weight samples for predictions"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (the tiny network's operations are too short to gain from more;"
        " on a busy machine extra threads only wait: 2-6x slower on 2 shared cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def bayesian_mlp(hidden: int) -> nn.Sequential:
    """1 -> hidden -> hidden -> 2 (mean, log-variance)."""

    def layer(n_in: int, n_out: int) -> bbb.BayesLinear:
        return bbb.BayesLinear(
            n_in, n_out, prior=bbb.GaussianPrior(1.0), estimator="local", mu_init="fan_in"
        )

    return nn.Sequential(
        layer(1, hidden), nn.ReLU(), layer(hidden, hidden), nn.ReLU(), layer(hidden, 2)
    )


def plot(train: TensorDataset, grid: Tensor, pred: bbb.RegressionPrediction, path: Path) -> None:
    xs = grid[:, 0].numpy()
    mean = pred.mean[:, 0]
    alea = pred.aleatoric[:, 0].sqrt()
    epi = pred.epistemic[:, 0].sqrt()
    total = pred.std[:, 0]
    fig = figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    ax.fill_between(
        xs,
        (mean - 2 * total).numpy(),
        (mean + 2 * total).numpy(),
        color="C1",
        alpha=0.25,
        label="mean ± 2 std (aleatoric + epistemic)",
    )
    ax.fill_between(
        xs,
        (mean - 2 * epi).numpy(),
        (mean + 2 * epi).numpy(),
        color="C0",
        alpha=0.5,
        label="mean ± 2 epistemic std",
    )
    x_train, y_train = train.tensors
    ax.scatter(x_train[:, 0], y_train[:, 0], s=4, color="k", alpha=0.35, label="training data")
    ax.plot(xs, true_function(grid)[:, 0].numpy(), "k--", lw=1, label="true f(x)")
    ax.plot(xs, mean.numpy(), color="C0", lw=1.5, label="predictive mean")
    ax.axvspan(X_LOW, X_HIGH, color="0.9", zorder=-1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Predictive distribution (grey: range of the training data)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")

    ax2.plot(xs, true_noise_std(grid)[:, 0].numpy(), "k--", label="true noise std")
    ax2.plot(xs, alea.numpy(), color="C1", label="learned noise std (aleatoric)")
    ax2.plot(xs, epi.numpy(), color="C0", label="epistemic std")
    ax2.axvspan(X_LOW, X_HIGH, color="0.9", zorder=-1)
    ax2.set_ylim(0, max(0.8, float(true_noise_std(grid).max()) * 1.2))
    ax2.set_xlabel("x")
    ax2.set_title("Standard deviations", fontsize=10)
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COVERAGE_LEVELS = (0.5, 0.9, 0.95)
COVERAGE_KEYS = ("50", "90", "95")


def interval_coverage_by_region(
    model: nn.Module,
    likelihood: bbb.Gaussian,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> dict[str, dict[str, float]]:
    """Coverage of the central 50/90/95% predictive intervals on fresh data (``--n-test``
    points, drawn after the training and validation sets), on the low-noise half (x < 0)
    and the high-noise half (x >= 0): with the learned noise, and with the same predictions
    given one noise variance for every x (their mean: what a homoscedastic model would
    give), which covers too much where the noise is small and too little where it is large."""
    x, y = make_data(args.n_test, generator).tensors
    pred = bbb.predict(model, x, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(pred, bbb.RegressionPrediction)
    flat = bbb.RegressionPrediction(
        pred.sample_means,
        pred.sample_variances.mean(dim=1, keepdim=True).expand_as(pred.sample_variances),
    )
    out: dict[str, dict[str, float]] = {}
    for noise, p in (("learned noise", pred), ("one noise level", flat)):
        for region, rows in (("x < 0", x[:, 0] < 0), ("x >= 0", x[:, 0] >= 0)):
            part = bbb.RegressionPrediction(p.sample_means[:, rows], p.sample_variances[:, rows])
            cov = bbb.metrics.interval_coverage(part, y[rows], levels=COVERAGE_LEVELS)
            out[f"{noise}, {region}"] = dict(zip(COVERAGE_KEYS, cov.coverage.tolist(), strict=True))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    loader_generator = seed_everything(args.seed)
    data_generator = torch.Generator().manual_seed(args.seed)
    train = make_data(args.n_train, data_generator)
    val = make_data(max(args.n_train // 4, 20), data_generator)

    model = bayesian_mlp(args.hidden)
    likelihood = bbb.Gaussian("heteroscedastic")
    elbo = bbb.ELBO(likelihood, len(train), num_samples=2)
    trainer = Trainer(
        model,
        elbo,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=loader_generator),
        val_loader=DataLoader(val, batch_size=len(val)),
        epochs=args.epochs,
        out_dir=out / "run",
        val_samples=10,
        progress=not args.quiet,
        log=None,
        loader_generator=loader_generator,
    )
    summary = trainer.fit(overwrite=True)  # a re-run replaces the previous one
    trainer.load_best()

    grid = torch.linspace(X_LOW - 0.5, X_HIGH + 0.5, 401).unsqueeze(-1)
    pred = bbb.predict(model, grid, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(pred, bbb.RegressionPrediction)
    plot(train, grid, pred, out / "regression.png")

    probe = torch.tensor([[-0.9], [-0.5], [0.0], [0.5], [0.9]])
    probe_pred = bbb.predict(model, probe, likelihood=likelihood, num_samples=args.samples)
    assert isinstance(probe_pred, bbb.RegressionPrediction)
    learned = probe_pred.aleatoric[:, 0].sqrt()
    truth = true_noise_std(probe)[:, 0]
    inside = (grid[:, 0] >= X_LOW) & (grid[:, 0] <= X_HIGH)
    epi_std = pred.epistemic[:, 0].sqrt()
    coverage = interval_coverage_by_region(model, likelihood, args, data_generator)
    # the validation numbers of the best epoch (its history row's val_* keys, without the
    # prefix), not the training loss, KL and timings that the row also holds
    best_row = trainer.history[summary["best_epoch"] - 1]
    val_metrics: dict[str, float] = {
        k.removeprefix("val_"): v for k, v in best_row.items() if k.startswith("val_")
    }
    result: dict[str, object] = {
        "x": probe[:, 0].tolist(),
        "learned_noise_std": learned.tolist(),
        "true_noise_std": truth.tolist(),
        "epistemic_std_inside_data": float(epi_std[inside].mean()),
        "epistemic_std_outside_data": float(epi_std[~inside].mean()),
        "best_epoch": summary["best_epoch"],
        "val": val_metrics,
        "test_coverage": coverage,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "noise.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"trained {summary['epochs_trained']} epochs (best {summary['best_epoch']})")
    print("    x   learned noise std   true noise std")
    for x, lv, tv in zip(probe[:, 0].tolist(), learned.tolist(), truth.tolist(), strict=True):
        print(f"{x:5.1f}   {lv:17.3f}   {tv:14.3f}")
    print(
        f"epistemic std: {result['epistemic_std_inside_data']:.3f} inside the data range, "
        f"{result['epistemic_std_outside_data']:.3f} outside it"
    )
    print("coverage of the central predictive intervals on fresh data (50% / 90% / 95%):")
    for name, row in coverage.items():
        print(f"  {name:26s} " + " / ".join(f"{100 * row[k]:.1f}%" for k in COVERAGE_KEYS))
    val_nll = val_metrics.get("nll")
    if isinstance(val_nll, float) and math.isfinite(val_nll):
        print(f"validation NLL {val_nll:.3f} nats per point")
    print(f"plot: {out / 'regression.png'}; numbers: {out / 'noise.json'}")
    return result


if __name__ == "__main__":
    main()
