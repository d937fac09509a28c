"""``bbb sweep``: hyper-parameter search on Optuna, from a laptop to many machines.

A *space file* (TOML) names the base command, its fixed options and the searched ones::

    [sweep]
    command = "train"          # the base command (only `train` so far)
    metric = "error"           # validation metric to optimise (default: error / nll)
    trials = 20                # default budget for spaces with ranges (--trials wins)

    [train]                    # fixed options of the base command (TrainConfig keys)
    dataset = "mnist"
    epochs = 20

    [search]                   # one entry per searched option
    lr = { log_float = [1e-5, 1e-2] }                 # a range: int, float or log_float
    num_samples = { grid = [1, 2, 5] }                # a grid (exhaustive when all are grids)
    prior = { choices = ["gaussian", "laplace"] }     # a list (sampled, never exhaustive)
    prior_sigma1 = { grid = [0, 1, 2], transform = "exp(-x)" }   # searched k, used exp(-k)

Every trial is an ordinary run directory ``SWEEP_DIR/trials/trial-NNNN`` written by
:func:`bbb.runs.train_run` with the test split left out; the validation metric of each epoch is
reported to Optuna, whose pruner may stop the trial early. The study lives in a SQLite file in
SWEEP_DIR (``study.db``) or in any database Optuna accepts (``--storage postgresql://...``):
the same command run on several machines joins the same study. Workers send a heartbeat; a
trial whose worker died is marked failed and retried (at most 3 times) by the next worker that
looks at the study, so re-running the command resumes it.

``bbb sweep show SWEEP_DIR`` prints the best trials and writes plots; ``bbb sweep best
SWEEP_DIR`` prints the best trial's configuration as TOML for ``bbb train --config``.
Optuna is an optional dependency: ``pip install -e '.[sweep]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "SweepError",
    "Param",
    "Space",
    "load_space",
    "run_sweep",
    "show_sweep",
    "best_config_toml",
    "main",
]

SWEEP_FILE = "sweep.json"
SPACE_COPY = "space.toml"
DEFAULT_DB = "study.db"
TRIALS_DIR = "trials"
REPORT_DIR = "report"
SUPPORTED_COMMANDS = ("train",)
SAMPLERS = ("auto", "grid", "tpe", "random")
PRUNERS = ("median", "hyperband", "none")
CLASSIFICATION_METRICS = ("error", "accuracy", "nll", "ece", "brier")
REGRESSION_METRICS = ("rmse", "log_likelihood", "nll")
MAXIMIZED = ("accuracy", "log_likelihood")
MAX_RETRY = 3
TRANSFORMS: dict[str, Callable[[float], float]] = {
    "exp(-x)": lambda x: math.exp(-x),
    "exp(x)": math.exp,
    "10^x": lambda x: 10.0**x,
    "10^-x": lambda x: 10.0 ** (-x),
}
_KINDS = ("grid", "choices", "int", "float", "log_float")
_DUPLICATE = "bbb_duplicate_of"


class SweepError(ValueError):
    """A bad space file, storage or sweep directory (printed as one ``bbb: error:`` line)."""


class _DuplicateTrial(Exception):  # noqa: N818 - control flow, not an error
    """Another worker is already evaluating this grid point (a rare race): skip it."""


# ---------------------------------------------------------------------------- the space
@dataclass
class Param:
    """One searched option: a grid, a list of choices, or an int / float / log-float range.

    ``values`` (grid, choices) and ``low``/``high`` are in *searched* units; ``transform``
    (one of :data:`TRANSFORMS`) maps a searched value to the option's value.
    """

    name: str
    kind: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    transform: str | None = None

    @property
    def optuna_name(self) -> str:
        """The parameter's name in the study (the option, plus its transform if any)."""
        return self.name if self.transform is None else f"{self.name} [{self.transform}]"

    @property
    def finite(self) -> bool:
        """Whether the option takes one of a finite list of values (grid or choices)."""
        return self.kind in ("grid", "choices")

    def encoded_values(self) -> list[Any]:
        """The grid / choices as Optuna stores them (lists, e.g. ``hidden``, as JSON text)."""
        assert self.values is not None
        return [json.dumps(v) if isinstance(v, list) else v for v in self.values]

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for this parameter; return the value in searched units (encoded)."""
        if self.finite:
            return trial.suggest_categorical(self.optuna_name, self.encoded_values())
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return trial.suggest_int(
                self.optuna_name,
                int(self.low),
                int(self.high),
                step=int(self.step or 1),
                log=self.log,
            )
        return trial.suggest_float(
            self.optuna_name, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def to_option(self, value: Any) -> Any:
        """The option's value for a searched (encoded) value: JSON lists decoded, transformed."""
        if (
            self.finite
            and isinstance(value, str)
            and any(isinstance(v, list) for v in self.values or [])
        ):
            value = json.loads(value)
        if self.transform is not None:
            value = TRANSFORMS[self.transform](float(value))
        return value

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (compared when a study is resumed)."""
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for key in ("values", "low", "high", "step", "transform"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.log:
            d["log"] = True
        return d

    def candidates(self) -> list[Any]:
        """Values to check the option with before anything runs (every grid value, the ends)."""
        return list(self.encoded_values()) if self.finite else [self.low, self.high]


@dataclass
class Space:
    """A parsed space file: base command, fixed options, searched options, objective."""

    command: str
    fixed: dict[str, Any]
    params: list[Param]
    metric: str
    trials: int | None = None
    sampler: str = "auto"
    pruner: str = "median"
    source: str = "space"
    raw_text: str = field(default="", repr=False)

    @property
    def direction(self) -> str:
        """``"maximize"`` for accuracy and log-likelihood, ``"minimize"`` otherwise."""
        return "maximize" if self.metric in MAXIMIZED else "minimize"

    @property
    def is_grid(self) -> bool:
        """Every searched option is a ``grid``: the space is searched exhaustively by default."""
        return all(p.kind == "grid" for p in self.params)

    def grid_points(self) -> list[dict[str, Any]]:
        """All combinations of the (finite) options, as Optuna parameter dictionaries."""
        names = [p.optuna_name for p in self.params]
        values = [p.encoded_values() for p in self.params]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]

    def config(self, searched: dict[str, Any]) -> TrainConfig:
        """The validated run configuration for searched values keyed by option name."""
        values = dict(self.fixed)
        for p in self.params:
            values[p.name] = p.to_option(searched[p.name])
        return TrainConfig.from_dict(values, source=self.source).validate()

    def digest(self) -> dict[str, Any]:
        """What identifies the study's space (JSON-normalised, stored in the study)."""
        d = {
            "command": self.command,
            "fixed": self.fixed,
            "params": [p.describe() for p in self.params],
            "metric": self.metric,
        }
        return json.loads(json.dumps(d, sort_keys=True))


