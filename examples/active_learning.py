"""Active learning on MNIST: BALD acquisition against random acquisition, with a Bayesian MLP.

A classifier starts from a tiny labelled set (``--initial-per-class`` digits of each class,
20 by default) drawn from a pool of unlabelled MNIST training images. Each round it is trained
from scratch on the labelled set (``bbb.train.Trainer``, a two-layer ``bbb.BayesLinear``
network), its test error is measured, and ``--acquire`` more pool images are labelled:

* ``bald``: the images of highest mutual information between the label and the weights,
  I[y; w | x] = H[p(y|x)] - E_w H[p(y|x, w)], the epistemic part of ``bbb.predict``'s
  uncertainty split (``ClassificationPrediction.epistemic``; Houlsby et al. 2011, Gal et al.
  2017): the digits on which weight samples disagree, whose label says most about the weights;
* ``random``: images drawn uniformly from the pool (the baseline).

``--strategy`` puts another of the library's acquisition functions (``bbb.acquire``) in
BALD's place against random: ``entropy`` (max predictive entropy), ``variation_ratios``,
``margin``, ``mean_std`` or ``batch_bald`` (BatchBALD, Kirsch et al. 2019: each round's
images chosen jointly, so that near-duplicates of one informative digit are not all taken).

Both strategies start from the same labelled set, and in each round both networks start from
the same initial weights and see the same training randomness, so the gap between the two
curves is the acquisition's doing. After every round the results so far are written (an
interrupted run keeps the finished rounds, and ``--resume`` continues it).

Do not expect BALD to win at this scale. With a few dozen labels the mean-field posterior of
most first-layer weights stays near the prior, so the predictive variance of an input grows
with its squared norm (sum_i x_i^2 sigma_i^2): the mutual information follows the amount of
ink (correlation 0.75 with ||x||^2 on the default pool after round 0), BALD labels many 0s
and 8s and hardly any 1s (``labelled_per_class`` in the JSON, printed at the end), and at
the defaults (seeds 0 and 1) it trailed random acquisition. ``--prior-sigma``, ``--kl-scale`` (a
tempered posterior) and ``--steps`` change the posterior it ranks by; compare several
``--seed`` values before concluding.

Outputs under ``--out`` (default ``runs/examples/active_learning``):

    active_learning.json   settings, and per round and strategy: labelled-set size, test error,
                           test NLL, the acquired images' pool indices, labels and scores
    active_learning.png    test error against labelled-set size, BALD and random

Usage::

    python examples/active_learning.py                   # a few minutes on a laptop CPU
    python examples/active_learning.py --rounds 2 --acquire 10 --pool-subset 500 \\
        --test-subset 500 --steps 50 --out /tmp/al

MNIST is read from ``--data-dir`` (or ``$BBB_DATA_DIR``, or ``../shared/data``); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import bbb
from bbb.data import load_mnist
from bbb.plots import figure
from bbb.train import Trainer, seed_everything

# the acquisition functions --strategy can put against random (bald, the default, included)
ACQUISITIONS = ("bald", "entropy", "variation_ratios", "margin", "mean_std", "batch_bald")
# the JSON key of the acquired images' scores, per strategy
SCORE_KEYS = {
    "bald": "acquired_mutual_information",
    "batch_bald": "acquired_joint_mutual_information",
}
NUM_CLASSES = 10


class UsageError(Exception):
    """Settings that cannot work (a pool without enough images of a class, a ``--resume``
    with nothing to continue): one line on stderr, exit 2, as argparse's own errors."""


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
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
        description="Active learning on MNIST with a Bayesian MLP: BALD against random "
        "acquisition, test error against labelled-set size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/examples/active_learning", help="output directory")
    p.add_argument("--data-dir", default=None, help="data root holding mnist/")
    p.add_argument(
        "--pool-subset",
        type=images(50000),
        default=5000,
        help="pool of unlabelled images: the first N of the 50000 training images",
    )
    p.add_argument(
        "--initial-per-class",
        type=positive_int,
        default=2,
        help="labelled images of each class at the start (drawn from the pool)",
    )
    p.add_argument("--rounds", type=non_negative_int, default=10, help="acquisition rounds")
    p.add_argument("--acquire", type=positive_int, default=10, help="images acquired per round")
    p.add_argument(
        "--val-subset",
        type=images(10000),
        default=100,
        help="validation images (of 10000) choosing each round's best weights; a realistic "
        "active-learning budget is small",
    )
    p.add_argument("--test-subset", type=images(10000), default=2000, help="test images (of 10000)")
    p.add_argument("--hidden", type=positive_int, default=100, help="units per hidden layer")
    p.add_argument(
        "--steps", type=positive_int, default=500, help="optimizer steps per training round"
    )
    p.add_argument(
        "--val-every",
        type=positive_int,
        default=25,
        help="steps between validations (a Trainer epoch); the best validated weights are kept",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--prior-sigma", type=positive_float, default=1.0, help="Gaussian prior sigma")
    p.add_argument(
        "--kl-scale",
        type=positive_float,
        default=1.0,
        help="weight of the KL term (1: the ELBO; below 1: a tempered posterior)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=20,
        help="weight samples for the BALD scores and the test predictions",
    )
    p.add_argument(
        "--strategy",
        choices=ACQUISITIONS,
        default="bald",
        help="the acquisition function compared against random (bbb.acquire; batch_bald: "
        "BatchBALD, the batch's joint mutual information)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (the small network's operations are too short to gain from more)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (same settings) after its last finished "
        "round; the result equals an uninterrupted run's",
    )
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.seed >= 2**63:
        p.error(f"--seed must be below 2**63, got {args.seed}")
    final = NUM_CLASSES * args.initial_per_class + args.rounds * args.acquire
    if final > args.pool_subset:
        p.error(
            f"the pool of --pool-subset {args.pool_subset} images cannot supply "
            f"{NUM_CLASSES} x --initial-per-class {args.initial_per_class} + --rounds "
            f"{args.rounds} x --acquire {args.acquire} = {final} labels; raise --pool-subset "
            "or lower the others"
        )
    return args


def bayesian_mlp(hidden: int, prior: bbb.Prior) -> nn.Sequential:
    """784 -> hidden -> hidden -> 10 logits, every weight with a Gaussian posterior."""

    def layer(n_in: int, n_out: int) -> bbb.BayesLinear:
        return bbb.BayesLinear(n_in, n_out, prior=prior, estimator="local", mu_init="fan_in")

    return nn.Sequential(
        layer(784, hidden), nn.ReLU(), layer(hidden, hidden), nn.ReLU(), layer(hidden, 10)
    )


def initial_indices(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """``per_class`` pool indices of each class, drawn at random (a balanced start)."""
    chosen = []
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < per_class:
            raise UsageError(
                f"the pool holds {members.numel()} images of class {c}, fewer than "
                f"--initial-per-class {per_class}; raise --pool-subset"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen)


def train_round(
    args: argparse.Namespace,
    x: Tensor,
    y: Tensor,
    val: TensorDataset,
    seed: int,
) -> nn.Module:
    """A new network trained on (x, y) for ``args.steps`` steps; the best-on-validation weights.

    The labelled set is tiny (20 images: one minibatch), so a Trainer epoch is ``--val-every``
    minibatches drawn with replacement rather than one pass over the data; the ELBO's data-set
    size is still the number of labelled images, which sets the weight of the KL term.
    """
    generator = seed_everything(seed)  # the same initial weights and noise for each strategy
    model = bayesian_mlp(args.hidden, bbb.GaussianPrior(args.prior_sigma))
    labelled = TensorDataset(x, y)
    batch = min(args.batch_size, len(labelled))
    sampler = RandomSampler(
        labelled, replacement=True, num_samples=batch * args.val_every, generator=generator
    )
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Categorical(), len(labelled), kl_scale=args.kl_scale),
        torch.optim.Adam(model.parameters(), lr=args.lr),
        DataLoader(labelled, batch_size=batch, sampler=sampler),
        val_loader=DataLoader(val, batch_size=1000),
        epochs=math.ceil(args.steps / args.val_every),
        val_samples=4,
        progress=False,
        log=None,
        loader_generator=generator,
    )
    trainer.fit()
    trainer.load_best()
    return model


