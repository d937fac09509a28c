"""Assemble a run from a :class:`bbb.config.TrainConfig`: data, model, objective, trainer.

The command line and the experiments call these functions; the training loop itself is
:class:`bbb.train.Trainer`. A run directory holds::

    config.json          the resolved configuration
    normalization.json   regression only: training-split statistics (original units)
    metrics.jsonl        one line per epoch
    checkpoints/         checkpoint-<epoch>.pt, the last two (atomic)
    best.pt              the best-on-validation model
    metrics.json         final summary (validation and test metrics of the best model)
    *.png                learning curves; reliability diagram, or regression calibration
                         (calibration.png) and band

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`train_run` joins the process
group, shards the training set with a ``DistributedSampler`` (``batch_size`` is the *global*
batch, split evenly over the processes), trains with ``DistributedDataParallel`` and lets rank 0
alone write the run directory (see :mod:`bbb.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from . import kernels as _kernels
from . import plots
from .config import (
    ConfigError,
    TrainConfig,
    anchored_uci_path,
    changed_settings,
    load_config_file,
)
from .elbo import ELBO, linear_annealing
from .likelihoods import Categorical, Gaussian, Likelihood
from .models import bayes_mlp, mlp
from .priors import Prior, make_prior
from .train import distributed as _dist
from .train.checkpoint import (
    CheckpointError,
    RunLock,
    atomic_write_text,
    check_writable,
    strict_json,
)
from .train.optim import adam
from .train.trainer import Trainer, evaluate, previous_run_files, seed_everything

__all__ = [
    "RunData",
    "build_data",
    "build_model",
    "build_likelihood",
    "train_run",
    "load_run",
    "check_device",
    "check_step_plan",
    "warmup_multiplier",
    "scheduler_interval",
]


@dataclass
class RunData:
    """Datasets of a run and how to read its targets."""

    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset | None
    in_features: int
    out_features: int  # classes, or target dimensions
    classification: bool
    y_mean: float = 0.0
    y_std: float = 1.0
    normalization: dict[str, Any] | None = None


def build_data(cfg: TrainConfig) -> RunData:
    """Load the data set named by ``cfg.dataset`` with its protocol splits."""
    from . import data as D

    if cfg.dataset == "mnist":
        train = D.load_mnist(cfg.data_dir, split="train", subset=cfg.subset)
        val = D.load_mnist(cfg.data_dir, split="val", subset=_sub(cfg.subset, 10000))
        test = D.load_mnist(cfg.data_dir, split="test", subset=_sub(cfg.subset, 10000))
        return RunData(train, val, test, 784, 10, True)
    if cfg.dataset == "toy":
        train, val = D.load_toy(n_train=cfg.toy_n, n_val=max(cfg.toy_n // 3, 10), seed=cfg.seed)
        return RunData(train, val, None, 1, 1, False)
    assert cfg.uci_path is not None
    split = D.load_uci(
        cfg.uci_path,
        cfg.uci_split,
        validation_fraction=cfg.val_fraction,
        seed=cfg.seed,
        data_dir=cfg.data_dir,
    )
    norm = {
        "x_mean": split.x_mean.tolist(),
        "x_std": split.x_std.tolist(),
        "y_mean": split.y_mean.tolist(),
        "y_std": split.y_std.tolist(),
        "note": "x and y were normalised with these training statistics; metrics are in "
        "original units",
    }
    train = split.train
    if cfg.subset is not None:
        train = TensorDataset(*(t[: cfg.subset] for t in train.tensors))
    return RunData(
        train,
        split.val,
        split.test,
        split.n_features,
        1,
        False,
        float(split.y_mean[0]),
        float(split.y_std[0]),
        norm,
    )


def _sub(subset: int | None, cap: int) -> int | None:
    return None if subset is None else min(subset, cap)


def build_prior(cfg: TrainConfig) -> Prior:
    if cfg.prior == "gaussian":
        return make_prior("gaussian", sigma=cfg.prior_sigma)
    if cfg.prior == "laplace":
        return make_prior("laplace", scale=cfg.prior_sigma)
    return make_prior(
        "scale_mixture", pi=cfg.prior_pi, sigma1=cfg.prior_sigma1, sigma2=cfg.prior_sigma2
    )


def build_likelihood(cfg: TrainConfig, data: RunData) -> Likelihood:
    if data.classification:
        return Categorical()
    return Gaussian(noise=cfg.noise, sigma=cfg.noise_sigma, output_dim=data.out_features)


def build_model(cfg: TrainConfig, data: RunData) -> nn.Module:
    """The network for ``cfg.method``: a Bayesian MLP, or a deterministic (dropout) baseline."""
    out = data.out_features
    if not data.classification and cfg.noise == "heteroscedastic":
        out *= 2
    if cfg.method == "bbb":
        return bayes_mlp(
            data.in_features,
            cfg.hidden,
            out,
            prior=build_prior(cfg),
            estimator=cfg.estimator,
            kl=cfg.kl,
            mu_init=cfg.mu_init,
            rho_init=cfg.rho_init,
        )
    return mlp(
        data.in_features, cfg.hidden, out, dropout=cfg.dropout if cfg.method == "dropout" else 0.0
    )


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return adam(params, cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def warmup_multiplier(
    warmup_steps: int, total_steps: int, schedule: str = "constant"
) -> Callable[[int], float]:
    """The learning-rate multiplier of optimizer step ``s`` (0-based) of a run with a linear
    warm-up, for ``torch.optim.lr_scheduler.LambdaLR`` stepped after every optimizer step.

    Steps ``0 .. warmup_steps - 1`` use ``(s + 1) / warmup_steps`` of the rate (``lr / N`` at
    the first step, the full ``lr`` at step ``N - 1``); then ``schedule`` ``"constant"``
    keeps 1, and ``"cosine"`` decays as ``(1 + cos(pi * (s - N) / (T - N))) / 2`` over the
    remaining ``T - N`` steps (``T = total_steps``): the full rate at step ``N``, 0 after the
    last step, the per-step counterpart of the per-epoch ``CosineAnnealingLR``.

    Args:
        warmup_steps: N >= 1, the warm-up's optimizer steps.
        total_steps: T > N, the run's optimizer steps (epochs x steps per epoch).
        schedule: ``"constant"`` or ``"cosine"`` (:data:`bbb.config.LR_SCHEDULES`).
    """
    from .config import LR_SCHEDULES

    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown schedule {schedule!r}; accepted values: {', '.join(LR_SCHEDULES)}"
        )
    for name, v in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be smaller than total_steps={total_steps}"
        )
    n, decay = warmup_steps, total_steps - warmup_steps
    cosine = schedule == "cosine"

    def multiplier(step: int) -> float:
        if step < n:
            return (step + 1) / n
        if not cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step - n, decay) / decay))

    return multiplier


def scheduler_interval(cfg: TrainConfig) -> str:
    """How the :class:`~bbb.train.Trainer` steps the schedule of ``cfg``: ``"step"`` (after
    every optimizer step) with a learning-rate warm-up, else ``"epoch"`` (as before)."""
    return "step" if cfg.lr_warmup_steps > 0 else "epoch"


def build_objective(
    cfg: TrainConfig,
    model: nn.Module,
    likelihood: Likelihood,
    dataset_size: int,
    trainer_epochs: int,
    *,
    epoch_steps: int | None = None,
) -> tuple[ELBO, torch.optim.Optimizer, Any]:
    """The ELBO (KL weighting, annealing; no KL for the deterministic baselines), optimizer
    and learning-rate schedule of ``cfg`` (cosine over ``trainer_epochs`` scheduler steps).

    ``epoch_steps``: the run's optimizer steps per trainer epoch, needed (and read) only with
    ``cfg.lr_warmup_steps`` > 0: the schedule is then a ``LambdaLR`` of
    :func:`warmup_multiplier` over ``trainer_epochs * epoch_steps`` optimizer steps, to be
    stepped per optimizer step (:func:`scheduler_interval`). A caller that lays out its own
    epochs without it (``bbb uci``) gets a :class:`~bbb.config.ConfigError` for
    ``lr_warmup_steps`` and ``steps_per_epoch``, which it could not honour.
    """
    if epoch_steps is None and (cfg.lr_warmup_steps > 0 or cfg.steps_per_epoch is not None):
        raise ConfigError(
            "lr_warmup_steps and steps_per_epoch are settings of `bbb train` (bbb.runs."
            "train_run), which lays out the optimizer steps of its epochs; this run lays out "
            f"its own (lr_warmup_steps={cfg.lr_warmup_steps!r}, steps_per_epoch="
            f"{cfg.steps_per_epoch!r}): leave them at 0 and unset"
        )
    kl_scale: Any = cfg.kl_scale
    if cfg.kl_anneal_steps > 0:
        kl_scale = linear_annealing(cfg.kl_anneal_steps, end=cfg.kl_scale)
    if cfg.method != "bbb":
        elbo = ELBO(likelihood, dataset_size, num_samples=1, kl_scale=0.0)
    else:
        elbo = ELBO(
            likelihood,
            dataset_size,
            num_samples=cfg.num_samples,
            kl_weighting=cfg.kl_weighting,
            kl_scale=kl_scale,
        )
    optimizer = _optimizer(cfg, [*model.parameters(), *likelihood.parameters()])
    scheduler: Any = None
    if cfg.lr_warmup_steps > 0:
        assert epoch_steps is not None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            warmup_multiplier(cfg.lr_warmup_steps, trainer_epochs * epoch_steps, cfg.lr_schedule),
        )
    elif cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=trainer_epochs)
    return elbo, optimizer, scheduler


def check_batch_size(batch_size: int, n_train: int) -> None:
    """Raise ``ValueError`` when a minibatch of ``batch_size`` examples cannot be drawn from a
    training set of ``n_train`` (:func:`train_run`'s first check of the data; ``bbb sweep``
    runs it on every trial's settings before the first trial)."""
    if batch_size > n_train:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({n_train} examples)"
        )


