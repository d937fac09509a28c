"""The UCI engine's settings: defaults, the search space, the split selection, config files."""

from __future__ import annotations

import itertools
import json
import numbers
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._text import read_text
from ..config import ConfigError, TrainConfig, load_config_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    # tomli: Python 3.10's TOML reader (a dependency there), absent where mypy runs
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]


PathLike = str | os.PathLike[str]

#: The default --tune grid (every combination is trained on split 0's training part minus a
#: validation part; the epoch count is chosen on the same validation curve).
DEFAULT_SEARCH: dict[str, Any] = {
    "grid": {"lr": [0.003, 0.01]},
    "validation_fraction": 0.2,
    "splits": [0],
    "smooth": 5,
}


_COUNT = re.compile(r"\d+", re.ASCII)
_SPLITS_FORMS = "use a count N (splits 0..N-1), a range a-b (a single split i: i-i) or a list 0,3,5"


def parse_splits(spec: str | int | Sequence[int] | None, n_splits: int) -> list[int]:
    """Split indices from ``spec`` (sorted, without repeats).

    The accepted forms:

    * ``None``: every split, ``0..n_splits-1``;
    * a count, the int ``N`` or the bare number ``"N"`` (1 <= N <= n_splits): the first N
      splits, ``0..N-1`` (so ``"0"`` selects nothing and is refused);
    * a range ``"a-b"``: splits a to b inclusive; a single split i is ``"i-i"``;
    * a list ``"0,3,5"`` (ranges allowed inside: ``"0,4-6"``);
    * a sequence of split indices, e.g. ``[0]`` or ``[0, 3]`` (a TOML ``splits = [0]``).

    Every number must be a non-negative integer in ASCII digits (``1.5``, ``"1.5"`` or
    ``[1.5]`` is refused, not truncated). Raises ValueError naming the valid range for
    anything else.
    """
    valid = f"valid splits are 0..{n_splits - 1} ({n_splits} splits)"
    if spec is None:
        return list(range(n_splits))
    if isinstance(spec, bool):
        raise ValueError(f"bad --splits {spec!r}: {_SPLITS_FORMS}; {valid}")
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(
                f"bad --splits {spec!r} (a {type(spec).__name__}): {_SPLITS_FORMS}; {valid}"
            ) from None
        bad = [s for s in items if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise ValueError(
                f"bad --splits {spec!r}: {bad[0]!r} is not an integer split index; {valid}"
            )
        out = [int(s) for s in items]
    else:
        text = spec.strip()
        if _COUNT.fullmatch(text):
            count = int(text)
            if not 1 <= count <= n_splits:
                alone = f" (split {count} alone is {count}-{count})" if count < n_splits else ""
                raise ValueError(
                    f"--splits {text}: a bare number is a count of splits (the first N), it "
                    f"must be in 1..{n_splits}{alone}; {valid}"
                )
            return list(range(count))
        out = []
        for part in text.split(","):
            bounds = [v.strip() for v in part.split("-", 1)]
            if not all(_COUNT.fullmatch(v) for v in bounds):
                raise ValueError(f"bad --splits {spec!r}: {_SPLITS_FORMS}; {valid}")
            a, b = int(bounds[0]), int(bounds[-1])
            if b < a:
                raise ValueError(
                    f"bad --splits {spec!r}: the range {part.strip()} ends before it starts; "
                    f"{valid}"
                )
            out.extend(range(a, b + 1))
    for s in out:
        if not 0 <= s < n_splits:
            raise ValueError(f"--splits: split {s} out of range; {valid}")
    if not out:
        raise ValueError(f"--splits {spec!r} selects no split; {valid}")
    return sorted(set(out))


def uci_config(**overrides: Any) -> TrainConfig:
    """The TrainConfig defaults of the UCI engine, with ``overrides`` applied (validated).

    Defaults: local reparameterisation, Gaussian prior sigma 1, learned homoscedastic noise
    initialised at 0.5 (normalised units), rho init -5, Adam lr 0.01, batch 2048 (capped at
    the training size, so the small sets are full-batch), 5 weight samples per step, uniform
    KL weighting, 2000 epochs; ``hidden`` is filled from ``n_hidden.txt``.
    """
    values: dict[str, Any] = {
        "dataset": "uci",
        "uci_path": ".",  # replaced by the data-set directory in run_uci
        "hidden": [50],
        "estimator": "local",
        "prior": "gaussian",
        "prior_sigma": 1.0,
        "mu_init": "fan_in",
        "rho_init": -5.0,
        "noise": "learned",
        "noise_sigma": 0.5,
        "kl_weighting": "uniform",
        "num_samples": 5,
        "optimizer": "adam",
        "lr": 0.01,
        "batch_size": 2048,
        "epochs": 2000,
        "val_fraction": 0.0,
        "val_samples": 100,
        "seed": 0,
    }
    values.update(overrides)
    return TrainConfig.from_dict(values, source="uci settings")


@dataclass
class SearchSpace:
    """The --tune search: a grid over TrainConfig fields, chosen on validation data.

    Attributes:
        grid: field name -> candidate values (the Cartesian product is searched).
        validation_fraction: share of each search split's *training* rows held out.
        splits: training splits whose validation parts score a grid point (mean val LL).
        smooth: the validation LL curve is smoothed by a moving average over this many
            validation points before taking its maximum (the chosen epoch count).
    """

    grid: dict[str, list[Any]] = field(default_factory=lambda: dict(DEFAULT_SEARCH["grid"]))
    validation_fraction: float = 0.2
    splits: list[int] = field(default_factory=lambda: [0])
    smooth: int = 5

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "search") -> SearchSpace:
        """Build and validate (grid keys must be TrainConfig fields)."""
        known = {"grid", "validation_fraction", "splits", "smooth"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {known}")
        fraction = values.get("validation_fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(
                f"{source}: validation_fraction must be a number in (0, 1), got {fraction!r}"
            )
        smooth = values.get("smooth", 5)
        if isinstance(smooth, bool) or not isinstance(smooth, int):
            raise ConfigError(f"{source}: smooth must be an integer >= 1, got {smooth!r}")
        if not isinstance(values.get("grid", {}), dict):
            raise ConfigError(f"{source}: grid must be a table of TrainConfig keys")
        space = cls(**{k: values[k] for k in known if k in values})
        names = set(TrainConfig.field_names())
        for key, candidates in space.grid.items():
            if key not in names:
                raise ConfigError(f"{source}: grid key {key!r} is not a TrainConfig field")
            if not isinstance(candidates, list) or not candidates:
                raise ConfigError(f"{source}: grid[{key!r}] must be a non-empty list")
        if not 0 < space.validation_fraction < 1:
            raise ConfigError(f"{source}: validation_fraction must lie in (0, 1)")
        if (
            not isinstance(space.splits, list)
            or not space.splits
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in space.splits)
        ):
            raise ConfigError(
                f"{source}: splits must be a non-empty list of split indices, got {space.splits!r}"
            )
        if space.smooth < 1:
            raise ConfigError(f"{source}: smooth must be >= 1")
        return space

    @classmethod
    def load(cls, path: PathLike | None) -> SearchSpace:
        """From a TOML file (keys at top level or under ``[search]``), or the default."""
        if path is None:
            return cls.from_dict(json.loads(json.dumps(DEFAULT_SEARCH)), "default search")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"search file {p} does not exist")
        text = read_text(p, ConfigError, what="search file")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"search file {p} is not valid TOML: {e}") from e
        search = data.get("search", data)
        if not isinstance(search, dict):
            raise ConfigError(f"{p}: [search] must be a table")
        return cls.from_dict(search, str(p))

    def points(self) -> list[dict[str, Any]]:
        """Every grid combination as a dict of overrides."""
        keys = list(self.grid)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())
        ]


