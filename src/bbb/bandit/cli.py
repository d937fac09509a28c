"""``bbb bandit``: its command-line flags and entry point."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..nn.estimators import ESTIMATORS
from .config import BANDIT_KERNELS, KL_DATA_SIZES, BanditConfig, read_saved_config
from .env import AGENTS, LATE_WINDOW
from .results import merge_runs
from .run import run_bandit

#: the namespace attribute listing the BanditConfig settings given on the command line
GIVEN = "_bandit_given"


class _Given(argparse.Action):
    """Stores the option's value (as argparse's ``store``) and records its name in
    ``namespace._bandit_given``: with ``--resume``, settings not given come from the run's
    ``config.json`` (not from this version's defaults, which may have changed since)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), self.dest})


def add_parser(sub: Any) -> None:
    """Register ``bbb bandit`` on the CLI's subparsers."""
    from ..cli import HelpFormatter

    p = sub.add_parser(
        "bandit",
        help="the Mushroom contextual bandit (paper section 5.3), resumable",
        formatter_class=HelpFormatter,
    )
    d = BanditConfig()
    # every BanditConfig field has a flag of the same name (argparse dest), recorded when given
    setting = functools.partial(p.add_argument, action=_Given)
    setting("--agents", nargs="+", default=d.agents, help=f"any of {', '.join(AGENTS)}")
    setting("--steps", type=int, default=d.steps, help="environment steps")
    setting("--seeds", type=int, nargs="+", default=d.seeds, help="seeds (one data stream each)")
    setting(
        "--updates-per-step",
        type=int,
        default=d.updates_per_step,
        help="minibatch updates after each step",
    )
    setting("--hidden", type=int, default=d.hidden, help="units in each of 2 hidden layers")
    setting("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    setting(
        "--buffer-size", type=int, default=d.buffer_size, help="replay buffer (last interactions)"
    )
    setting("--lr", type=float, default=d.lr, help="Adam learning rate")
    setting(
        "--adam-eps",
        type=float,
        default=d.adam_eps,
        help="Adam's eps (all agents; larger damps the KL-only drift of data-less weights)",
    )
    setting(
        "--thompson-samples",
        type=int,
        default=d.thompson_samples,
        help="weight samples averaged per decision",
    )
    setting(
        "--estimator",
        default=d.estimator,
        help=f"BBB training estimator: {', '.join(ESTIMATORS)}",
    )
    setting("--prior", default=d.prior, help="BBB prior: gaussian, scale_mixture or laplace")
    setting("--prior-pi", type=float, default=d.prior_pi, help="scale mixture: weight of sigma1")
    setting("--prior-sigma1", type=float, default=d.prior_sigma1, help="scale mixture: wide sigma")
    setting(
        "--prior-sigma2", type=float, default=d.prior_sigma2, help="scale mixture: narrow sigma"
    )
    setting(
        "--prior-sigma", type=float, default=d.prior_sigma, help="gaussian sigma / laplace scale"
    )
    setting(
        "--noise-sigma",
        type=float,
        default=d.noise_sigma,
        help="BBB agent's Gaussian reward-noise sd (likelihood)",
    )
    setting(
        "--rho-init", type=float, default=d.rho_init, help="initial rho (sigma = softplus(rho))"
    )
    setting(
        "--kl-data-size",
        default=d.kl_data_size,
        choices=KL_DATA_SIZES,
        help="BBB ELBO's N: the buffer's current size (the protocol), all interactions seen, "
        "or the buffer's capacity from the first step (the KL never outweighs a near-empty buffer)",
    )
    setting(
        "--prior-update",
        type=int,
        default=d.prior_update,
        metavar="STEPS",
        help="every STEPS steps the BBB agent's prior becomes its current posterior "
        "(variational continual learning; a variant, not the paper's agent; 0: never)",
    )
    setting(
        "--kernels",
        default=d.kernels,
        choices=BANDIT_KERNELS,
        help="the Bayesian agent's update: eager PyTorch, or native (C noise and fused "
        "gradients; float32 CPU, Gaussian prior; built on first use, eager with a warning "
        "where it cannot be)",
    )
    setting(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    setting(
        "--data-dir",
        default=None,
        help="data root holding mushroom/ (default: $BBB_DATA_DIR, ../shared/data)",
    )

    p.add_argument("--out", default="runs/bandit", help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint; settings not given are "
        "the run's own (its config.json); --steps, --checkpoint-every and --data-dir may change",
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


def config_from_args(args: Any) -> BanditConfig:
    """The run's settings from parsed ``bbb bandit`` arguments: every flag's value, except
    with ``--resume`` (not ``--merge``) of a run that has a ``config.json``, where a setting
    not given on the command line is the run's own (``read_saved_config``). So a run started
    before a default changed resumes with the command that started it, or with just
    ``--resume --out RUN_DIR``; a setting given that differs from the run's is refused by
    ``run_bandit`` (all but ``--steps``, ``--checkpoint-every`` and ``--data-dir``)."""
    names = [f.name for f in fields(BanditConfig)]
    values = {name: getattr(args, name) for name in names}
    saved_path = Path(args.out) / "config.json"
    if args.resume and not args.merge and saved_path.is_file():
        given: set[str] = getattr(args, GIVEN, set())
        saved = asdict(read_saved_config(saved_path))
        values = {name: values[name] if name in given else saved[name] for name in names}
    return BanditConfig(**values)


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
    cfg = config_from_args(args)
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
            f"continue with --resume --out {args.out}"
        )
    return 0