def check_step_plan(
    cfg: TrainConfig, n_train: int, batches_per_pass: int, kl_weighting: str
) -> int:
    """Refuse, before any file is written, an epoch layout the run cannot train; return the
    optimizer steps per epoch.

    ``n_train``: training examples; ``batches_per_pass``: minibatches of one pass over them
    (``len(train_loader)``: per process under ``torch.distributed``); ``kl_weighting``: the
    ELBO's (``"uniform"`` for the deterministic baselines). Refused with a
    :class:`~bbb.config.ConfigError` that gives the numbers: ``steps_per_epoch`` that is not
    a multiple of the batches per pass under the blundell weighting (whose weights run over
    one pass), and ``lr_warmup_steps`` not smaller than the run's total optimizer steps.
    """
    k = cfg.steps_per_epoch
    per_pass = (
        f"the {n_train} training examples in minibatches of {cfg.batch_size} make "
        f"{batches_per_pass} optimizer step(s) per pass"
    )
    if k is not None and kl_weighting == "blundell" and k % batches_per_pass:
        multiples = ", ".join(str(m * batches_per_pass) for m in (1, 2, 4))
        raise ConfigError(
            f"steps_per_epoch={k} with kl_weighting 'blundell': {per_pass}, and the blundell KL "
            "weights run over the minibatches of one pass (the KL counts once per pass), so an "
            f"epoch must be whole passes: steps_per_epoch must be a multiple of "
            f"{batches_per_pass} (e.g. {multiples}), or use kl_weighting 'uniform'"
        )
    epoch_steps = k if k is not None else batches_per_pass
    total = cfg.epochs * epoch_steps
    if cfg.lr_warmup_steps >= total:
        how = f"steps_per_epoch={k}" if k is not None else per_pass
        raise ConfigError(
            f"lr_warmup_steps={cfg.lr_warmup_steps} must be smaller than the run's "
            f"{total} optimizer steps (epochs={cfg.epochs} x {epoch_steps} per epoch; {how}), "
            "or the warm-up would never end: lower it, or raise epochs or steps_per_epoch"
        )
    return epoch_steps


