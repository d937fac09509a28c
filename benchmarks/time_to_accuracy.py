"""Time to accuracy (issue 8): seconds of training until a 784-400-400-10 network reaches a
target validation error on MNIST (default 3%), bbb against the peer libraries.

Same machine, same run, same data order (seeded shuffles), batch 128, Adam (lr 1e-3) for
everyone; each library with its documented layer defaults (bayesian-torch: prior N(0, 1),
rho_init -3, its layer KL the mean over the layer's weights (``kl.mean()``), not their sum;
blitz 0.2.8: its default prior, ``prior_pi=1`` with ``prior_sigma_1=0.1``, i.e. a Gaussian
N(0, 0.1^2) with a Monte Carlo KL, and rho_init -7, ``sample_elbo`` with ``sample_nbr=1``;
bbb: ``--estimator`` (default local), Gaussian prior N(0, 1)). KL weight 1 / N for all (on
bayesian-torch's averaged KL, so its KL term is far smaller). Validation error (the last 10000 training images) of the predictive mean over
``--eval-samples`` stochastic forward passes, every ``--eval-every`` steps; evaluation time is
not counted. Stops at the target or after ``--max-seconds`` of training.

    python benchmarks/time_to_accuracy.py --json runs/bench/time_to_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbb
from bbb.bench import machine_info
from bbb.data import load_mnist
from bbb.models import bayes_mlp

HIDDEN = 400
BATCH = 128
LIBRARIES = ("bbb", "bayesian-torch", "blitz")


def _bbb(estimator: str, n: int) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    model = bayes_mlp(784, [HIDDEN, HIDDEN], 10, estimator=estimator, prior=bbb.GaussianPrior(1.0))
    elbo = bbb.ELBO(bbb.Categorical(), n)
    return model, lambda x, y: elbo(model, x, y).loss


def _bayesian_torch(n: int) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    from bbb.bench_peers import _bayesian_torch as build

    model = build("mlp", HIDDEN, "reparam", "gaussian", 1)
    assert model is not None

    def loss(x: Tensor, y: Tensor) -> Tensor:
        out, kl = model(x)
        return F.cross_entropy(out, y) + kl / n

    return model, loss


def _blitz(n: int) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    from blitz.modules import BayesianLinear
    from blitz.utils import variational_estimator

    @variational_estimator
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = BayesianLinear(784, HIDDEN)
            self.l2 = BayesianLinear(HIDDEN, HIDDEN)
            self.l3 = BayesianLinear(HIDDEN, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    model = Net()
    crit = nn.CrossEntropyLoss()

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return model.sample_elbo(  # type: ignore[operator]
            inputs=x, labels=y, criterion=crit, sample_nbr=1, complexity_cost_weight=1.0 / n
        )

    return model, loss


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    logits: Tensor = out[0] if isinstance(out, tuple) else out  # bayesian-torch: (out, kl)
    return logits


@torch.no_grad()
def _val_error(model: nn.Module, x: Tensor, y: Tensor, samples: int) -> float:
    probs = sum(F.softmax(_logits(model, x), -1) for _ in range(samples))
    assert isinstance(probs, Tensor)
    return float((probs.argmax(-1) != y).float().mean())


def run(library: str, args: argparse.Namespace, data: tuple[Tensor, ...]) -> dict[str, Any]:
    """Train one library until the target error or the time budget; return its curve."""
    xtr, ytr, xva, yva = data
    n = xtr.shape[0]
    torch.manual_seed(args.seed)
    if library == "bbb":
        model, loss_fn = _bbb(args.estimator, n)
    elif library == "bayesian-torch":
        model, loss_fn = _bayesian_torch(n)
    elif library == "blitz":
        model, loss_fn = _blitz(n)
    else:
        raise ValueError(f"unknown library {library!r}; accepted values: {', '.join(LIBRARIES)}")
    if n < BATCH:  # no full minibatch: the training loop below would never take a step
        raise ValueError(f"{n} training examples: at least one batch ({BATCH}) is needed")
    compile_seconds = None
    if library == "bbb" and args.kernels != "eager":
        # build the compiled (or native) kernels on a throw-away network (they serve every
        # network of the process), so that building is reported apart from training
        t0 = time.perf_counter()
        with bbb.use_kernels(args.kernels):
            warm, warm_loss = _bbb(args.estimator, n)
            warm_loss(xtr[:BATCH], ytr[:BATCH]).backward()
        compile_seconds = round(time.perf_counter() - t0, 2)
        if bbb.kernels.failures():
            raise SystemExit(f"kernels not compiled here: {bbb.kernels.failures()}")
        torch.manual_seed(args.seed)
        model, loss_fn = _bbb(args.estimator, n)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    trained, steps, curve = 0.0, 0, []
    reached: float | None = None
    with bbb.use_kernels(args.kernels if library == "bbb" else "eager"):
        while trained < args.max_seconds and reached is None:
            order = torch.randperm(n, generator=g)
            for i in range(0, n - BATCH + 1, BATCH):
                idx = order[i : i + BATCH]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(xtr[idx], ytr[idx]).backward()
                opt.step()
                trained += time.perf_counter() - t0
                steps += 1
                if steps % args.eval_every == 0:
                    err = _val_error(model, xva, yva, args.eval_samples)
                    curve.append({"step": steps, "seconds": round(trained, 2), "val_error": err})
                    print(f"[tta] {library}: step {steps}, {trained:.1f} s, val error {err:.4f}")
                    if err <= args.target:
                        reached = trained
                        break
                if trained >= args.max_seconds:
                    break
    return {
        "library": library,
        "estimator": args.estimator if library == "bbb" else "reparam",
        "kernels": args.kernels if library == "bbb" else None,
        "compile_seconds": compile_seconds,
        "seconds_to_target": None if reached is None else round(reached, 2),
        "steps": steps,
        "curve": curve,
    }


class RefusedValueError(ValueError):
    """An option value out of range, an unknown name or a peer not installed: exit code 1
    (``bbb``'s and ``bbb bench``'s code for a refused value; 2 is a command line that cannot
    be parsed, argparse's own errors)."""


def _check_args(args: argparse.Namespace, libraries: list[str]) -> None:
    """Refuse, naming the option, what would otherwise run the wrong thing or fail late: an
    unknown or missing library (or a peer not installed), an unknown bbb estimator, a subset
    smaller than one batch, a target error outside (0, 1], a non-positive evaluation period,
    sample count or time budget. Raises :class:`RefusedValueError`."""
    import importlib.util

    if not libraries:
        raise RefusedValueError(f"--libraries is empty (accepted values: {', '.join(LIBRARIES)})")
    for lib in libraries:
        if lib not in LIBRARIES:
            raise RefusedValueError(
                f"--libraries: unknown library {lib!r} (accepted values: {', '.join(LIBRARIES)})"
            )
        module = {"bayesian-torch": "bayesian_torch", "blitz": "blitz"}.get(lib)
        if module is not None and importlib.util.find_spec(module) is None:
            raise RefusedValueError(
                f"--libraries: {lib} is not installed (make bench installs the peers)"
            )
    if "bbb" in libraries and args.estimator not in bbb.ESTIMATORS:  # was a traceback, late
        raise RefusedValueError(
            f"--estimator: unknown estimator {args.estimator!r} (accepted values: "
            f"{', '.join(bbb.ESTIMATORS)})"
        )
    if args.subset is not None and args.subset < BATCH:
        # fewer examples than one minibatch: no step was ever taken and the loop spun forever
        raise RefusedValueError(
            f"--subset must be at least the batch size {BATCH}, got {args.subset}"
        )
    if not 0.0 < args.target <= 1.0:
        raise RefusedValueError(f"--target must be a validation error in (0, 1], got {args.target}")
    for option, value in (
        ("--eval-every", args.eval_every),
        ("--eval-samples", args.eval_samples),
        ("--max-seconds", args.max_seconds),
        ("--lr", args.lr),
    ):
        if not value > 0:
            raise RefusedValueError(f"{option} must be positive, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. A command line argparse cannot parse exits with 2
    (argparse's ``SystemExit``); a refused value is one line, ``PROG: error: ...``, and exit
    code 1, as ``bbb bench`` gives for the same kind of value (the README's exit codes)."""
    p = argparse.ArgumentParser(prog="benchmarks/time_to_accuracy.py", description=__doc__)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--target", type=float, default=0.03, help="validation error to reach")
    p.add_argument("--estimator", default="local", help="bbb estimator")
    p.add_argument("--libraries", default="bbb,bayesian-torch,blitz")
    p.add_argument("--max-seconds", type=float, default=600.0, help="training budget each")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kernels",
        default="eager",
        choices=bbb.KERNEL_BACKENDS,
        help="bbb's kernel backend (compile, native: built before timing, that time reported "
        "apart)",
    )
    p.add_argument("--subset", type=int, default=None, help="training examples (quick runs)")
    p.add_argument(
        "--no-tune-allocator",
        dest="tune_allocator",
        action="store_false",
        help="leave glibc's malloc as it is (default: bbb.tune_allocator(), for every library)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    try:
        _check_args(args, libraries)
    except RefusedValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    tuned = bbb.tune_allocator() if args.tune_allocator else False
    train = load_mnist(args.data_dir, split="train", subset=args.subset)
    val = load_mnist(args.data_dir, split="val")
    data = (*train.tensors, *val.tensors)
    results = [run(lib, args, data) for lib in libraries]
    for r in results:
        print(f"{r['library']:<15} {r['estimator']:<8} seconds to {args.target:.1%}: "
              f"{r['seconds_to_target']}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "machine": {**machine_info(), "allocator_tuned": tuned},
            "command": " ".join(sys.argv),
            "results": results,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _entry() -> int:
    """``main`` as a command: missing data or a value the library refuses is one line (exit
    code 1), Ctrl-C is ``interrupted`` (exit code 130), as ``bbb bench`` gives them."""
    prog = "benchmarks/time_to_accuracy.py"
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_entry())
