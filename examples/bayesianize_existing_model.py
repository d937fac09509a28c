"""Turn an ordinary trained network into a Bayesian one, fine-tune it, and turn it back.

1. An ordinary ``nn.Sequential`` convnet (two ``nn.Conv2d`` and an ``nn.Linear``) is trained
   briefly on an MNIST subset (with ``bbb.train.Trainer`` and a zero-KL ``bbb.ELBO``: plain
   cross-entropy).
2. ``bbb.bayesianize(model, init_from_weights=True)`` replaces every conv/linear layer by its
   Bayesian counterpart whose posterior mean starts at the trained weights, so the *mean
   network* computes exactly the same function as the original.
3. The Bayesian network is fine-tuned with the ELBO for a little while (``Trainer`` again).
4. We compare the accuracy of the mean network before and after fine-tuning, and show the
   epistemic uncertainty (mutual information) on test digits, on misclassified ones and on
   out-of-distribution inputs (uniform noise images, and digits with their pixels shuffled).
5. ``bbb.to_deterministic`` exports the mean network back to plain ``nn.Conv2d``/``nn.Linear``
   layers; we check that it computes the same outputs as the Bayesian mean network, and that
   ``bayesianize(..., init_from_weights=True)`` of the export gives the same mean network again.

Outputs under ``--out`` (default ``runs/examples/bayesianize_existing_model``):

    report.json          accuracies, epistemic uncertainty, round-trip errors
    epistemic.png        histograms of the epistemic uncertainty per input type
    deterministic.pt     state_dict of the exported mean network
    pretrain/, finetune/ the Trainer run directories

Usage::

    python examples/bayesianize_existing_model.py            # about 30 s on a laptop CPU
    python examples/bayesianize_existing_model.py --subset 500 --pretrain-epochs 1 \\
        --finetune-epochs 1 --out /tmp/bayesianize
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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
        description="bayesianize a trained convnet, fine-tune it with the ELBO, export it back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", default="runs/examples/bayesianize_existing_model", help="output directory"
    )
    p.add_argument("--data-dir", default=None, help="data root holding mnist/")
    p.add_argument("--subset", type=images(50000), default=5000, help="training images (of 50000)")
    p.add_argument("--test-subset", type=images(10000), default=2000, help="test images (of 10000)")
    p.add_argument(
        "--pretrain-epochs", type=positive_int, default=2, help="epochs of ordinary training"
    )
    p.add_argument(
        "--finetune-epochs", type=positive_int, default=2, help="epochs of ELBO fine-tuning"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size")
    p.add_argument(
        "--samples", type=positive_int, default=20, help="weight samples for predictions"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (the small network's operations are too short to gain from more;"
        " on a busy machine extra threads only wait: 2-6x slower on 2 shared cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def convnet() -> nn.Sequential:
    """An ordinary convnet: conv 5x5 (8) -> pool -> conv 5x5 (16) -> pool -> linear (10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy of a deterministic forward pass (for a Bayesian model: call it under
    ``bbb.sampling(model, "mean")`` to get the mean network)."""
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def mean_network_outputs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with bbb.sampling(model, "mean"):
        out: Tensor = model(x)
    return out


def fit(
    model: nn.Module,
    elbo: bbb.ELBO,
    data: tuple[TensorDataset, TensorDataset],
    *,
    epochs: int,
    out_dir: Path,
    lr: float,
    val_samples: int,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> dict[str, object]:
    """Train with bbb.train.Trainer and keep the best-on-validation weights."""
    train, val = data
    trainer = Trainer(
        model,
        elbo,
        torch.optim.Adam(model.parameters(), lr=lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator),
        val_loader=DataLoader(val, batch_size=500),
        epochs=epochs,
        out_dir=out_dir,
        val_samples=val_samples,
        progress=not args.quiet,
        log=None,
        loader_generator=generator,
    )
    summary = trainer.fit(overwrite=True)  # a re-run replaces the previous one
    trainer.load_best()
    return summary


def plot_epistemic(groups: dict[str, Tensor], path: Path) -> None:
    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    top = max(float(v.max()) for v in groups.values() if v.numel()) or 1.0
    bins = torch.linspace(0, top, 40).numpy()
    for name, values in groups.items():
        if values.numel():
            ax.hist(values.numpy(), bins=bins, alpha=0.5, density=True, label=name)
    ax.set_xlabel("epistemic uncertainty (mutual information, nats)")
    ax.set_ylabel("density")
    ax.set_title("Fine-tuned Bayesian convnet: epistemic uncertainty by input type", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    generator = seed_everything(args.seed)

    train = load_mnist(args.data_dir, split="train", subset=args.subset, flatten=False)
    val = load_mnist(args.data_dir, split="val", subset=min(1000, args.subset), flatten=False)
    test = load_mnist(args.data_dir, split="test", subset=args.test_subset, flatten=False)
    x_test, y_test = test.tensors
    n = len(train)

    # 1. An ordinary network, trained briefly (a zero-KL ELBO is plain cross-entropy).
    plain = convnet()
    plain_elbo = bbb.ELBO(bbb.Categorical(), n, kl_scale=0.0)
    fit(
        plain,
        plain_elbo,
        (train, val),
        epochs=args.pretrain_epochs,
        out_dir=out / "pretrain",
        lr=2e-3,
        val_samples=1,
        args=args,
        generator=generator,
    )
    acc_plain = accuracy(plain, x_test, y_test)
    print(f"ordinary convnet after {args.pretrain_epochs} epoch(s): test accuracy {acc_plain:.2%}")

    # 2. Bayesian copy whose posterior means are the trained weights.
    bayes = bbb.bayesianize(
        plain,
        prior=bbb.GaussianPrior(1.0),
        estimator="flipout",
        init_from_weights=True,
        rho_init=-6.0,
    )
    converted = [type(m).__name__ for m in bbb.bayes_modules(bayes)]
    with torch.no_grad():
        same = torch.equal(mean_network_outputs(bayes, x_test[:256]), plain.eval()(x_test[:256]))
    with bbb.sampling(bayes, "mean"):
        acc_before = accuracy(bayes, x_test, y_test)
    print(f"bayesianize: {', '.join(converted)}; mean network == original: {same}")

    # 3. Fine-tune with the ELBO.
    elbo = bbb.ELBO(bbb.Categorical(), n)
    fit(
        bayes,
        elbo,
        (train, val),
        epochs=args.finetune_epochs,
        out_dir=out / "finetune",
        lr=1e-3,
        val_samples=4,
        args=args,
        generator=generator,
    )
    with bbb.sampling(bayes, "mean"):
        acc_after = accuracy(bayes, x_test, y_test)
    pred = bbb.predict(bayes, x_test, num_samples=args.samples)
    assert isinstance(pred, bbb.ClassificationPrediction)
    acc_predictive = float((pred.predicted == y_test).float().mean())
    print(
        f"mean-network test accuracy: {acc_before:.2%} before fine-tuning, {acc_after:.2%} after "
        f"({acc_predictive:.2%} for the predictive average of {args.samples} weight samples)"
    )

    # 4. Epistemic uncertainty: test digits, misclassified digits, out-of-distribution inputs.
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(x_test[:500].shape, generator=g) * float(x_test.max())
    perm = torch.randperm(28 * 28, generator=g)
    shuffled = x_test[:500].flatten(1)[:, perm].reshape(-1, 1, 28, 28)
    wrong = pred.predicted != y_test
    groups = {
        "test digits": pred.epistemic,
        "misclassified digits": pred.epistemic[wrong],
        "shuffled-pixel digits": bbb.predict(bayes, shuffled, num_samples=args.samples).epistemic,
        "uniform noise": bbb.predict(bayes, noise, num_samples=args.samples).epistemic,
    }
    plot_epistemic(groups, out / "epistemic.png")
    epistemic = {k: float(v.mean()) if v.numel() else None for k, v in groups.items()}
    for name, value in epistemic.items():
        print(
            f"mean epistemic uncertainty, {name:22s}: {value if value is None else f'{value:.4f}'}"
        )

    # 5. Export the mean network as plain torch.nn, and back.
    deterministic = bbb.to_deterministic(bayes)
    assert not list(bbb.bayes_modules(deterministic))
    with torch.no_grad():
        exported_outputs = deterministic.eval()(x_test)
    export_error = float((exported_outputs - mean_network_outputs(bayes, x_test)).abs().max())
    again = bbb.bayesianize(deterministic, init_from_weights=True)
    round_trip_error = float(
        (mean_network_outputs(again, x_test) - mean_network_outputs(bayes, x_test)).abs().max()
    )
    acc_exported = accuracy(deterministic, x_test, y_test)
    torch.save(deterministic.state_dict(), out / "deterministic.pt")
    print(
        f"to_deterministic: test accuracy {acc_exported:.2%}, max |output difference| to the "
        f"mean network {export_error:.2e}; bayesianize(export) again: {round_trip_error:.2e}"
    )

    report: dict[str, object] = {
        "converted_layers": converted,
        "accuracy_plain": acc_plain,
        "accuracy_mean_network_before_finetuning": acc_before,
        "accuracy_mean_network_after_finetuning": acc_after,
        "accuracy_predictive": acc_predictive,
        "accuracy_exported": acc_exported,
        "mean_network_equals_original_after_conversion": same,
        "mean_epistemic": epistemic,
        "export_max_abs_error": export_error,
        "round_trip_max_abs_error": round_trip_error,
        "num_samples": args.samples,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'report.json'}; plot: {out / 'epistemic.png'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except bbb.data.MissingDataError as exc:  # no MNIST files: one line, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