def _check_data(name: str, ds: TensorDataset | None) -> None:
    if ds is None:
        return
    if len(ds) == 0:
        raise ValueError(f"the {name} set is empty")
    for t in ds.tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the {name} set contains NaN or Inf values")


#: settings a resumed run may change (how long it trains, where, and how its KL kernels run);
#: any other difference would be silently overridden by the restored optimiser/scheduler state
# data_dir: the same (checksummed) data read from another root, e.g. on another machine
RESUMABLE_CHANGES = ("epochs", "patience", "device", "kernels", "data_dir")


#: the plots :func:`finish_run` may write in a run directory (which ones depends on the run)
RUN_PLOTS = ("learning_curves.png", "reliability.png", "regression_band.png", "calibration.png")


#: result files of ``bbb evaluate`` / ``bbb prune`` in a run directory: they describe the
#: model best.pt held when they were written
RESULT_GLOBS = ("eval.json", "eval-*.json", "prune-*.json")


def _resume_point(run: Path) -> tuple[int, int, Path]:
    """(epochs done, epochs without improvement, file) of the checkpoint a resume of ``run``
    starts from: the newest *readable* epoch checkpoint, as :class:`~bbb.train.Trainer`
    picks it (a corrupt newest one is skipped; the Trainer warns about it when it resumes).

    A :class:`~bbb.train.checkpoint.CheckpointError` names each file when none is readable.
    """
    import warnings

    from .train.checkpoint import load_checkpoint
    from .train.trainer import _REQUIRED

    with warnings.catch_warnings():  # the Trainer's own load warns once, not twice
        warnings.simplefilter("ignore")
        state, path = load_checkpoint(run / "checkpoints", map_location="cpu", require=_REQUIRED)
    return int(state["epoch"]), int(state.get("bad_epochs", 0)), path


