"""The validation search: every grid point trained on a validation part, the epochs chosen."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypedDict

import torch

from ..config import ConfigError, TrainConfig
from ..data.uci import UCIDataset
from ..train.trainer import NonFinitePredictionError, TrainingDivergedError
from .settings import PathLike, SearchSpace, check_uci_settings
from .train import _block, _results_of, _run_data, _train


def _smoothed_argmax(values: list[float], window: int) -> tuple[int, float]:
    """Index and value of the maximum of the trailing moving average of ``values``."""
    best_i, best_v = 0, -math.inf
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        v = sum(values[lo : i + 1]) / (i + 1 - lo)
        if v > best_v:
            best_i, best_v = i, v
    return best_i, best_v


Curves = tuple[list[float], list[float]]


class TunePoint(TypedDict, total=False):
    """One grid point of :func:`tune`'s ``"points"`` (a plain dict in the JSON result).

    A diverged point has ``overrides``, ``val_ll`` (None), ``diverged_on_splits`` and
    ``diverged_because``; a finite one ``overrides``, ``val_ll`` and the ``val_rmse``,
    ``epochs`` and ``curve_*`` keys."""

    overrides: dict[str, Any]
    val_ll: float | None
    diverged_on_splits: list[int]
    diverged_because: list[str | None]
    val_rmse: float
    epochs: int
    curve_epochs: list[int]
    curve_ll: list[float]
    curve_rmse: list[float]


def _tune_curve(
    key: int,
    path: PathLike,
    cfg: TrainConfig,
    split: int,
    validation_fraction: float,
    passes: int,
    verify: bool = True,
    threads: int | None = None,
) -> tuple[int, int, Curves | None, str | None]:
    """``(key, split, curves, why)``: the validation LL and RMSE curves (original units,
    one value per trainer epoch) of one grid point on one split's training rows minus a
    validation part; ``curves`` is None when training diverged, and ``why`` then says how.

    Diverged: a non-finite loss or parameters (:class:`TrainingDivergedError`), non-finite
    validation predictions with finite parameters (:class:`NonFinitePredictionError`: e.g. a
    learned noise std beyond float32's range, whose loss stays finite in log space), or a
    non-finite validation value."""
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = UCIDataset(path, verify=verify)
    sp = dataset.split(split, validation_fraction=validation_fraction, seed=cfg.seed)
    data = _run_data(sp, sp.train, sp.val)
    try:
        trainer, _ = _train(cfg, data, passes=passes, seed=cfg.seed * 10007 + split, val_every=True)
    except (TrainingDivergedError, NonFinitePredictionError) as e:
        return key, split, None, f"{type(e).__name__}: {e}"
    ll = [-r["val_nll"] for r in trainer.history]
    rmse = [r["val_rmse"] for r in trainer.history]
    bad = next((j for j, v in enumerate(ll + rmse) if not math.isfinite(v)), None)
    if bad is not None:
        epoch = trainer.history[bad % len(ll)]["epoch"]
        return key, split, None, f"a non-finite validation value at trainer epoch {epoch}"
    return key, split, (ll, rmse), None


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
    curves: dict[tuple[int, int], Curves | None] = {}
    why: dict[tuple[int, int], str | None] = {}

    def record(r: tuple[int, int, Curves | None, str | None]) -> None:
        curves[(r[0], r[1])], why[(r[0], r[1])] = r[2], r[3]

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
            _results_of(futures, record)
    else:
        for i, s in tasks:
            record(_tune_curve(i, dataset.path, cfgs[i], s, frac, passes, verify))
    points: list[TunePoint] = []
    # (smoothed validation LL, point) of the points that did not diverge, in grid order
    finite: list[tuple[float, TunePoint]] = []
    for i, overrides in enumerate(overrides_list):
        per_block = _block(cfgs[i], passes)
        diverged = [s for s in space.splits if curves[(i, s)] is None]
        if diverged:  # a valid point of the grid (e.g. too high a learning rate): scored last
            reasons = [why[(i, s)] for s in diverged]
            points.append(
                {
                    "overrides": overrides,
                    "val_ll": None,
                    "diverged_on_splits": diverged,
                    "diverged_because": reasons,
                }
            )
            if log:
                log(f"  tune {overrides}: diverged (splits {diverged}): {reasons[0]}")
            continue
        # no split diverged: every split's curves, in space.splits order
        done = [c for c in (curves[(i, s)] for s in space.splits) if c is not None]
        lls = [c[0] for c in done]
        rmses = [c[1] for c in done]
        ll = [sum(c[k] for c in lls) / len(lls) for k in range(len(lls[0]))]
        rmse = [sum(c[k] for c in rmses) / len(rmses) for k in range(len(ll))]
        k, score = _smoothed_argmax(ll, space.smooth)
        point: TunePoint = {
            "overrides": overrides,
            "val_ll": score,
            "val_rmse": rmse[k],
            "epochs": (k + 1) * per_block,
            "curve_epochs": [(j + 1) * per_block for j in range(len(ll))],
            "curve_ll": ll,
            "curve_rmse": rmse,
        }
        points.append(point)
        finite.append((score, point))
        if log:
            log(
                f"  tune {overrides}: val ll {score:.4f} rmse {rmse[k]:.4g} "
                f"at epoch {point['epochs']}"
            )
    if not finite:
        first = points[0]
        raise TrainingDivergedError(
            f"every grid point diverged in the search on {dataset.name} (the first, "
            f"{first['overrides']}, on split {first['diverged_on_splits'][0]}: "
            f"{first['diverged_because'][0]}): lower the learning rate"
        )
    best = max(finite, key=lambda sp: sp[0])[1]  # the first of equal scores, as before
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
