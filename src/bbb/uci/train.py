"""One split: its network trained by the library's Trainer, in blocks of passes; its test metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import as_completed
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .. import metrics as M
from ..config import TrainConfig
from ..data.uci import UCIDataset, UCISplit
from ..kernels import use_kernels
from ..runs import RunData, build_likelihood, build_model, build_objective
from ..train.trainer import (
    NonFinitePredictionError,
    Trainer,
    TrainingDivergedError,
    regression_predictive,
    seed_everything,
)
from .report import CALIBRATION_LEVELS, coverage_key, width_key
from .settings import PathLike, check_uci_settings


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


def _noise_std(likelihood: Any, y_std: float) -> float | None:
    """The learned/fixed homoscedastic noise std in original units (None if heteroscedastic)."""
    if getattr(likelihood, "noise", None) == "heteroscedastic":
        return None
    return float(likelihood.sigma.detach()[0]) * y_std


def calibration_metrics(
    means: Tensor, variances: Tensor, targets: Tensor, y_scale: float
) -> dict[str, float]:
    """Calibration of a test set's mixture predictive (`bbb.metrics`), no random draws.

    Args:
        means: per-weight-sample predictive means ``(S, B, 1)``, normalised units.
        variances: per-sample predictive variances ``(S, B, 1)`` (noise included), > 0,
            normalised units squared.
        targets: test targets ``(B, 1)``, normalised units.
        y_scale: the target's normalisation scale (training std, > 0): widths and CRPS are
            returned in original units.

    Returns:
        ``coverage_<100 a>`` (fraction of test targets inside the central ``a`` predictive
        interval, exact mixture quantiles) and ``width_<100 a>`` (its mean width, original
        units) for each ``a`` in :data:`CALIBRATION_LEVELS`; ``calibration_error`` and
        ``calibration_rmse`` (mean absolute and root-mean-square deviation of the Kuleshov
        calibration curve from the diagonal, 99-point grid 0.01..0.99; fractions);
        ``crps`` (mean continuous ranked probability score, original units).
    """
    cov = M.interval_coverage(means, variances, targets, levels=CALIBRATION_LEVELS, y_scale=y_scale)
    out: dict[str, float] = {}
    for a, c in zip(CALIBRATION_LEVELS, cov.coverage.tolist(), strict=True):
        out[coverage_key(a)] = float(c)
    for a, w in zip(CALIBRATION_LEVELS, cov.mean_width.tolist(), strict=True):
        out[width_key(a)] = float(w)
    curve = M.regression_calibration_data(means, variances, targets, levels=99)
    out["calibration_error"] = curve.calibration_error("mean_absolute")
    out["calibration_rmse"] = curve.calibration_error("root_mean_square")
    out["crps"] = M.crps(means, variances, targets, y_scale=y_scale)
    return out


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
    homoscedastic noise), ``n_train``, ``n_test``, and the test set's calibration
    (:func:`calibration_metrics`: ``coverage_50`` ... ``coverage_99``, ``width_50`` ...
    ``width_99`` in original units, ``calibration_error``, ``calibration_rmse``, ``crps`` in
    original units), computed from the same ``test_samples`` predictions as ``rmse`` and
    ``ll`` (no further random draws: the RMSE and LL are those of :func:`bbb.train.evaluate`).
    `run_uci` adds ``settings`` (the TrainConfig values that vary in a search).

    Raises :class:`TrainingDivergedError` naming the data set, the split and the learning
    rate when training diverged: a non-finite loss or parameters, or non-finite test
    predictions from finite parameters (a noise variance beyond the dtype's range).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    ds = UCIDataset(path, verify=verify)
    data_split = ds.split(split)
    data = _run_data(data_split, data_split.train, None)
    try:
        trainer, likelihood = _train(cfg, data, passes=passes, seed=cfg.seed * 10007 + split)
        # the predictions bbb.train.evaluate would score, kept for the calibration metrics
        means, variances, targets = regression_predictive(
            trainer.model,
            DataLoader(data_split.test, batch_size=len(data_split.test)),
            likelihood,
            num_samples=test_samples,
            device=cfg.device,
        )
    except (TrainingDivergedError, NonFinitePredictionError) as e:
        # which split, with which rate (a NonFinitePredictionError from the test evaluation is
        # the same failure: finite parameters whose predictions overflow)
        raise TrainingDivergedError(f"{ds.name} split {split} diverged (lr={cfg.lr:g}): {e}") from e
    report = M.regression_report(means, variances, targets, y_scale=data.y_std)
    calibration = calibration_metrics(means, variances, targets, data.y_std)
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
        **calibration,
    }


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