def _check_resumable(cfg: TrainConfig, saved: Path) -> bool:
    """Refuse to resume the run of ``saved`` (its config.json) with other settings, or one
    that has no checkpoint to resume from; return whether the resumed run trains on (more
    epochs than its checkpoint holds, and early stopping has not ended it)."""
    from .train.checkpoint import latest_checkpoint

    if not saved.exists():
        raise ConfigError(f"cannot resume: {saved} does not exist")
    ckpt_dir = saved.parent / "checkpoints"
    if latest_checkpoint(ckpt_dir) is None:
        # stopped before its first epoch ended: nothing is lost by starting it again, and a
        # directory without checkpoints, best.pt or metrics.json is not refused as a run
        raise CheckpointError(
            f"nothing to resume: no checkpoint in {ckpt_dir} (the run stopped before its first "
            "epoch ended); start it anew: the original command with --overwrite instead of "
            f"--resume, e.g. `bbb train --config {saved} --out {saved.parent} --overwrite` "
            "(train_run with overwrite=True instead of resume=True)"
        )
    old = TrainConfig.from_dict(load_config_file(saved), source=str(saved)).to_dict()
    if old["uci_path"]:  # a run saved before uci_path was made absolute (see train_run)
        old["uci_path"] = anchored_uci_path(old["uci_path"])
    new = cfg.to_dict()
    diff = changed_settings(old, new, RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(
            f"cannot resume {saved.parent} with other settings ({'; '.join(diff)}): only "
            f"{', '.join(RESUMABLE_CHANGES)} may change when resuming; start a new run instead"
        )
    done, bad_epochs, path = _resume_point(saved.parent)
    if cfg.epochs < done:
        raise ConfigError(
            f"cannot resume {saved.parent} with epochs {cfg.epochs}: the run has already done "
            f"{done} epochs ({path.name}); epochs must be >= {done} (nothing was changed)"
        )
    if cfg.lr_schedule == "cosine" and old["epochs"] != new["epochs"]:
        # per epoch (CosineAnnealingLR over epochs) or, with lr_warmup_steps, per optimizer
        # step (over epochs x steps per epoch): either way its length is the run's
        unit = "optimizer steps" if cfg.lr_warmup_steps > 0 else "epochs"
        raise ConfigError(
            f"cannot resume {saved.parent} with epochs {old['epochs']} -> {new['epochs']}: its "
            f"cosine learning-rate schedule was laid out over the original length (in {unit}); "
            "start a new run instead"
        )
    return cfg.epochs > done and not (cfg.patience is not None and bad_epochs >= cfg.patience)


def train_run(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
    evaluate_test: bool = True,
    write_plots: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` into ``out_dir``; return its summary.

    A directory that already holds a run is an error unless ``resume`` (continue it) or
    ``overwrite`` (delete its checkpoints, ``best.pt`` and metrics, then start anew).

    ``epoch_callback`` is passed to the :class:`~bbb.train.Trainer` (called after each epoch
    with the epoch's metrics row; it may raise :class:`~bbb.train.StopTraining`).
    ``evaluate_test=False`` leaves the test split out entirely (hyper-parameter searches):
    ``metrics.json`` then holds the validation metrics only. ``write_plots=False`` skips the
    PNG files (quick searches).

    Launched by ``torchrun`` with several processes, this trains data-parallel (one process
    group for the call, left at the end unless the caller had already created it).
    """
    # a resumed run's saved settings are not refused for being ignored (TrainConfig.validate)
    cfg.validate(check_applicable=not resume)
    if cfg.uci_path:
        # saved in config.json: a relative path would lead nowhere from another directory
        cfg = dataclasses.replace(cfg, uci_path=anchored_uci_path(cfg.uci_path))
    out = Path(out_dir)
    check_device(
        cfg.device,
        remedy="train on the CPU with --device cpu (device='cpu'; a resumed run may change "
        "its device)",
    )
    trains_on = False
    if resume:
        trains_on = _check_resumable(cfg, out / "config.json")
    elif not overwrite and out.is_dir():
        previous = previous_run_files(out)
        if previous:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(p.name for p in previous)}); resume it "
                "(--resume / resume=True), start it over (--overwrite / overwrite=True) or "
                "choose another directory"
            )
    had_group = _dist.is_distributed()
    device = _dist.init_from_env(cfg.device)
    # rank 0 locks the run directory before writing anything in it (config.json first; see
    # _train_run's setup): a second process training into it is refused
    locks: list[RunLock] = []
    try:
        with _kernels.use_kernels(cfg.kernels):
            return _train_run(
                cfg,
                out,
                device,
                resume=resume,
                progress=progress,
                log=log,
                epoch_callback=epoch_callback,
                evaluate_test=evaluate_test,
                write_plots=write_plots,
                locks=locks,
                stale_results=trains_on,
            )
    finally:
        for lock in locks:
            lock.release()
        if not had_group and _dist.is_distributed():
            _dist.cleanup()


def _train_run(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    *,
    resume: bool,
    progress: bool,
    log: Any,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
    evaluate_test: bool = True,
    write_plots: bool = True,
    locks: list[RunLock],  # rank 0 appends the run directory's lock; the caller releases it
    stale_results: bool = False,  # a resumed run trains on: its eval/prune files go
) -> dict[str, Any]:
    world = _dist.world_size()
    generator = seed_everything(cfg.seed)
    data = build_data(cfg)
    if not evaluate_test:
        data.test = None  # never checked, evaluated or plotted
    for name, ds in (("training", data.train), ("validation", data.val), ("test", data.test)):
        _check_data(name, ds)
    check_batch_size(cfg.batch_size, len(data.train))
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is the global batch: it must be a multiple of the "
            f"number of processes ({world})"
        )
    model = build_model(cfg, data).to(device)
    likelihood = build_likelihood(cfg, data).to(device)
    if world == 1:
        train_loader = DataLoader(
            data.train, batch_size=cfg.batch_size, shuffle=True, generator=generator
        )
    else:  # each rank: its shard (reshuffled by epoch from the seed), batch_size / world rows
        sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
            data.train, num_replicas=world, rank=_dist.rank(), shuffle=True, seed=cfg.seed
        )
        train_loader = DataLoader(
            data.train, batch_size=cfg.batch_size // world, sampler=sampler, generator=generator
        )
    eval_bs = max(cfg.batch_size, 1000)
    val_loader = None if data.val is None else DataLoader(data.val, batch_size=eval_bs)
    # the baselines' ELBO weighs the KL (zero) uniformly whatever cfg.kl_weighting says
    weighting = cfg.kl_weighting if cfg.method == "bbb" else "uniform"
    # refused here, before setup() writes anything, with the data's numbers
    epoch_steps = check_step_plan(cfg, len(data.train), len(train_loader), weighting)
    elbo, optimizer, scheduler = build_objective(
        cfg, model, likelihood, len(data.train), cfg.epochs, epoch_steps=epoch_steps
    )

    def setup() -> None:
        check_writable(out)  # a clear error before anything is written or trained
        # rank 0's lock on the run directory, before its first write: another process may
        # be training here. Held until train_run returns (the Trainer re-enters it).
        locks.append(RunLock(out))
        if resume:
            cfg.save(out / "config.json")  # the resumed run's settings (epochs, patience, ...)
            if stale_results:
                # they evaluated the best model so far, which training on may replace
                _remove_results(out, log)
        else:
            # overwrite: the previous run's files go first (evaluations of its model, its
            # plots and a UCI run's normalization.json too: a new run of another data set or
            # without validation data would have left them describing the old one)
            stale = [
                *previous_run_files(out),
                *(p for pattern in RESULT_GLOBS for p in out.glob(pattern)),
                *(out / name for name in RUN_PLOTS + ("normalization.json",)),
            ]
            for p in stale:
                p.unlink(missing_ok=True)
            cfg.save(out / "config.json")
            if data.normalization is not None:
                atomic_write_text(
                    out / "normalization.json", strict_json(data.normalization, indent=2)
                )

    _dist.on_main(setup, "creating the run directory")
    val_samples = cfg.val_samples if cfg.method == "bbb" else 1
    trainer = Trainer(
        model,
        elbo,
        optimizer,
        train_loader,
        val_loader=val_loader,
        scheduler=scheduler,
        scheduler_interval=scheduler_interval(cfg),
        steps_per_epoch=cfg.steps_per_epoch,
        epochs=cfg.epochs,
        out_dir=out,
        val_samples=val_samples,
        patience=cfg.patience,
        progress=progress,
        log=log,
        loader_generator=generator,
        y_scale=data.y_std,
        grad_clip=cfg.grad_clip,
        device=device,
        epoch_callback=epoch_callback,
    )
    start = time.perf_counter()
    summary = trainer.fit(resume=resume, overwrite=True)
    trainer.load_best()
    summary["wall_seconds"] = time.perf_counter() - start
    _dist.on_main(
        lambda: finish_run(
            out, cfg, model, likelihood, data, trainer.history, summary, write_plots=write_plots
        ),
        "evaluating the best model and plotting",
    )
    return summary


def _remove_results(out: Path, log: Any) -> None:
    """Delete the ``bbb evaluate`` / ``bbb prune`` results of ``out`` (:data:`RESULT_GLOBS`)
    before a resumed run trains on, and say so through ``log`` (when given)."""
    stale = sorted({p for pattern in RESULT_GLOBS for p in out.glob(pattern) if p.is_file()})
    for p in stale:
        p.unlink(missing_ok=True)
    if stale and log:
        log(
            f"removed {', '.join(p.name for p in stale)}: they evaluated the model before "
            "this resumed training, which may replace best.pt; run bbb evaluate / bbb prune "
            "again when it ends"
        )


def finish_run(
    out: Path,
    cfg: TrainConfig,
    model: nn.Module,
    likelihood: Likelihood,
    data: RunData,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    *,
    write_plots: bool = True,
) -> None:
    """Evaluate the best model, write ``metrics.json`` and (``write_plots``) the plots."""
    samples = cfg.val_samples if cfg.method == "bbb" else 1
    # the plots' predictions without dropout (evaluate() switches modes itself); Bayesian
    # layers sample in either mode
    model.eval()
    result: dict[str, Any] = {"summary": summary}
    for name, ds in (("val", data.val), ("test", data.test)):
        if ds is None:
            continue
        loader = DataLoader(ds, batch_size=1000)
        result[name] = evaluate(
            model,
            loader,
            likelihood,
            num_samples=samples,
            device=cfg.device,
            y_scale=data.y_std,
        )
    calibration_preds: dict[str, tuple[Any, torch.Tensor]] = {}
    if not data.classification:
        assert isinstance(likelihood, Gaussian), type(likelihood)
        result["calibration"] = {}
        for name, ds in (("val", data.val), ("test", data.test)):
            if ds is None:
                continue
            pred, target = _split_predictive(model, likelihood, ds, samples, cfg)
            calibration_preds[name] = (pred, target)
            result["calibration"][name] = {
                "n_examples": int(target.shape[0]),
                "num_samples": samples,
                **regression_calibration(pred, target, data.y_std),
            }
    # strict JSON: a non-finite metric or summary value is null (NaN is not JSON)
    atomic_write_text(out / "metrics.json", strict_json(result, indent=2) + "\n")
    if not write_plots:
        return
    if calibration_preds:
        _plot_calibration(calibration_preds, out / "calibration.png")
    if history:
        plots.learning_curves(history, out / "learning_curves.png")
    if data.classification and data.val is not None:
        from .metrics import plot_reliability_diagram
        from .predictive import predict

        x, y = data.val.tensors
        pred = predict(model, x[:5000].to(cfg.device), num_samples=samples)
        plot_reliability_diagram(pred.probs.cpu(), y[:5000], out / "reliability.png")
    if not data.classification and data.in_features == 1:
        plots.regression_band(model, likelihood, data.train, out / "regression_band.png")


def regression_calibration(pred: Any, target: torch.Tensor, y_scale: float) -> dict[str, float]:
    """:func:`bbb.metrics.regression_calibration_report` of a regression run's predictions.

    Args:
        pred: a :class:`bbb.RegressionPrediction` in normalised units (``sample_means`` and
            ``sample_variances`` (S, B, D), S weight samples of B examples, D outputs).
        target: the targets (B, D), normalised units (moved to the predictions' device).
        y_scale: the training split's target standard deviation (original units per
            normalised unit; 1 where targets are not normalised).

    Returns:
        ``coverage_50``, ``coverage_80``, ``coverage_90``, ``coverage_95``, ``coverage_99``
        (share of targets inside the central predictive interval of that level), the mean
        absolute and root-mean-square deviation of the calibration curve
        (``calibration_error``, ``calibration_rmse``; fractions in [0, 1]) and ``crps``
        (original units). NaN for each (null in a result file) where a prediction is not
        finite (an overflowed noise variance).
    """
    from .metrics import DEFAULT_COVERAGE_LEVELS, _level_key, regression_calibration_report

    means, variances = pred.sample_means, pred.sample_variances
    if not (bool(torch.isfinite(means).all()) and bool(torch.isfinite(variances).all())):
        keys = [_level_key("coverage", a) for a in DEFAULT_COVERAGE_LEVELS]
        return dict.fromkeys([*keys, "calibration_error", "calibration_rmse", "crps"], math.nan)
    return regression_calibration_report(means, variances, target.to(means.device), y_scale=y_scale)


def _split_predictive(
    model: nn.Module, likelihood: Gaussian, ds: TensorDataset, samples: int, cfg: TrainConfig
) -> tuple[Any, torch.Tensor]:
    """The predictive of ``model`` on every example of ``ds`` (``samples`` weight samples)
    and its targets (B, D), for :func:`finish_run`'s calibration.

    The weight samples come from a stream of their own seeded with ``cfg.seed`` (the same
    numbers on every call), and the global random state is left as it was: the plots drawn
    after it are those of a run without this step."""
    from .predictive import predict

    x, y = ds.tensors[0], ds.tensors[1]
    device = torch.device(cfg.device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type):
        torch.manual_seed(cfg.seed)
        pred = predict(
            model, x.to(device), likelihood=likelihood, num_samples=samples, max_rows=65536
        )
    return pred, y.reshape(y.shape[0], -1)


def _plot_calibration(preds: dict[str, tuple[Any, torch.Tensor]], path: Path) -> None:
    """``calibration.png``: the calibration curve and PIT histogram of the test split's
    predictive (the validation split's when the data set has no test split)."""
    from .metrics import plot_regression_calibration

    split = "test" if "test" in preds else "val"
    pred, target = preds[split]
    if not (
        bool(torch.isfinite(pred.sample_means).all())
        and bool(torch.isfinite(pred.sample_variances).all())
    ):
        return  # nothing to draw (metrics.json holds nulls)
    plot_regression_calibration(
        pred.sample_means,
        pred.sample_variances,
        target.to(pred.sample_means.device),
        path=path,
        title=f"{split} split: {target.shape[0]} examples, {pred.sample_means.shape[0]} "
        "weight samples",
    )


def check_device(
    device: str | int | torch.device, *, remedy: str = "use device='cpu'"
) -> torch.device:
    """``device`` as a :class:`torch.device`, or a :class:`~bbb.config.ConfigError` saying why
    this machine cannot use it (CUDA or MPS missing, a GPU index beyond the last) followed by
    ``remedy``, before anything is loaded or trained. An integer is an accelerator's index, as
    :class:`torch.device` reads it (``0`` is ``cuda:0`` on a CUDA machine)."""
    if isinstance(device, bool):
        raise ConfigError(f"device must be a string, an index or a torch.device, got {device!r}")
    if isinstance(device, int) and not torch.accelerator.is_available():
        # torch.device(0) raises "Cannot access accelerator device when none is available",
        # which the except below would report as "not a torch device"
        raise ConfigError(
            f"device {device} (an accelerator's index) is not available here: this machine "
            f"has no accelerator (CUDA, MPS, ...) visible to PyTorch; {remedy}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    why = None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this PyTorch ({torch.__version__}) was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible to this process"
            )
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        why = "MPS is not available on this machine"
    if why is not None:
        raise ConfigError(f"device {str(device)!r} is not available here: {why}; {remedy}")
    return dev


def _check_uci_path(cfg: TrainConfig, cfg_path: Path) -> None:
    """A :class:`~bbb.data.MissingDataError` naming the saved ``uci_path`` (and ``cfg_path``)
    when it is a path (not a bare name under ``DATA_DIR/uci``) leading to no directory."""
    if cfg.dataset != "uci" or not cfg.uci_path:
        return
    from .data import MissingDataError

    p = Path(cfg.uci_path).expanduser()
    if p.is_dir() or (not p.is_absolute() and len(p.parts) == 1):
        return  # a bare name: bbb.data.load_uci looks it up under the data directory
    fix = f"set uci_path in {cfg_path} to where the data set is now"
    if p.is_absolute():
        raise MissingDataError(
            f"the run's UCI data set {p} (uci_path in {cfg_path}) does not exist: {fix}"
        )
    raise MissingDataError(
        f"the run's uci_path {cfg.uci_path!r} (in {cfg_path}) is relative to the working "
        f"directory it was trained in, and {os.path.abspath(p)} does not exist: run the "
        f"command from that directory, or {fix} (an absolute path)"
    )


def _data_without_examples(cfg: TrainConfig, run: Path) -> RunData:
    """The :class:`RunData` of a run without its examples (``load_run(..., load_data=False)``):
    the sizes the model is built from and, for UCI, the training split's statistics from
    the run's ``normalization.json``; ``train`` is empty (0 rows), ``val`` and ``test`` None."""
    import json

    def empty(in_features: int, classification: bool) -> TensorDataset:
        y = torch.empty(0, dtype=torch.long) if classification else torch.empty(0, 1)
        return TensorDataset(torch.empty(0, in_features), y)

    if cfg.dataset == "mnist":
        return RunData(empty(784, True), None, None, 784, 10, True)
    if cfg.dataset == "toy":
        return RunData(empty(1, False), None, None, 1, 1, False)
    path = run / "normalization.json"
    why = None
    norm: Any = None
    try:
        norm = json.loads(path.read_text())
    except FileNotFoundError:
        why = "it is missing"
    except (OSError, ValueError) as e:
        why = f"it cannot be read ({type(e).__name__})"
    if why is None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list)
            and norm[k]
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in norm[k])
            for k in ("x_mean", "x_std", "y_mean", "y_std")
        )
        if not ok:
            why = "it does not hold the lists x_mean, x_std, y_mean and y_std"
    if why is not None:
        raise ConfigError(
            f"load_run(..., load_data=False) reads the sizes and statistics of a UCI run from "
            f"{path}, and {why}: load the run with its data (load_data=True)"
        )
    n = len(norm["x_mean"])
    return RunData(
        empty(n, False),
        None,
        None,
        n,
        1,
        False,
        float(norm["y_mean"][0]),
        float(norm["y_std"][0]),
        norm,
    )


def load_run(
    run_dir: str | Path,
    which: str = "best",
    device: str | torch.device | None = None,
    *,
    data_dir: str | Path | None = None,
    load_data: bool = True,
) -> tuple[TrainConfig, nn.Module, Likelihood, RunData]:
    """Rebuild a saved run: its config, model, likelihood and data.

    ``which="best"``: the best-on-validation weights (``best.pt``); ``"last"``: the end of
    training (the newest readable checkpoint). The model is returned in eval mode.

    ``device``: where to put the model and likelihood (the checkpoint is read straight onto
    it); ``None`` = the run's own device (``config.json``), an error naming the way out when
    this machine lacks it (a run trained on a GPU, loaded where there is none: pass
    ``device="cpu"``). The returned config's ``device`` is the device loaded on.

    ``data_dir``: the data root to read the run's data set from instead of the one its
    ``config.json`` names (a run moved to another machine, or trained with a relative
    ``data_dir`` from another working directory); the returned config holds it.

    A saved setting the run never read (a baseline's prior, momentum with Adam: refused for a
    new run) is not an error here: runs written before that check could hold one.

    The data set is loaded too (the run's splits, as training saw them): regression targets
    are normalised with the training split's statistics (``RunData.y_mean``, ``y_std``; UCI),
    and so are the model's predictions.

    ``load_data=False``: the model and likelihood alone, for inference where the training
    data is not (a deployment machine): the data set is not read, and the returned
    ``RunData`` has its sizes and (UCI) statistics, read from the run's
    ``normalization.json``, with an empty ``train`` (0 rows) and no ``val`` or ``test``.
    """
    from .train.checkpoint import load_checkpoint

    if which not in ("best", "last"):
        raise ValueError(f"unknown checkpoint choice {which!r}; accepted values: best, last")
    run = Path(run_dir)
    cfg_path = run / "config.json"
    # the run directories of the other commands hold a config.json of their own kind
    for marker, command in (("uci.json", "bbb uci"), ("regret.csv", "bbb bandit")):
        if (run / marker).is_file():
            raise ConfigError(
                f"{run} is a `{command}` run directory ({marker}), not one written by `bbb "
                "train`: load_run, bbb evaluate and bbb prune read `bbb train` runs"
            )
    if not cfg_path.is_file():
        raise ConfigError(f"{run} is not a run directory: {cfg_path} is missing")
    # load_config_file names the file when it is not valid JSON (a truncated copy)
    raw = load_config_file(cfg_path)
    if {"agents", "updates_per_step"} <= raw.keys():  # a bandit run before its first results
        raise ConfigError(
            f"{run} is a `bbb bandit` run directory ({cfg_path.name} of its agents), not one "
            "written by `bbb train`: load_run, bbb evaluate and bbb prune read `bbb train` runs"
        )
    cfg = TrainConfig.from_dict(raw, source=str(cfg_path)).validate(check_applicable=False)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    if load_data:
        _check_uci_path(cfg, cfg_path)
    if device is None:
        target = check_device(
            cfg.device,
            remedy=f"the run {run} was trained on it: load it on the CPU with load_run(..., "
            "device='cpu') (bbb evaluate / bbb prune: --device cpu)",
        )
    else:
        target = check_device(device, remedy="choose another device (e.g. cpu)")
    cfg = dataclasses.replace(cfg, device=str(target))
    if which == "best":
        path = run / "best.pt"
        if not path.is_file():
            from .train.checkpoint import latest_checkpoint

            why = (
                "the run has not finished an epoch"
                if latest_checkpoint(run / "checkpoints") is None
                else "its epoch checkpoints hold the end of training: which='last'"
            )
            raise CheckpointError(f"{path} is missing ({why})")
    else:
        path = run / "checkpoints"
    data = build_data(cfg) if load_data else _data_without_examples(cfg, run)
    model = build_model(cfg, data).to(target)
    likelihood = build_likelihood(cfg, data).to(target)
    # a .pt file without them (not written by bbb train) is a CheckpointError naming it
    state, used = load_checkpoint(path, map_location=target, require=("model", "elbo"))
    prefix = "likelihood."
    try:
        model.load_state_dict(state["model"])
        likelihood.load_state_dict(
            {k[len(prefix) :]: v for k, v in state["elbo"].items() if k.startswith(prefix)}
        )
    except (RuntimeError, AttributeError) as e:  # was torch's message alone, without the file
        raise CheckpointError(
            f"{used} does not fit the model that {run / 'config.json'} builds "
            f"({type(e).__name__}: {e})"
        ) from None
    # in eval mode: dropout (the baseline networks) off; Bayesian layers sample either way
    return cfg, model.eval(), likelihood, data