def _parse_param(name: str, spec: Any, where: str) -> Param:
    """One ``[search]`` entry: a bare list (a grid) or a table with one kind key."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict):
        raise SweepError(
            f"{where}: {name} must be a list of values or a table such as "
            f"{{ grid = [...] }}, {{ int = [lo, hi] }} or {{ log_float = [lo, hi] }}"
        )
    kinds = [k for k in _KINDS if k in spec]
    unknown = sorted(set(spec) - {*_KINDS, "log", "step", "transform"})
    if unknown:
        raise SweepError(
            f"{where}: {name}: unknown key(s) {', '.join(unknown)}; accepted: "
            f"{', '.join(_KINDS)}, log, step, transform"
        )
    if len(kinds) != 1:
        raise SweepError(f"{where}: {name} needs exactly one of {', '.join(_KINDS)}")
    kind = kinds[0]
    transform = spec.get("transform")
    if transform is not None and transform not in TRANSFORMS:
        raise SweepError(
            f"{where}: {name}: unknown transform {transform!r}; accepted: {', '.join(TRANSFORMS)}"
        )
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SweepError(f"{where}: {name}: log must be true or false, got {log!r}")
    body = spec[kind]
    if kind in ("grid", "choices"):
        if not isinstance(body, list) or not body:
            raise SweepError(f"{where}: {name}: the {kind} is empty (give at least one value)")
        if "step" in spec or log:
            raise SweepError(f"{where}: {name}: step and log apply to ranges, not to a {kind}")
        if len({json.dumps(v, sort_keys=True) for v in body}) != len(body):
            raise SweepError(f"{where}: {name}: the {kind} lists a value twice")
        for v in body:
            if not isinstance(v, (bool, int, float, str, list)):
                raise SweepError(f"{where}: {name}: unsupported value {v!r}")
        return Param(name, kind, values=list(body), transform=transform)
    if (
        not isinstance(body, list)
        or len(body) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in body)
    ):
        raise SweepError(f"{where}: {name}: a range is [low, high] (two numbers), got {body!r}")
    low, high = body
    if low > high:
        raise SweepError(f"{where}: {name}: empty range [{low}, {high}] (low > high)")
    if kind == "int" and not all(isinstance(v, int) for v in body):
        raise SweepError(f"{where}: {name}: an int range needs integer bounds, got {body!r}")
    if kind == "log_float":
        kind, log = "float", True
    if log and low <= 0:
        raise SweepError(f"{where}: {name}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise SweepError(f"{where}: {name}: step must be a positive number, got {step!r}")
        if log:
            raise SweepError(f"{where}: {name}: step and log cannot be combined")
        if kind == "int" and not isinstance(step, int):
            raise SweepError(f"{where}: {name}: an int range needs an integer step")
    return Param(name, kind, low=low, high=high, log=log, step=step, transform=transform)


def load_space(path: str | Path) -> Space:
    """Read and check a space file; every candidate value is validated as a TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"space file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"space file {path} is not valid TOML: {e}") from e
    where = str(path)
    head = data.get("sweep", {})
    if not isinstance(head, dict):
        raise SweepError(f"{where}: [sweep] must be a table")
    unknown = sorted(set(head) - {"command", "metric", "trials", "sampler", "pruner"})
    if unknown:
        raise SweepError(
            f"{where}: unknown key(s) {', '.join(unknown)} in [sweep]; accepted: "
            "command, metric, trials, sampler, pruner"
        )
    command = head.get("command", "train")
    if command not in SUPPORTED_COMMANDS:
        hint = (
            " (`bbb uci` reports no per-epoch validation metric yet: search with "
            'command = "train" and dataset = "uci")'
            if command == "uci"
            else ""
        )
        raise SweepError(
            f"{where}: base command {command!r} is not supported; accepted: "
            f"{', '.join(SUPPORTED_COMMANDS)}{hint}"
        )
    top_unknown = sorted(set(data) - {"sweep", command, "search"})
    if top_unknown:
        raise SweepError(
            f"{where}: unknown table(s) {', '.join(top_unknown)}; accepted: sweep, {command}, "
            "search"
        )
    fixed = data.get(command, {})
    search = data.get("search")
    if not isinstance(fixed, dict):
        raise SweepError(f"{where}: [{command}] must be a table of fixed options")
    if not isinstance(search, dict) or not search:
        raise SweepError(f"{where}: [search] is missing or empty: name at least one option")
    valid = TrainConfig.field_names()
    for table, keys in ((command, fixed), ("search", search)):
        bad = sorted(set(keys) - set(valid))
        if bad:
            raise SweepError(
                f"{where}: unknown option(s) {', '.join(bad)} in [{table}]; valid options: "
                f"{', '.join(valid)}"
            )
    both = sorted(set(fixed) & set(search))
    if both:
        raise SweepError(f"{where}: {', '.join(both)} is both fixed and searched")
    if "dataset" in search:
        raise SweepError(f"{where}: dataset cannot be searched (one sweep per data set)")
    params = [_parse_param(name, spec, f"{where} [search]") for name, spec in search.items()]
    classification = fixed.get("dataset", TrainConfig.dataset) == "mnist"
    accepted = CLASSIFICATION_METRICS if classification else REGRESSION_METRICS
    metric = head.get("metric", "error" if classification else "nll")
    if metric not in accepted:
        raise SweepError(
            f"{where}: unknown metric {metric!r} for this data set; accepted: {', '.join(accepted)}"
        )
    trials = head.get("trials")
    if trials is not None and (
        isinstance(trials, bool) or not isinstance(trials, int) or trials < 1
    ):
        raise SweepError(f"{where}: trials must be a positive integer, got {trials!r}")
    sampler = head.get("sampler", "auto")
    if sampler not in SAMPLERS:
        raise SweepError(f"{where}: unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    pruner = head.get("pruner", "median")
    if pruner not in PRUNERS:
        raise SweepError(f"{where}: unknown pruner {pruner!r}; accepted: {', '.join(PRUNERS)}")
    space = Space(command, fixed, params, metric, trials, sampler, pruner, where, text)
    first = {p.name: p.candidates()[0] for p in params}
    for p in params:
        for value in p.candidates():
            try:
                space.config({**first, p.name: value})
            except ConfigError as e:
                raise SweepError(f"{where}: {p.name} = {value!r}: {e}") from e
    return space


# ---------------------------------------------------------------------------- storage
def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SweepError(
            "bbb sweep needs Optuna: pip install -e '.[sweep]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # bbb prints its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _masked(url: str) -> str:
    """The storage URL without its password (for messages and ``sweep.json``)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse: show its scheme only
        return url.split("://", 1)[0] + "://..."


def _retry_callback() -> Any:
    """Optuna's callback that re-queues a dead worker's trial (renamed in Optuna 4.9)."""
    optuna = _import_optuna()
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    cls = cls or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=MAX_RETRY)


def _retry_kwarg() -> str:
    try:
        import optuna.storages
    except ImportError:
        return "failed_trial_callback"
    new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    return "heartbeat_stale_trial_callback" if new else "failed_trial_callback"


def _with_driver(url: str) -> str:
    """``postgresql://`` with a driver that is installed (psycopg 3, else psycopg2).

    SQLAlchemy's default PostgreSQL driver changed from psycopg2 to psycopg (3) in 2.1; either
    one works. An explicit ``postgresql+DRIVER://`` URL is used as given.
    """
    import importlib.util

    if url.startswith("postgresql://"):
        for module, dialect in (
            ("psycopg", "postgresql+psycopg"),
            ("psycopg2", "postgresql+psycopg2"),
        ):
            if importlib.util.find_spec(module) is not None:
                return dialect + url[len("postgresql") :]
    return url


def _has_password(url: str) -> bool:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password is not None
    except Exception:  # noqa: BLE001 - not parseable: treat as secret
        return True


def _default_storage(out: Path) -> str:
    return f"sqlite:///{(out / DEFAULT_DB).resolve()}"


def open_storage(url: str, heartbeat: int = 60) -> Any:
    """An Optuna RDB storage with worker heartbeats; dead workers' trials are retried.

    A trial whose worker sent no heartbeat for ``3 * heartbeat`` seconds is marked failed and
    re-queued (with the same parameters, at most :data:`MAX_RETRY` times).
    """
    optuna = _import_optuna()
    given, url = url, _with_driver(url)
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 120}  # concurrent local workers wait for the lock
    elif url.startswith("postgresql"):
        engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            **{_retry_kwarg(): _retry_callback()},
        )
    except Exception as e:  # noqa: BLE001 - driver errors of every kind: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot open the study storage {_masked(given)}: {first}") from e


def _make_sampler(name: str, space: Space) -> Any:
    optuna = _import_optuna()
    if name == "grid":
        if not all(p.finite for p in space.params):
            ranges = [p.name for p in space.params if not p.finite]
            raise SweepError(
                f"the grid sampler needs every option to be a grid or a list; ranges: "
                f"{', '.join(ranges)}"
            )

        class _SweepGridSampler(optuna.samplers.GridSampler):  # type: ignore[misc,name-defined]
            """GridSampler; the worker loop, not ``after_trial``, decides when to stop."""

            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                return None

        return _SweepGridSampler({p.optuna_name: p.encoded_values() for p in space.params})
    if name == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


def _make_pruner(name: str, space: Space) -> Any:
    optuna = _import_optuna()
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        epochs = space.fixed.get("epochs", TrainConfig.epochs)
        searched = any(p.name == "epochs" for p in space.params)
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource="auto" if searched else int(epochs)
        )
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def _resolve_sampler(name: str, space: Space) -> str:
    if name == "auto":
        return "grid" if space.is_grid else "tpe"
    return name


def _open_study(
    space: Space, storage: Any, study_name: str, sampler: str, pruner: str, *, create: bool
) -> Any:
    optuna = _import_optuna()
    kwargs = {
        "storage": storage,
        "study_name": study_name,
        "sampler": _make_sampler(sampler, space),
        "pruner": _make_pruner(pruner, space),
    }
    if create:
        study = optuna.create_study(direction=space.direction, load_if_exists=True, **kwargs)
    else:
        study = optuna.load_study(**kwargs)
    saved = study.user_attrs.get("bbb_space")
    if saved is None:
        study.set_user_attr("bbb_space", space.digest())
        study.set_user_attr("bbb_metric", space.metric)
    elif saved != space.digest():
        raise SweepError(
            f"study {study_name!r} was started with a different search space (or metric); "
            "run the changed space with another --out or --study-name"
        )
    return study


# ---------------------------------------------------------------------------- workers
def _is_duplicate(t: Any) -> bool:
    return _DUPLICATE in t.user_attrs


def _retried_numbers(trials: Sequence[Any]) -> set[int]:
    """Numbers of failed trials that a retry (a later trial) stands in for."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _point_key(params: dict[str, Any], names: Sequence[str]) -> tuple[str, ...] | None:
    if not all(n in params for n in names):
        return None
    return tuple(json.dumps(params[n]) for n in names)


@dataclass
class _Worker:
    """One worker: claims trials of the study until the budget or grid is exhausted."""

    space: Space
    study: Any
    out: Path
    sampler: str
    n_trials: int | None
    poll: float
    prefix: str = ""
    verbose: bool = False
    trial_plots: bool = True
    current: int | None = None
    ran: int = 0

    def say(self, text: str) -> None:
        print(f"{self.prefix}{text}", flush=True)

    def todo(self, trials: Sequence[Any]) -> list[dict[str, Any]] | int:
        """Grid points not yet claimed (grid), or how many trials the budget has left."""
        if self.sampler == "grid":
            points = self.space.grid_points()
            names = [p.optuna_name for p in self.space.params]
            claimed = {_point_key(t.params, names) for t in trials if not _is_duplicate(t)} - {None}
            target = min(self.n_trials or len(points), len(points))
            if len(claimed) >= target:
                return []
            return [p for p in points if _point_key(p, names) not in claimed]
        assert self.n_trials is not None
        retried = _retried_numbers(trials)
        counted = [t for t in trials if not _is_duplicate(t) and t.number not in retried]
        return max(self.n_trials - len(counted), 0)

    def run(self) -> None:
        """Run trials until nothing is left; wait while other workers' trials may fail."""
        optuna = _import_optuna()
        waiting_said = False
        while True:
            optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            states = optuna.trial.TrialState
            if not any(t.state == states.WAITING for t in trials):
                todo = self.todo(trials)
                if not todo:
                    running = [t.number for t in trials if t.state == states.RUNNING]
                    if not running:
                        break
                    if not waiting_said:
                        self.say(
                            f"waiting for running trial(s) {running} (a dead worker's trial is "
                            "retried once its heartbeat is stale)"
                        )
                        waiting_said = True
                    time.sleep(self.poll)
                    continue
                if isinstance(todo, list) and len(trials) >= len(self.space.grid_points()):
                    # left-over grid points (after a failure or a race) are queued explicitly
                    self.study.enqueue_trial(random.choice(todo))
            waiting_said = False
            self.ran += 1
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
            except KeyboardInterrupt:
                self._requeue_interrupted()
                raise

    def _requeue_interrupted(self) -> None:
        """Ctrl-C: Optuna marked the trial failed; queue it again like a dead worker's."""
        optuna = _import_optuna()
        if self.current is None:
            return
        for t in self.study.get_trials(deepcopy=False):
            if t.number == self.current and t.state == optuna.trial.TrialState.FAIL:
                _retry_callback()(self.study, t)
                self.say(f"trial {t.number} interrupted: queued again for the next run")

    def objective(self, trial: Any) -> float:
        """Train one configuration; report the validation metric per epoch; prune."""
        optuna = _import_optuna()
        from .runs import train_run
        from .train.trainer import StopTraining

        self.current = trial.number
        searched = {p.name: p.suggest(trial) for p in self.space.params}
        names = [p.optuna_name for p in self.space.params]
        if self.sampler == "grid":
            mine = _point_key(trial.params, names)
            alive = (
                optuna.trial.TrialState.RUNNING,
                optuna.trial.TrialState.WAITING,
                optuna.trial.TrialState.COMPLETE,
                optuna.trial.TrialState.PRUNED,
            )
            for t in self.study.get_trials(deepcopy=False):
                if (
                    t.number != trial.number
                    and t.state in alive
                    and not _is_duplicate(t)
                    and _point_key(t.params, names) == mine
                ):
                    trial.set_user_attr(_DUPLICATE, t.number)
                    self.say(f"trial {trial.number} skipped: its grid point is trial {t.number}'s")
                    raise _DuplicateTrial(f"grid point taken by trial {t.number}")
        shown = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        run_dir = self.out / TRIALS_DIR / f"trial-{trial.number:04d}"
        key = f"val_{self.space.metric}"
        sign = -1.0 if self.space.direction == "maximize" else 1.0
        best: dict[str, Any] = {"value": math.inf, "epoch": 0}
        try:
            cfg = self.space.config(searched)
            if run_dir.exists():  # left by an older study of the same name: not this trial's
                shutil.rmtree(run_dir)
            trial.set_user_attr("run_dir", str(run_dir.relative_to(self.out)))
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("config", cfg.to_dict())
            mine_frozen = [
                t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number
            ]
            retry = mine_frozen[0].system_attrs.get("failed_trial") if mine_frozen else None
            again = "" if retry is None else f" (retry of trial {retry})"
            self.say(f"trial {trial.number} started: {shown}{again}")

            def on_epoch(epoch: int, row: dict[str, Any]) -> None:
                if key not in row:
                    have = ", ".join(k for k in row if k.startswith("val_")) or "none"
                    raise SweepError(
                        f"the epoch report has no {key} (validation metrics: {have}); the "
                        "data set needs a validation split"
                    )
                value = float(row[key])
                if sign * value < best["value"]:
                    best.update(value=sign * value, epoch=epoch)
                trial.report(value, epoch)
                if trial.should_prune():
                    raise StopTraining("pruned by the sweep")

            log = (lambda s: self.say(f"trial {trial.number}: {s}")) if self.verbose else None
            summary = train_run(
                cfg,
                run_dir,
                progress=False,
                log=log,
                epoch_callback=on_epoch,
                evaluate_test=False,
                write_plots=self.trial_plots,
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            trial.set_user_attr("error", msg)
            self.say(f"trial {trial.number} failed: {msg}")
            raise
        value = sign * best["value"]
        trial.set_user_attr("best_epoch", best["epoch"])
        trial.set_user_attr("epochs_trained", summary["epochs_trained"])
        pruned = bool(summary.get("stopped_by_callback"))
        state = "PRUNED" if pruned else "COMPLETE"
        info = {
            "study": self.study.study_name,
            "trial": trial.number,
            "state": state,
            "params": trial.params,
            key: value,
            "best_epoch": best["epoch"],
        }
        (run_dir / "trial.json").write_text(json.dumps(info, indent=2) + "\n")
        self.say(
            f"trial {trial.number} {state.lower()}: {key}={value:.6g} (epoch {best['epoch']} "
            f"of {summary['epochs_trained']})"
        )
        if pruned:
            raise optuna.TrialPruned()
        return value


@dataclass
class SweepOptions:
    """Options of ``bbb sweep SPACE``."""

    space: Path
    out: Path
    trials: int | None = None
    workers: int = 1
    storage: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    study_name: str = "bbb-sweep"
    heartbeat: int = 60
    verbose: bool = False
    trial_plots: bool = True
    worker_id: int | None = None  # set in the processes that --workers starts


def _saved_info(out: Path) -> dict[str, Any]:
    path = out / SWEEP_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON: {e}") from e
    return info if isinstance(info, dict) else {}


def _storage_url(out: Path, given: str | None, info: dict[str, Any]) -> str:
    """``--storage``, else the one the sweep directory recorded, else its SQLite file."""
    if given:
        return given
    saved = info.get("storage")
    if saved is None:
        return _default_storage(out)
    if info.get("storage_password"):
        raise SweepError(
            f"the study storage of {out} ({saved}) needs a password: pass --storage URL"
        )
    return str(saved)


def run_sweep(opts: SweepOptions) -> int:
    """``bbb sweep SPACE --out DIR``: create or join the study, run workers; exit status."""
    _import_optuna()
    space = load_space(opts.space)
    if opts.workers < 1:
        raise SweepError(f"--workers must be >= 1, got {opts.workers}")
    if opts.heartbeat < 1:
        raise SweepError(f"--heartbeat must be >= 1 second, got {opts.heartbeat}")
    sampler = _resolve_sampler(opts.sampler or space.sampler, space)
    pruner = opts.pruner or space.pruner
    n_trials = opts.trials or space.trials
    if sampler != "grid" and n_trials is None:
        raise SweepError(
            "the space has ranges or lists: give a budget with --trials N (or trials = N in "
            "[sweep])"
        )
    if n_trials is not None and n_trials < 1:
        raise SweepError(f"--trials must be >= 1, got {n_trials}")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    info = _saved_info(out)
    url = _storage_url(out, opts.storage, info)
    storage = open_storage(url, opts.heartbeat)
    study = _open_study(space, storage, opts.study_name, sampler, pruner, create=True)
    if opts.worker_id is None:
        from .train.checkpoint import atomic_write_text

        masked = _masked(url)
        record = {
            "study_name": opts.study_name,
            "storage": None if url == _default_storage(out) else masked,
            "storage_password": _has_password(url),
            "space": SPACE_COPY,
            "metric": space.metric,
            "direction": space.direction,
        }
        atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
        if not (out / SPACE_COPY).exists() or opts.space.resolve() != (out / SPACE_COPY).resolve():
            atomic_write_text(out / SPACE_COPY, space.raw_text)
        what = (
            f"grid of {len(space.grid_points())} points"
            if sampler == "grid"
            else f"{n_trials} trials"
        )
        print(
            f"study {opts.study_name!r} in {_masked(url)}: {what}, sampler {sampler}, pruner "
            f"{pruner}, objective val_{space.metric} ({space.direction})",
            flush=True,
        )
    procs: list[subprocess.Popen[bytes]] = []
    worker_id = opts.worker_id
    if opts.workers > 1 and worker_id is None:  # this process is worker 0, the others start
        procs = _spawn_workers(opts, url, sampler, pruner, n_trials)
        worker_id = 0
    if opts.workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    worker = _Worker(
        space,
        study,
        out,
        sampler,
        n_trials,
        poll=min(2.0, opts.heartbeat / 2),
        prefix="" if worker_id is None else f"[worker {worker_id}] ",
        verbose=opts.verbose,
        trial_plots=opts.trial_plots,
    )
    try:
        worker.run()
        if worker_id is not None:
            worker.say(f"done ({worker.ran} trial(s) run here)")
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            p.wait()
        raise
    if opts.worker_id is None:
        _print_counts(study)
        print(f"see the results: bbb sweep show {out}", flush=True)
    bad = [i + 1 for i, c in enumerate(codes) if c != 0]
    if bad:
        raise SweepError(f"worker process(es) {bad} exited with an error (see above)")
    return 0


def _spawn_workers(
    opts: SweepOptions, url: str, sampler: str, pruner: str, n_trials: int | None
) -> list[subprocess.Popen[bytes]]:
    """Start worker processes 1 .. ``opts.workers - 1`` on this machine (this one is 0)."""
    base = [
        sys.executable,
        "-m",
        "bbb",
        "sweep",
        str(opts.space),
        "--out",
        str(opts.out),
        "--workers",
        str(opts.workers),
        "--sampler",
        sampler,
        "--pruner",
        pruner,
        "--study-name",
        opts.study_name,
        "--heartbeat",
        str(opts.heartbeat),
    ]
    if n_trials is not None:
        base += ["--trials", str(n_trials)]
    if opts.verbose:
        base.append("--verbose")
    if not opts.trial_plots:
        base.append("--no-trial-plots")
    env = {**os.environ, "BBB_SWEEP_STORAGE": url}  # not on the command line (a password)
    return [
        subprocess.Popen([*base, "--worker-id", str(i)], env=env) for i in range(1, opts.workers)
    ]


def _print_counts(study: Any) -> None:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = "duplicate" if _is_duplicate(t) else t.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"study {study.study_name!r}: {sum(counts.values())} trials ({text})", flush=True)


# ---------------------------------------------------------------------------- results
def _load_finished(out: Path, storage: str | None, study_name: str | None) -> tuple[Any, str]:
    """The study of a sweep directory and its metric name, for ``show`` and ``best``."""
    optuna = _import_optuna()
    info = _saved_info(out)
    if not info and storage is None:
        raise SweepError(f"{out} is not a sweep directory: {out / SWEEP_FILE} is missing")
    url = _storage_url(out, storage, info)
    name = study_name or info.get("study_name", "bbb-sweep")
    st = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        raise SweepError(f"no study named {name!r} in {_masked(url)}") from None
    metric = study.user_attrs.get("bbb_metric") or info.get("metric", "objective")
    return study, str(metric)


def _sorted_complete(study: Any) -> list[Any]:
    optuna = _import_optuna()
    done = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: (t.value if not reverse else -t.value, t.number))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def show_sweep(
    out: Path,
    *,
    top: int = 10,
    storage: str | None = None,
    study_name: str | None = None,
    plots: bool = True,
) -> str:
    """Print (return) the best trials as a table; write ``report/`` (CSV and PNG plots)."""
    study, metric = _load_finished(out, storage, study_name)
    trials = study.get_trials(deepcopy=False)
    best = _sorted_complete(study)
    names: list[str] = []
    for t in trials:
        names += [n for n in t.params if n not in names]
    key = f"val_{metric}"
    header = ["rank", "trial", key, "epoch", *names, "run_dir"]
    rows = [header]
    for rank, t in enumerate(best[:top], 1):
        rows.append(
            [
                str(rank),
                str(t.number),
                _fmt(t.value),
                str(t.user_attrs.get("best_epoch", "")),
                *[_fmt(t.params.get(n, "")) for n in names],
                str(t.user_attrs.get("run_dir", "")),
            ]
        )
    counts: dict[str, int] = {}
    for t in trials:
        s = "duplicate" if _is_duplicate(t) else t.state.name.lower()
        counts[s] = counts.get(s, 0) + 1
    text = [
        f"study {study.study_name!r}: {len(trials)} trials ("
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"); objective {key} ({study.direction.name.lower()})",
    ]
    text.append(_table(rows) if len(rows) > 1 else "no finished trial yet")
    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    with open(report / "trials.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", key, "best_epoch", *names, "run_dir", "host", "error"])
        for t in trials:
            state = "DUPLICATE" if _is_duplicate(t) else t.state.name
            w.writerow(
                [
                    t.number,
                    state,
                    "" if t.value is None else t.value,
                    t.user_attrs.get("best_epoch", ""),
                    *[t.params.get(n, "") for n in names],
                    t.user_attrs.get("run_dir", ""),
                    t.user_attrs.get("host", ""),
                    t.user_attrs.get("error", ""),
                ]
            )
    (report / "best_trials.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    written = [report / "trials.csv", report / "best_trials.txt"]
    if plots:
        written += _plots(study, key, report, text)
    text.append("written: " + ", ".join(str(p) for p in written))
    return "\n".join(text)


def _plots(study: Any, key: str, report: Path, notes: list[str]) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written: list[Path] = []
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("history.png", lambda: ovm.plot_optimization_history(study, target_name=key)),
        ("importances.png", lambda: ovm.plot_param_importances(study, target_name=key)),
        ("parallel_coordinates.png", lambda: ovm.plot_parallel_coordinate(study, target_name=key)),
    ]
    for name, make in jobs:
        path = report / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        except Exception as e:  # noqa: BLE001 - too few trials, a missing optional package...
            plt.close("all")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if name != "importances.png":
                notes.append(f"{name} skipped: {reason}")
                continue
            fig = _fallback_importances(study, key, reason)
            if fig is None:
                notes.append(f"{name} skipped: {reason}")
                continue
            notes.append(
                f"{name}: Optuna's importance evaluator failed ({reason}); wrote the "
                "|Spearman rank correlation| fallback"
            )
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _fallback_importances(study: Any, key: str, reason: str) -> Any:
    """A clearly labelled |Spearman rank correlation| bar chart (no extra packages)."""
    import matplotlib.pyplot as plt

    done = _sorted_complete(study)
    if len(done) < 2:
        return None
    names = sorted({n for t in done for n in t.params})
    y = _ranks([float(t.value) for t in done])
    scores = []
    for n in names:
        raw = [t.params.get(n) for t in done]
        if all(isinstance(v, (int, float)) for v in raw):
            xs = [float(v) for v in raw]
        else:
            levels = sorted({json.dumps(v) for v in raw})
            xs = [float(levels.index(json.dumps(v))) for v in raw]
        r = _ranks(xs)
        mr, my = sum(r) / len(r), sum(y) / len(y)
        cov = sum((a - mr) * (b - my) for a, b in zip(r, y, strict=True))
        var = math.sqrt(sum((a - mr) ** 2 for a in r) * sum((b - my) ** 2 for b in y))
        scores.append(abs(cov / var) if var > 0 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(names)))
    ax.barh(names, scores)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"|Spearman rank correlation| with {key}")
    ax.set_title(
        f"Parameter importance (fallback)\nOptuna's evaluator failed: {reason[:70]}", fontsize=9
    )
    return fig


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise SweepError(f"cannot write {v!r} as TOML")


