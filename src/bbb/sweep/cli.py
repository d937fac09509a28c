"""``bbb sweep``: its command line (run, show, best)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from .results import best_config_toml, show_sweep
from .run import SweepOptions, run_sweep
from .space import PRUNERS, SAMPLERS, SweepError


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    from ..cli import _Parser

    run = _Parser(
        prog="bbb sweep",
        description="Hyper-parameter search on Optuna. `bbb sweep SPACE.toml --out DIR` runs "
        "(or resumes, or joins) a study; `bbb sweep show DIR` and `bbb sweep best DIR` read it.",
    )
    run.add_argument("space", help="space file (TOML): [sweep], [train] fixed options, [search]")
    run.add_argument("--out", required=True, help="sweep directory (trial runs, SQLite study)")
    run.add_argument("--trials", type=int, help="trial budget (default: the whole grid)")
    run.add_argument(
        "--workers", type=int, default=1, help="worker processes on this machine (default: 1)"
    )
    run.add_argument(
        "--storage",
        default=os.environ.get("BBB_SWEEP_STORAGE"),
        help="study storage, e.g. postgresql://user:pw@host/db (default: DIR/study.db)",
    )
    run.add_argument("--sampler", choices=SAMPLERS, help="default: grid for grids, else tpe")
    run.add_argument("--pruner", choices=PRUNERS, help="default: median")
    run.add_argument(
        "--study-name", default="bbb-sweep", help="study name in the storage (default: bbb-sweep)"
    )
    run.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="worker heartbeat in seconds (default: 60); a trial silent for 3x this is retried",
    )
    run.add_argument(
        "--verbose", action="store_true", help="print every epoch of every trial (default: off)"
    )
    run.add_argument(
        "--no-trial-plots",
        action="store_true",
        help="no PNG files in the trial run directories (default: off)",
    )
    run.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)

    show = _Parser(prog="bbb sweep show", description="The best trials and plots of a sweep.")
    show.add_argument("sweep_dir")
    show.add_argument("--top", type=int, default=10, help="rows of the table (default: 10)")
    show.add_argument(
        "--storage",
        default=os.environ.get("BBB_SWEEP_STORAGE"),
        help="storage URL (default: $BBB_SWEEP_STORAGE, then the one the sweep recorded)",
    )
    show.add_argument("--study-name", help="study name (default: the one the sweep recorded)")
    show.add_argument("--no-plots", action="store_true", help="table and CSV only (default: off)")

    best = _Parser(prog="bbb sweep best", description="The best configuration as TOML.")
    best.add_argument("sweep_dir")
    best.add_argument(
        "--storage",
        default=os.environ.get("BBB_SWEEP_STORAGE"),
        help="storage URL (default: $BBB_SWEEP_STORAGE, then the one the sweep recorded)",
    )
    best.add_argument("--study-name", help="study name (default: the one the sweep recorded)")
    best.add_argument("-o", "--output", help="also write the TOML to this file")
    return run, show, best


def main(argv: Sequence[str]) -> int:
    """``bbb sweep ...`` (called by :func:`bbb.cli.main`, which prints errors as one line)."""
    run, show, best = _parsers()
    argv = list(argv)
    if argv[:1] == ["show"]:
        a = show.parse_args(argv[1:])
        if a.top < 1:  # 0 printed "no finished trial yet", -1 dropped the last row
            # a refused value: exit code 1, like --trials 0 (a usage error's 2 is for a
            # malformed command line, --top abc)
            raise SweepError(f"--top must be >= 1, got {a.top}")
        print(
            show_sweep(
                Path(a.sweep_dir),
                top=a.top,
                storage=a.storage,
                study_name=a.study_name,
                plots=not a.no_plots,
            )
        )
        return 0
    if argv[:1] == ["best"]:
        a = best.parse_args(argv[1:])
        text = best_config_toml(Path(a.sweep_dir), storage=a.storage, study_name=a.study_name)
        # printed first: a file that cannot be written loses nothing (it was lost with the
        # error); written atomically (a crash never leaves half a TOML under the name)
        print(text, end="", flush=True)
        if a.output:
            from ..train.checkpoint import atomic_write_text

            try:
                atomic_write_text(a.output, text)
            except OSError as e:
                raise SweepError(
                    f"cannot write {a.output} ({e.strerror or e}); the TOML is printed above"
                ) from None
        return 0
    a = run.parse_args(argv)
    # the options' values first, as bbb train does: before Optuna is imported or the space
    # file read (run_sweep checks them again for a caller of the library)
    for option, value, minimum in (
        ("--trials", a.trials, 1),
        ("--workers", a.workers, 1),
        ("--heartbeat", a.heartbeat, 1),
    ):
        if value is not None and value < minimum:
            unit = " second" if option == "--heartbeat" else ""
            raise SweepError(f"{option} must be >= {minimum}{unit}, got {value}")
    opts = SweepOptions(
        space=Path(a.space),
        out=Path(a.out),
        trials=a.trials,
        workers=a.workers,
        storage=a.storage,
        sampler=a.sampler,
        pruner=a.pruner,
        study_name=a.study_name,
        heartbeat=a.heartbeat,
        verbose=a.verbose,
        trial_plots=not a.no_trial_plots,
        worker_id=a.worker_id,
    )
    return run_sweep(opts)
