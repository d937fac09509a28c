"""A Bayesian last layer on a trained network: convert only the head, fine-tune it, compare.

1. An ordinary network (``body`` -> ``head``, an ``nn.Sequential``) is trained with plain
   cross-entropy on MNIST (when the files are found) or on a synthetic 10-class problem.
2. ``bbb.bayesianize(plain, include="head", init_from_weights=True, rho_init="moped")``
   replaces the head ``nn.Linear`` alone by a ``BayesLinear`` whose posterior mean is the
   trained head and whose sigma starts at ``moped_delta * |w|`` (MOPED); the body stays a
   plain network, frozen (``requires_grad_(False)``).
3. The head is fine-tuned with the ELBO by ``bbb.train.Trainer`` (the optimizer holds the
   head's parameters only; the body's weights do not move, checked).
4. Plain network vs Bayesian-head network on the test set: accuracy, negative log-likelihood
   and expected calibration error (ECE, 15 bins), and how well the predictive entropy (and,
   for the Bayesian head, the mutual information) separates test inputs from
   out-of-distribution ones (AUROC; MNIST: uniform-noise images and pixel-shuffled digits;
   synthetic: inputs from the same clusters moved 4x further from the origin).

Outputs under ``--out`` (default ``runs/examples/bayesian_last_layer``): ``report.json``
with every number printed, and ``finetune/`` (the Trainer run directory).

Usage::

    python examples/bayesian_last_layer.py                       # MNIST if found, ~15 s
    python examples/bayesian_last_layer.py --data synthetic      # ~10 s
    python examples/bayesian_last_layer.py --data synthetic --n-train 500 --pretrain-epochs 5 \\
        --finetune-epochs 2 --samples 5 --out /tmp/bll
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.data import load_mnist
from bbb.metrics import auroc, expected_calibration_error
from bbb.train import Trainer, seed_everything

SYNTHETIC_CLASSES = 10
SYNTHETIC_DIM = 20


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
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
        description="Train a plain network, make its last layer Bayesian, fine-tune that "
        "head with the ELBO, and compare calibration and out-of-distribution detection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/examples/bayesian_last_layer", help="output directory")
    p.add_argument(
        "--data",
        choices=("auto", "mnist", "synthetic"),
        default="auto",
        help="auto: MNIST when its files are found (--data-dir, $BBB_DATA_DIR, ../shared/data), "
        "else the synthetic problem",
    )
    p.add_argument("--data-dir", default=None, help="data root holding mnist/")
    p.add_argument(
        "--n-train", type=positive_int, default=5000, help="training examples (MNIST: of 50000)"
    )
    p.add_argument("--n-test", type=positive_int, default=2000, help="test (and OOD) examples")
    p.add_argument("--hidden", type=positive_int, default=128, help="width of the body's layers")
    p.add_argument(
        "--pretrain-epochs", type=positive_int, default=5, help="epochs of ordinary training"
    )
    p.add_argument(
        "--finetune-epochs", type=positive_int, default=5, help="epochs of ELBO fine-tuning"
    )
    p.add_argument("--batch-size", type=positive_int, default=100, help="minibatch size")
    p.add_argument(
        "--rho-init",
        choices=("moped", "default"),
        default="moped",
        help="moped: sigma = --moped-delta * |w| of the trained head; default: rho in (-5, -4)",
    )
    p.add_argument(
        "--moped-delta", type=positive_float, default=0.1, help="sigma / |w| with --rho-init moped"
    )
    p.add_argument("--lr", type=positive_float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument(
        "--samples", type=positive_int, default=32, help="weight samples for predictions"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.data == "mnist" and args.n_train > 50000:
        p.error(f"--n-train must be at most 50000 with MNIST, got {args.n_train}")
    if args.data == "mnist" and args.n_test > 10000:
        p.error(f"--n-test must be at most 10000 with MNIST, got {args.n_test}")
    return args


def network(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    """A plain MLP: ``body`` (two hidden ReLU layers of ``hidden`` units) -> ``head`` (linear
    to ``classes`` logits)."""
    body = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(hidden, classes)))


def synthetic(n: int, generator: torch.Generator, centres: Tensor) -> tuple[Tensor, Tensor]:
    """``n`` points (``(n, SYNTHETIC_DIM)``) around random class centres, labels ``(n,)``;
    the clusters overlap (noise std 1.0 around centres of norm about 2.6), so that a
    calibrated classifier is not always sure."""
    y = torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=generator)
    x = centres[y] + torch.randn(n, SYNTHETIC_DIM, generator=generator)
    return x, y


def load_data(
    args: argparse.Namespace, generator: torch.Generator
) -> tuple[str, TensorDataset, TensorDataset, dict[str, Tensor]]:
    """(name, train set, test set, out-of-distribution inputs by kind)."""
    use_mnist = args.data == "mnist"
    if args.data == "auto":
        try:
            load_mnist(args.data_dir, split="test", subset=1)
            use_mnist = args.n_train <= 50000 and args.n_test <= 10000
        except bbb.data.MissingDataError:
            use_mnist = False
    if use_mnist:
        train = load_mnist(args.data_dir, split="train", subset=args.n_train)
        test = load_mnist(args.data_dir, split="test", subset=args.n_test)
        x_test = test.tensors[0]
        noise = torch.rand(x_test.shape, generator=generator) * float(x_test.max())
        perm = torch.randperm(x_test.shape[1], generator=generator)
        ood = {"uniform noise": noise, "shuffled-pixel digits": x_test[:, perm]}
        return "mnist", train, test, ood
    centres = 0.6 * torch.randn(SYNTHETIC_CLASSES, SYNTHETIC_DIM, generator=generator)
    train = TensorDataset(*synthetic(args.n_train, generator, centres))
    test = TensorDataset(*synthetic(args.n_test, generator, centres))
    far, _ = synthetic(args.n_test, generator, centres)
    return "synthetic", train, test, {"4x further from the origin": 4 * far}


def pretrain(
    model: nn.Module, train: TensorDataset, args: argparse.Namespace, g: torch.Generator
) -> None:
    """Ordinary training: Adam on the cross-entropy (the user's existing network)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g)
    model.train()
    for _ in range(args.pretrain_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each row of ``probs`` (N, K) -> (N,)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy, mean NLL (nats) and ECE of predictive probabilities ``probs`` (N, K)."""
    picked = probs.gather(1, y[:, None]).squeeze(1)
    return {
        "accuracy": float((probs.argmax(-1) == y).float().mean()),
        "nll": float(-picked.clamp_min(1e-30).log().mean()),
        "ece": expected_calibration_error(probs, y),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    generator = seed_everything(args.seed)
    data, train, test, ood = load_data(args, generator)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    classes = int(y_train.max()) + 1 if data == "synthetic" else 10
    print(f"data: {data}, {len(train)} training and {len(test)} test examples")

    # 1. The ordinary network.
    plain = network(x_train.shape[1], args.hidden, classes)
    pretrain(plain, train, args, generator)
    with torch.no_grad():
        plain_probs = plain(x_test).softmax(-1)
        plain_ood = {k: plain(v).softmax(-1) for k, v in ood.items()}

    # 2. Only the head becomes Bayesian; the body is frozen.
    moped = args.rho_init == "moped"
    bayes = bbb.bayesianize(
        plain,
        include="head",
        init_from_weights=True,
        rho_init="moped" if moped else (-5.0, -4.0),
        moped_delta=args.moped_delta if moped else None,
    )
    body = bayes.get_submodule("body")
    body.requires_grad_(False)
    body_before = [p.detach().clone() for p in body.parameters()]
    converted = [n for n, m in bayes.named_modules() if isinstance(m, bbb.BayesModule)]
    print(f"bayesianize(include='head'): Bayesian layers {converted}, body frozen")

    # 3. Fine-tune the head with the ELBO (the optimizer holds the trainable parameters only).
    head_params = [p for p in bayes.parameters() if p.requires_grad]
    trainer = Trainer(
        bayes,
        # the frozen body runs once per example, not once per weight sample
        bbb.ELBO(bbb.Categorical(), len(train), num_samples=4, shared_prefix=True),
        torch.optim.Adam(head_params, lr=args.lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator),
        epochs=args.finetune_epochs,
        out_dir=out / "finetune",
        progress=not args.quiet,
        log=None,
        loader_generator=generator,
    )
    trainer.fit(overwrite=True)
    body_moved = max(
        float((p - q).abs().max()) for p, q in zip(body.parameters(), body_before, strict=True)
    )

    # 4. Compare.
    pred = bbb.predict(bayes, x_test, num_samples=args.samples, shared_prefix=True)
    assert isinstance(pred, bbb.ClassificationPrediction)
    pred_ood = {
        k: bbb.predict(bayes, v, num_samples=args.samples, shared_prefix=True)
        for k, v in ood.items()
    }
    report: dict[str, object] = {
        "data": data,
        "converted_layers": converted,
        "trainable_parameters": sum(p.numel() for p in head_params),
        "frozen_parameters": sum(p.numel() for p in body.parameters()),
        "body_max_abs_change": body_moved,
        "rho_init": args.rho_init,
        "plain": scores(plain_probs, y_test),
        "bayesian_head": scores(pred.probs, y_test),
        "ood_auroc": {},
    }
    aurocs: dict[str, dict[str, float]] = {}
    for kind in ood:
        other = pred_ood[kind]
        assert isinstance(other, bbb.ClassificationPrediction)
        aurocs[kind] = {
            "plain_entropy": auroc(entropy(plain_probs), entropy(plain_ood[kind])),
            "bayesian_head_entropy": auroc(pred.entropy, other.entropy),
            "bayesian_head_mutual_information": auroc(pred.epistemic, other.epistemic),
        }
    report["ood_auroc"] = aurocs
    report["num_samples"] = args.samples
    report["threads"] = torch.get_num_threads()
    report["wall_seconds"] = time.perf_counter() - start

    print(f"{'':24s}{'accuracy':>10s}{'NLL':>8s}{'ECE':>8s}")
    for name in ("plain", "bayesian_head"):
        s = report[name]
        assert isinstance(s, dict)
        print(f"{name:24s}{s['accuracy']:10.2%}{s['nll']:8.4f}{s['ece']:8.4f}")
    for kind, values in aurocs.items():
        print(
            f"OOD AUROC ({kind}): plain entropy {values['plain_entropy']:.3f}, Bayesian head "
            f"entropy {values['bayesian_head_entropy']:.3f}, mutual information "
            f"{values['bayesian_head_mutual_information']:.3f}"
        )
    print(f"body weights moved by at most {body_moved:.1e} during fine-tuning (frozen)")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'report.json'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except bbb.data.MissingDataError as exc:  # --data mnist without the files: one line
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