def strategies(args: argparse.Namespace) -> tuple[str, str]:
    """The two strategies compared: ``--strategy`` (``bald`` by default) and ``random``."""
    return (args.strategy, "random")


def acquire(
    strategy: str,
    model: nn.Module,
    pool_x: Tensor,
    unlabelled: Tensor,
    count: int,
    num_samples: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``count`` pool indices (of the ``unlabelled`` ones) to label next, and their scores (the
    mutual information for BALD, the joint one after each pick for BatchBALD, the acquisition
    function's score for the others; NaN for random). Every strategy but random is
    :func:`bbb.acquire` on the unlabelled images (highest score first, ties to the lowest
    index; BatchBALD's configurations drawn from ``generator``)."""
    if strategy == "random":
        pick = torch.randperm(unlabelled.numel(), generator=generator)[:count]
        return unlabelled[pick], torch.full((pick.numel(),), math.nan)
    chosen = bbb.acquire(
        model,
        pool_x[unlabelled],
        count,
        method=strategy,
        num_samples=num_samples,
        generator=generator,
    )
    return unlabelled[chosen.indices], chosen.scores


LABELS = {
    "bald": "BALD (mutual information)",
    "batch_bald": "BatchBALD (joint mutual information)",
    "entropy": "max entropy",
    "variation_ratios": "variation ratios",
    "margin": "margin",
    "mean_std": "mean std",
    "random": "random",
}


def plot_curves(results: dict[str, list[dict[str, Any]]], path: Path, test_size: int) -> None:
    fig = figure(figsize=(6, 4))
    ax = fig.subplots()
    for strategy, style in zip(results, ("o-", "s--"), strict=True):
        rows = results[strategy]
        ax.plot(
            [r["labelled"] for r in rows],
            [100 * r["test_error"] for r in rows],
            style,
            label=LABELS[strategy],
        )
    ax.set_xlabel("labelled training images")
    ax.set_ylabel(f"test error (%, {test_size} images)")
    ax.set_title("Active learning on MNIST, Bayesian MLP")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (an interrupted write leaves the previous round's file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# settings a resumed run must share with the interrupted one (the others only say where the
# data and outputs are, or how fast and how verbosely to run)
RUN_SETTINGS = (
    "pool_subset",
    "initial_per_class",
    "rounds",
    "acquire",
    "val_subset",
    "test_subset",
    "hidden",
    "steps",
    "val_every",
    "batch_size",
    "lr",
    "prior_sigma",
    "kl_scale",
    "samples",
    "strategy",
    "seed",
)
# the value of a setting in a report written before the setting existed
LEGACY_SETTINGS = {"strategy": "bald"}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed for one (seed, round, stream): independent streams for every round of
    every --seed (``seed + round`` would give seed 1's round 0 the network of seed 0's round
    1, correlating the runs of a multi-seed study)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def load_previous(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The report of the interrupted run in ``path`` that ``--resume`` continues (UsageError
    with the reason when there is none to continue)."""
    try:
        report = json.loads(path.read_text())
        settings, results = report["settings"], report["results"]
        # the settings first: a run of another --strategy holds no rounds of this one
        written = settings.get("strategy", LEGACY_SETTINGS["strategy"])
        done = [len(results[s]) for s in (written, "random")]
    except FileNotFoundError:
        raise UsageError(f"--resume: no {path} to continue (run without --resume)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--resume: {path} is not a readable report ({exc!r})") from None
    if report.get("finished"):
        raise UsageError(f"--resume: the run in {path.parent} is finished; nothing to continue")
    changed = [
        k for k in RUN_SETTINGS if settings.get(k, LEGACY_SETTINGS.get(k)) != getattr(args, k)
    ]
    if changed:
        was = ", ".join(
            f"--{k.replace('_', '-')} {settings.get(k, LEGACY_SETTINGS.get(k))}" for k in changed
        )
        raise UsageError(f"--resume: the run in {path.parent} was started with {was}")
    if len(set(done)) != 1:
        raise UsageError(f"--resume: {path} holds unequal rounds per strategy {done}")
    for s in strategies(args):  # every round before the last holds the pool indices acquired
        for row in results[s]:
            acquired = row.get("acquired", []) if isinstance(row, dict) else None
            if not (isinstance(acquired, list) and all(type(i) is int for i in acquired)):
                raise UsageError(f"--resume: {path}: a round of {s} is damaged")
    return dict(report)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    say: Callable[[str], None] = (lambda _: None) if args.quiet else print
    out = Path(args.out)
    path = out / "active_learning.json"
    previous = load_previous(path, args) if args.resume else None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)

    pool = load_mnist(args.data_dir, split="train", subset=args.pool_subset)
    val = load_mnist(args.data_dir, split="val", subset=args.val_subset)
    test = load_mnist(args.data_dir, split="test", subset=args.test_subset)
    pool_x, pool_y = pool.tensors
    x_test, y_test = test.tensors
    say(
        f"MNIST: pool of {len(pool)} training images, {len(val)} validation, "
        f"{len(test)} test images"
    )

    compared = strategies(args)
    draw = torch.Generator().manual_seed(derived_seed(args.seed, 0, 0))
    start_set = initial_indices(pool_y, args.initial_per_class, draw)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in compared}
    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("quiet", "resume")},
        "initial_indices": start_set.tolist(),
        "results": results,
        "finished": False,
        "wall_seconds": 0.0,
    }
    labelled = {s: start_set.clone() for s in compared}
    if previous is not None:  # the finished rounds, and the labelled sets they reached
        results.update(previous["results"])
        report["wall_seconds"] = previous.get("wall_seconds", 0.0)
        for s in compared:
            acquired = [i for row in results[s] for i in row.get("acquired", [])]
            labelled[s] = torch.cat([start_set, torch.tensor(acquired, dtype=torch.long)])
        say(f"resuming after round {len(results[args.strategy]) - 1} ({path})")
    elapsed = report["wall_seconds"]
    first = len(results[args.strategy])
    for round_ in range(first, args.rounds + 1):
        line = [f"round {round_:2d}"]
        for strategy in compared:
            idx = labelled[strategy]
            model = train_round(
                args, pool_x[idx], pool_y[idx], val, derived_seed(args.seed, round_, 1)
            )
            pred = bbb.predict(model, x_test, num_samples=args.samples)
            row: dict[str, Any] = {
                "round": round_,
                "labelled": idx.numel(),
                "test_error": bbb.metrics.error(pred.probs, y_test),
                "test_nll": float(-pred.log_prob(y_test).mean()),
                "labelled_per_class": torch.bincount(pool_y[idx], minlength=10).tolist(),
            }
            if round_ < args.rounds:
                mask = torch.ones(len(pool), dtype=torch.bool)
                mask[idx] = False
                unlabelled = torch.nonzero(mask).flatten()
                randomness = torch.Generator().manual_seed(derived_seed(args.seed, round_, 2))
                new, scores = acquire(
                    strategy, model, pool_x, unlabelled, args.acquire, args.samples, randomness
                )
                labelled[strategy] = torch.cat([idx, new])
                row["acquired"] = new.tolist()
                row["acquired_labels"] = pool_y[new].tolist()
                if strategy != "random":
                    row[SCORE_KEYS.get(strategy, "acquired_scores")] = scores.tolist()
            results[strategy].append(row)
            line.append(f"{strategy} {row['labelled']:4d} labelled: error {row['test_error']:.2%}")
        say(", ".join(line))
        report["wall_seconds"] = elapsed + time.perf_counter() - start
        write_json(path, report)

    plot_curves(results, out / "active_learning.png", len(test))
    report["finished"] = True
    report["threads"] = torch.get_num_threads()
    report["wall_seconds"] = elapsed + time.perf_counter() - start
    write_json(path, report)
    widths = [max(8, len(s)) for s in compared]
    print("labelled  " + "  ".join(f"{s:>{w}}" for s, w in zip(compared, widths, strict=True)))
    for rows in zip(*(results[s] for s in compared), strict=True):
        print(
            f"{rows[0]['labelled']:8d}  "
            + "  ".join(f"{r['test_error']:{w}.2%}" for r, w in zip(rows, widths, strict=True))
        )
    for strategy in compared:  # BALD's choices are not class-balanced: worth a look
        print(
            f"{strategy}: labelled images per class {results[strategy][-1]['labelled_per_class']}"
        )
    print(
        f"test error against labelled images: {out / 'active_learning.png'}; "
        f"data: {path} ({report['wall_seconds']:.0f} s)"
    )
    return report


if __name__ == "__main__":
    try:
        main()
    except bbb.data.MissingDataError as exc:  # no MNIST files: one line, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
    except UsageError as exc:
        print(f"{Path(__file__).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"{Path(__file__).name}: interrupted; the finished rounds are in "
            "active_learning.json: add --resume to continue",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
