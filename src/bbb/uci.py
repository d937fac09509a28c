"""The UCI regression benchmark: every split of a data set, a validation search, the table.

Protocol (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016): for each split ``i`` of a
directory in the split format (`bbb.data.uci`), train on ``index_train_i`` and test on
``index_test_i``, with features and target normalised by the training statistics; one hidden
layer of ``n_hidden.txt`` ReLU units (50; 100 for protein). The test metrics are in the
*original* units of the target:

* ``rmse``: root-mean-squared error of the predictive mean ``(1/S) sum_s mu_s(x)``;
* ``ll``: mean over test points of ``log (1/S) sum_s N(y; mu_s(x), sigma_s(x)^2)``, the Gaussian
  mixture predictive over S weight samples, observation noise included
  (`bbb.metrics.mixture_gaussian_log_likelihood` with ``y_scale = y_std``: the normalised
  log-density minus ``log y_std``).

Over the splits, ``rmse_mean``/``ll_mean`` and the standard errors ``rmse_se``/``ll_se`` =
``std / sqrt(n)`` with the sample standard deviation (``ddof=1``; None for one split).

Nothing here is a second training loop: each split builds its network, likelihood and ELBO
from a :class:`bbb.config.TrainConfig` (`bbb.runs.build_model`, `bbb.runs.build_likelihood`)
and trains it with :class:`bbb.train.Trainer`; the test metrics come from
:func:`bbb.train.evaluate`. To keep the many epochs cheap, a "trainer epoch" is a block of
``passes`` passes over the shuffled data (`RepeatedBatches`), so per-epoch bookkeeping (and,
in the search, the validation pass) happens once per block.

A run directory (``bbb uci PATH --out RUN_DIR``) holds::

    config.json       the TrainConfig of the splits (after the search, the chosen values)
    uci.json          engine settings: data set, splits, test samples, search settings
    tune.json         --tune only: every grid point, its validation curve and the choice
    splits/split_<i>.json  one record per finished split (atomic; --resume skips these)
    splits.csv        split, rmse, ll, epochs, seconds, chosen hyper-parameters
    metrics.json      rmse_mean, rmse_se, ll_mean, ll_se, per-split rows, settings, timing
    splits.png        per-split test RMSE and log-likelihood; tune.png: validation curves

``run_all`` runs every data set under a root into ``RUN_DIR/<name>`` and writes ``table.md``
with our numbers next to the published ones (`PUBLISHED`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .config import ConfigError, TrainConfig, load_config_file
from .data.checksums import MissingDataError, resolve_data_dir
from .data.uci import UCIDataset, UCISplit, count_splits, dataset_name, find_uci_datasets
from .kernels import use_kernels
from .runs import RunData, build_likelihood, build_model, build_objective
from .train.checkpoint import atomic_write_text
from .train.trainer import Trainer, TrainingDivergedError, evaluate, seed_everything

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PUBLISHED",
    "DEFAULT_SEARCH",
    "RepeatedBatches",
    "SearchSpace",
    "UCIRunSettings",
    "parse_splits",
    "published_row",
    "run_all",
    "run_uci",
    "standard_error",
    "uci_config",
]

PathLike = str | os.PathLike[str]

#: Published test RMSE / log-likelihood (mean over splits), in original units. Sources:
#: PBP and VI (Graves 2011, as run by the PBP authors): Hernandez-Lobato & Adams (2015);
#: MC dropout: Gal & Ghahramani (2016); deep ensembles: Lakshminarayanan et al. (2017).
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "boston": {
        "PBP": (3.01, -2.57),
        "MC dropout": (2.97, -2.46),
        "Deep ens.": (3.28, -2.41),
        "VI (Graves)": (4.32, -2.90),
    },
    "concrete": {
        "PBP": (5.67, -3.16),
        "MC dropout": (5.23, -3.04),
        "Deep ens.": (6.03, -3.06),
        "VI (Graves)": (7.19, -3.39),
    },
    "energy": {
        "PBP": (1.80, -2.04),
        "MC dropout": (1.66, -1.99),
        "Deep ens.": (2.09, -1.38),
        "VI (Graves)": (2.65, -2.39),
    },
    "kin8nm": {
        "PBP": (0.10, 0.90),
        "MC dropout": (0.10, 0.95),
        "Deep ens.": (0.09, 1.20),
        "VI (Graves)": (0.10, 0.90),
    },
    "power": {
        "PBP": (4.12, -2.84),
        "MC dropout": (4.02, -2.80),
        "Deep ens.": (4.11, -2.79),
        "VI (Graves)": (4.33, -2.89),
    },
    "wine": {
        "PBP": (0.64, -0.97),
        "MC dropout": (0.62, -0.93),
        "Deep ens.": (0.64, -0.94),
        "VI (Graves)": (0.65, -0.98),
    },
}
PUBLISHED_METHODS = ("PBP", "MC dropout", "Deep ens.", "VI (Graves)")
_ALIASES = {
    "bostonhousing": "boston",
    "housing": "boston",
    "power-plant": "power",
    "powerplant": "power",
    "wine-quality-red": "wine",
    "winequalityred": "wine",
}

#: The default --tune grid (every combination is trained on split 0's training part minus a
#: validation part; the epoch count is chosen on the same validation curve).
DEFAULT_SEARCH: dict[str, Any] = {
    "grid": {"lr": [0.003, 0.01]},
    "validation_fraction": 0.2,
    "splits": [0],
    "smooth": 5,
}

SPLIT_FIELDS = ("split", "rmse", "ll", "epochs", "seconds")


# --------------------------------------------------------------------------- helpers


def published_row(name: str) -> dict[str, tuple[float, float]] | None:
    """Published (RMSE, LL) per method for a data-set directory name, or None if unknown."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return PUBLISHED.get(key)


