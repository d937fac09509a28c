"""The search space file: parameters, their kinds and transforms, the sweep's settings."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._text import read_text
from ..config import ConfigError, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    # tomli: Python 3.10's TOML reader (a dependency there), absent where mypy runs
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:  # pragma: no cover
    import optuna


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
_NO_VALIDATION = (
    "a trial is scored on the validation split, and a UCI run with val_fraction 0 has none "
    "(the test split is never used); give val_fraction > 0, e.g. 0.2"
)


class SweepError(ValueError):
    """A bad space file, storage or sweep directory (printed as one ``bbb: error:`` line)."""


class _DuplicateTrial(Exception):  # noqa: N818 - control flow, not an error
    """Another worker is already evaluating this grid point (a rare race): skip it."""


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
            # a value the transform cannot take (a string, a list) or whose result overflows
            # a float is named here, not left as a bare "math range error"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SweepError(
                    f"{self.name}: transform {self.transform!r} needs a number, got {value!r}"
                )
            try:
                value = TRANSFORMS[self.transform](float(value))
            except OverflowError:
                raise SweepError(
                    f"{self.name}: transform {self.transform!r} of {value!r} overflows a float"
                ) from None
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

    def as_suggested(self, value: Any) -> Any:
        """A candidate ``value`` with the type the option receives: a ``float`` range's ends
        are floats even where TOML wrote them as ints (``[1, 5]``); a transform's output is a
        float whatever its input."""
        return float(value) if self.kind == "float" and self.transform is None else value

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
        cfg = TrainConfig.from_dict(values, source=self.source).validate()
        if cfg.dataset == "uci" and cfg.val_fraction == 0:
            raise SweepError(_NO_VALIDATION)
        return cfg

    def check_step_plans(self) -> list[str]:
        """Check, before any trial starts, the epoch layouts the space can give against the
        data (the checks ``bbb train`` makes before it writes anything: a ``batch_size``
        larger than the training set, and :func:`bbb.runs.check_step_plan`'s: a
        ``lr_warmup_steps`` not below the run's total optimizer steps, and a
        ``steps_per_epoch`` that is not a multiple of the steps per pass under
        ``kl_weighting = "blundell"``); return notes on values that cannot train.

        The options that set the layout (``lr_warmup_steps``, ``steps_per_epoch``,
        ``epochs``, ``batch_size``, ``kl_weighting``, ``method`` and those that size the
        training set: ``dataset``, ``data_dir``, ``uci_path``, ``uci_split``, ``subset``,
        ``val_fraction``, ``toy_n``) are checked at every combination of their candidate
        values: every value of a grid or list, the two ends of a range (the highest value
        the range's ``step`` reaches); the other searched options at their first value.

        * No combination can train (a fixed ``lr_warmup_steps = 100`` with 4 optimizer
          steps in all; a fixed ``batch_size = 512`` with 100 training examples; a range
          whose lowest warm-up or batch size is already too large): refused with a
          :class:`SweepError` that gives the setting, its value and the limit.
        * Some can (a warm-up range ``[10, 500]`` over 100 steps, a ``batch_size`` range
          ``[16, 512]`` over 100 examples): the sweep runs; a trial given an impossible
          value fails at its start, before it trains or writes anything, with the same
          message as its error (``bbb sweep show``'s error column); the notes returned
          say which values will fail. (Such a trial is not run with another value, e.g. a
          batch size clipped to the training set: its recorded parameters would not be
          the ones it trained with, and a range's every value above the limit would train
          the same full-batch configuration again; narrow the range instead.)

        The batch-size and warm-up checks are exact on a range's ends: the limits only grow
        with ``epochs``, ``steps_per_epoch``, the training set and a smaller ``batch_size``
        (the warm-up's). The blundell
        multiple is not (a range may hold a multiple between two ends that are not), so it
        is checked here only when ``steps_per_epoch``, ``batch_size`` and the data options
        are fixed or lists; under a range it is left to each trial. Data that cannot be
        loaded here (its combinations are not counted) and a space of more than
        :data:`_PLAN_COMBINATIONS` combinations of these options are left to the trials
        too. The training set is loaded once per distinct combination of the data options
        (every check needs its size).
        """
        from ..runs import build_data, check_batch_size, check_step_plan

        by_name = {p.name: p for p in self.params}
        relevant = [p for p in self.params if p.name in _PLAN_KEYS]
        ends = {p.name: _plan_candidates(p) for p in relevant}
        first = {p.name: p.as_suggested(p.candidates()[0]) for p in self.params}
        inexact = any(
            not by_name[k].finite
            for k in ("steps_per_epoch", "batch_size", *_DATA_KEYS)
            if k in by_name
        )
        if math.prod(len(v) for v in ends.values()) > _PLAN_COMBINATIONS:
            return []  # left to the trials (see above)
        configs: list[tuple[dict[str, Any], TrainConfig]] = []
        for combo in itertools.product(*ends.values()):
            at = dict(zip(ends, combo, strict=True))
            try:
                cfg = self.config({**first, **at})
            except (ConfigError, SweepError):
                continue  # a combination the trials refuse anyway (each value passed alone)
            configs.append((at, cfg))
        sizes: dict[tuple[Any, ...], int | None] = {}
        failed: list[tuple[dict[str, Any], str]] = []
        checked = 0
        for at, cfg in configs:
            key = tuple(json.dumps(getattr(cfg, k)) for k in _DATA_KEYS)
            if key not in sizes:
                try:
                    sizes[key] = len(build_data(cfg).train)
                except Exception:  # noqa: BLE001 - reported by each trial, as before
                    sizes[key] = None
            n_train = sizes[key]
            if n_train is None:
                continue
            checked += 1
            try:  # bbb.runs.train_run's first check of the data
                check_batch_size(cfg.batch_size, n_train)
            except ValueError as e:
                failed.append((at, str(e)))
                continue
            # bbb.runs.train_run's weighting: the baselines' KL (zero) is weighed uniformly
            weighting = cfg.kl_weighting if cfg.method == "bbb" and not inexact else "uniform"
            try:
                check_step_plan(cfg, n_train, -(-n_train // cfg.batch_size), weighting)
            except ConfigError as e:
                failed.append((at, str(e)))
        if not failed:
            return []
        at, reason = failed[0]
        shown = ", ".join(f"{k} = {v!r}" for k, v in at.items())
        if len(failed) == checked:
            if not at:
                raise SweepError(f"{self.source}: no trial can train: {reason}")
            raise SweepError(
                f"{self.source}: no trial can train: every combination of the searched "
                f"{', '.join(at)} ({checked} checked, ranges at both ends) fails, e.g. "
                f"{shown}: {reason}"
            )
        return [
            f"{len(failed)} of {checked} combinations of the searched {', '.join(at)} "
            f"checked (ranges at both ends) cannot train, e.g. {shown}: {reason}; a trial "
            "given such values fails at its start with this reason"
        ]

    def digest(self) -> dict[str, Any]:
        """What identifies the study's space (JSON-normalised, stored in the study)."""
        d = {
            "command": self.command,
            "fixed": self.fixed,
            "params": [p.describe() for p in self.params],
            "metric": self.metric,
        }
        return json.loads(json.dumps(d, sort_keys=True))


#: options that size the training set (with the batch size: the optimizer steps per pass)
_DATA_KEYS = ("dataset", "data_dir", "uci_path", "uci_split", "subset", "val_fraction", "toy_n")
#: the most combinations of _PLAN_KEYS values Space.check_step_plans checks (each is a
#: TrainConfig validated: about 0.1 ms)
_PLAN_COMBINATIONS = 10_000
#: options that set a run's epoch layout (see Space.check_step_plans)
_PLAN_KEYS = (
    "lr_warmup_steps",
    "steps_per_epoch",
    "epochs",
    "batch_size",
    "kl_weighting",
    "method",
    *_DATA_KEYS,
)


def _plan_candidates(p: Param) -> list[Any]:
    """``p``'s values for the step-plan check, typed as suggested: a grid's or list's values,
    a range's two ends (its high end lowered to the last value its ``step`` reaches, as
    Optuna does)."""
    if p.finite or p.step is None:
        return [p.as_suggested(v) for v in p.candidates()]
    assert p.low is not None and p.high is not None
    top = p.low + math.floor((p.high - p.low) / p.step + 1e-9) * p.step
    if p.kind == "int":
        top = int(top)
    return [p.as_suggested(p.low), p.as_suggested(top)]


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
        if spec.get("log") is False:  # a log_float is a log range: "log = false" contradicts it
            raise SweepError(
                f"{where}: {name}: log_float is searched on a log scale; for a linear range "
                "write { float = [low, high] }"
            )
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
    text = read_text(path, SweepError, what="space file")
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
    if fixed.get("dataset") == "uci" and fixed.get("val_fraction", 1) == 0:
        raise SweepError(f"{where}: [{command}] val_fraction = 0: {_NO_VALIDATION}")
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
    # checked with the values' suggested types: an integer option searched as a float range
    # (num_samples = { float = [1, 5] }) would otherwise pass here and fail in every trial
    suggested = {p.name: p.as_suggested(v) for p, v in zip(params, first.values(), strict=True)}
    for p in params:
        for value in p.candidates():
            try:
                space.config({**suggested, p.name: p.as_suggested(value)})
            except (ConfigError, SweepError) as e:
                # the other options are at their first values; when this one is too, any of
                # them may be the cause: all are shown
                at = {p.name: value} if value != first[p.name] else first
                shown = ", ".join(f"{k} = {v!r}" for k, v in at.items())
                raise SweepError(f"{where}: {shown}: {e}") from e
    return space
