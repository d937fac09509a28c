"""The ``bbb`` command: parses arguments, builds a config, calls the library.

Commands: ``demo``, ``train``, ``evaluate``, ``prune``, ``uci``. Errors are printed as one line
(``bbb: error: ...``) with a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .allocator import tune_allocator_by_default

if typing.TYPE_CHECKING:
    from .config import TrainConfig

# nothing here imports torch (bbb.config does): imported inside main's error handling, a Ctrl-C
# during the second or two that torch takes is the one-line "bbb: interrupted" (exit 130), not a
# traceback -- as long as `import bbb` itself does not import torch first (see bbb/__init__.py)

__all__ = ["main", "build_parser", "HelpFormatter"]

_HELP = {
    "dataset": "data set: mnist, toy (the paper's regression curve) or uci",
    "data_dir": "data root holding mnist/, uci/, mushroom/ (default: $BBB_DATA_DIR, then ../shared/data)",
    "uci_path": "UCI split-format directory (or a name under DATA_DIR/uci); required with "
    "--dataset uci (default: none)",
    "uci_split": "UCI split index",
    "subset": "use only the first N training examples (and at most the first N validation and test "
    "examples of MNIST: bbb evaluate of such a run scores those), for quick runs (default: all)",
    "val_fraction": "UCI: share of the training split held out for validation",
    "toy_n": "toy: number of training points",
    "method": "bbb (Bayes by Backprop), sgd (plain network) or dropout",
    "hidden": "hidden layer widths",
    "dropout": "dropout probability for --method dropout",
    "estimator": "gradient estimator: reparam, local or flipout",
    "prior": "prior: gaussian, scale_mixture or laplace",
    "prior_sigma": "Gaussian prior sigma / Laplace scale",
    "prior_pi": "scale-mixture weight pi of the first component",
    "prior_sigma1": "scale-mixture sigma1",
    "prior_sigma2": "scale-mixture sigma2",
    "kl": "KL: auto, closed_form or mc",
    "mu_init": "posterior mean initialisation: paper (U(-0.2, 0.2)) or fan_in",
    "rho_init": "initial rho (sigma = softplus(rho))",
    "noise": "regression noise: fixed, learned or heteroscedastic",
    "noise_sigma": "regression noise std (fixed) or its initial value (learned)",
    "kl_weighting": "per-minibatch KL weights: uniform or blundell",
    "kl_scale": "constant KL multiplier beta (1 = the ELBO)",
    "kl_anneal_steps": "linear KL warm-up steps (0 = none)",
    "num_samples": "Monte Carlo weight samples per training step",
    "optimizer": "adam or sgd",
    "lr": "learning rate",
    "lr_schedule": "constant, or cosine (decays to 0 over --epochs, stepped per epoch; with "
    "--lr-warmup-steps over the optimizer steps after the warm-up)",
    "lr_warmup_steps": "linear learning-rate warm-up from lr/N to lr over the first N optimizer "
    "steps, then --lr-schedule laid out in optimizer steps; N must be below the run's total "
    "steps (epochs x steps per epoch). 0 = none: --lr-schedule stepped per epoch",
    "steps_per_epoch": "optimizer steps per epoch: several passes over a tiny training set per "
    "epoch (validation, checkpoints, --epochs and --patience count these epochs), or fewer "
    "steps than one pass; with --kl-weighting blundell a multiple of the steps per pass, "
    "ceil(N / batch size) (default: one pass over the training set)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay (deterministic baselines)",
    "batch_size": "minibatch size",
    "epochs": "training epochs",
    "patience": "early stopping after this many epochs without improvement (default: no early "
    "stopping)",
    "grad_clip": "clip the gradient norm to this value (default: no clipping)",
    "seed": "random seed (makes a CPU run reproducible)",
    "val_samples": "weight samples for validation/test predictions",
    "device": "torch device, e.g. cpu or cuda",
    "kernels": "the sample's and KL's elementwise kernels: eager, compile (torch.compile) or "
    "native (C kernels and noise, float32 on CPU); both fall back to eager with a warning",
}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a dataclass field annotation string/type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        elem, is_list = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, f.name)
        if "(default" not in help_text:  # --data-dir states its own (not None)
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if is_list:
            kwargs.update(nargs="+", type=elem)
        else:
            kwargs["type"] = elem
        p.add_argument(flag, **kwargs)


_QUIET_HELP = (
    "no progress bars (they are drawn only when stderr is a terminal: a log file gets the "
    "per-epoch lines, not a bar's carriage returns)"
)


def _show_progress(quiet: bool) -> bool:
    """Whether to draw progress bars: not with ``--quiet``, and only on a terminal. A bar
    redrawn with carriage returns in a log file (``bbb train ... 2> log``, a CI job, nohup)
    leaves hundreds of partial lines per epoch; the per-epoch lines say the same there."""
    if quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``bbb train``: carries the one line that says how to continue."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a long-running command, raised by :func:`_sigterm_as_interrupt`'s
    handler: the Ctrl-C path stops the work (exit code 143, 128 + SIGTERM, not 130)."""