def standard_error(values: Sequence[float]) -> float | None:
    """``std / sqrt(n)`` with the sample standard deviation (ddof=1); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def parse_splits(spec: str | int | Sequence[int] | None, n_splits: int) -> list[int]:
    """Split indices from ``spec``.

    ``None``: all ``n_splits``; an int or a bare number ``"N"``: the first N splits;
    ``"a-b"``: a to b inclusive; ``"0,3,5"``: those (ranges allowed inside the list).
    Raises ValueError naming the valid range for anything else.
    """
    valid = f"valid splits are 0..{n_splits - 1} ({n_splits} splits)"
    if spec is None:
        return list(range(n_splits))
    if isinstance(spec, bool):
        raise ValueError(f"bad --splits {spec!r}")
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        out = [int(s) for s in spec]
    else:
        text = spec.strip()
        if text.isdigit():
            count = int(text)
            if not 1 <= count <= n_splits:
                raise ValueError(f"--splits {text}: a count must be in 1..{n_splits}; {valid}")
            return list(range(count))
        out = []
        for part in text.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = (int(v) for v in part.split("-", 1))
                    if b < a:
                        raise ValueError
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ValueError(
                    f"bad --splits {spec!r}: use a count N, a range a-b or a list 0,3,5; {valid}"
                ) from None
    for s in out:
        if not 0 <= s < n_splits:
            raise ValueError(f"--splits: split {s} out of range; {valid}")
    if not out:
        raise ValueError(f"--splits {spec!r} selects no split; {valid}")
    return sorted(set(out))


class RepeatedBatches(Sampler[torch.Tensor]):
    """Index batches for ``passes`` shuffled passes over ``n`` rows (one "trainer epoch").

    Each pass is a fresh permutation (drawn from ``generator``) cut into batches of
    ``batch_size`` (the last one may be smaller). Used with ``DataLoader(dataset,
    sampler=RepeatedBatches(...), batch_size=None)``: a `TensorDataset` is indexed with the
    whole index tensor (int64, (batch,)) at once: one gather instead of ``batch_size`` lookups.
    """

    def __init__(
        self, n: int, batch_size: int, passes: int = 1, generator: torch.Generator | None = None
    ) -> None:
        if n < 1 or batch_size < 1 or passes < 1:
            raise ValueError(f"need n, batch_size, passes >= 1, got {n}, {batch_size}, {passes}")
        self.n, self.batch_size, self.passes, self.generator = n, batch_size, passes, generator

    def __len__(self) -> int:
        return self.passes * math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.passes):
            perm = torch.randperm(self.n, generator=self.generator)
            for start in range(0, self.n, self.batch_size):
                yield perm[start : start + self.batch_size]


def _passes_per_block(epochs: int, block: int) -> int:
    """Passes per trainer epoch: the largest divisor of ``epochs`` that is <= ``block``."""
    return max(d for d in range(1, max(1, min(block, epochs)) + 1) if epochs % d == 0)


def _block(cfg: TrainConfig, passes: int) -> int:
    """Passes per trainer epoch for ``cfg``: 1 under the "blundell" KL weighting, whose
    weights run over the minibatches of one pass (a block of passes would spread them over the
    block, ~1/passes of the KL), else :func:`_passes_per_block`."""
    return 1 if cfg.kl_weighting == "blundell" else _passes_per_block(cfg.epochs, passes)


def _results_of(futures: Iterable[Any], handle: Callable[[Any], None]) -> None:
    """``handle`` each finished future's result as it comes; a failed one does not discard
    the others' (they are all handled first), then the first error is raised."""
    errors = []
    for fut in as_completed(futures):
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others
            errors.append(e)
            continue
        handle(result)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- settings


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
        data = tomllib.loads(p.read_text(encoding="utf-8"))
        return cls.from_dict(data.get("search", data), str(p))

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


# --------------------------------------------------------------------------- one split


