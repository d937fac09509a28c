"""Classify MNIST digits with a Bayesian MLP and show the digits it is least sure about.

A two-layer Bayes-by-Backprop network (``bbb.BayesLinear``, Gaussian prior, local
reparameterisation) is trained with ``bbb.train.Trainer`` on a subset of MNIST. The test set is
then predicted with ``bbb.predict`` averaging over weight samples, which splits the predictive
entropy of each digit into an aleatoric part (the expected entropy of one network: ambiguous
digits) and an epistemic part (the mutual information between label and weights: disagreement
between weight samples). The 16 test digits with the highest predictive entropy are plotted.

Outputs under ``--out`` (default ``runs/examples/mnist_uncertainty``):

    most_uncertain.png   the 16 most uncertain test digits (entropy, aleatoric, epistemic)
    metrics.json         test error, NLL, calibration and mean uncertainties
    run/                 the Trainer's run directory (metrics.jsonl, checkpoints, best.pt)

Usage::

    python examples/mnist_uncertainty.py                      # about 30 s on a laptop CPU
    python examples/mnist_uncertainty.py --epochs 1 --subset 500 --out /tmp/mnist-unc

MNIST is read from ``--data-dir`` (or ``$BBB_DATA_DIR``, or ``../shared/data``); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import bbb
from bbb.data import load_mnist
from bbb.plots import figure
from bbb.train import Trainer, seed_everything


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


def images(available: int) -> Callable[[str], int]:
    """argparse type: a number of images in 1..``available`` (the size of the split)."""

    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= available:
            raise argparse.ArgumentTypeError(f"must be in 1..{available}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Bayesian MLP on MNIST: test error and the most uncertain test digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/examples/mnist_uncertainty", help="output directory")
    p.add_argument("--data-dir", default=None, help="data root holding mnist/")
    p.add_argument("--subset", type=images(50000), default=10000, help="training images (of 50000)")
    p.add_argument(
        "--val-subset", type=images(10000), default=2000, help="validation images (of 10000)"
    )
    p.add_argument(
        "--test-subset", type=images(10000), default=None, help="test images (default: all)"
    )
    p.add_argument("--hidden", type=positive_int, default=200, help="units per hidden layer")
    p.add_argument("--epochs", type=positive_int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate")
    p.add_argument("--prior-sigma", type=positive_float, default=1.0, help="Gaussian prior sigma")
    p.add_argument(
        "--samples", type=positive_int, default=10, help="weight samples for test predictions"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (the small network's operations are too short to gain from more;"
        " on a busy machine extra threads only wait: 2-6x slower on 2 shared cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def bayesian_mlp(hidden: int, prior: bbb.Prior) -> nn.Sequential:
    """784 -> hidden -> hidden -> 10 logits, every weight with a Gaussian posterior."""

    def layer(n_in: int, n_out: int) -> bbb.BayesLinear:
        return bbb.BayesLinear(n_in, n_out, prior=prior, estimator="local", mu_init="fan_in")

    return nn.Sequential(
        layer(784, hidden), nn.ReLU(), layer(hidden, hidden), nn.ReLU(), layer(hidden, 10)
    )


def plot_most_uncertain(
    images: torch.Tensor,
    labels: torch.Tensor,
    pred: bbb.ClassificationPrediction,
    path: Path,
    count: int = 16,
) -> list[dict[str, float | int]]:
    """Grid of the ``count`` test digits of highest predictive entropy; returns their data."""
    count = min(count, images.shape[0])
    order = torch.argsort(pred.entropy, descending=True)[:count]
    cols = 4
    rows = (count + cols - 1) // cols
    fig = figure(figsize=(2.3 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    chosen = []
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist(), strict=False):
        item = {
            "index": i,
            "label": int(labels[i]),
            "predicted": int(pred.predicted[i]),
            "probability": float(pred.probs[i].max()),
            "entropy": float(pred.entropy[i]),
            "aleatoric": float(pred.aleatoric[i]),
            "epistemic": float(pred.epistemic[i]),
        }
        chosen.append(item)
        ax.imshow(images[i].reshape(28, 28).numpy(), cmap="gray_r")
        colour = "black" if item["label"] == item["predicted"] else "red"
        ax.set_title(
            f"true {item['label']}, pred {item['predicted']} ({item['probability']:.2f})\n"
            f"H={item['entropy']:.2f} al={item['aleatoric']:.2f} ep={item['epistemic']:.2f}",
            fontsize=8,
            color=colour,
        )
    fig.suptitle(
        "Most uncertain test digits (nats: H = aleatoric + epistemic; red = misclassified)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    generator = seed_everything(args.seed)

    train = load_mnist(args.data_dir, split="train", subset=args.subset)
    val = load_mnist(args.data_dir, split="val", subset=args.val_subset)
    test = load_mnist(args.data_dir, split="test", subset=args.test_subset)
    print(f"MNIST: {len(train)} training, {len(val)} validation, {len(test)} test images")

    model = bayesian_mlp(args.hidden, bbb.GaussianPrior(args.prior_sigma))
    elbo = bbb.ELBO(bbb.Categorical(), len(train))
    trainer = Trainer(
        model,
        elbo,
        torch.optim.Adam(model.parameters(), lr=args.lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator),
        val_loader=DataLoader(val, batch_size=1000),
        epochs=args.epochs,
        out_dir=out / "run",
        val_samples=4,
        progress=not args.quiet,
        log=None if args.quiet else print,
        loader_generator=generator,
    )
    summary = trainer.fit(overwrite=True)  # a re-run replaces the previous one
    trainer.load_best()  # the best-on-validation weights

    x_test, y_test = test.tensors
    pred = bbb.predict(model, x_test, num_samples=args.samples)
    assert isinstance(pred, bbb.ClassificationPrediction)
    report = bbb.metrics.classification_report(pred.probs, y_test, log_probs=pred.log_probs)
    wrong = pred.predicted != y_test
    uncertain = plot_most_uncertain(x_test, y_test, pred, out / "most_uncertain.png")

    metrics: dict[str, object] = {
        "test": report,
        "num_samples": args.samples,
        "best_epoch": summary["best_epoch"],
        "mean_entropy": float(pred.entropy.mean()),
        "mean_aleatoric": float(pred.aleatoric.mean()),
        "mean_epistemic": float(pred.epistemic.mean()),
        "mean_entropy_correct": float(pred.entropy[~wrong].mean()) if (~wrong).any() else None,
        "mean_entropy_wrong": float(pred.entropy[wrong].mean()) if wrong.any() else None,
        "most_uncertain": uncertain,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print(
        f"test error {report['error']:.2%} (NLL {report['nll']:.3f}, ECE {report['ece']:.3f}) "
        f"with {args.samples} weight samples"
    )
    if metrics["mean_entropy_wrong"] is not None and metrics["mean_entropy_correct"] is not None:
        print(
            f"mean predictive entropy: {metrics['mean_entropy_correct']:.3f} nats on correctly "
            f"classified digits, {metrics['mean_entropy_wrong']:.3f} on misclassified ones"
        )
    print(f"most uncertain digits: {out / 'most_uncertain.png'}; metrics: {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except bbb.data.MissingDataError as exc:  # no MNIST files: one line, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