class _TermState:
    """Whether (and when) :func:`_sigterm_as_interrupt`'s handler has fired. With ``defer``
    set the handler only records the signal: the command stops at its next safe point (the
    bandit: after the step under way, which it checkpoints first)."""

    fired = False
    when = 0.0
    defer = False


# the state of the handler installed by the running command (None: none installed)
_ACTIVE_TERM: _TermState | None = None


# a SIGTERM this soon after the first is the same stop, delivered twice (see below)
_REPEAT_SECONDS = 5.0


# the commands that stop on SIGTERM as on Ctrl-C: the long-running, resumable ones
_TERM_COMMANDS = ("train", "uci", "bandit", "sweep")


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool = True) -> typing.Iterator[_TermState]:
    """SIGTERM (what cluster schedulers, Kubernetes and torchrun send to stop a process)
    stops the block like Ctrl-C: the handler raises :class:`_Terminated`, a KeyboardInterrupt,
    in the main thread. Before, the process died at once (exit -15) with no word of how to
    continue the run. Installed by :func:`main` for the long-running commands only (never at
    import), and the previous handler is restored on the way out.

    Only the first SIGTERM raises. Another within :data:`_REPEAT_SECONDS` is a copy of the
    same stop (under SLURM each rank gets the scheduler's SIGTERM and torchrun's forwarded one)
    and is ignored, so it cannot break into the clean-up (a lock's release, a temporary file's
    removal); a later one kills the process at once, as SIGTERM did before (a stop that hangs
    needs no ``kill -9``). The child processes of a ``--jobs`` pool (``bbb uci``) get the
    signal too: without it the pool's shutdown waited for every queued split to be trained."""
    state = _TermState()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state.fired:
            if time.monotonic() - state.when < _REPEAT_SECONDS:
                return
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        state.fired = True
        state.when = time.monotonic()
        if state.defer:
            return
        _terminate_children()
        raise _Terminated("terminated")

    global _ACTIVE_TERM
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not settable here (an embedded interpreter)
        yield state
        return
    outer, _ACTIVE_TERM = _ACTIVE_TERM, state
    try:
        yield state
    finally:
        _ACTIVE_TERM = outer  # main() called again inside a command: the outer one's
        signal.signal(signal.SIGTERM, previous)


def _terminate_children() -> None:
    """SIGTERM to this process's multiprocessing children (a ``--jobs`` pool's workers)."""
    import multiprocessing

    try:
        children = multiprocessing.active_children()
    except Exception:  # noqa: BLE001 - best effort from a signal handler
        return
    for child in children:
        with contextlib.suppress(Exception):
            child.terminate()


def _resume_hint(out: Path) -> str:
    """What ``bbb train`` says when interrupted: how to continue the run in ``out``.

    Under ``torchrun`` every rank is interrupted and prints; only rank 0 (``RANK``, read from
    the environment: the process group is gone by now) gives the command, once.
    """
    import shlex

    rank = os.environ.get("RANK", "0")
    if rank.isdigit() and int(rank) > 0:
        return f"interrupted (rank {int(rank)}; rank 0 says how to continue)"
    if not (out / "config.json").is_file():
        return "interrupted before the run was set up; nothing to resume"
    where = shlex.quote(str(out))
    if not any((out / "checkpoints").glob("checkpoint-*.pt")):
        # --resume would refuse: no epoch ended
        config = shlex.quote(str(out / "config.json"))
        return (
            "interrupted in the first epoch (no checkpoint yet); start the run again with: "
            f"bbb train --config {config} --out {where} --overwrite"
        )
    return f"interrupted; continue the run with: bbb train --resume {where}"


