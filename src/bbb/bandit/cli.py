"""``bbb bandit``: its command-line flags and entry point."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..nn.estimators import ESTIMATORS
from .config import BANDIT_KERNELS, KL_DATA_SIZES, BanditConfig
from .env import AGENTS, LATE_WINDOW
from .results import merge_runs
from .run import run_bandit


def add_parser(sub: Any) -> None:
    """Register ``bbb bandit`` on the CLI's subparsers."""
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "bandit",
        help="the Mushroom contextual bandit (paper section 5.3), resumable",
        formatter_class=HelpFormatter,
    )
    d = BanditConfig()
    p.add_argument("--agents", nargs="+", default=d.agents, help=f"any of {', '.join(AGENTS)}")
    p.add_argument("--steps", type=int, default=d.steps, help="environment steps")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=d.seeds, help="seeds (one data stream each)"
    )
    p.add_argument(
        "--updates-per-step",
        type=int,
        default=d.updates_per_step,
        help="minibatch updates after each step",
    )
    p.add_argument("--hidden", type=int, default=d.hidden, help="units in each of 2 hidden layers")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    p.add_argument(
        "--buffer-size", type=int, default=d.buffer_size, help="replay buffer (last interactions)"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument(
        "--adam-eps",
        type=float,
        default=d.adam_eps,
        help="Adam's eps (all agents; larger damps the KL-only drift of data-less weights)",
    )
    p.add_argument(
        "--thompson-samples",
        type=int,
        default=d.thompson_samples,
        help="weight samples averaged per decision",
    )
    p.add_argument(
        "--estimator",
        default=d.estimator,
        help=f"BBB training estimator: {', '.join(ESTIMATORS)}",
    )
    p.add_argument("--prior", default=d.prior, help="BBB prior: gaussian, scale_mixture or laplace")
    p.add_argument(
        "--prior-pi", type=float, default=d.prior_pi, help="scale mixture: weight of sigma1"
    )
    p.add_argument(
        "--prior-sigma1", type=float, default=d.prior_sigma1, help="scale mixture: wide sigma"
    )
    p.add_argument(
        "--prior-sigma2", type=float, default=d.prior_sigma2, help="scale mixture: narrow sigma"
    )
    p.add_argument(
        "--prior-sigma", type=float, default=d.prior_sigma, help="gaussian sigma / laplace scale"
    )
    p.add_argument(
        "--noise-sigma",
        type=float,
        default=d.noise_sigma,
        help="BBB agent's Gaussian reward-noise sd (likelihood)",
    )
    p.add_argument(
        "--rho-init", type=float, default=d.rho_init, help="initial rho (sigma = softplus(rho))"
    )
    p.add_argument(
        "--kl-data-size",
        default=d.kl_data_size,
        choices=KL_DATA_SIZES,
        help="BBB ELBO's N: the buffer's current size (the protocol), all interactions seen, "
        "or the buffer's capacity from the first step (the KL never outweighs a near-empty buffer)",
    )
    p.add_argument(
        "--prior-update",
        type=int,
        default=d.prior_update,
        metavar="STEPS",
        help="every STEPS steps the BBB agent's prior becomes its current posterior "
        "(variational continual learning; a variant, not the paper's agent; 0: never)",
    )
    p.add_argument(
        "--kernels",
        default=d.kernels,
        choices=BANDIT_KERNELS,
        help="the Bayesian agent's update: eager PyTorch, or native (C noise and fused "
        "gradients; float32 CPU, Gaussian prior; built on first use, eager with a warning "
        "where it cannot be)",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="data root holding mushroom/ (default: $BBB_DATA_DIR, ../shared/data)",
    )
    p.add_argument("--out", default="runs/bandit", help="run directory")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that already holds a run (its checkpoints and results are "
        "deleted first)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes (checked every step; the step reached is "
        "checkpointed, continue with --resume) (default: no limit)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="instead of running: combine finished runs of disjoint agents into --out",
    )


def main_bandit(args: Any, should_stop: Callable[[], bool] | None = None) -> int:
    """Run ``bbb bandit`` from parsed arguments.

    ``should_stop`` is checked after every step: once true, the step reached is checkpointed
    and ``KeyboardInterrupt`` is raised (the CLI then names the command that continues the
    run). None: the ``bbb`` command's SIGTERM flag, when its handler defers to this check."""
    if should_stop is None:
        from .. import cli

        term = cli._ACTIVE_TERM
        if term is not None and term.defer:
            should_stop = lambda: term.fired  # noqa: E731
    from dataclasses import fields

    # every BanditConfig field has a flag of the same name (argparse dest)
    cfg = BanditConfig(**{f.name: getattr(args, f.name) for f in fields(BanditConfig)})
    if args.max_minutes is not None and not (
        math.isfinite(args.max_minutes) and args.max_minutes > 0
    ):
        raise ValueError(
            f"--max-minutes must be a positive number of minutes, got {args.max_minutes}"
        )
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    if args.merge:
        summary = merge_runs(args.merge, args.out)
    else:
        summary = run_bandit(
            cfg,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
            max_seconds=max_seconds,
            should_stop=should_stop,
        )
        if summary.get("stopped_by") == "request":
            raise KeyboardInterrupt
    window = summary.get("per_step_regret_window", LATE_WINDOW)
    for agent, v in summary["agents"].items():
        # a standard deviation over one seed is not 0 but undefined: not printed
        n_seeds = len(v.get("cumulative_regret_per_seed", []))
        spread = (
            f" +- {v['cumulative_regret_std']:.1f} (sd over {n_seeds} seeds)"
            if n_seeds > 1
            else " (one seed: sd n/a)"
        )
        print(
            f"{agent:14s} cumulative regret {v['cumulative_regret_mean']:.1f}{spread} "
            f"(per step, last {window} steps: {v['per_step_regret_last_10000_mean']:.3f})"
        )
    if summary.get("complete") is False:
        print(
            f"stopped at step {summary['steps_done']} of {summary['steps']} (--max-minutes); "
            "continue with the same flags and --resume"
        )
    return 0