@dataclass
class UCIRunSettings:
    """Engine settings that are not part of the per-split TrainConfig.

    Attributes:
        splits: the split indices to run.
        test_samples: weight samples of the test predictive (S of the mixture).
        passes: passes over the data per trainer epoch (bookkeeping granularity).
        jobs: worker processes (splits run in parallel, one torch thread each).
        tune: whether the validation search ran; search: its space.
        threads: torch intra-op threads per process.
    """

    splits: list[int]
    test_samples: int = 100
    passes: int = 20
    jobs: int = 1
    tune: bool = False
    search: SearchSpace | None = None
    threads: int = 1


def check_uci_settings(cfg: TrainConfig, *, tuning: bool = False) -> None:
    """Settings the UCI protocol cannot honour, refused instead of ignored."""
    if cfg.patience is not None:
        raise ConfigError(
            "the UCI engine trains every split for a fixed number of epochs (chosen by --tune "
            "on validation curves); patience is not used there, leave it unset"
        )
    # the UCI engine builds its own epochs and schedule per split (build_objective refuses
    # these when not given the epoch plan, but only after config.json, uci.json and splits/
    # were written): refused here, before anything is written
    per_step = [
        f"{key} = {getattr(cfg, key)!r}"
        for key in ("lr_warmup_steps", "steps_per_epoch")
        if getattr(cfg, key) not in (None, 0)
    ]
    if per_step:
        raise ConfigError(
            f"the UCI engine trains every split by whole passes with a per-epoch schedule; "
            f"{' and '.join(per_step)} is not used there: leave "
            + ("them" if len(per_step) > 1 else "it")
            + " unset"
        )
    if tuning and cfg.lr_schedule == "cosine":
        raise ConfigError(
            "--tune picks the epoch count E from validation curves trained with the cosine "
            "schedule laid over all the search's epochs, but the final training of E epochs "
            "would lay it over E (another learning-rate path): use lr_schedule 'constant' "
            "with --tune, or a cosine schedule with a fixed --epochs"
        )


def uci_table(path: PathLike | None) -> dict[str, Any]:
    """The optional ``[uci]`` table of a TOML config file (engine keys such as ``splits``).

    A file that is not UTF-8 or not TOML, or a ``uci`` key that is not a table (``uci = 3``),
    raises ConfigError naming the file.
    """
    if path is None or Path(path).suffix != ".toml" or not Path(path).is_file():
        return {}
    text = read_text(Path(path), ConfigError, what="config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    table = data.get("uci", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: uci must be a table ([uci] with splits = ...), got {table!r}")
    unknown = sorted(set(table) - {"splits"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [uci]: {', '.join(unknown)}; valid: splits")
    return dict(table)


def load_uci_config_file(path: PathLike | None, **flags: Any) -> TrainConfig:
    """`uci_config` defaults, then a TOML/JSON config file, then non-None ``flags``.

    A TOML file holds TrainConfig keys at the top level or under ``[train]``, and optionally
    a ``[uci]`` table (read by `uci_table`, ignored here).
    """
    values: dict[str, Any] = {}
    if path is not None:
        data = load_config_file(Path(path))
        data.pop("uci", None)
        values.update(data)
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(given)
    try:
        cfg = uci_config(**values).validate()
    except ConfigError as e:
        # a key or value read from the file is named with the file (was "uci settings:
        # unknown key(s) trian" with no word of where it came from)
        key = str(e).split(" ", 1)[0]
        if path is not None and (str(e).startswith("uci settings: unknown") or key not in given):
            raise ConfigError(f"{path}: {e}") from None
        raise
    check_uci_settings(cfg)  # before any worker starts
    return cfg