def _run_data(split: UCISplit, train: TensorDataset, val: TensorDataset | None) -> RunData:
    return RunData(
        train,
        val,
        split.test,
        split.n_features,
        1,
        False,
        float(split.y_mean[0]),
        float(split.y_std[0]),
    )


def _train(
    cfg: TrainConfig,
    data: RunData,
    *,
    passes: int,
    seed: int,
    val_every: bool = False,
) -> tuple[Trainer, Any]:
    """Build model, likelihood, ELBO and optimizer from ``cfg`` and fit with `Trainer`.

    ``cfg.epochs`` passes over ``data.train`` in trainer epochs of ``_block(cfg, passes)``
    passes (1 under the "blundell" KL weighting, else the largest divisor of ``cfg.epochs``
    not above ``passes``); with ``val_every`` the trainer validates (original-unit NLL) after
    every trainer epoch.
    Returns the trainer (model at its final weights) and the likelihood.
    """
    check_uci_settings(cfg)
    generator = seed_everything(seed)
    model = build_model(cfg, data).to(cfg.device)
    likelihood = build_likelihood(cfg, data).to(cfg.device)
    n = len(data.train)
    per_block = _block(cfg, passes)
    # the same ELBO, optimizer and schedule as `bbb train` (bbb.runs.build_objective)
    elbo, optimizer, scheduler = build_objective(cfg, model, likelihood, n, cfg.epochs // per_block)
    sampler = RepeatedBatches(n, min(cfg.batch_size, n), per_block, generator)
    loader = DataLoader(data.train, sampler=sampler, batch_size=None)
    val_loader = None
    if val_every and data.val is not None:
        val_loader = DataLoader(data.val, batch_size=len(data.val))
    trainer = Trainer(
        model,
        elbo,
        optimizer,
        loader,
        val_loader=val_loader,
        scheduler=scheduler,
        epochs=cfg.epochs // per_block,
        out_dir=None,
        val_metric="nll",
        val_samples=cfg.val_samples,
        progress=False,
        log=None,
        loader_generator=generator,
        y_scale=data.y_std,
        grad_clip=cfg.grad_clip,
        device=cfg.device,
    )
    with use_kernels(cfg.kernels):
        trainer.fit()
    return trainer, likelihood


def check_uci_settings(cfg: TrainConfig, *, tuning: bool = False) -> None:
    """Settings the UCI protocol cannot honour, refused instead of ignored."""
    if cfg.patience is not None:
        raise ConfigError(
            "the UCI engine trains every split for a fixed number of epochs (chosen by --tune "
            "on validation curves); patience is not used there, leave it unset"
        )
    if tuning and cfg.lr_schedule == "cosine":
        raise ConfigError(
            "--tune picks the epoch count E from validation curves trained with the cosine "
            "schedule laid over all the search's epochs, but the final training of E epochs "
            "would lay it over E (another learning-rate path): use lr_schedule 'constant' "
            "with --tune, or a cosine schedule with a fixed --epochs"
        )


def _noise_std(likelihood: Any, y_std: float) -> float | None:
    """The learned/fixed homoscedastic noise std in original units (None if heteroscedastic)."""
    if getattr(likelihood, "noise", None) == "heteroscedastic":
        return None
    return float(likelihood.sigma.detach()[0]) * y_std


def run_split(
    path: PathLike,
    split: int,
    cfg: TrainConfig,
    *,
    test_samples: int = 100,
    passes: int = 10,
    threads: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Train on the whole training part of ``split``, evaluate on its test part.

    Returns a record: ``split``, ``rmse`` and ``ll`` (test, original units), ``epochs``,
    ``seconds`` (training + evaluation wall time), ``cpu_seconds`` (CPU time of the process
    over the same span), ``noise_std`` (original units, learned
    homoscedastic noise), ``n_train``, ``n_test`` and ``settings`` (the TrainConfig values
    that vary in a search).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    ds = UCIDataset(path, verify=verify)
    data_split = ds.split(split)
    data = _run_data(data_split, data_split.train, None)
    trainer, likelihood = _train(cfg, data, passes=passes, seed=cfg.seed * 10007 + split)
    report = evaluate(
        trainer.model,
        DataLoader(data_split.test, batch_size=len(data_split.test)),
        likelihood,  # type: ignore[arg-type]
        num_samples=test_samples,
        device=cfg.device,
        y_scale=data.y_std,
    )
    return {
        "split": split,
        "rmse": report["rmse"],
        "ll": report["log_likelihood"],
        "epochs": cfg.epochs,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "noise_std": _noise_std(likelihood, data.y_std),
        "n_train": len(data_split.train),
        "n_test": len(data_split.test),
    }


# --------------------------------------------------------------------------- search


def _smoothed_argmax(values: list[float], window: int) -> tuple[int, float]:
    """Index and value of the maximum of the trailing moving average of ``values``."""
    best_i, best_v = 0, -math.inf
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        v = sum(values[lo : i + 1]) / (i + 1 - lo)
        if v > best_v:
            best_i, best_v = i, v
    return best_i, best_v


def _tune_curve(
    key: int,
    path: PathLike,
    cfg: TrainConfig,
    split: int,
    validation_fraction: float,
    passes: int,
    verify: bool = True,
    threads: int | None = None,
) -> tuple[int, int, tuple[list[float], list[float]] | None]:
    """``(key, split, curves)``: the validation LL and RMSE curves (original units,
    one value per trainer epoch) of one grid point on one split's training rows minus a
    validation part; ``curves`` is None when training diverged."""
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = UCIDataset(path, verify=verify)
    sp = dataset.split(split, validation_fraction=validation_fraction, seed=cfg.seed)
    data = _run_data(sp, sp.train, sp.val)
    try:
        trainer, _ = _train(cfg, data, passes=passes, seed=cfg.seed * 10007 + split, val_every=True)
    except TrainingDivergedError:
        return key, split, None
    return (
        key,
        split,
        ([-r["val_nll"] for r in trainer.history], [r["val_rmse"] for r in trainer.history]),
    )


def tune(
    dataset: UCIDataset,
    base: TrainConfig,
    space: SearchSpace,
    *,
    passes: int = 10,
    jobs: int = 1,
    threads: int = 1,
    verify: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Grid search on validation parts carved from training splits (never the test rows).

    For every grid point and every split in ``space.splits``: train on the training rows
    minus a random ``validation_fraction`` (statistics of the remaining rows), validating the
    original-unit log-likelihood after every block of ``_block(cfg, passes)`` epochs (see
    :func:`_train`) up to ``base.epochs``. The curve is
    averaged over the search splits and smoothed (``space.smooth`` points); the grid point
    with the best smoothed value wins, and its argmax gives the epoch count. ``jobs`` > 1
    trains the (grid point, split) pairs in parallel processes.

    Returns ``{"points": [...], "chosen": {...overrides, "epochs": E}, "seconds": ...}``.
    """
    start = time.perf_counter()
    bad = [s for s in space.splits if s >= dataset.n_splits]
    if bad:
        raise ConfigError(
            f"search splits {bad} out of range: {dataset.name} has splits 0..{dataset.n_splits - 1}"
        )
    overrides_list = space.points()
    cfgs = [
        TrainConfig.from_dict({**base.to_dict(), **o}, source="search").validate()
        for o in overrides_list
    ]
    for c in (base, *cfgs):  # the base and every grid point (the grid may set the schedule)
        check_uci_settings(c, tuning=True)
    tasks = [(i, s) for i in range(len(cfgs)) for s in space.splits]
    frac = space.validation_fraction
    curves: dict[tuple[int, int], tuple[list[float], list[float]] | None] = {}
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(
            max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("spawn")
        ) as pool:
            futures = {
                pool.submit(
                    _tune_curve, i, dataset.path, cfgs[i], s, frac, passes, verify, threads
                ): (i, s)
                for i, s in tasks
            }
            _results_of(futures, lambda r: curves.__setitem__((r[0], r[1]), r[2]))
    else:
        for i, s in tasks:
            curves[(i, s)] = _tune_curve(i, dataset.path, cfgs[i], s, frac, passes, verify)[2]
    points = []
    for i, overrides in enumerate(overrides_list):
        per_block = _block(cfgs[i], passes)
        diverged = [s for s in space.splits if curves[(i, s)] is None]
        if diverged:  # a valid point of the grid (e.g. too high a learning rate): scored last
            points.append({"overrides": overrides, "val_ll": None, "diverged_on_splits": diverged})
            if log:
                log(f"  tune {overrides}: diverged (splits {diverged})")
            continue
        lls = [curves[(i, s)][0] for s in space.splits]  # type: ignore[index]
        rmses = [curves[(i, s)][1] for s in space.splits]  # type: ignore[index]
        ll = [sum(c[k] for c in lls) / len(lls) for k in range(len(lls[0]))]
        rmse = [sum(c[k] for c in rmses) / len(rmses) for k in range(len(ll))]
        k, score = _smoothed_argmax(ll, space.smooth)
        point = {
            "overrides": overrides,
            "val_ll": score,
            "val_rmse": rmse[k],
            "epochs": (k + 1) * per_block,
            "curve_epochs": [(j + 1) * per_block for j in range(len(ll))],
            "curve_ll": ll,
            "curve_rmse": rmse,
        }
        points.append(point)
        if log:
            log(
                f"  tune {overrides}: val ll {score:.4f} rmse {rmse[k]:.4g} "
                f"at epoch {point['epochs']}"
            )
    finite = [p for p in points if p["val_ll"] is not None]
    if not finite:
        raise TrainingDivergedError(
            f"every grid point diverged in the search on {dataset.name}: lower the learning rate"
        )
    best = max(finite, key=lambda p: p["val_ll"])
    return {
        "metric": "validation log-likelihood (original units), smoothed",
        "validation_fraction": space.validation_fraction,
        "splits": space.splits,
        "smooth": space.smooth,
        "max_epochs": base.epochs,
        "points": points,
        "chosen": {**best["overrides"], "epochs": best["epochs"]},
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- a data set


def _split_path(out: Path, split: int) -> Path:
    return out / "splits" / f"split_{split}.json"


def _load_records(out: Path) -> dict[int, dict[str, Any]]:
    records = {}
    folder = out / "splits"
    if folder.is_dir():
        for p in sorted(folder.glob("split_*.json")):
            try:
                rec = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue  # cannot happen with atomic writes; treat as unfinished
            records[int(rec["split"])] = rec
    return records


def _comparable(value: Any, key: str) -> Any:
    """An engine setting as compared on --resume: the data-set location may be spelled
    differently (a name, a relative or an absolute path), so it is left out."""
    if key == "path":
        return None
    if key == "requested_config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "uci_path"}
    return value


def _chosen(cfg: TrainConfig, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in keys}


def _write_csv(path: Path, rows: list[dict[str, Any]], extra: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*SPLIT_FIELDS, "noise_std", *extra])
    for r in rows:
        noise = "" if r.get("noise_std") is None else f"{r['noise_std']:.6g}"
        writer.writerow(
            [
                r["split"],
                f"{r['rmse']:.6g}",
                f"{r['ll']:.6g}",
                r["epochs"],
                f"{r['seconds']:.2f}",
                noise,
                *(r["settings"].get(k, "") for k in extra),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def _plot_splits(rows: list[dict[str, Any]], name: str, path: Path) -> None:
    from .plots import figure

    splits = [r["split"] for r in rows]
    fig = figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, label in ((ax1, "rmse", "test RMSE"), (ax2, "ll", "test log-likelihood")):
        vals = [r[key] for r in rows]
        ax.bar(splits, vals, color="C0" if key == "rmse" else "C1")
        mean = sum(vals) / len(vals)
        ax.axhline(mean, color="k", lw=1, ls="--", label=f"mean {mean:.3f}")
        pub = published_row(name)
        if pub is not None:
            ax.axhline(pub["PBP"][0 if key == "rmse" else 1], color="C3", lw=1, ls=":", label="PBP")
        ax.set_xlabel("split")
        ax.set_title(f"{name}: {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_tune(result: dict[str, Any], path: Path) -> None:
    from .plots import figure

    fig = figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for p in result["points"]:
        ax.plot(p["curve_epochs"], p["curve_ll"], label=str(p["overrides"]), lw=1)
    ax.axvline(result["chosen"]["epochs"], color="k", ls="--", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation log-likelihood")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and standard errors (``std/sqrt(n)``, ddof=1) of ``rmse`` and ``ll`` over rows."""
    rmse = [r["rmse"] for r in rows]
    ll = [r["ll"] for r in rows]
    n = len(rows)
    return {
        "n_splits": n,
        "rmse_mean": sum(rmse) / n,
        "rmse_se": standard_error(rmse),
        "ll_mean": sum(ll) / n,
        "ll_se": standard_error(ll),
    }


def run_uci(
    path: PathLike,
    out_dir: PathLike,
    *,
    config: TrainConfig | None = None,
    settings: UCIRunSettings | None = None,
    splits: str | int | Sequence[int] | None = None,
    data_dir: PathLike | None = None,
    resume: bool = False,
    verify: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run (or resume) every selected split of the data set in ``path``; return metrics.

    Args:
        path: a directory in the UCI split format, or a name under ``<data-dir>/uci/``.
        out_dir: the run directory (layout in the module docstring).
        config: per-split training settings (default `uci_config()`; see the note on
            ``hidden``).
        settings: engine settings (splits, test samples, search, jobs); ``splits`` overrides.
        splits: split selection (see `parse_splits`).
        data_dir: data root for bare names.
        resume: skip the splits already recorded in ``out_dir`` (and reuse its search);
            the settings must match the saved ones.
        verify: check the SHA-256 digests of the known shared copies.
        log: one line per finished split (None: silent).

    Returns:
        The content of ``metrics.json``.

    Note: ``hidden`` follows ``n_hidden.txt`` (50; 100 for protein) while the config holds
    the single-layer default ``[50]``; any other value is used as given.
    """
    dataset = UCIDataset(path, data_dir=data_dir, verify=verify)
    info = dataset.info
    cfg = config if config is not None else uci_config()
    if cfg.hidden == [50]:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "hidden": [info.n_hidden]})
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "uci_path": str(dataset.path)}).validate()
    st = settings if settings is not None else UCIRunSettings(splits=[])
    check_uci_settings(cfg, tuning=st.tune)  # before any split or worker starts
    chosen_splits = parse_splits(
        splits if splits is not None else (st.splits or None), info.n_splits
    )
    st.splits = chosen_splits
    out = Path(out_dir)
    log = log or (lambda _msg: None)
    engine = {
        "dataset": info.name,
        "path": str(dataset.path),
        "n_hidden": info.n_hidden,
        "reference_epochs": info.n_epochs,
        "test_samples": st.test_samples,
        "passes_per_trainer_epoch": st.passes,
        "tune": st.tune,
        "search": None if st.search is None else st.search.__dict__,
        "requested_config": cfg.to_dict(),
    }
    records = _load_records(out)
    if resume:
        saved = out / "uci.json"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} does not exist")
        old = json.loads(saved.read_text())
        diff = [k for k in engine if _comparable(old.get(k), k) != _comparable(engine[k], k)]
        if diff:
            raise ConfigError(
                f"cannot resume {out}: settings differ from the saved run ({', '.join(diff)}); "
                "use the same options or another --out"
            )
    elif records:
        raise ConfigError(
            f"{out} already holds finished splits; pass --resume to continue it, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "uci.json", json.dumps(engine, indent=2, sort_keys=True) + "\n")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(st.threads)  # tiny networks: extra threads only spin-wait
    try:
        return _run_uci_body(dataset, cfg, st, out, engine, records, resume, verify, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_uci_body(
    dataset: UCIDataset,
    cfg: TrainConfig,
    st: UCIRunSettings,
    out: Path,
    engine: dict[str, Any],
    records: dict[int, dict[str, Any]],
    resume: bool,
    verify: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The search (if any), the splits and the summary files of `run_uci`."""
    info = dataset.info
    chosen_splits = st.splits
    wall_start = time.perf_counter()
    tuned_keys: list[str] = []
    tune_seconds = 0.0
    if st.tune:
        space = st.search or SearchSpace()
        tuned_keys = [*space.grid, "epochs"]
        tune_path = out / "tune.json"
        if resume and tune_path.is_file():
            result = json.loads(tune_path.read_text())
            log(f"{info.name}: reusing the search in {tune_path}")
        else:
            log(f"{info.name}: validation search over {len(space.points())} grid points")
            result = tune(
                dataset,
                cfg,
                space,
                passes=st.passes,
                jobs=st.jobs,
                threads=st.threads,
                verify=verify,
                log=log,
            )
            atomic_write_text(tune_path, json.dumps(result, indent=2) + "\n")
            _plot_tune(result, out / "tune.png")
        tune_seconds = float(result["seconds"])
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **result["chosen"]}).validate()
        log(f"{info.name}: chosen {result['chosen']}")
    cfg.save(out / "config.json")
    report_keys = tuned_keys or ["lr", "prior_sigma", "noise", "num_samples", "batch_size"]
    extra_keys = [k for k in report_keys if k != "epochs"]
    todo = [s for s in chosen_splits if s not in records]
    if records and todo != chosen_splits:
        log(f"{info.name}: resuming, {len(chosen_splits) - len(todo)} split(s) already done")

    def finish(rec: dict[str, Any]) -> None:
        rec["settings"] = _chosen(cfg, report_keys)
        atomic_write_text(_split_path(out, rec["split"]), json.dumps(rec, indent=2) + "\n")
        records[rec["split"]] = rec
        log(
            f"{info.name} split {rec['split']}: rmse {rec['rmse']:.4g} ll {rec['ll']:.4g} "
            f"({rec['seconds']:.1f}s)"
        )

    (out / "splits").mkdir(exist_ok=True)
    kwargs = {"test_samples": st.test_samples, "passes": st.passes, "verify": verify}
    if st.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(
            max_workers=min(st.jobs, len(todo)), mp_context=mp.get_context("spawn")
        ) as pool:
            futures = [
                pool.submit(run_split, dataset.path, s, cfg, threads=st.threads, **kwargs)
                for s in todo
            ]
            _results_of(futures, finish)  # a failed split keeps the others' results
    else:
        for s in todo:
            finish(run_split(dataset.path, s, cfg, **kwargs))  # type: ignore[arg-type]
    rows = [records[s] for s in chosen_splits]
    _write_csv(out / "splits.csv", rows, extra_keys)
    metrics = {
        "dataset": info.name,
        **summarize(rows),
        "splits": [{k: r[k] for k in (*SPLIT_FIELDS, "noise_std")} for r in rows],
        "split_seconds_total": sum(r["seconds"] for r in rows),
        "split_cpu_seconds_total": (
            sum(r["cpu_seconds"] for r in rows) if all("cpu_seconds" in r for r in rows) else None
        ),
        "tune_seconds": tune_seconds,
        "wall_seconds_this_call": time.perf_counter() - wall_start,
        "settings": {
            **engine,
            "config": cfg.to_dict(),
            "splits_run": chosen_splits,
            "jobs": st.jobs,
            "threads": st.threads,
            "chosen": _chosen(cfg, report_keys),
        },
        "units": "rmse and ll (nats per test point) in original target units; "
        "se = sample std (ddof=1) / sqrt(n_splits)",
        "published": published_row(info.name),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _plot_splits(rows, info.name, out / "splits.png")
    return metrics


# --------------------------------------------------------------------------- all data sets


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: our RMSE and LL (mean +- se) next to the published columns."""

    def pm(mean: float, se: float | None, digits: int) -> str:
        return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    head = [
        "data set",
        "splits",
        "BBB RMSE",
        "BBB LL",
        *(f"{m} RMSE / LL" for m in PUBLISHED_METHODS),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in results:
        digits = 3 if m["rmse_mean"] < 1 else 2
        pub = published_row(m["dataset"]) or {}
        cols = [
            f"{pub[k][0]:.2f} / {pub[k][1]:.2f}" if k in pub else "-" for k in PUBLISHED_METHODS
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    m["dataset"],
                    str(m["n_splits"]),
                    pm(m["rmse_mean"], m["rmse_se"], digits),
                    pm(m["ll_mean"], m["ll_se"], 2),
                    *cols,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def resolve_uci_root(root: PathLike | None, data_dir: PathLike | None = None) -> Path:
    """``root``, or ``<data-dir>/uci`` when None; must be an existing directory."""
    path = Path(root) if root is not None else resolve_data_dir(data_dir) / "uci"
    if not path.is_dir():
        raise MissingDataError(f"UCI root {path} is not a directory")
    return path


def run_all(
    root: PathLike | None,
    out_dir: PathLike,
    *,
    config_for: Callable[[str], TrainConfig] | None = None,
    settings_for: Callable[[str], UCIRunSettings] | None = None,
    data_dir: PathLike | None = None,
    resume: bool = False,
    verify: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run every data set found under ``root`` into ``out_dir/<name>``; write ``table.md``.

    ``config_for(name)`` / ``settings_for(name)`` give the per-data-set settings (default:
    `uci_config()` and all splits).
    """
    resolved = resolve_uci_root(root, data_dir)
    directories = find_uci_datasets(resolved)
    if not directories:
        raise MissingDataError(f"no UCI split directory under {resolved}")
    out = Path(out_dir)
    results = []
    for d in directories:
        name = dataset_name(d)
        cfg = config_for(name) if config_for else None
        st = settings_for(name) if settings_for else None
        results.append(
            run_uci(d, out / name, config=cfg, settings=st, resume=resume, verify=verify, log=log)
        )
    table = format_table(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "summary.json", json.dumps(results, indent=2) + "\n")
    return results


def uci_table(path: PathLike | None) -> dict[str, Any]:
    """The optional ``[uci]`` table of a TOML config file (engine keys such as ``splits``)."""
    if path is None or Path(path).suffix != ".toml" or not Path(path).is_file():
        return {}
    table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("uci", {})
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
        data = load_config_file(path)
        data.pop("uci", None)
        values.update(data)
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = uci_config(**values).validate()
    check_uci_settings(cfg)  # before any worker starts
    return cfg


# --------------------------------------------------------------------------- command line

_FLAG_KEYS = (
    "estimator",
    "prior",
    "prior_sigma",
    "noise",
    "noise_sigma",
    "rho_init",
    "epochs",
    "lr",
    "num_samples",
    "batch_size",
    "seed",
    "device",
)


def add_parser(sub: Any) -> Any:
    """Add the ``uci`` subcommand to an argparse subparsers object; return its parser."""
    from .cli import HelpFormatter

    p = sub.add_parser(
        "uci",
        formatter_class=HelpFormatter,
        help="UCI regression benchmark: every split of a data set (or --all), mean and SE",
        description="Train and test on every split of a UCI data set in the split format of "
        "Hernandez-Lobato & Adams (2015). Metrics (test RMSE, test log-likelihood) are in "
        "original units. Settings: defaults < --config file < flags; --tune picks the grid "
        "point and the epoch count on a validation part of the training split.",
    )
    d = uci_config()  # the engine's defaults of the TrainConfig flags (a --config file's win)
    p.add_argument("path", nargs="?", help="split directory, or a name under DATA_DIR/uci")
    p.add_argument(
        "--all",
        nargs="?",
        const="",
        metavar="ROOT",
        help="run every data set under ROOT (default: DATA_DIR/uci) and print the table",
    )
    p.add_argument(
        "--splits",
        help="a count N (splits 0..N-1), a range a-b or a list 0,3,5 (default: every split)",
    )
    p.add_argument("--out", help="run directory (default: runs/uci/<name>, or runs/uci for --all)")
    p.add_argument(
        "--data-dir", help="data root holding uci/ (default: $BBB_DATA_DIR, then ../shared/data)"
    )
    p.add_argument(
        "--config",
        help="TOML/JSON file of TrainConfig keys (for --all: a folder "
        "of <name>.toml files, each optional)",
    )
    p.add_argument("--tune", action="store_true", help="validation search before the splits")
    p.add_argument("--search", help="TOML search space for --tune (default: built-in grid)")
    p.add_argument("--resume", action="store_true", help="skip splits already finished in --out")
    p.add_argument("--jobs", type=int, default=1, help="splits run in parallel processes")
    p.add_argument("--test-samples", type=int, default=100, help="weight samples at test time")
    p.add_argument("--passes", type=int, default=20, help="data passes per trainer epoch")
    p.add_argument("--no-verify", action="store_true", help="skip SHA-256 checks of shared copies")
    p.add_argument("--quiet", action="store_true", help="no per-split lines")
    p.add_argument("--estimator", help=f"reparam, local or flipout (default: {d.estimator})")
    p.add_argument("--prior", help=f"gaussian, scale_mixture or laplace (default: {d.prior})")
    p.add_argument(
        "--prior-sigma", type=float, help=f"Gaussian prior sigma (default: {d.prior_sigma:g})"
    )
    p.add_argument("--noise", help=f"fixed, learned or heteroscedastic (default: {d.noise})")
    p.add_argument(
        "--noise-sigma",
        type=float,
        help=f"(initial) noise std, normalised units (default: {d.noise_sigma:g})",
    )
    p.add_argument(
        "--rho-init",
        type=float,
        help=f"initial rho, sigma = softplus(rho) (default: {d.rho_init:g})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"epochs (with --tune: the maximum searched) (default: {d.epochs})",
    )
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {d.lr:g})")
    p.add_argument(
        "--num-samples",
        type=int,
        help=f"weight samples per training step (default: {d.num_samples})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"minibatch size, capped at the training size (default: {d.batch_size})",
    )
    p.add_argument("--seed", type=int, help=f"random seed (default: {d.seed})")
    p.add_argument("--device", help=f"torch device (default: {d.device})")
    return p


def _settings(args: Any) -> UCIRunSettings:
    if args.jobs < 1 or args.test_samples < 1 or args.passes < 1:
        raise ConfigError("--jobs, --test-samples and --passes must be >= 1")
    return UCIRunSettings(
        splits=[],
        test_samples=args.test_samples,
        passes=args.passes,
        jobs=args.jobs,
        tune=args.tune,
        search=SearchSpace.load(args.search) if args.tune else None,
    )


def main_uci(args: Any) -> int:
    """Run the ``bbb uci`` subcommand from parsed ``args``; print the results."""
    flags = {k: getattr(args, k) for k in _FLAG_KEYS}
    log = None if args.quiet else print
    verify = not args.no_verify
    if args.all is not None:
        if args.path is not None:
            raise ConfigError("give either PATH or --all ROOT, not both")
        root = args.all or None
        config_dir = Path(args.config) if args.config else None
        if config_dir is not None and not config_dir.is_dir():
            raise ConfigError(f"--config for --all must be a folder of <name>.toml: {config_dir}")

        def config_for(name: str) -> TrainConfig:
            file = None if config_dir is None else config_dir / f"{name}.toml"
            return load_uci_config_file(file if file and file.is_file() else None, **flags)

        split_counts = {
            dataset_name(d): count_splits(d)
            for d in find_uci_datasets(resolve_uci_root(root, args.data_dir))
        }

        def settings_for(name: str) -> UCIRunSettings:
            st = _settings(args)
            file = None if config_dir is None else config_dir / f"{name}.toml"
            spec = args.splits if args.splits is not None else uci_table(file).get("splits")
            if spec is not None:
                n = split_counts[name]
                if (isinstance(spec, int) and not isinstance(spec, bool)) or (
                    isinstance(spec, str) and spec.strip().isdigit()
                ):
                    # a count across data sets of different sizes: each set's first
                    # min(count, its splits) (protein has 5, the others 20)
                    spec = min(int(spec), n)
                st.splits = parse_splits(spec, n)
            return st

        out = Path(args.out or "runs/uci")
        results = run_all(
            root,
            out,
            config_for=config_for,
            settings_for=settings_for,
            data_dir=args.data_dir,
            resume=args.resume,
            verify=verify,
            log=log,
        )
        print(format_table(results), end="")
        print(f"written: {out / 'table.md'}")
        return 0
    if args.path is None:
        raise ConfigError("bbb uci needs a data-set PATH (or --all [ROOT])")
    cfg = load_uci_config_file(args.config, **flags)
    dataset = UCIDataset(args.path, data_dir=args.data_dir, verify=verify)
    out = Path(args.out or f"runs/uci/{dataset.name}")
    metrics = run_uci(
        dataset.path,
        out,
        config=cfg,
        settings=_settings(args),
        splits=args.splits if args.splits is not None else uci_table(args.config).get("splits"),
        resume=args.resume,
        verify=verify,
        log=log,
    )
    print(format_table([metrics]), end="")
    print(f"run directory: {out}")
    return 0