def best_config_toml(
    out: Path, *, storage: str | None = None, study_name: str | None = None
) -> str:
    """The best trial's configuration as TOML (top-level TrainConfig keys; unset keys left out)."""
    study, metric = _load_finished(out, storage, study_name)
    done = _sorted_complete(study)
    if not done:
        raise SweepError(f"no finished trial yet in study {study.study_name!r}")
    t = done[0]
    cfg = t.user_attrs.get("config")
    if cfg is None:
        path = out / str(t.user_attrs.get("run_dir", "")) / "config.json"
        if not path.is_file():
            raise SweepError(f"trial {t.number} has no recorded config and {path} is missing")
        cfg = json.loads(path.read_text())
    lines = [
        f"# best trial {t.number} of study {study.study_name!r}: val_{metric} = {t.value:.6g} "
        f"(epoch {t.user_attrs.get('best_epoch', '?')} of {t.user_attrs.get('epochs_trained', '?')})",
        "# searched: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in t.params.items()),
        f"# run directory: {out / str(t.user_attrs.get('run_dir', ''))}",
        "# use: bbb train --config THIS_FILE",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if v is not None]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- command line
def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    from .cli import _Parser

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
        if a.output:
            Path(a.output).write_text(text, encoding="utf-8")
        print(text, end="")
        return 0
    a = run.parse_args(argv)
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