def _rerun_hint(argv: Sequence[str] | None, what: str) -> str:
    """What ``bbb uci`` / ``bbb bandit`` say when interrupted: the same command with
    ``--resume`` (and without ``--overwrite``, which excludes it)."""
    import shlex

    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return f"interrupted; continue ({what}) with: {shlex.join(['bbb', *words])}"


_SEED_HELP = "random seed of the weight samples (the same seed gives the same numbers)"

_DEVICE_HELP = (
    "torch device to evaluate on, e.g. cpu or cuda; run: the run's own device, from its "
    "config.json (a run trained on a GPU needs --device cpu on a machine without one)"
)


def _result_file_name(
    split: str, fraction: float | None = None, per_layer: bool = False, compact: bool = False
) -> str:
    """The file ``bbb evaluate`` / ``bbb prune`` write in the run directory.

    The test split keeps the historical names (``eval.json``, ``prune-<F>.json``); any other
    split is named in the file (``eval-val.json``, ``prune-<F>-val.json``), so evaluating it
    does not overwrite the test results. Pruning each layer separately (``--per-layer``) is
    named too (``prune-<F>-per-layer[-val].json``): it does not replace the global pruning's
    results; so is the evaluation of a compact export (``eval-compact[-val].json``).
    """
    if fraction is None:
        base = "eval-compact" if compact else "eval"
    else:
        # 6 significant digits (the historical prune-0.95.json) unless they round: 0.9999999
        # was prune-1.json, and 0.95 and 0.9500001 overwrote each other's file
        text = f"{fraction:g}"
        if float(text) != fraction:
            text = repr(float(fraction))
        base = f"prune-{text}" + ("-per-layer" if per_layer else "")
    return f"{base}.json" if split == "test" else f"{base}-{split}.json"


