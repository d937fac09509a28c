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


SUBCOMMANDS = ("show", "best")


def split_subcommand(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``("show" | "best" | "run", the arguments without the subcommand word)``.

    The subcommand is the first word that is neither an option nor an option's value, so
    options may come before it (``bbb sweep --storage URL show DIR``, the form of
    ``bbb sweep SPACE --storage URL``): only the first word was looked at, and ``show`` was then
    read as the run's space file. Without ``show`` / ``best`` the words are the run's.
    """
    parsers = _parsers()
    # every option string of the three parsers, and those that take a value
    options: dict[str, bool] = {}
    for parser in parsers:
        for action in parser._actions:
            for opt in action.option_strings:
                options[opt] = options.get(opt, False) or action.nargs != 0
    words = list(argv)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--":  # what follows is positional: a space file, whatever its name
            return "run", words
        if not w.startswith("-") or w == "-":  # the first positional word
            if w in SUBCOMMANDS:
                return w, words[:i] + words[i + 1 :]
            return "run", words
        if w.startswith("--") and "=" in w:  # --option=value: one word
            i += 1
            continue
        name = w
        if w.startswith("--") and w not in options:
            # argparse's unambiguous abbreviation of a long option (--stor URL)
            full = [o for o in options if o.startswith(w)]
            name = full[0] if len(full) == 1 else w
        i += 2 if options.get(name, False) else 1  # the option's value is the next word
    return "run", words


def main(argv: Sequence[str]) -> int:
    """``bbb sweep ...`` (called by :func:`bbb.cli.main`, which prints errors as one line)."""
    run, show, best = _parsers()
    command, argv = split_subcommand(argv)
    if command == "show":
        a = show.parse_args(argv)
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
    if command == "best":
        a = best.parse_args(argv)
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