def _check_result_writable(run_dir: Path, name: str) -> None:
    """An :class:`OSError` naming ``run_dir`` when ``bbb evaluate`` / ``bbb prune`` could not
    write their result file ``name`` into it (read-only, no permission, a full disk's inode
    table): a file is created there and removed, as the atomic write will do."""
    import os
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{name}.", suffix=".probe", dir=run_dir)
    except OSError as e:
        raise OSError(
            f"cannot write {name} into the run directory {run_dir} ({e.strerror or e}): make "
            "it writable (or copy the run to a writable place) and run the command again; "
            "nothing was evaluated"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _result_json(result: dict[str, Any]) -> str:
    """A result file's text: strict JSON (no NaN or Infinity; None where a value is not finite)."""
    from .train.checkpoint import strict_json

    return strict_json(result, indent=2) + "\n"


def _fmt_metric(value: Any) -> str:
    """A metric for the summary line: 4 significant digits; ``nan`` for a null (non-finite)."""
    if value is None:
        return "nan"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


_DATA_DIR_HELP = (
    "data root holding mnist/, uci/, mushroom/, for a run moved to another machine or trained "
    "with a relative --data-dir in another working directory (default: the run's own "
    "data directory)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of every ``bbb`` command: each option's help ends with its default.

    ``(default: X)`` is appended unless the default is None (nothing to show: the help says
    what happens then) or the help already states the default in its own words.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


class UsageError(ValueError):
    """The command line cannot be used as written (exit code 2): what the parser rejects (an
    unknown command or option, a missing value or one of the wrong type, a value outside the
    option's listed choices) and options that exclude each other. A value the command checks
    (out of range, an unknown name) and every error met while working exit with 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``bbb: error: ...``), not usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bbb",
        description="Bayes by Backprop for PyTorch: train, evaluate and prune Bayesian networks.",
        formatter_class=HelpFormatter,
        epilog="Environment: BBB_DATA_DIR, the data root (default ../shared/data); "
        "BBB_TUNE_ALLOCATOR=0 leaves glibc's malloc as it is (by default the command calls "
        "bbb.tune_allocator(): freed memory is reused instead of faulted in again each step).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bbb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # `bbb bench ARGS...`: forwarded as is to bbb.bench.main (issue 8; see main()).
    sub.add_parser(
        "bench", help="training-step benchmark vs peers (bbb bench --help)", add_help=False
    )
    # `bbb sweep ARGS...`: forwarded to bbb.sweep.main (issue 10; see main()).
    sub.add_parser(
        "sweep", help="hyper-parameter search on Optuna (bbb sweep --help)", add_help=False
    )

    demo = sub.add_parser(
        "demo",
        help="fit the paper's regression curve and plot the uncertainty band",
        formatter_class=HelpFormatter,
        description="Fit a Bayesian MLP and a plain MLP of the same shape to the regression "
        "curve of the paper (section 5.2) and plot the Bayesian network's uncertainty bands "
        "beside the plain fit. Writes OUT/regression.png and OUT/metrics.json (validation "
        "metrics; the 95% band's mean width inside and outside the data), and each network's "
        "run under OUT/bbb and OUT/plain. A run over an existing OUT replaces it.",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--epochs", type=int, default=300, help="training epochs")
    demo.add_argument("--n-train", type=int, default=500, help="training points")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads: numbers independent of the core count with 1, the fastest for "
        "this small network on busy cores; 0 keeps torch's setting (default: 1)",
    )

    train = sub.add_parser(
        "train",
        help="train a network (options from flags or --config; flags win)",
        formatter_class=HelpFormatter,
        description="Train a Bayesian (or baseline) MLP. Every option can also be set in a TOML "
        "config file (--config); flags override the file.",
    )
    train.add_argument("--config", help="TOML config file, or a run's config.json")
    train.add_argument("--out", help="run directory (default: runs/<dataset>-<method>)")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its newest good checkpoint, with its own config.json; "
        "of the other options only --epochs, --patience, --device, --kernels, --data-dir and "
        "--quiet may be given with it",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run directory that already holds a run (its checkpoints, best.pt "
        "and metrics are deleted first)",
    )
    train.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    _add_config_flags(train)

    ev = sub.add_parser(
        "evaluate",
        help="test metrics of a trained run",
        formatter_class=HelpFormatter,
        description="Evaluate a run's best model (best.pt) on its test (or validation) split "
        "with --num-samples weight samples: the metrics over the whole split, and the mean "
        "predictive uncertainty over its first 2000 examples. Prints them and writes them to "
        "the run directory (eval.json, eval-val.json).",
    )
    ev.add_argument("run_dir", help="run directory written by `bbb train`")
    ev.add_argument("--num-samples", type=int, default=100, help="weight samples per prediction")
    ev.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="which split: val or test (results go to eval.json for test, eval-val.json for val)",
    )
    ev.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    ev.add_argument("--device", default="run", help=_DEVICE_HELP)
    ev.add_argument("--data-dir", help=_DATA_DIR_HELP)
    ev.add_argument(
        "--compact",
        metavar="FILE",
        help="evaluate the weights of a compact export (`bbb prune --export FILE`) in the run's "
        "architecture instead of the run's best model (results: eval-compact.json) "
        "(default: the run's best model)",
    )

    pr = sub.add_parser(
        "prune",
        help="remove the weights of lowest signal-to-noise ratio, then evaluate",
        formatter_class=HelpFormatter,
        description="Prune a --method bbb run as in the paper (section 5.1): the weights of "
        "lowest signal-to-noise ratio |mu|/sigma are removed (set to exactly zero in every "
        "sampling mode, and out of the KL), exactly floor(F x n) of the n weights, ties broken "
        "by position; biases are kept. One threshold over all layers, or each layer's own "
        "with --per-layer. Then evaluates as `bbb evaluate` does; the run's files are not "
        "changed (the results go to prune-F.json).",
    )
    pr.add_argument("run_dir", help="run directory written by `bbb train`")
    pr.add_argument(
        "--fraction", type=float, default=0.95, help="share F of the weights to remove, in [0, 1)"
    )
    pr.add_argument("--per-layer", action="store_true", help="threshold each layer separately")
    pr.add_argument("--num-samples", type=int, default=100, help="weight samples per prediction")
    pr.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="which split: val or test (results go to prune-F.json for test, prune-F-val.json "
        "for val; prune-F-per-layer[-val].json with --per-layer)",
    )
    pr.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    pr.add_argument("--device", default="run", help=_DEVICE_HELP)
    pr.add_argument("--data-dir", help=_DATA_DIR_HELP)
    pr.add_argument(
        "--export",
        metavar="FILE",
        help="also save the pruned network compactly (only its kept weights; bbb.save_compact) "
        "and report its size on disk; `bbb evaluate RUN --compact FILE` evaluates it "
        "(default: no export)",
    )
    from .uci import add_parser as _add_uci_parser

    _add_uci_parser(sub)
    from .bandit import add_parser as _add_bandit_parser

    _add_bandit_parser(sub)
    return parser


def _train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    from .config import ConfigError, TrainConfig, anchored_uci_path, load_config_file
    from .runs import RESUMABLE_CHANGES

    values: dict[str, Any] = {}
    resume = args.resume is not None
    source = args.config or "flags"
    from_file: dict[str, Any] = {}
    if resume:
        clash = [f for f in ("config", "out", "overwrite") if getattr(args, f)]
        if clash:
            raise UsageError(
                f"--resume continues the run in its own directory with its own config.json; it "
                f"cannot be combined with {', '.join('--' + f for f in clash)}"
            )
        run = Path(args.resume)
        saved = run / "config.json"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} does not exist")
        from_file = load_config_file(saved)
        values.update(from_file)
        source = str(saved)
        old = TrainConfig.from_dict(values, source=source).to_dict()
        if old["uci_path"] and args.uci_path:  # saved absolute (see bbb.runs.train_run)
            old["uci_path"] = anchored_uci_path(old["uci_path"])
            args.uci_path = anchored_uci_path(args.uci_path)
        changed = [  # a flag repeating the run's own value is harmless
            f"--{n.replace('_', '-')} ({old[n]!r} -> {getattr(args, n)!r})"
            for n in TrainConfig.field_names()
            if getattr(args, n) is not None
            and n not in RESUMABLE_CHANGES
            and getattr(args, n) != old[n]
        ]
        if changed:
            allowed = ", ".join("--" + n.replace("_", "-") for n in RESUMABLE_CHANGES)
            raise UsageError(
                f"{', '.join(changed)} cannot change when resuming (the run continues with the "
                f"settings its weights, optimiser and schedule were made with); only {allowed} "
                "can"
            )
    elif args.config:
        from_file = load_config_file(args.config)
        values.update(from_file)
    flags = {name for name in TrainConfig.field_names() if getattr(args, name) is not None}
    for name in flags:
        values[name] = getattr(args, name)
    # a resumed run's own settings are not refused for being ignored (see TrainConfig.validate);
    # a flag given is refused when the run never reads it, even at its default value
    # (`--noise-sigma 1` for MNIST); a config file's keys only when changed from the default
    # (a run's config.json, a documented --config, holds every key)
    try:
        cfg = TrainConfig.from_dict(values, source=source).validate(
            check_applicable=not resume, given=flags
        )
    except ConfigError as e:
        # a bad value read from a config file is named with the file (was "lr must be a
        # finite positive number, got -1" with no word of where the -1 came from)
        key = str(e).split(" ", 1)[0]
        if key in from_file and key not in flags:
            raise ConfigError(f"{source}: {e}") from None
        raise
    out = Path(args.resume) if resume else Path(args.out or f"runs/{cfg.dataset}-{cfg.method}")
    return cfg, out, resume


def _evaluate(
    run_dir: str,
    num_samples: int,
    split: str,
    prune: float | None,
    per_layer: bool,
    seed: int = 0,
    device: str | None = None,
    compact: str | None = None,
    export: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from .config import ConfigError
    from .likelihoods import Categorical, Gaussian
    from .predictive import ClassificationPrediction, predict
    from .pruning import dense_state_bytes, load_compact, prune_by_snr, save_compact
    from .runs import load_run
    from .train.trainer import evaluate, seed_everything

    # the options' values first: a bad one is reported whatever the run holds (exit code 1,
    # like every value check; see UsageError)
    if num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {num_samples}")
    if not 0 <= seed < 2**64:  # what torch's generators take
        raise ValueError(f"--seed must be a non-negative integer below 2**64, got {seed}")
    if prune is not None and not (math.isfinite(prune) and 0.0 <= prune < 1.0):
        raise ValueError(f"--fraction must lie in [0, 1), got {prune!r}")
    for flag, value in (("--export", export), ("--compact", compact)):
        if value is not None and not value.strip():  # an unset shell variable: "." otherwise
            raise ValueError(f"{flag} is empty: give a file name")
    if export is not None and not Path(export).resolve().parent.is_dir():
        raise ValueError(f"--export {export}: its directory does not exist")
    if export is not None and Path(export).is_dir():
        raise ValueError(f"--export {export} is a directory: give the file to write")
    cfg, model, likelihood, data = load_run(run_dir, device=device, data_dir=data_dir)
    if prune is not None and cfg.method != "bbb":
        raise ConfigError(
            f"{run_dir} was trained with --method {cfg.method}: its weights have no posterior, "
            "hence no signal-to-noise ratio to prune by (bbb prune needs a --method bbb run)"
        )
    # the result file goes into the run directory: refused now, not after the evaluation
    _check_result_writable(
        Path(run_dir), _result_file_name(split, prune, per_layer, compact is not None)
    )
    if compact is not None:
        load_compact(model, compact)
    splits = {"val": data.val, "test": data.test}
    ds = splits[split]
    if ds is None:
        have = [name for name, d in splits.items() if d is not None]
        hint = f" (use --split {' or '.join(have)})" if have else ""
        raise ConfigError(f"the run's data set has no {split} split{hint}")
    # the weight samples (and nothing else) are random: seeded, the numbers are reproducible
    seed_everything(seed)
    result: dict[str, Any] = {
        "run": run_dir,
        "split": split,
        "num_samples": num_samples,
        "seed": seed,
        "device": cfg.device,
        # how many examples were evaluated (a run trained with --subset N evaluates the first
        # min(N, 10000) validation / test images of MNIST)
        "n_examples": len(ds),
    }
    if compact is not None:
        result["compact"] = compact
    if prune is not None:
        pr = prune_by_snr(model, prune, per_layer=per_layer)
        result["pruned"] = {
            "fraction": pr.fraction,
            "per_layer": per_layer,
            # per layer there is no single threshold: each layer has its own
            "threshold": None if per_layer else pr.threshold,
            "removed": pr.removed,
            "total": pr.total,
        }
        if export is not None:
            result["pruned"]["export"] = export
            result["pruned"]["export_bytes"] = save_compact(model, export)
            result["pruned"]["dense_state_bytes"] = dense_state_bytes(model)
    samples = num_samples if cfg.method == "bbb" else 1
    # load_run builds the likelihood from the run's data (build_likelihood): one of these two
    assert isinstance(likelihood, (Categorical, Gaussian)), type(likelihood)
    report = evaluate(
        model,
        DataLoader(ds, batch_size=1000),
        likelihood,
        num_samples=samples,
        device=cfg.device,
        y_scale=data.y_std,
    )
    result["metrics"] = report
    # the uncertainty summary is taken over the first 2000 examples (a predict of every weight
    # sample at once): said in the result, whose n_examples counts the whole split
    x = ds.tensors[0][:_UNCERTAINTY_EXAMPLES].to(cfg.device)
    pred = predict(model, x, likelihood=likelihood, num_samples=samples)
    if isinstance(pred, ClassificationPrediction):
        result["uncertainty"] = {
            "n_examples": int(x.shape[0]),
            "mean_entropy": float(pred.entropy.mean()),
            "mean_aleatoric": float(pred.aleatoric.mean()),
            "mean_epistemic": float(pred.epistemic.mean()),
        }
    else:
        s2 = data.y_std**2
        result["uncertainty"] = {
            "n_examples": int(x.shape[0]),
            "mean_total_variance": float(pred.variance.mean()) * s2,
            "mean_aleatoric_variance": float(pred.aleatoric.mean()) * s2,
            "mean_epistemic_variance": float(pred.epistemic.mean()) * s2,
            # calibration of the same predictions against their targets (the split's first
            # examples too): coverage of the central intervals, calibration error, CRPS
            **_regression_calibration(pred, ds.tensors[1][: x.shape[0]], data.y_std),
        }
    return result


def _regression_calibration(pred: Any, target: Any, y_scale: float) -> dict[str, float]:
    """:func:`bbb.runs.regression_calibration` (``bbb train`` writes the same numbers of the
    whole validation and test splits into ``metrics.json``)."""
    from .runs import regression_calibration

    return regression_calibration(pred, target, y_scale)


#: the keys of a regression result's ``uncertainty`` section that ``bbb evaluate`` prints
#: in a ``calibration:`` section of their own (the result file keeps them in ``uncertainty``)
_CALIBRATION_KEYS = ("calibration_error", "calibration_rmse", "crps")


def _is_calibration_key(key: str) -> bool:
    return key.startswith("coverage_") or key in _CALIBRATION_KEYS


_UNCERTAINTY_EXAMPLES = 2000


def _print_table(result: dict[str, Any]) -> None:
    """Print a ``bbb evaluate`` / ``bbb prune`` result: ``pruned:``, ``metrics:`` and
    ``uncertainty:``, and for a regression run ``calibration:`` (central-interval coverage,
    calibration error, CRPS of the same first examples as ``uncertainty``), which the result
    file holds in its ``uncertainty`` section."""

    def rows(items: dict[str, Any]) -> None:
        for k, v in items.items():
            print(f"  {k:24s} {v:.6g}" if isinstance(v, float) else f"  {k:24s} {v}")

    for section in ("pruned", "metrics"):
        if section in result:
            print(f"{section}:")
            rows(result[section])
    if "uncertainty" in result:
        u = result["uncertainty"]
        calibration = {k: v for k, v in u.items() if _is_calibration_key(k)}
        print("uncertainty:")
        rows({k: v for k, v in u.items() if k not in calibration})
        if calibration:
            print("calibration:")
            rows({"n_examples": u.get("n_examples"), **calibration})


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # unknown options are reported by the top-level parser, which pointed at `bbb --help`
        # instead of the subcommand's own options
        prog = f"bbb {args.command}" if args.command else "bbb"
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)")
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            args.out,
            epochs=args.epochs,
            n_train=args.n_train,
            seed=args.seed,
            progress=_show_progress(args.quiet),
            threads=None if args.threads == 0 else args.threads,
        )
        return 0
    if args.command == "train":
        from .runs import train_run

        cfg, out, resume = _train_config(args)
        try:
            summary = train_run(
                cfg,
                out,
                resume=resume,
                overwrite=args.overwrite,
                progress=_show_progress(args.quiet),
            )
        except KeyboardInterrupt:
            raise _Interrupted(_resume_hint(out)) from None
        metrics = json.loads((out / "metrics.json").read_text())
        print(f"run directory: {out}")
        print(
            f"best epoch {summary['best_epoch']} of {summary['epochs_trained']}, {summary['wall_seconds']:.1f}s"
        )
        for split in ("val", "test"):
            if split in metrics:
                text = ", ".join(f"{k}={_fmt_metric(v)}" for k, v in metrics[split].items())
                print(f"{split}: {text}")
        for split, report in metrics.get("calibration", {}).items():
            keys = ("coverage_50", "coverage_90", "calibration_error", "crps")
            text = ", ".join(f"{k}={_fmt_metric(report.get(k))}" for k in keys)
            print(f"{split} calibration: {text}")
        return 0
    if args.command in ("evaluate", "prune"):
        fraction = args.fraction if args.command == "prune" else None
        per_layer = getattr(args, "per_layer", False)
        result = _evaluate(
            args.run_dir,
            args.num_samples,
            args.split,
            fraction,
            per_layer,
            seed=args.seed,
            device=None if args.device == "run" else args.device,
            compact=getattr(args, "compact", None),
            export=getattr(args, "export", None),
            data_dir=args.data_dir,
        )
        name = _result_file_name(args.split, fraction, per_layer, result.get("compact") is not None)
        from .train.checkpoint import atomic_write_text

        # written before anything is printed: a reader that closes the pipe early
        # (`bbb evaluate RUN | head -1`) loses no result
        atomic_write_text(Path(args.run_dir) / name, _result_json(result))
        _print_table(result)
        print(f"written: {Path(args.run_dir) / name}")
        return 0
    if args.command == "uci":
        from .uci import main_uci

        try:
            return main_uci(args)
        except KeyboardInterrupt:
            raise _Interrupted(_rerun_hint(argv, "finished splits are kept")) from None
    if args.command == "bandit":
        from .bandit import main_bandit

        # its --quiet only turns the progress bar off: no bar into a log either (see _QUIET_HELP)
        args.quiet = not _show_progress(args.quiet)

        # SIGTERM stops the bandit after the step under way, checkpointed (as --max-minutes
        # does): up to checkpoint_every steps of work were lost when it broke in mid-step
        term = _ACTIVE_TERM
        if term is not None:
            term.defer = True
        try:
            return main_bandit(args)  # which reads term.fired after every step
        except KeyboardInterrupt:
            raise _Interrupted(_rerun_hint(argv, "from its last checkpoint")) from None
        finally:
            if term is not None:
                term.defer = False
    parser.error(f"unknown command {args.command!r}")
    return 2


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of a ``bbb`` command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _sweep_hint(argv: Sequence[str]) -> str:
    """What an interrupted ``bbb sweep SPACE --out DIR`` says: the same command continues
    the study (the interrupted trial was queued again). ``show`` / ``best`` and the worker
    processes a sweep starts (``--worker-id``) have nothing to continue."""
    import shlex

    from .sweep.cli import split_subcommand
    from .sweep.storage import _masked

    words = list(argv)
    # options may come before show/best (`bbb sweep --storage URL show DIR`)
    if split_subcommand(words)[0] != "run" or any(w.startswith("--worker-id") for w in words):
        return "interrupted"
    # a storage URL's password is not printed (the user gives it again)
    for i, w in enumerate(words):
        if w.startswith("--storage="):
            words[i] = "--storage=" + _masked(w.split("=", 1)[1])
        elif w == "--storage" and i + 1 < len(words):
            words[i + 1] = _masked(words[i + 1])
    return f"interrupted; continue the sweep with: {shlex.join(['bbb', 'sweep', *words])}"


def _lenient_stdout() -> io.TextIOWrapper | None:
    """Let stdout print any path: a directory name with bytes that are not UTF-8 (decoded by
    Python to surrogates) under a UTF-8 locale, or a non-ASCII name under an ASCII one, made
    ``print`` raise UnicodeEncodeError after the work was done (``bbb train`` trained, then
    exited 1 at ``run directory: ...``). A strict stdout is switched to ``surrogateescape``
    (UTF-8: the name's own bytes come out) or ``backslashreplace``; returns the stream to
    restore, or None when nothing was changed."""
    stream = sys.stdout
    if not isinstance(stream, io.TextIOWrapper) or stream.errors != "strict":
        return None
    try:
        utf8 = codecs.lookup(stream.encoding).name == "utf-8"
        stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
    except (LookupError, ValueError, OSError):
        return None
    return stream


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """``bbb: warning: MESSAGE``: a warning of the command as one line (the category is named
    unless it is a plain UserWarning, such as bbb's own)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"bbb: warning: {kind}{message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bbb`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the line, not only before the command
        argv = [a for a in argv if a != "--debug"]
    # a bbb process trains or evaluates: keep freed tensors' memory for reuse (bbb.allocator;
    # BBB_TUNE_ALLOCATOR=0 opts out; the benchmark decides for itself, --no-tune-allocator)
    if argv[:1] != ["bench"]:
        tune_allocator_by_default()
    # a warning is one line on stderr, like an error (not the library's file, line number and
    # source line); --debug keeps Python's format, which says where it was raised
    previous_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _format_warning
    strict_stdout = _lenient_stdout()
    term = _TermState()
    try:
        # SIGTERM stops the long-running commands as Ctrl-C does (see _sigterm_as_interrupt)
        with _sigterm_as_interrupt(_command_of(argv) in _TERM_COMMANDS) as term:
            if argv[:1] == ["bench"]:  # the benchmark parses its own options
                from .bench import main as bench_main

                return bench_main(argv[1:])
            if argv[:1] == ["sweep"]:  # the sweep parses its own options (show, best, run)
                from .sweep import main as sweep_main

                try:
                    return sweep_main(argv[1:])
                except KeyboardInterrupt:
                    raise _Interrupted(_sweep_hint(argv[1:])) from None
            return run(argv)
    except KeyboardInterrupt as e:
        text = str(e) if isinstance(e, _Interrupted) else "interrupted"
        if term.fired:  # the same line, saying what stopped the command
            text = "terminated (SIGTERM)" + text.removeprefix("interrupted")
        print(f"bbb: {text}", file=sys.stderr)
        return 143 if term.fired else 130
    except BrokenPipeError:
        # the reader of stdout went away (`bbb ... | head`): nothing more to say to it; point
        # stdout at /dev/null so the interpreter's final flush does not fail again, and exit
        # as a process killed by SIGPIPE would (128 + 13), like other command-line tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except UsageError as e:
        print(f"bbb: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the message, no traceback unless --debug
        if debug:
            raise
        # the whole message: its later lines often hold the details (the mismatching
        # tensors of a state dict, the paths tried) and the remedy
        msg = str(e).strip() or type(e).__name__
        print(f"bbb: error: {msg}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous_format
        if strict_stdout is not None:
            with contextlib.suppress(ValueError, OSError):  # closed: its reader went away
                strict_stdout.reconfigure(errors="strict")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
