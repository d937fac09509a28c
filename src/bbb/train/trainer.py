"""The one training loop: ELBO steps, validation, best model, checkpoints, resume.

Used by the ``bbb`` command line, the experiments and library users alike::

    trainer = bbb.train.Trainer(model, elbo, optimizer, train_loader, val_loader=val_loader,
                                epochs=20, out_dir="runs/mnist")
    summary = trainer.fit()          # or trainer.fit(resume=True) after a crash

Each epoch: ELBO steps over ``train_loader`` (minibatch i of M gets the ELBO's KL weight for
index i), a validation pass (``evaluate``), a line in ``metrics.jsonl``, an atomic checkpoint
(model, optimizer, scheduler, ELBO state, RNG states, the training and validation loaders'
generators, epoch) and, when the
validation metric improved, ``best.pt``. ``fit(resume=True)`` continues from the newest
readable checkpoint; on CPU the resumed run ends with exactly the parameters of an uninterrupted
one (all randomness comes from the saved generators), except with a loader that keeps its
workers between epochs (``persistent_workers=True``: their random state cannot be saved; the
resume warns).

Under ``torch.distributed`` (``torchrun``; see :mod:`bbb.train.distributed`) the same loop
trains with ``DistributedDataParallel``: give it a loader with a ``DistributedSampler`` (its
``set_epoch`` is called every epoch), the ELBO with the global data-set size, and the
*unwrapped* model. Losses are reduced across ranks, validation runs on rank 0 and its report
is shared, and only rank 0 writes files; checkpoints hold the unwrapped model, so a run can be
resumed with any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import metrics as M
from ..elbo import ELBO
from ..likelihoods import Categorical, Gaussian, Likelihood
from ..predictive import predict
from . import distributed as _dist
from .checkpoint import (
    CheckpointError,
    RunLock,
    _fsync_dir,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strict_json,
)

_EARLY = "early stopping"
# keys a checkpoint must hold to be resumed from (any other .pt file counts as unreadable)
_REQUIRED = ("format", "epoch", "model", "optimizer", "elbo", "rng")
#: the epoch checkpoints' format (a file of another format is refused when resuming)
_FORMAT = "bbb-checkpoint-1"


def previous_run_files(out_dir: Path) -> list[Path]:
    """What a finished or interrupted training run left in ``out_dir``: its epoch checkpoints,
    ``best.pt`` and ``metrics.json`` (empty for a new directory)."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(out_dir / "checkpoints")
    found += [p for p in (out_dir / "best.pt", out_dir / "metrics.json") if p.is_file()]
    return found


__all__ = [
    "Trainer",
    "TrainingDivergedError",
    "NonFinitePredictionError",
    "StopTraining",
    "evaluate",
    "regression_predictive",
    "seed_everything",
    "LOWER_IS_BETTER",
    "SCHEDULER_INTERVALS",
]

LOWER_IS_BETTER = ("error", "nll", "ece", "brier", "rmse", "loss")
#: when the Trainer steps its learning-rate scheduler: ``"epoch"`` (once after each epoch's
#: validation) or ``"step"`` (after every optimizer step: OneCycleLR, a warm-up over the first
#: K steps, cosine with warm-up laid out in steps)
SCHEDULER_INTERVALS = ("epoch", "step")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the message names the epoch and step."""


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an ``epoch_callback`` to end training after the epoch it was called for.

    The epoch's files are already written when the callback runs, so the run directory stays
    complete and consistent; ``fit`` returns normally with ``stopped_by_callback`` set.
    """


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and Python's ``random``; return a generator for data-loader shuffling."""
    import random

    # any integer type (a NumPy integer from np.arange too), not a bool
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if seed >= 2**64:  # torch.manual_seed's limit (its own message: "Overflow when unpacking")
        raise ValueError(f"seed must be below 2**64 (a 64-bit generator seed), got {seed!r}")
    torch.manual_seed(seed)
    random.seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_plateau_mode(scheduler: Any, val_metric: str, has_val: bool) -> None:
    """Refuse a ``ReduceLROnPlateau`` whose mode would cut the rate when the run improves."""
    monitored = f"val_metric {val_metric!r}" if has_val else "the training loss (no val_loader)"
    mode = "max" if has_val and val_metric in ("accuracy", "log_likelihood") else "min"
    if scheduler.mode != mode:
        raise ValueError(
            f"the ReduceLROnPlateau scheduler has mode={scheduler.mode!r}, but the Trainer "
            f"steps it with {monitored}, for which higher is "
            f"{'better' if mode == 'max' else 'worse'}: create it with mode={mode!r}"
        )


#: the metrics of :func:`evaluate`'s report a Trainer can select on, by task
_CLASSIFICATION_METRICS = ("error", "accuracy", "nll", "ece", "brier")
_REGRESSION_METRICS = ("rmse", "log_likelihood", "nll")


def _check_val_metric(value: object, classification: bool, has_val: bool) -> str:
    """The metric the best epoch is chosen on: ``value``, or the task's default (``"error"``
    for classification, ``"nll"`` for regression) when it is None; a ``ValueError`` for a
    metric :func:`evaluate` does not report for the task, and for a non-default one given
    without a ``val_loader`` (it would never be computed: without validation the best model
    is the last epoch's). The default itself is accepted without one: a caller that
    validates only sometimes (``bbb.uci``'s training) passes it either way, and it selects
    nothing the Trainer would not select without it."""
    default = "error" if classification else "nll"
    if value is None:
        return default
    valid = _CLASSIFICATION_METRICS if classification else _REGRESSION_METRICS
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown val_metric {value!r}; accepted values: {', '.join(valid)}")
    if not has_val and value != default:
        raise ValueError(
            f"val_metric={value!r} needs a val_loader, and none was given: the metric would "
            "never be computed. Without validation data the best model is the last epoch's "
            "(and a ReduceLROnPlateau steps on the training loss); pass val_loader=... to "
            "choose the best epoch on it, or leave val_metric out"
        )
    return value


def _check_scheduler_interval(value: object) -> str:
    """``value`` if it is one of :data:`SCHEDULER_INTERVALS`, else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in SCHEDULER_INTERVALS:
        raise ValueError(
            f"unknown scheduler_interval {value!r}; accepted values: "
            f"{', '.join(map(repr, SCHEDULER_INTERVALS))}"
        )
    return value


def _check_steps_per_epoch(value: object) -> int | None:
    """``value`` if it is None or a positive integer, else a ``ValueError``."""
    if value is not None and not _is_positive_int(value):
        raise ValueError(
            f"steps_per_epoch must be a positive integer (optimizer steps per epoch) or None "
            f"(one pass over train_loader), got {value!r}"
        )
    return value  # type: ignore[return-value]


def _type_name(obj: object) -> str:
    """``module.QualifiedName`` of ``obj``'s class (a checkpoint's record of its scheduler)."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_plateau(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _warn_dataset_size(train_loader: Iterable[Any], elbo: ELBO) -> None:
    """Warn when the ELBO's ``dataset_size`` is not the training loader's data-set length.

    Only where it matters: the ``"uniform"`` KL weight is ``kl_scale / dataset_size`` (the
    ``"blundell"`` one does not depend on it, and a zero ``kl_scale`` has no KL term).
    """
    import warnings

    if elbo.kl_weighting != "uniform" or (not callable(elbo.kl_scale) and elbo.kl_scale == 0):
        return
    dataset = getattr(train_loader, "dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:  # no dataset, or an IterableDataset without a length
        return
    if n != elbo.dataset_size:
        ratio = n / elbo.dataset_size
        warnings.warn(
            f"ELBO dataset_size={elbo.dataset_size} but the training loader's data set holds "
            f"{n} examples: the KL term's weight is kl_scale / dataset_size, {ratio:.3g} "
            "times what that data set calls for. Pass "
            f"ELBO(..., dataset_size={n}), or, if the loader's sampler draws from a subset of "
            f"{elbo.dataset_size} examples on purpose, silence this with "
            "warnings.filterwarnings('ignore', message='ELBO dataset_size')",
            UserWarning,
            stacklevel=3,
        )


def _warn_untrained_elbo_parameters(elbo: ELBO, optimizer: torch.optim.Optimizer) -> None:
    """Warn when trainable parameters of the ELBO (a learned noise) are not in ``optimizer``:
    they would keep their initial value, silently."""
    import warnings

    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        n for n, p in elbo.named_parameters() if p.requires_grad and id(p) not in in_optimizer
    ]
    if missing:
        warnings.warn(
            f"the ELBO's trainable parameters {', '.join(missing)} (e.g. a learned noise) are "
            "not in the optimizer and will not be trained: build it from "
            "[*model.parameters(), *elbo.parameters()]",
            UserWarning,
            stacklevel=3,
        )


def _check_components(model: object, elbo: object, optimizer: object) -> None:
    """A ``TypeError`` unless ``model`` is an ``nn.Module``, ``elbo`` a :class:`bbb.ELBO` and
    ``optimizer`` an optimizer instance (each failed with an ``AttributeError`` deep in the
    constructor or the loop)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(elbo, ELBO):
        hint = (
            ": wrap it, e.g. bbb.ELBO(likelihood, dataset_size=len(train_set))"
            if isinstance(elbo, Likelihood)
            else ""
        )
        raise TypeError(f"elbo must be a bbb.ELBO, got {type(elbo).__name__}{hint}")
    groups = getattr(optimizer, "param_groups", None)
    if isinstance(optimizer, type) or not isinstance(groups, list):
        what = f"the class {optimizer.__name__}" if isinstance(optimizer, type) else None
        raise TypeError(
            "optimizer must be an optimizer instance built on the model's parameters "
            "(e.g. torch.optim.Adam(model.parameters(), lr=1e-3)), got "
            f"{what or type(optimizer).__name__}"
        )


def _warn_untrained_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Warn when ``optimizer`` holds none of the model's trainable parameters (built on
    another model, or before the model was rebuilt): every step leaves the model as it was,
    silently. Not an error: a deliberately frozen model (a test of a plateau, training the
    ELBO's noise alone) trains so too."""
    import warnings

    trainable = [p for p in model.parameters() if p.requires_grad]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if trainable and not any(id(p) in in_optimizer for p in trainable):
        warnings.warn(
            f"the optimizer holds none of the model's {len(trainable)} trainable parameter "
            "tensors (built on another model, or before the model was rebuilt or replaced): "
            "training will not change the model; build it from model.parameters() (and "
            "elbo.parameters(), e.g. a learned noise)",
            UserWarning,
            stacklevel=3,
        )


def _check_hooks(log: object, epoch_callback: object, loader_generator: object) -> None:
    """A ``TypeError`` for a ``log`` or ``epoch_callback`` that is neither None nor callable and
    a ``loader_generator`` that is neither None nor a ``torch.Generator``: each failed only
    after the first epoch's training (its log line, its callback, its checkpoint)."""
    for name, value in (("log", log), ("epoch_callback", epoch_callback)):
        if value is not None and not callable(value):
            raise TypeError(
                f"{name} must be a callable or None, got {type(value).__name__} {value!r}"
            )
    if loader_generator is not None and not isinstance(loader_generator, torch.Generator):
        raise TypeError(
            "loader_generator must be the torch.Generator that shuffles train_loader, or None "
            f"(the loader's own), got {type(loader_generator).__name__} {loader_generator!r}"
        )


_COMPILED_PREFIX = "_orig_mod."


def _plain_module(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``model`` itself otherwise): the one whose
    state a checkpoint holds, loadable into the uncompiled network."""
    # torch.compile's wrapper class, looked up without importing torch._dynamo (slow): a
    # compiled model exists only once it has been imported
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if compiled is not None and isinstance(model, compiled):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A model state dict without ``torch.compile``'s ``_orig_mod.`` key prefix (what a
    checkpoint of a compiled model held before it was saved from the underlying module)."""
    if state and all(isinstance(k, str) and k.startswith(_COMPILED_PREFIX) for k in state):
        return {k[len(_COMPILED_PREFIX) :]: v for k, v in state.items()}
    return state


def _check_device(device: torch.device | str, model: nn.Module, elbo: ELBO) -> torch.device:
    """``device`` as a :class:`torch.device`, or a ``ValueError`` (a
    :class:`~bbb.config.ConfigError`) when this machine cannot use it, or when none of the
    model's parameters (or, where it has some, none of the ELBO's: a learned noise scale)
    lives there: the Trainer sends the minibatches to ``device`` and moves nothing else,
    so the first step would fail in the middle of ``fit()``."""
    from ..runs import check_device

    dev = check_device(device, remedy="give the device the model lives on (e.g. device='cpu')")
    if dev.type == "meta":
        # a meta tensor has a shape and no values: the first step failed mid-fit() ("Tensor.item()
        # cannot be called on meta tensors")
        raise ValueError(
            "device='meta' cannot train: meta tensors have shapes and no values (the loss "
            "could not be read); materialise the model on a real device first "
            "(model.to_empty(device='cpu'), then initialise or load its weights) and give "
            "that device"
        )

    def there(d: torch.device) -> bool:
        # device="cuda" is the current GPU: any index matches (torch resolves it so)
        return d.type == dev.type and (dev.index is None or d.index in (None, dev.index))

    for what, module in (("model", model), ("ELBO", elbo)):
        devices = {p.device for p in module.parameters()}
        if devices and not any(there(d) for d in devices):
            on = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(
                f"device={str(device)!r}, but the {what}'s parameters are on {on}: the "
                f"Trainer sends the minibatches to device and moves nothing else; move the "
                f"{what} there first ({what.lower()}.to(device), before building the "
                f"optimizer), or give device={on.split(', ')[0]!r}"
            )
    return dev


#: how deep :func:`_sampler_chain` follows samplers wrapped in samplers (``.sampler``)
_MAX_SAMPLER_DEPTH = 8


def _sampler_chain(loader: Iterable[Any]) -> list[Any]:
    """The samplers ``loader`` draws its indices through, each once, outermost first: its
    ``sampler`` and every sampler that one wraps (its ``.sampler``: the inner sampler of a
    ``BatchSampler`` given as ``DataLoader(ds, sampler=BatchSampler(...), batch_size=None)``,
    or of a wrapper of the user's), then its ``batch_sampler`` and every sampler that one
    wraps (``BatchSampler(RandomSampler(ds, generator=g), ...)``); empty for a list of
    minibatches. Followed at most :data:`_MAX_SAMPLER_DEPTH` deep."""
    return [s for _, s in _sampler_paths(loader)]


def _sampler_paths(loader: Iterable[Any]) -> list[tuple[str, Any]]:
    """:func:`_sampler_chain` with where each sampler sits (``"sampler"``,
    ``"batch_sampler.sampler"``, ...), in the same order."""
    found: list[tuple[str, Any]] = []
    for name in ("sampler", "batch_sampler"):
        s, path, depth = getattr(loader, name, None), name, 0
        while s is not None and depth < _MAX_SAMPLER_DEPTH and not any(s is f for _, f in found):
            found.append((path, s))
            s, path, depth = getattr(s, "sampler", None), f"{path}.sampler", depth + 1
    return found


def _shuffle_generators(loader: Iterable[Any]) -> list[torch.Generator]:
    """The :class:`torch.Generator` objects ``loader`` draws from, each once: its own
    (``DataLoader(..., generator=g)``: the shuffle, and the workers' base seed) and those of
    its samplers (:func:`_sampler_chain`: ``RandomSampler(ds, generator=g2)``, directly, inside
    its batch sampler, or inside a ``BatchSampler`` given as its sampler), in that order;
    empty when it has none (it shuffles with the global RNG, or not at all). A loader and a
    sampler given different generators draw from both: the shuffle from the sampler's, the
    base seed from the loader's."""
    return [g for _, g in _generator_roles(loader)]


def _generator_roles(loader: Iterable[Any]) -> list[tuple[str, torch.Generator]]:
    """:func:`_shuffle_generators` with where each was found (``"loader"``, ``"sampler"``,
    ``"batch_sampler.sampler"``, ...): the checkpoints save each generator's state under its
    role, so a resume restores it into the generator in the same place (by position, a loader
    whose generators came in another order got their states swapped, silently)."""
    found: list[tuple[str, torch.Generator]] = []
    for role, candidate in (("loader", loader), *_sampler_paths(loader)):
        generator = getattr(candidate, "generator", None)
        if isinstance(generator, torch.Generator) and not any(generator is g for _, g in found):
            found.append((role, generator))
    return found


def _epoch_sampler(loader: Iterable[Any]) -> Any | None:
    """The sampler of ``loader`` that reshuffles by epoch (has ``set_epoch``: a
    ``DistributedSampler``), whether it is the loader's ``sampler``, sits inside its
    ``batch_sampler`` (``DataLoader(batch_sampler=BatchSampler(DistributedSampler(ds), ...))``,
    where ``loader.sampler`` is a plain ``SequentialSampler``) or inside a ``BatchSampler``
    given as its sampler (``batch_size=None``): the first of :func:`_sampler_chain` that has
    one; None when there is none."""
    for candidate in _sampler_chain(loader):
        if callable(getattr(candidate, "set_epoch", None)):
            return candidate
    return None


def _unshuffled(loader: Iterable[Any]) -> str | None:
    """How ``loader`` gives its minibatches in the same order every pass, or None when it
    shuffles or cannot tell: a list or tuple of minibatches, a ``SequentialSampler``
    (directly or inside its batch sampler, or inside a ``BatchSampler`` given as its
    sampler), a sampler with ``shuffle=False`` (a ``DistributedSampler(..., shuffle=False)``)."""
    from torch.utils.data import BatchSampler, SequentialSampler

    if isinstance(loader, (list, tuple)):
        return f"a {type(loader).__name__} of minibatches"
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    sampler = inner if inner is not None else getattr(loader, "sampler", None)
    if type(sampler) is BatchSampler:  # sampler=BatchSampler(...), batch_size=None: its order
        sampler = sampler.sampler
    if isinstance(sampler, SequentialSampler):
        return "a SequentialSampler"
    if getattr(sampler, "shuffle", None) is False:
        return f"a {type(sampler).__name__} with shuffle=False"
    return None


def _why_empty(loader: Iterable[Any]) -> str:
    """Why a loader of length 0 whose passes hold examples gives no minibatch (its
    ``drop_last=True`` drops the only, short one), as ``" (...)"``; empty otherwise."""
    batch_size = getattr(loader, "batch_size", None)
    if not (batch_size and getattr(loader, "drop_last", False)):
        return ""
    # the examples of one pass: its sampler's (a subset, a shard), else its data set's
    for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        try:
            n = len(source)  # type: ignore[arg-type]
        except TypeError:
            continue
        if n:
            return (
                f" (a pass gives {n} examples, fewer than batch_size={batch_size}, and "
                "drop_last=True drops that short minibatch: lower batch_size or set "
                "drop_last=False)"
            )
        return ""
    return ""


def _persistent_workers(loader: Iterable[Any]) -> bool:
    """Whether ``loader`` keeps worker processes between its passes
    (``DataLoader(..., num_workers>0, persistent_workers=True)``): its iterator, created once,
    draws the workers' base seed once; a resumed run cannot continue it exactly."""
    workers = getattr(loader, "num_workers", 0)
    return (
        bool(getattr(loader, "persistent_workers", False))
        and isinstance(workers, int)
        and (workers > 0)
    )


def _describe_batch(batch: object) -> str:
    """What a minibatch that is not an ``(x, y)`` pair of tensors is, for an error message."""
    if isinstance(batch, Tensor):
        return (
            f"a single tensor of shape {tuple(batch.shape)} (a loader over a tensor: wrap "
            "inputs and targets as TensorDataset(x, y))"
        )
    if isinstance(batch, dict):
        return f"a dict with keys {', '.join(map(repr, batch))} (give the pair (x, y) instead)"
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) < 2:
        return (
            f"a {type(batch).__name__} of {len(batch)} element(s) (a TensorDataset of the "
            "inputs alone? give TensorDataset(x, y))"
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        kinds = ", ".join(type(v).__name__ for v in batch[:2])
        return f"a {type(batch).__name__} whose first two elements are {kinds}, not tensors"
    return f"a {type(batch).__name__}"


def _batches(loader: Iterable[Any], device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
    """``loader``'s minibatches as ``(x, y)`` on ``device``: the first two elements of each
    (a tuple or list; further elements are ignored); a ``TypeError`` for any other minibatch
    (inputs alone, a dict, a bare tensor), which failed as an ``IndexError`` or ``KeyError``."""
    for batch in loader:
        if not (
            isinstance(batch, Sequence)
            and not isinstance(batch, str)
            and len(batch) >= 2
            and isinstance(batch[0], Tensor)
            and isinstance(batch[1], Tensor)
        ):
            raise TypeError(
                "the data loader must yield (x, y) minibatches (inputs and targets: two "
                f"tensors), got {_describe_batch(batch)}"
            )
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class NonFinitePredictionError(ValueError):
    """:func:`evaluate`: the model's predictions hold NaN or Inf for finite inputs (``predict``
    refuses non-finite inputs itself); the message says for how many examples."""


def _check_predictions(*predictions: Tensor) -> None:
    """Raise :class:`NonFinitePredictionError` when any of ``predictions`` (first dimension:
    examples) is not finite."""
    bad = torch.zeros(predictions[0].shape[0], dtype=torch.bool)
    for t in predictions:
        bad |= ~torch.isfinite(t).reshape(t.shape[0], -1).all(1)
    if bool(bad.any()):
        raise NonFinitePredictionError(
            f"the model's predictions are NaN or Inf for {int(bad.sum())} of {bad.numel()} "
            "examples (finite inputs): its parameters have diverged or hold NaN/Inf; check "
            "its training loss (a smaller learning rate or gradient clipping helps)"
        )


def _check_evaluable(likelihood: Likelihood, who: str, hint: str = "") -> None:
    """A ``TypeError`` unless :func:`evaluate` has metrics for ``likelihood``."""
    if not isinstance(likelihood, (Categorical, Gaussian)):
        name = likelihood.__name__ if isinstance(likelihood, type) else type(likelihood).__name__
        raise TypeError(
            f"{who} supports Categorical and Gaussian likelihoods (and their subclasses), got "
            f"{name}: its predictive metrics are those of a classifier or a Gaussian "
            f"regression{hint}"
        )


def _training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's train/eval flag (``model`` included)."""
    return {m: m.training for m in model.modules()}


def _restore_training_modes(modes: dict[nn.Module, bool]) -> None:
    """Set each module's flag back as :func:`_training_modes` read it: ``model.train(flag)``
    would give every submodule the root's, undoing a ``body.eval()`` of the user's."""
    for module, training in modes.items():
        module.training = training


def _regression_outputs(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: Gaussian,
    num_samples: int,
    device: torch.device,
    shared_prefix: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mixture predictive over ``loader``, on the CPU: means and variances (S, B, D),
    targets as the loader gives them; refused when empty or not finite."""
    means, variances, targets = [], [], []
    for x, y in _batches(loader, device):
        rpred = predict(
            model, x, likelihood=likelihood, num_samples=num_samples, shared_prefix=shared_prefix
        )
        means.append(rpred.sample_means.cpu())
        variances.append(rpred.sample_variances.cpu())
        targets.append(y.cpu())
    if not means:
        raise ValueError("evaluate: the data loader is empty")
    all_means, all_variances = torch.cat(means, 1), torch.cat(variances, 1)
    # (samples, examples, ...): one row per example
    _check_predictions(all_means.transpose(0, 1), all_variances.transpose(0, 1))
    return all_means, all_variances, torch.cat(targets)


@torch.no_grad()
def regression_predictive(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: Gaussian,
    *,
    num_samples: int = 10,
    device: torch.device | str = "cpu",
    shared_prefix: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The predictions :func:`evaluate` scores for a regression model, for other metrics
    (calibration): ``(means, variances, targets)`` on the CPU, means and variances
    ``(S, B, D)`` per weight sample (variances with the observation noise), targets as the
    loader gives them; the model in eval mode meanwhile, each submodule's mode restored
    after. The same random draws as :func:`evaluate` on the same loader."""
    _check_evaluable(likelihood, "regression_predictive")
    modes = _training_modes(model)
    model.eval()
    try:
        return _regression_outputs(
            model, loader, likelihood, num_samples, torch.device(device), shared_prefix
        )
    finally:
        _restore_training_modes(modes)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: Likelihood,
    *,
    num_samples: int = 10,
    device: torch.device | str = "cpu",
    y_scale: float = 1.0,
    n_bins: int = 15,
    shared_prefix: bool = False,
) -> dict[str, float]:
    """Predictive metrics of ``model`` over ``loader`` with ``num_samples`` weight samples.

    ``shared_prefix``: passed to :func:`bbb.predict` (the layers before the first Bayesian
    layer run once per example); the :class:`Trainer` passes its ELBO's setting.

    Classification: ``error``, ``accuracy``, ``nll`` (predictive, nats per example: the
    exact ``-log p(y|x)`` from :attr:`ClassificationPrediction.log_probs`, by log-sum-exp, not
    floored where the predictive probability underflows), ``ece``, ``brier``. Regression:
    ``rmse`` and ``log_likelihood`` (of the Gaussian mixture predictive, noise included; in
    original units when ``y_scale`` is the target's normalisation scale) and ``nll`` =
    -log_likelihood.

    ``likelihood`` must be a :class:`bbb.Categorical` or :class:`bbb.Gaussian` (or a subclass
    of either): the metrics are theirs. Any other is a ``TypeError``, raised before the model
    runs.
    """
    _check_evaluable(likelihood, "evaluate")
    device = torch.device(device)
    modes = _training_modes(model)
    model.eval()
    try:
        if isinstance(likelihood, Categorical):
            probs, labels = [], []
            log_probs: list[Tensor | None] = []
            for x, y in _batches(loader, device):
                pred = predict(
                    model,
                    x,
                    likelihood=likelihood,
                    num_samples=num_samples,
                    shared_prefix=shared_prefix,
                )
                probs.append(pred.probs.cpu())
                labels.append(y.cpu())
                log_probs.append(None if pred.log_probs is None else pred.log_probs.cpu())
            if not probs:
                raise ValueError("evaluate: the data loader is empty")
            all_probs, all_labels = torch.cat(probs), torch.cat(labels)
            _check_predictions(all_probs)
            # the NLL from the log-sum-exp log_probs: a confidently wrong example counts its
            # full -log p, where metrics.nll of the averaged probabilities clamps each at 1e-12
            # (at most 27.6 nats per example)
            exact = None if any(lp is None for lp in log_probs) else torch.cat(log_probs)  # type: ignore[arg-type]
            return M.classification_report(all_probs, all_labels, n_bins=n_bins, log_probs=exact)
        assert isinstance(likelihood, Gaussian)  # _check_evaluable: Categorical or Gaussian
        all_means, all_variances, targets = _regression_outputs(
            model, loader, likelihood, num_samples, device, shared_prefix
        )
        report = M.regression_report(all_means, all_variances, targets, y_scale=y_scale)
        report["nll"] = -report["log_likelihood"]
        return report
    finally:
        # each submodule's own mode: a frozen body the user put in eval mode stays in it
        _restore_training_modes(modes)


class Trainer:
    """Trains a Bayesian network by minimising the minibatch negative ELBO.

    Args:
        model: the network (Bayesian layers inside).
        elbo: a :class:`bbb.ELBO` (its likelihood's parameters, e.g. a learned noise, should be
            in ``optimizer`` too). Its ``dataset_size`` should be ``len(train_loader.dataset)``
            (the global size under ``torch.distributed``); a ``UserWarning`` says when it is
            not (with uniform KL weighting, where the KL weight depends on it).
        optimizer: any ``torch.optim`` optimizer.
        train_loader: a ``DataLoader`` yielding ``(x, y)``.
        val_loader: optional validation loader; the best-on-validation model is kept.
        scheduler: optional LR scheduler, stepped as ``scheduler_interval`` says. A
            ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (per epoch only) is stepped with the
            epoch's value of
            ``val_metric`` (the validation metric the best epoch is chosen on) when there is a
            ``val_loader``, else with the epoch's mean training loss; its ``mode`` must match
            (``"max"`` for ``accuracy`` and ``log_likelihood``, else ``"min"``). Its state,
            like any scheduler's, is saved in the checkpoints and restored on resume. A
            ``OneCycleLR`` whose ``total_steps`` are fewer than the run would step it is refused
            (torch raised at the step past its end, mid-epoch); one stepped per epoch with
            ``total_steps > epochs`` (laid out in optimizer steps) is a ``UserWarning``.
        scheduler_interval: ``"epoch"`` (default: ``scheduler.step()`` once after each
            epoch's validation) or ``"step"`` (after every optimizer step, for schedules laid
            out in steps: ``OneCycleLR(total_steps=epochs * steps)``, a linear warm-up over
            the first K steps with ``LambdaLR``, cosine with warm-up). Under
            ``torch.distributed`` every rank takes the same steps, so every rank's rate is the
            same. ``ReduceLROnPlateau`` is refused with ``"step"`` (its metric exists once per
            epoch). Saved in the checkpoints: a resume with another value is refused.
        steps_per_epoch: optimizer steps per epoch (None, the default: one pass over
            ``train_loader``, ``len(train_loader)`` steps). For a tiny labelled set (20 points
            and batch 128: one step per pass) an epoch of ``steps_per_epoch`` steps makes
            validation, checkpoints, ``epochs``, ``patience`` and the metrics rows count
            useful units. Each epoch iterates the loader again and again (a new shuffle per
            pass; a ``DistributedSampler`` gets ``set_epoch(epoch * passes + pass)``, moved
            past every value an earlier ``fit()`` of this Trainer gave it when
            ``steps_per_epoch`` was lowered between the two, so no pass repeats an earlier
            pass's shuffle) and cuts the last pass at ``steps_per_epoch``. The ELBO's
            ``batch_index``/``num_batches`` stay those of the minibatch within its pass, so the blundell KL weights sum to 1
            per pass over the data (the KL counts once per pass, as the paper's objective
            wants); with ``kl_weighting="blundell"`` it must therefore be a multiple of
            ``len(train_loader)``. Fewer steps than ``len(train_loader)`` (shorter epochs on a
            large set) need a shuffling loader. Saved in the checkpoints: a resume with
            another value is refused. (The alternative recipe, ``DataLoader(...,
            sampler=RandomSampler(ds, replacement=True, num_samples=K * B))``, makes an epoch
            of K steps too, but the blundell weights then run over the K steps: the KL counts
            once per K * B / N passes.)
        epochs: total number of epochs (a resumed run continues up to it; it must be at least
            the number of epochs the run has already done).
        out_dir: run directory for ``metrics.jsonl``, checkpoints, ``best.pt``; None: in memory.
        val_metric: the key of :func:`evaluate`'s report to select on (``"error"`` for
            classification and ``"nll"`` for regression by default; lower is better except
            for ``accuracy`` and ``log_likelihood``). Another metric without a ``val_loader``
            is a ``ValueError`` (it would never be computed: without validation the best
            model is the last epoch's); the default is accepted there.
        val_samples: weight samples for validation predictions.
        patience: stop after this many epochs without improvement (None: never).
        progress: show a tqdm progress bar per epoch (True or False; another value is a
            ``ValueError``).
        log: called with one line per epoch (``print`` by default; None for silence).
        loader_generator: the generator that shuffles ``train_loader``: its state is saved in
            the checkpoints and restored on resume, so the resumed run draws the shuffles the
            uninterrupted one would. None (the default): the loader's own generator, if it
            has one (``DataLoader(..., shuffle=True, generator=g)``, or a sampler's:
            ``RandomSampler(ds, generator=g)``, also inside a ``BatchSampler`` given as
            ``batch_sampler`` or as ``sampler``), read at each checkpoint (a ``train_loader``
            assigned later counts); a loader that shuffles with the global RNG needs none
            (the checkpoints hold it). Before, None saved nothing, and a resume of such a
            loader silently repeated the shuffles of the run's first epochs. A
            ``loader_generator`` that is not the loader's own is warned about (the state of
            the wrong one would be saved), as is a resume whose checkpoint holds a
            generator's state and this Trainer none, or the reverse.
        y_scale: target normalisation scale for regression metrics in original units.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        device: where the model lives (and the minibatches are sent): checked at
            construction, a ``ValueError`` when this machine cannot use it (CUDA or MPS
            missing, a GPU index beyond the last; ``"meta"``, whose tensors hold no values)
            or when none of the model's (or the ELBO's) parameters is there (move them
            first: ``model.to(device)``, before building the optimizer).
        distributed: train with ``DistributedDataParallel`` (None: when a ``torch.distributed``
            process group with more than one process is initialised; True, False or None,
            another value is a ``ValueError``).
        find_unused_parameters: passed to DDP; only needed for a model with parameters the
            loss does not reach at every step (True or False; another value is a
            ``ValueError``).
        epoch_callback: called as ``epoch_callback(epoch, row)`` after each epoch's files are
            written (``row``: the ``metrics.jsonl`` line, with the ``val_*`` keys), on every
            process; raise :class:`StopTraining` from it to end training there (e.g. a pruned
            hyper-parameter trial). Under ``torch.distributed`` a stop raised on any rank
            stops every rank after that epoch.

    Train/eval modes: each epoch puts the model in training mode, except the submodules that
    are in eval mode in a model that is in training mode when the epoch starts (a frozen
    body's BatchNorm or a Dropout the user switched off: ``model.body.eval()`` before
    ``fit()``), which stay in eval mode; validation restores each submodule's own mode
    afterwards. A model wholly in eval mode (left so by a prediction) trains wholly in
    training mode.

    ``metrics.jsonl`` (and ``trainer.history``) holds one row per epoch: ``epoch``; the
    epoch's training means over its examples (each minibatch weighted by its size) ``loss``
    (the minimised negative ELBO per example), ``nll``, ``kl`` (the whole network's KL, nats)
    and ``kl_weight`` (the weight the ELBO gave the KL, ``beta * pi_i / B`` per minibatch:
    ``kl_scale / dataset_size`` with uniform weighting, whose epoch mean the blundell
    weighting has too; an annealed ``kl_scale`` changes it step by step), ``weighted_kl``
    (the mean of ``kl_weight * kl``: ``loss = nll + weighted_kl`` up to rounding, and
    ``nll + kl_weight * kl`` where the weight is constant over the epoch),
    ``train_seconds``; the validation report's keys prefixed ``val_`` (with a
    ``val_loader``); ``lr`` (the learning rate of the epoch's first step: parameter group
    0's; with ``scheduler_interval="epoch"`` the rate of every step of the epoch), with
    ``scheduler_interval="step"`` ``lr_last`` (group 0's rate at the epoch's last step) and,
    with several parameter groups, ``lrs`` (every group's, first step, in order).
    """

    def __init__(
        self,
        model: nn.Module,
        elbo: ELBO,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader[Any],
        *,
        val_loader: Iterable[Any] | None = None,
        scheduler: Any | None = None,
        scheduler_interval: str = "epoch",
        steps_per_epoch: int | None = None,
        epochs: int = 10,
        out_dir: str | Path | None = None,
        val_metric: str | None = None,
        val_samples: int = 10,
        patience: int | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = print,
        loader_generator: torch.Generator | None = None,
        y_scale: float = 1.0,
        grad_clip: float | None = None,
        device: torch.device | str = "cpu",
        distributed: bool | None = None,
        find_unused_parameters: bool = False,
        epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        # refused here, not in the middle of fit() (an AttributeError deep in the loop, or
        # after the first epoch's training)
        _check_components(model, elbo, optimizer)
        _check_hooks(log, epoch_callback, loader_generator)
        if not _is_positive_int(epochs):
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if patience is not None and not _is_positive_int(patience):
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
        if patience is not None and val_loader is None:
            raise ValueError("patience needs a val_loader: early stopping watches validation")
        if val_loader is not None:
            # refused here, not after the first epoch's training (a bare AssertionError)
            _check_evaluable(
                elbo.likelihood,
                "validation (val_loader)",
                "; train without a val_loader (an epoch_callback can evaluate it your own way)",
            )
        if isinstance(val_samples, bool) or not isinstance(val_samples, int):
            raise ValueError(
                f"val_samples must be an integer (the number of weight samples), got "
                f"{val_samples!r}"
            )
        if val_samples < 1:
            raise ValueError(f"val_samples must be >= 1, got {val_samples!r}")
        # any other value was taken for its truth: progress="no" showed the bar,
        # distributed="no" asked for DDP
        _dist.check_bool_option("progress", progress, "a progress bar per epoch")
        _dist.check_bool_option(
            "distributed",
            distributed,
            "train with DistributedDataParallel",
            "this process alone",
            none="DDP when a process group of more than one process is initialised",
        )
        _dist.check_bool_option(
            "find_unused_parameters",
            find_unused_parameters,
            "DDP looks for the parameters the loss did not reach, at every step",
        )
        if (
            isinstance(y_scale, bool)
            or not isinstance(y_scale, (int, float))
            or not (math.isfinite(y_scale) and y_scale > 0)
        ):
            raise ValueError(f"y_scale must be a finite positive number, got {y_scale!r}")
        try:
            n_batches = len(train_loader)
        except TypeError:
            # a DataLoader over an IterableDataset without __len__ (a stream)
            raise TypeError(
                f"the training loader ({type(train_loader).__name__}) has no len(): the "
                "Trainer needs its number of minibatches per pass (the blundell KL weights, "
                "steps_per_epoch's passes, the progress bar); give the IterableDataset a "
                "__len__ (the DataLoader's length is then len(dataset) / batch_size) or use "
                "a map-style Dataset"
            ) from None
        if n_batches == 0:
            raise ValueError(f"the training data loader is empty{_why_empty(train_loader)}")
        self._scheduler_interval = _check_scheduler_interval(scheduler_interval)
        self._steps_per_epoch = _check_steps_per_epoch(steps_per_epoch)
        if grad_clip is not None and (
            isinstance(grad_clip, bool)
            or not isinstance(grad_clip, (int, float))
            or not (math.isfinite(grad_clip) and grad_clip > 0)
        ):
            raise ValueError(
                f"grad_clip must be a finite positive number or None, got {grad_clip!r}"
            )
        if distributed is None:
            distributed = _dist.is_distributed()
        if distributed and not _dist.is_distributed():
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group with more "
                "than one process (launch with torchrun)"
            )
        if val_loader is not None and (not distributed or _dist.is_main()):
            # refused now, not after the first training epoch (evaluate's "the data loader
            # is empty"); a loader without len() (a stream) is checked when it is read. Only
            # rank 0 validates: another rank's val_loader is never read.
            try:
                n_val = len(val_loader)  # type: ignore[arg-type]
            except TypeError:
                n_val = None
            if n_val == 0:
                raise ValueError(
                    f"the validation data loader (val_loader) is empty{_why_empty(val_loader)}: "
                    "give it the validation set, or val_loader=None to train without validation"
                )
        # an FSDP-sharded model: DDP failed on it in DTensor's words, and without DDP each
        # rank's checkpoint held its shards only
        _dist.refuse_fsdp(model, "the Trainer")
        _dist.refuse_fsdp(elbo, "the Trainer")
        self.model = model
        self.elbo = elbo
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self._scheduler: Any | None = None
        self.epochs = epochs
        if isinstance(out_dir, str) and not out_dir.strip():
            # Path("") is Path("."): the checkpoints and metrics would land in the current
            # directory, which the caller almost never meant
            raise ValueError(
                f"out_dir={out_dir!r} is empty: give the run directory (e.g. 'runs/mnist'), "
                "or out_dir=None to keep the run in memory"
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.val_metric = _check_val_metric(
            val_metric, isinstance(elbo.likelihood, Categorical), val_loader is not None
        )
        self.scheduler = scheduler  # validated: see the property
        if getattr(elbo, "accumulation_steps", 1) != 1:
            raise ValueError(
                f"the ELBO has accumulation_steps={elbo.accumulation_steps}, but the Trainer "
                "steps the optimizer at every minibatch (no gradient accumulation): its KL "
                "schedule would advance that many times too slowly; use accumulation_steps=1"
            )
        _warn_dataset_size(train_loader, elbo)
        _warn_untrained_model(model, optimizer)
        _warn_untrained_elbo_parameters(elbo, optimizer)
        self.epoch = 0
        # one more than the largest value given to the training sampler's set_epoch (0: none
        # yet); saved in the checkpoints. See _sampler_epochs.
        self._sampler_epochs_used = 0
        self._check_epoch_plan()
        # the (scheduler, scheduler_interval) last checked for a cycle that would stop early
        self._schedule_checked: tuple[Any, str] = (None, "epoch")
        self._warn_one_cycle_per_epoch()
        self._run_lock: RunLock | None = None
        # the checkpoint holding the parameters the current epoch started from (the one
        # resumed from, or the last one written); None before the first
        self._start_checkpoint: Path | None = None
        self.val_samples = val_samples
        self.patience = patience
        self.progress = progress
        self.log = log
        self.loader_generator = loader_generator
        own = _shuffle_generators(train_loader)
        if loader_generator is not None and own and not any(g is loader_generator for g in own):
            import warnings

            warnings.warn(
                "loader_generator is not the generator train_loader shuffles with: the "
                "checkpoints would hold the state of the one that does not shuffle, and a "
                "resumed run's shuffles would not be the uninterrupted run's; pass the "
                "loader's generator (or loader_generator=None: the Trainer then takes it)",
                UserWarning,
                stacklevel=2,
            )
        self.y_scale = y_scale
        self.grad_clip = grad_clip
        self.device = _check_device(device, model, elbo)
        self.best_metric = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        # why training ended before ``epochs`` ("early stopping": patience ran out); a resumed
        # run works it out again from its bad_epochs and the patience it is given
        self.stopped: str | None = None
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, Tensor] | None = None
        self.best_elbo_state: dict[str, Tensor] | None = None
        self.distributed = bool(distributed)
        # rank 0 (or the only process) writes files, logs and shows progress
        self.is_writer = not self.distributed or _dist.is_main()
        self._ddp: nn.Module | None = None
        # a distributed fit()'s held Ctrl-C / SIGTERM (see _fit); None outside one
        self._stop: _dist.DeferredStop | None = None
        # the ELBO's replicas during this Trainer's training epochs (see train_epoch)
        self._replicas = 1
        # (train_loader, elbo.dataset_size) when the last fit() returned (see _check_new_round)
        self._fitted_data: tuple[Any, int] = (train_loader, elbo.dataset_size)
        # group 0's learning rate at the last optimizer step taken (metrics' lr_last)
        self._lr_last: float = float(optimizer.param_groups[0]["lr"])
        # None: fit() has not run; False: the last fit() raised; True: it returned
        self._fit_returned: bool | None = None
        # fit(new_round=True) checked and about to train (see _fit)
        self._round_reset_pending = False
        self.epoch_callback = epoch_callback
        if self.distributed:
            if not self.is_writer:
                self.log, self.progress = None, False
            if val_loader is not None and _epoch_sampler(val_loader) is not None:
                import warnings

                warnings.warn(
                    "validation runs on rank 0 alone, over what its val_loader gives: with a "
                    f"DistributedSampler that is 1/{_dist.world_size()} of the validation set "
                    "(the metrics, best model and early stopping would use that shard); give "
                    "the Trainer a plain DataLoader over the whole validation set",
                    stacklevel=2,
                )
            if _epoch_sampler(train_loader) is None:
                import warnings

                warnings.warn(
                    "distributed training with a loader without a DistributedSampler: every "
                    "rank sees the whole training set",
                    stacklevel=2,
                )
            # wrap_elbo sets elbo.replicas (the blundell KL weight uses the global batch,
            # R * B): kept for this Trainer's epochs alone, and the ELBO's own value restored,
            # so that the ELBO reused outside this run (a Trainer(distributed=False), a loss
            # computed by hand) does not divide its blundell weight by R
            previous = elbo.replicas
            self._ddp = _dist.wrap_elbo(
                model, elbo, self.device, find_unused_parameters=find_unused_parameters
            )
            self._replicas = elbo.replicas
            elbo.replicas = previous

    # ------------------------------------------------------------------ settings
    # validated when set after construction too (fit() tells a user to raise them)
    @property
    def epochs(self) -> int:
        """The total number of epochs (those already trained included)."""
        return self._epochs

    @epochs.setter
    def epochs(self, value: int) -> None:
        if not _is_positive_int(value):
            raise ValueError(f"epochs must be a positive integer, got {value!r}")
        self._epochs = value

    @property
    def patience(self) -> int | None:
        """Epochs without improvement before early stopping (None: never)."""
        return self._patience

    @patience.setter
    def patience(self, value: int | None) -> None:
        if value is not None and not _is_positive_int(value):
            raise ValueError(f"patience must be a positive integer or None, got {value!r}")
        if value is not None and self.val_loader is None:
            raise ValueError("patience needs a val_loader: early stopping watches validation")
        self._patience = value

    @property
    def scheduler(self) -> Any | None:
        """The learning-rate scheduler (None: a constant rate), stepped as
        :attr:`scheduler_interval` says. May be replaced between ``fit()`` calls (a new
        schedule for an active-learning round); a new one is validated as in the constructor."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any | None) -> None:
        if value is not None and not callable(getattr(value, "step", None)):
            raise TypeError(
                f"scheduler must be a torch.optim.lr_scheduler scheduler (with a step() method) "
                f"or None, got {type(value).__name__}"
            )
        if _is_plateau(value):
            self._refuse_plateau_per_step(self._scheduler_interval)
            _check_plateau_mode(value, self.val_metric, self.val_loader is not None)
        self._scheduler = value

    @property
    def scheduler_interval(self) -> str:
        """``"epoch"``: the scheduler steps once after each epoch (its validation);
        ``"step"``: after every optimizer step (see :data:`SCHEDULER_INTERVALS`)."""
        return self._scheduler_interval

    @scheduler_interval.setter
    def scheduler_interval(self, value: str) -> None:
        value = _check_scheduler_interval(value)
        if _is_plateau(self._scheduler):
            self._refuse_plateau_per_step(value)
        self._scheduler_interval = value

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch (None: one pass over ``train_loader``, ``len(train_loader)``
        steps); see the class docstring."""
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        self._steps_per_epoch = _check_steps_per_epoch(value)

    @staticmethod
    def _refuse_plateau_per_step(interval: str) -> None:
        if interval == "step":
            raise ValueError(
                "a ReduceLROnPlateau scheduler cannot be stepped per optimizer step "
                "(scheduler_interval='step'): it needs a metric, which the Trainer has once per "
                "epoch (the validation metric, or the epoch's training loss); use "
                "scheduler_interval='epoch' (or steps_per_epoch to validate more often)"
            )

    def _epoch_steps(self) -> int:
        """Optimizer steps in one epoch: ``steps_per_epoch``, else ``len(train_loader)``."""
        return self._steps_per_epoch or len(self.train_loader)

    def _check_epoch_plan(self) -> None:
        """Refuse, before any training, an epoch layout that would train wrongly or fail
        midway: ``steps_per_epoch`` that breaks the blundell KL weighting or never reaches
        part of an unshuffled loader, and a ``OneCycleLR`` that runs out of steps."""
        passes = len(self.train_loader)
        k = self._steps_per_epoch
        if k is not None and self.elbo.kl_weighting == "blundell" and k % passes:
            raise ValueError(
                f"steps_per_epoch={k} with the ELBO's kl_weighting='blundell': the blundell "
                f"weights pi_i run over the {passes} minibatches of one pass over train_loader "
                "(they sum to 1 per pass, so the KL counts once per pass over the data), so an "
                f"epoch must be whole passes: steps_per_epoch must be a multiple of "
                f"len(train_loader)={passes} (e.g. {passes}, {2 * passes}, {4 * passes}), or "
                "use kl_weighting='uniform'"
            )
        fixed_order = _unshuffled(self.train_loader) if k is not None and k < passes else None
        if fixed_order is not None:
            raise ValueError(
                f"steps_per_epoch={k} is less than len(train_loader)={passes}, and the loader "
                f"does not shuffle ({fixed_order}): every epoch starts a new pass and "
                f"would take the same first {k} minibatches, the others never; shuffle the "
                "loader (DataLoader(..., shuffle=True), DistributedSampler(..., "
                f"shuffle=True)) or use steps_per_epoch >= {passes}"
            )
        sched = self._scheduler
        if isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
            per_epoch = self._epoch_steps() if self._scheduler_interval == "step" else 1
            needed = (self.epochs - self.epoch) * per_epoch
            left = sched.total_steps - sched.last_epoch
            if needed > left:
                unit = (
                    f"{per_epoch} per epoch (scheduler_interval='step')"
                    if self._scheduler_interval == "step"
                    else "one per epoch (scheduler_interval='epoch')"
                )
                raise ValueError(
                    f"the OneCycleLR scheduler has {left} of its total_steps="
                    f"{sched.total_steps} steps left, but the run would step it {needed} times "
                    f"({self.epochs - self.epoch} epochs to train, {unit}); torch raises at "
                    f"the step past its end. Create it with total_steps="
                    f"{sched.last_epoch + needed} (or lower epochs)"
                )

    def _warn_one_cycle_per_epoch(self, stacklevel: int = 3) -> None:
        """Warn when a ``OneCycleLR`` stepped per epoch would not reach the end of its cycle
        (laid out in optimizer steps but given ``scheduler_interval='epoch'``): it has more
        steps left than the run has epochs left. Checked for each (scheduler,
        scheduler_interval) the Trainer is given: at construction, and by ``fit()`` for one
        assigned since (a new round's schedule)."""
        sched = self._scheduler
        self._schedule_checked = (sched, self._scheduler_interval)
        if not isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
            return
        left = sched.total_steps - sched.last_epoch
        epochs_left = self.epochs - self.epoch
        if self._scheduler_interval == "epoch" and left > epochs_left:
            import warnings

            warnings.warn(
                f"the OneCycleLR scheduler has {left} of its total_steps={sched.total_steps} "
                f"steps left, but with scheduler_interval='epoch' it steps once per epoch, "
                f"{epochs_left} times: the cycle would stop early. For a cycle over optimizer "
                "steps pass scheduler_interval='step'",
                UserWarning,
                stacklevel=stacklevel,
            )

    # ------------------------------------------------------------------ helpers
    def _score(self, report: dict[str, float]) -> float:
        v = report[self.val_metric]
        return -v if self.val_metric in ("accuracy", "log_likelihood") else v

    def _resume_generators(self) -> list[torch.Generator]:
        """The generators whose states the checkpoints hold: ``loader_generator`` (if given)
        and every generator the training loader draws from (:func:`_shuffle_generators`),
        each once, in that order."""
        found = _shuffle_generators(self.train_loader)
        g = self.loader_generator
        if g is None:
            return found
        return [g, *(other for other in found if other is not g)]

    def _resume_generator_roles(self) -> list[str]:
        """Where each of :meth:`_resume_generators` sits in the training loader (see
        :func:`_generator_roles`), ``"loader_generator"`` for one it does not hold."""
        roles = _generator_roles(self.train_loader)
        return [
            next((role for role, other in roles if other is g), "loader_generator")
            for g in self._resume_generators()
        ]

    def _val_generators(self) -> list[torch.Generator]:
        """The generators the validation loader draws from (a ``DataLoader(val, shuffle=True,
        generator=g)``: its order decides which weight sample scores which example), those
        of :meth:`_resume_generators` left out; their states are in the checkpoints too."""
        if self.val_loader is None:
            return []
        train = self._resume_generators()
        return [g for g in _shuffle_generators(self.val_loader) if not any(g is t for t in train)]

    def _state(self) -> dict[str, Any]:
        generators = self._resume_generators()
        return {
            "format": _FORMAT,
            "epoch": self.epoch,
            # the underlying module's state under torch.compile (no "_orig_mod." prefix): the
            # checkpoint loads into the uncompiled network too
            "model": _plain_module(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            # its class: a resume with another kind of scheduler is refused (_check_layout)
            "scheduler_type": None if self.scheduler is None else _type_name(self.scheduler),
            # how the run is laid out: a resume with another layout is refused (_check_layout)
            "scheduler_interval": self._scheduler_interval,
            "steps_per_epoch": self._steps_per_epoch,
            "elbo": self.elbo.state_dict(),
            "rng": rng_state(),
            # the first generator's state (what a checkpoint held before) and every one's:
            # a DataLoader(generator=g) over a RandomSampler(generator=g2) draws from both
            "loader_generator": generators[0].get_state() if generators else None,
            "loader_generators": [g.get_state() for g in generators],
            # where each sits: a resume restores them by role, not by position
            "loader_generator_roles": self._resume_generator_roles(),
            # a shuffled val_loader's: a resumed run's validation metrics (best epoch, early
            # stopping, a ReduceLROnPlateau's steps) are the uninterrupted run's
            "val_loader_generators": [g.get_state() for g in self._val_generators()],
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "sampler_epochs_used": self._sampler_epochs_used,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        _plain_module(self.model).load_state_dict(_plain_state(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.elbo.load_state_dict(state["elbo"])
        set_rng_state(state["rng"])
        generators = self._resume_generators()
        saved = state.get("loader_generators")
        if saved is None:  # a checkpoint written before every generator was saved
            first = state.get("loader_generator")
            saved = [] if first is None else [first]
        roles = self._resume_generator_roles()
        saved_roles: list[str] | None = state.get("loader_generator_roles")  # since session 28
        by_role = (
            saved_roles is not None
            and len(saved_roles) == len(saved)
            and sorted(saved_roles) == sorted(roles)
        )
        if by_role and saved_roles is not None:
            states = dict(zip(saved_roles, saved, strict=True))
            for g, role in zip(generators, roles, strict=True):
                g.set_state(states[role])
        else:
            for g, g_state in zip(generators, saved, strict=False):
                g.set_state(g_state)
        if saved_roles is not None and not by_role and len(saved) == len(generators) > 0:
            import warnings

            warnings.warn(
                f"the checkpoint holds the states of the training loader's generators at "
                f"{', '.join(saved_roles)}, but this Trainer's loader draws from generators "
                f"at {', '.join(roles)}: they were restored in order, so the resumed run's "
                "shuffles may not be the uninterrupted run's; build the loader as the run did",
                UserWarning,
                stacklevel=4,
            )
        if generators and saved and len(generators) != len(saved):
            import warnings

            warnings.warn(
                f"the checkpoint holds the states of {len(saved)} generator(s) that the "
                f"training loader drew from, but this Trainer's loader draws from "
                f"{len(generators)} (its own DataLoader(generator=...), its sampler's, "
                "loader_generator): the resumed run's shuffles are not the uninterrupted "
                "run's; build the loader as the run did",
                UserWarning,
                stacklevel=4,
            )
        elif bool(generators) != bool(saved):
            import warnings

            warnings.warn(
                "the checkpoint holds the state of the generator that shuffled the training "
                "loader, but this Trainer's loader has none (no loader_generator, no "
                "DataLoader(..., generator=g)): the resumed run's shuffles are not the "
                "uninterrupted run's; build the loader as the run did"
                if not generators
                else "the checkpoint holds no state of the generator that shuffles the "
                "training loader (written by a run whose loader had none, or by a version of "
                "bbb that saved it only with loader_generator): the generator starts afresh, "
                "so the resumed run's shuffles are not the uninterrupted run's",
                UserWarning,
                stacklevel=4,
            )
        val_generators = self._val_generators()
        # absent: written before they were saved (by a version that left them at their start)
        saved_val = state.get("val_loader_generators") or []
        for g, g_state in zip(val_generators, saved_val, strict=False):
            g.set_state(g_state)
        if len(val_generators) != len(saved_val):
            import warnings

            warnings.warn(
                f"the checkpoint holds the states of {len(saved_val)} generator(s) that "
                f"the validation loader drew from, but this Trainer's val_loader draws from "
                f"{len(val_generators)}: the resumed run's validation order, and so its "
                "validation metrics, are not the uninterrupted run's; build the val_loader as "
                "the run did (an unshuffled one needs none)",
                UserWarning,
                stacklevel=4,
            )
        if _persistent_workers(self.train_loader):
            import warnings

            warnings.warn(
                "the training loader keeps its worker processes from epoch to epoch "
                "(persistent_workers=True): the uninterrupted run drew their base seed (from "
                "the loader's generator, else the global RNG) once, at its first epoch, and "
                "the workers' random state carried on from there, where this resumed run "
                "draws it anew at its first epoch: its shuffles, weight noise and any random "
                "draw in the workers are not the uninterrupted run's. For an exact resume, "
                "train with persistent_workers=False",
                UserWarning,
                stacklevel=4,
            )
        self.epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        # absent (a checkpoint of an earlier version): its run gave epoch * passes + pass,
        # which start at epoch * passes, the value the next epoch computes anyway
        self._sampler_epochs_used = int(state.get("sampler_epochs_used", 0))
        # derived, not saved: a larger patience given on resume lets the run train on, and the
        # same epoch stopped by the callback and by patience still counts as stopped early
        self.stopped = self._patience_ran_out()

    def _metrics_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "metrics.jsonl"

    def _read_history(self, epoch: int) -> list[dict[str, Any]]:
        """metrics.jsonl rows up to ``epoch`` (the file is rewritten without the later ones)."""
        path = self._metrics_path()
        history: list[dict[str, Any]] = []
        if path is None or not path.exists():
            return history
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("epoch", 0) <= epoch:
                history.append(row)
        atomic_write_text(path, "".join(strict_json(r) + "\n" for r in history))
        return history

    def _prepare(
        self, resume: bool, overwrite: bool = False, continuing: bool = False
    ) -> tuple[dict[str, Any], Path, list[dict[str, Any]], dict[str, Any] | None] | None:
        """Check the run directory; when resuming, read (state, path, history, best).

        ``continuing``: this Trainer's own run, trained on from its state in memory (a second
        ``fit()``): the directory holds that run, which is neither refused nor deleted.
        """
        if self.out_dir is None:
            return None
        check_writable(self.out_dir)
        # held until fit() returns: a second process training into this directory is refused
        self._run_lock = RunLock(self.out_dir)
        remove_stale_temporaries(self.out_dir)
        if continuing:
            return None
        ckpt_dir = self.out_dir / "checkpoints"
        if not resume:
            previous = previous_run_files(self.out_dir)
            if previous and not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds a run ({', '.join(p.name for p in previous)});"
                    " resume it (resume=True, bbb train --resume), start it over "
                    "(overwrite=True, --overwrite) or choose another directory"
                )
            # a new run: nothing of the previous one may outlive it (its checkpoints, with
            # higher epoch numbers, would be the ones a later resume picks)
            for p in previous:
                p.unlink()
            path = self._metrics_path()
            if path is not None and path.exists():
                path.unlink()
            return None
        if latest_checkpoint(ckpt_dir) is None:
            raise CheckpointError(
                f"nothing to resume: no checkpoint in {ckpt_dir} (the run stopped before its "
                "first epoch ended); start it anew: resume=False with overwrite=True (bbb "
                "train with --overwrite instead of --resume)"
            )
        # Loaded on the CPU: the RNG states must stay there (the generators take CPU tensors),
        # and load_state_dict moves model and optimizer tensors to their parameters' device.
        cpu = torch.device("cpu")
        state, path = load_checkpoint(ckpt_dir, map_location=cpu, require=_REQUIRED)
        done = int(state["epoch"])
        if done > self.epochs:  # refused before anything in the run directory is rewritten
            raise ValueError(
                f"cannot resume {self.out_dir} with epochs={self.epochs}: the run has already "
                f"done {done} epochs ({path.name}); epochs must be >= {done}"
            )
        best: dict[str, Any] | None = None
        if (self.out_dir / "best.pt").exists():
            try:
                best, _ = load_checkpoint(
                    self.out_dir / "best.pt", map_location=cpu, require=("model", "elbo", "epoch")
                )
            except CheckpointError as e:
                # the epoch checkpoints are intact: train on, choosing the best model again
                # (fit warns); best.pt is replaced, atomically, at the next best epoch
                best = {"unreadable": str(e)}
        return state, path, self._read_history(done), best

    def _append_metrics(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        path = self._metrics_path()
        if path is not None and self.is_writer:
            new = not path.exists()
            with open(path, "a", encoding="utf-8") as f:
                # strict JSON: a non-finite value (a NaN validation metric) is null
                f.write(strict_json(row) + "\n")
                f.flush()
                os.fsync(f.fileno())  # on disk before the epoch's checkpoint is
            if new:  # the file's directory entry too (POSIX: an fsync of the directory)
                _fsync_dir(path.parent)

    def _save_best(self) -> None:
        model_state = _plain_module(self.model).state_dict()
        self.best_state = {k: v.detach().clone() for k, v in model_state.items()}
        self.best_elbo_state = {k: v.detach().clone() for k, v in self.elbo.state_dict().items()}
        if self.out_dir is not None and self.is_writer:
            import io

            buf = io.BytesIO()
            best = {"model": self.best_state, "elbo": self.best_elbo_state, "epoch": self.epoch}
            torch.save(best, buf)
            atomic_write_bytes(self.out_dir / "best.pt", buf.getvalue())

    # ------------------------------------------------------------------ training
    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns mean loss, nll, kl, kl_weight, weighted_kl
        and timing (see the class docstring's ``metrics.jsonl``).

        The ELBO's ``replicas`` is this run's for the epoch (the world size under
        ``torch.distributed``, else 1), then restored: an ELBO used before by a distributed
        run does not divide this run's blundell KL weight by that run's world size.
        """
        previous = self.elbo.replicas
        self.elbo.replicas = self._replicas
        try:
            return self._train_epoch_scoped()
        finally:
            self.elbo.replicas = previous

    def _train_epoch_scoped(self) -> dict[str, float]:
        # A model in training mode whose submodules the user put in eval mode (a frozen
        # body's BatchNorm, a Dropout switched off) keeps them there; a model wholly in eval
        # mode (left so by a prediction) trains in training mode, as before. Read at every
        # epoch (the previous epoch and the validation leave the same modes), so a direct
        # train_epoch() call sees the modes of its moment.
        kept = [m for m in self.model.modules() if not m.training] if self.model.training else []
        self.model.train()
        for module in kept:
            module.eval()
        self.elbo.train()
        sampler = _epoch_sampler(self.train_loader)
        if sampler is not None and self._steps_per_epoch is None:
            # a DistributedSampler's shuffle for this epoch (with steps_per_epoch: for each
            # pass, see _epoch_batches)
            sampler.set_epoch(self._sampler_epochs(1)[0])
        if not self.distributed:
            return self._train_epoch()
        # Every rank must take the same number of steps: DDP all-reduces gradients at each
        # one, and a rank with a batch more would pair its all-reduce with another rank's
        # end-of-epoch reduction (gloo aborts the process, nccl hangs until the timeout).
        counts = _dist.gather_object(len(self.train_loader))
        odd = next((r for r, c in enumerate(counts) if c != counts[0]), None)
        if odd is not None:
            raise _dist.DistributedError(
                f"the training loader gives {counts[0]} batches on rank 0 but {counts[odd]} "
                f"on rank {odd} (epoch {self.epoch + 1}): every rank must take the same number "
                "of steps; shard the data with a DistributedSampler, which pads the shards to "
                "equal length"
            )
        # Each rank draws its own weight noise from a seed derived from the shared RNG stream;
        # the shared stream is restored afterwards, so validation, checkpoints (which save it)
        # and the next epoch see the same state on every rank, for any number of ranks.
        epoch_seed = int(torch.randint(0, 2**62, (1,)))
        shared = torch.get_rng_state()
        torch.manual_seed(_dist.rank_seed(epoch_seed, _dist.rank()))
        try:
            return self._train_epoch()
        finally:
            torch.set_rng_state(shared)

    def _train_epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        num_batches = self._epoch_steps()
        # stepped after every optimizer step (scheduler_interval="step")
        step_scheduler = self._scheduler if self._scheduler_interval == "step" else None
        sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "kl_weight": 0.0, "weighted_kl": 0.0}
        n_seen = 0
        bar = tqdm(
            total=num_batches,
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        stop = self._stop
        flags: tuple[Tensor, Tensor] | None = None  # (0, 1) in the loss's dtype and device
        for i, index, per_pass, x, y in self._epoch_batches():
            if self._ddp is None:
                result = self.elbo(self.model, x, y, batch_index=index, num_batches=per_pass)
                loss_value = float(result.loss.detach())
            else:
                result = self._ddp(x, y, batch_index=index, num_batches=per_pass)
                # the mean over ranks: non-finite on every rank when it is on any one; with it,
                # whether a rank holds a stop (Ctrl-C, SIGTERM): every rank takes it here, at
                # the same step, instead of one leaving the others in their next all-reduce
                loss = result.loss.detach().reshape(1)
                if flags is None:
                    flags = (loss.new_zeros(1), loss.new_ones(1))
                pending = stop is not None and stop.pending
                both = _dist.all_reduce_mean(torch.cat((loss, flags[pending])))
                loss_value, stopping = both.tolist()
                if stopping > 0 and stop is not None:
                    stop.stop(
                        f"at step {i + 1} of epoch {self.epoch + 1} (that epoch is not saved)"
                    )
            if not math.isfinite(loss_value):
                where = self._last_good_checkpoint(first_step=i == 0)
                bad_data = [
                    name
                    for name, t in (("inputs", x), ("targets", y))
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())
                ]
                stats = f"nll={float(result.nll)}, kl={float(result.kl)}"
                if self._ddp is not None:
                    # every rank is here (the loss was reduced over ranks), but each saw only
                    # its own shard: say which rank's minibatch holds the NaN (rank 0 alone
                    # blamed the learning rate when rank 1's data were at fault)
                    per_rank = _dist.gather_object((bad_data, stats))
                    stats = "; ".join(f"rank {r}: {st}" for r, (_, st) in enumerate(per_rank))
                    bad_data = [
                        f"{n} on rank {r}" for r, (ns, _) in enumerate(per_rank) for n in ns
                    ]
                hint = (
                    f"The minibatch {' and '.join(bad_data)} contain NaN or Inf values: clean "
                    "the data set."
                    if bad_data
                    else "Try a smaller learning rate, a smaller initial rho or gradient clipping."
                )
                raise TrainingDivergedError(
                    f"loss became {loss_value} at epoch {self.epoch + 1}, step {i + 1} of "
                    f"{num_batches} ({stats}){where}. " + hint
                )
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            if self.grad_clip is not None:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self._lr_last = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if step_scheduler is not None:
                step_scheduler.step()  # the rate of the next step
            b = x.shape[0]
            n_seen += b
            sums["loss"] += loss_value * b
            sums["nll"] += float(result.nll) * b
            sums["kl"] += float(result.kl) * b
            # the weight the ELBO gave this minibatch's KL (beta * pi_i / B, annealed or
            # blundell-weighted), and the KL term it added to the loss
            sums["kl_weight"] += float(result.kl_weight) * b
            sums["weighted_kl"] += float(result.kl_weight) * float(result.kl) * b
            bar.update(1)
            if self.progress:
                bar.set_postfix(
                    loss=f"{loss_value:.4g}",
                    nll=f"{float(result.nll):.4g}",
                    kl=f"{float(result.kl):.4g}",
                )
        bar.close()
        if self.distributed:  # sums of loss * B and the example counts over ranks
            keys = list(sums)
            t = torch.tensor(
                [sums[k] for k in keys] + [float(n_seen)], dtype=torch.float64, device=self.device
            )
            t = _dist.all_reduce_sum(t).cpu()
            sums = {k: float(t[j]) for j, k in enumerate(keys)}
            n_seen = int(t[-1])
        out = {k: v / max(n_seen, 1) for k, v in sums.items()}
        out["train_seconds"] = time.perf_counter() - start
        return out

    def _epoch_batches(self) -> Iterable[tuple[int, int, int, Tensor, Tensor]]:
        """The epoch's minibatches as ``(step, batch_index, num_batches, x, y)``: ``step``
        counts the epoch's optimizer steps; ``batch_index`` of ``num_batches`` is the
        minibatch's place in its pass over ``train_loader`` (what the blundell KL weight
        reads: the weights sum to 1 over each pass).

        Without ``steps_per_epoch``: one pass (step == batch_index). With it: passes over the
        loader, each a new iteration (a new shuffle), until ``steps_per_epoch`` steps; the
        last pass is cut there (a new epoch starts a new pass). A sampler with ``set_epoch``
        (a ``DistributedSampler``) is set to ``epoch * passes + pass`` for each pass, so every
        pass of every epoch has its own shuffle, the same on every rank and on resume.
        """
        per_pass = len(self.train_loader)
        k = self._steps_per_epoch
        if k is None:
            for i, (x, y) in enumerate(_batches(self.train_loader, self.device)):
                yield i, i, per_pass, x, y
            return
        sampler = _epoch_sampler(self.train_loader)
        passes = -(-k // per_pass)
        seeds = self._sampler_epochs(passes) if sampler is not None else []
        step, p = 0, 0
        while step < k:
            if sampler is not None:
                sampler.set_epoch(seeds[p])
            given = 0
            for j, (x, y) in enumerate(_batches(self.train_loader, self.device)):
                given += 1
                yield step, j, per_pass, x, y
                step += 1
                if step == k:
                    break
            if given == 0:
                raise ValueError(
                    f"the training loader gave no minibatch in pass {p + 1} of epoch "
                    f"{self.epoch + 1} (len(train_loader) is {per_pass}): steps_per_epoch "
                    "needs a loader that can be iterated again and again"
                )
            p += 1

    def _sampler_epochs(self, passes: int) -> list[int]:
        """The ``set_epoch`` values of this epoch's ``passes`` passes over the training
        loader: ``epoch * passes + pass``, moved up (by the same amount for every pass) to
        start past every value already given (``_sampler_epochs_used``), and recorded as given.

        One ``fit()`` (and its resume, which restores ``_sampler_epochs_used`` from the
        checkpoint) is never moved: its values are ``epoch * passes + pass`` as documented.
        A later ``fit()`` with fewer passes per epoch (``steps_per_epoch`` lowered, or set back
        to None) would reuse values of the earlier one, and with them the earlier passes'
        shuffles; it continues after them instead. Every rank computes the same values.
        """
        first = max(self.epoch * passes, self._sampler_epochs_used)
        self._sampler_epochs_used = first + passes
        return list(range(first, first + passes))

    def _last_good_checkpoint(self, first_step: bool = False) -> str:
        """``"; the last good checkpoint ... is intact"`` (or how it is not good) for a
        divergence message; empty without one.

        The last good checkpoint is the one this epoch started from (the one resumed from:
        not the newest file when that one was unreadable). ``first_step``: the divergence
        came at the epoch's first step, which ran with the parameters that checkpoint holds:
        resuming from it would diverge again at once.
        """
        from .checkpoint import checkpoint_epoch, list_checkpoints

        start = self._start_checkpoint
        if start is None or not start.is_file():
            return ""
        if not first_step:
            return f"; the last good checkpoint {start} is intact"
        found = list_checkpoints(start.parent)
        before = [p for p in found if checkpoint_epoch(p) < checkpoint_epoch(start)]
        older = (
            f" (the one before it, {before[-1]}, trained on: delete the newer ones to resume "
            "from it)"
            if before
            else ""
        )
        return (
            f"; the checkpoint {start} holds the parameters this step started from (the "
            f"epoch's first): resuming from it would likely diverge again{older}"
        )

    def _check_finite_parameters(self) -> None:
        """:class:`TrainingDivergedError` when a step of the epoch just trained left a parameter
        NaN or Inf with a finite loss (a NaN gradient, an overflowing update), before the
        epoch's checkpoint would save it as good."""
        params = [
            (name, p)
            for name, p in [
                *_plain_module(self.model).named_parameters(),
                *self.elbo.named_parameters(),
            ]
            if p.requires_grad and p.is_floating_point()  # what the optimizer may have changed
        ]
        if not params:
            return
        # one flag per tensor, read back at once: a single device synchronisation per epoch
        flags = [torch.isfinite(p.detach()).all() for _, p in params]
        finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        bad = [name for (name, _), ok in zip(params, finite, strict=True) if not ok]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise TrainingDivergedError(
                f"parameters became NaN or Inf during epoch {self.epoch + 1} ({shown}) while "
                f"the loss stayed finite (a NaN or Inf gradient, or an overflowing update)"
                f"{self._last_good_checkpoint()}. Try a smaller learning rate or gradient "
                "clipping."
            )

    def validate(self) -> dict[str, float]:
        """Validation report (empty when there is no validation loader)."""
        if self.val_loader is None:
            return {}
        loader = self.val_loader
        if not self.distributed:
            return self._validate_local(loader)
        # rank 0 evaluates; its report and RNG state (validation draws weight samples) are
        # shared, so every rank takes the same best-model and early-stopping decisions.
        report, rng = _dist.on_main(
            lambda: (self._validate_local(loader), torch.get_rng_state()), "validating"
        )
        torch.set_rng_state(rng)
        return report

    def _validate_local(self, loader: Iterable[Any]) -> dict[str, float]:
        return evaluate(
            self.model,
            loader,
            self.elbo.likelihood,
            num_samples=self.val_samples,
            device=self.device,
            y_scale=self.y_scale,
            shared_prefix=self.elbo.shared_prefix,
        )

    def fit(
        self, resume: bool = False, overwrite: bool = False, *, new_round: bool | None = None
    ) -> dict[str, Any]:
        """Train until ``epochs`` (or early stopping); returns a summary dictionary.

        The summary: ``epochs_trained``, ``best_epoch``, ``best_val`` (the best value of
        ``val_metric``; None without validation), ``val_metric``, ``stopped_early``,
        ``stopped_by_callback``, ``train_seconds`` (all epochs') and the last epoch's training
        means ``final_loss``, ``final_nll``, ``final_kl`` and ``final_kl_weight`` (its
        ``metrics.jsonl`` row's ``loss``, ``nll``, ``kl``, ``kl_weight``; None where the
        run's history has no such row).

        With ``resume=True`` and a run directory holding checkpoints, training continues from
        the newest readable one (a corrupt newest one is skipped with a warning); a run that
        had stopped early stays stopped unless it is given a larger patience, one stopped by
        the epoch callback trains on. Without it, a run
        directory that already holds a run is an error unless ``overwrite=True``, which
        deletes the previous run's checkpoints, ``best.pt`` and metrics first.

        Called again on a Trainer whose last ``fit()`` returned, ``fit()`` trains on from
        where that one ended (the same model, optimizer, scheduler, history and run
        directory, which it appends to): ``epochs`` counts every epoch, those already done
        included, so raise it first (``trainer.epochs += 5``); for an active-learning round
        on a larger training set, also set ``trainer.train_loader`` and
        ``trainer.elbo.dataset_size`` and say ``new_round`` (below). With nothing left to train (``epochs`` reached, or
        the patience run out: raise ``trainer.patience``) that call is a ``RuntimeError``
        saying so (it used to return the previous summary without training), as is
        ``overwrite=True`` (it would delete the files of the training the model holds). A
        fresh run (a round trained from scratch) needs a new Trainer, model and optimizer.

        ``new_round`` (for such a second ``fit()`` only): ``True`` starts a new selection
        round: the best model, its metric, the patience count and an early stop are reset, so
        the best model (``load_best()``, ``best.pt``) is the best of the coming epochs alone
        (without it, the earlier round's best stays the best until beaten: with a harder or
        different validation set, or a model that improves slowly on its new data, the new
        round's weights were never saved as the best); ``False`` keeps the best of every epoch
        so far. When the training data changed since the last ``fit()`` (another
        ``train_loader`` object or ``elbo.dataset_size``), leaving it unset is a
        ``RuntimeError`` asking for one or the other. A round's reset is saved from its first
        epoch's checkpoint on (a resume from an older checkpoint resumes the earlier round).
        The scheduler is not reset: assign a new one (``trainer.scheduler = ...``) for a new
        schedule; a ``OneCycleLR`` without the steps the coming epochs need is refused.
        """
        if resume and self.out_dir is None:
            raise ValueError("resume=True needs an out_dir")
        continuing = not resume and self._fit_returned is True
        if new_round is not None:
            if not isinstance(new_round, bool):
                raise TypeError(f"new_round must be True, False or None, got {new_round!r}")
            if not continuing:
                raise ValueError(
                    "new_round applies to a second fit() of a Trainer whose last fit() returned "
                    "(an active-learning round trained on from the previous one); "
                    + (
                        "a resumed run continues its checkpoint's round"
                        if resume
                        else "this Trainer has not trained yet"
                    )
                )
        # a new round's reset waits until every check has passed (see _fit): a refused call
        # must not lose the earlier round's best model
        self._round_reset_pending = False
        if continuing:
            reset = self._check_new_round(new_round)
            self._check_continuation(overwrite, new_round=reset)
            self._round_reset_pending = reset
            # the loader or the ELBO's dataset_size may have changed since (a new round)
            _warn_dataset_size(self.train_loader, self.elbo)
        try:
            if self.distributed:  # rank 0 reads the run directory; every rank gets its content
                loaded = _dist.on_main(
                    lambda: self._prepare(resume, overwrite, continuing),
                    "preparing the run directory",
                )
            else:
                loaded = self._prepare(resume, overwrite, continuing)
            return self._fit(loaded)
        finally:  # also when _prepare refused the directory after taking the lock
            if self._run_lock is not None:
                self._run_lock.release()
                self._run_lock = None

    def _check_new_round(self, new_round: bool | None) -> bool:
        """Whether this ``fit()`` starts a new selection round (``new_round=True``); refuse an
        unsaid choice when the training data changed since the last ``fit()`` (see
        :meth:`fit`). Changes nothing: :meth:`_start_new_round` resets, once every check of
        the call has passed."""
        loader, size = self._fitted_data
        changes = []
        if self.train_loader is not loader:
            changes.append("trainer.train_loader was replaced")
        if self.elbo.dataset_size != size:
            changes.append(f"elbo.dataset_size {size} -> {self.elbo.dataset_size}")
        if changes and new_round is None:
            raise RuntimeError(
                f"the training data changed since the last fit() ({'; '.join(changes)}): say "
                "whether this is a new round. fit(new_round=True) chooses the best model among "
                "the coming epochs alone (best metric, best epoch and patience restart; "
                "load_best() then gives this round's best); fit(new_round=False) keeps the "
                f"best of all epochs so far (epoch {self.best_epoch}'s weights stay the best "
                "until beaten)"
            )
        return new_round is True

    def _start_new_round(self) -> None:
        """Forget the best model, its metric, the patience count and an early stop: the
        coming epochs choose the round's own best (``fit(new_round=True)``)."""
        self.best_metric, self.best_epoch, self.bad_epochs = math.inf, 0, 0
        self.best_state = self.best_elbo_state = None
        self.stopped = None

    def _check_continuation(self, overwrite: bool, *, new_round: bool = False) -> None:
        """Refuse a ``fit()`` (no resume) of a Trainer that has already trained when it would
        train nothing or delete its run (see :meth:`fit`); ``new_round``: the call starts a
        new round, whose reset patience count lets a run stopped early train on."""
        if overwrite:
            raise RuntimeError(
                f"fit(overwrite=True) on a Trainer that has already trained {self.epoch} epochs: "
                "it would delete the run's files while the model, optimizer and history keep "
                "that training. To start over, build a new Trainer with a freshly initialised "
                "model and optimizer; to train on, raise trainer.epochs and call fit()"
            )
        # derived as on resume: a larger patience set since (or a new round) lets the run
        # train on
        stopped = None if new_round else self._patience_ran_out()
        if not new_round:
            self.stopped = stopped
        new = " (with another out_dir)" if self.out_dir is not None else ""
        if self.epoch >= self.epochs:
            raise RuntimeError(
                f"this Trainer has already trained {self.epoch} epochs (epochs={self.epochs}), so "
                "fit() would train nothing: epochs counts every epoch, those already done "
                "included. To "
                f"train on from here, raise it (e.g. trainer.epochs = {self.epochs + 5}) and "
                "call fit() again (for a new active-learning round also set "
                "trainer.train_loader and trainer.elbo.dataset_size, and call "
                f"fit(new_round=True)); to train from scratch, build a new Trainer{new}"
            )
        if stopped is not None:
            raise RuntimeError(
                f"this Trainer's run stopped early after epoch {self.epoch} (no improvement "
                f"for patience={self.patience} epochs), so fit() would train nothing: raise "
                f"trainer.patience to train on, or build a new Trainer{new}"
            )

    def _check_layout(self, state: dict[str, Any], path: Path) -> None:
        """Refuse to resume a checkpoint written with another ``scheduler_interval``,
        ``steps_per_epoch`` or kind (class) of scheduler (a checkpoint without them was
        written with the defaults, by a version without these options): the resumed run
        would not be the one started."""
        saved = {
            "scheduler_interval": state.get("scheduler_interval", "epoch"),
            "steps_per_epoch": state.get("steps_per_epoch"),
        }
        now = {
            "scheduler_interval": self._scheduler_interval,
            "steps_per_epoch": self._steps_per_epoch,
        }
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in saved if saved[k] != now[k]]
        # torch's load_state_dict updates any scheduler's attributes with any other's (a
        # LambdaLR's state in a OneCycleLR gave a mix of the two, silently)
        saved_type = state.get("scheduler_type")  # absent: written before it was saved
        if (
            saved_type is not None
            and self.scheduler is not None
            and state.get("scheduler") is not None
            and saved_type != _type_name(self.scheduler)
        ):
            diff.append(f"scheduler: {saved_type} -> {_type_name(self.scheduler)}")
        if diff:
            raise CheckpointError(
                f"{path} was written by a run with other settings ({'; '.join(diff)}): a "
                "resumed run must step its schedule and lay out its epochs as the run it "
                "continues; give the Trainer the checkpoint's values"
            )

    def _restore_best(self, best: dict[str, Any] | None, path: Path) -> None:
        """Take the best model's weights from ``best.pt`` (read by _prepare) if they are those
        of the checkpoint's best epoch; otherwise warn and choose the best model again."""
        readable = best if best is not None and "unreadable" not in best else None
        if readable is not None and int(readable.get("epoch", -1)) == self.best_epoch:
            self.best_state = _plain_state(readable["model"])
            self.best_elbo_state = readable["elbo"]
            return
        if 0 < self.best_epoch == self.epoch:
            # the checkpoint's own weights are the best: best.pt, written after it, is behind
            # (a crash or Ctrl-C between the two writes) or lost; nothing is: bring it up to date
            if best is not None and "unreadable" in best:
                import warnings

                warnings.warn(
                    f"best.pt is unreadable ({best['unreadable']}): rewritten from {path.name}, "
                    f"whose weights are the best so far (epoch {self.epoch})",
                    stacklevel=4,
                )
            self._save_best()
            return
        if readable is not None:  # ahead of the checkpoint resumed from (a newer one unreadable)
            why = (
                f"best.pt holds epoch {readable.get('epoch')} but {path.name} names epoch "
                f"{self.best_epoch} as the best"
            )
        elif self.best_epoch == 0 or self.val_loader is None:
            return  # no best model yet, or the best is always the last epoch
        elif best is None:
            why = f"best.pt (epoch {self.best_epoch}, the best so far) is missing"
        else:
            why = f"best.pt is unreadable ({best['unreadable']})"
        import warnings

        warnings.warn(
            f"{why}: its weights are lost, so the best model is chosen again from the next "
            "epoch on (the epoch checkpoints are intact)",
            stacklevel=4,
        )
        self.best_metric, self.best_epoch = math.inf, 0

    def _fit(self, loaded: Any) -> dict[str, Any]:
        if loaded is not None:
            self._fit_returned = False
            state, path, self.history, best = loaded
            if state.get("format") != _FORMAT:
                raise CheckpointError(
                    f"{path}: checkpoint format {state.get('format')!r}, but this version of "
                    f"bbb reads {_FORMAT!r}"
                )
            self._check_layout(state, path)
            try:
                self._restore(state)
            except (RuntimeError, ValueError, KeyError) as e:  # another architecture, ...
                raise CheckpointError(
                    f"{path} does not fit this Trainer's model, optimizer or ELBO "
                    f"({type(e).__name__}: {e})"
                ) from None
            self._restore_best(best, path)
            self._start_checkpoint = path
            if self.log:
                self.log(f"resumed from {path} (epoch {self.epoch})")
        if self.stopped is not None and not self._round_reset_pending and self.log:
            self.log(f"the run had stopped at epoch {self.epoch} ({self.stopped}): not training on")
        if (self.stopped is None or self._round_reset_pending) and self.epoch < self.epochs:
            # the settings may have changed since the constructor (a new round's loader or
            # scheduler, more epochs): refused before any training (and before the Trainer
            # stops counting as one whose last fit() returned: a continued run refused here
            # is continued by the next fit(), once the setting is fixed)
            self._check_epoch_plan()
            if self._schedule_checked != (self._scheduler, self._scheduler_interval):
                # a scheduler (or interval) assigned since the constructor or the last fit()
                self._warn_one_cycle_per_epoch(stacklevel=4)
        self._fit_returned = False
        if self._round_reset_pending:  # every check passed: the new round starts
            self._round_reset_pending = False
            self._start_new_round()
        if not self.distributed:
            return self._fit_loop()
        # a Ctrl-C / SIGTERM on one rank is held until every rank takes it (at a training
        # step's loss all-reduce, or after an epoch's files): see DeferredStop
        with _dist.DeferredStop() as self._stop:
            try:
                return self._fit_loop()
            finally:
                self._stop = None

    def _fit_loop(self) -> dict[str, Any]:
        stopped_by_callback = False
        per_step = self._scheduler_interval == "step"
        while self.epoch < self.epochs and self.stopped is None:
            # the rates of the epoch's first step, one per parameter group (per epoch: the
            # rates of every step of the epoch)
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            train_stats = self.train_epoch()
            self._check_finite_parameters()  # identical on every rank: no exchange needed
            val = self.validate()
            self.epoch += 1
            if per_step:
                pass  # stepped after every optimizer step (_train_epoch)
            elif isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # the monitored quantity: the selection metric, or the training loss without
                # validation data (the same on every rank: both are shared/reduced)
                self.scheduler.step(val[self.val_metric] if val else train_stats["loss"])
            elif self.scheduler is not None:
                self.scheduler.step()
            improved = False
            if val:
                score = self._score(val)
                if score < self.best_metric:
                    self.best_metric, self.best_epoch, self.bad_epochs = score, self.epoch, 0
                    improved = True
                else:
                    self.bad_epochs += 1
            else:
                self.best_epoch, improved = self.epoch, True
            row: dict[str, Any] = {"epoch": self.epoch, **train_stats}
            row.update({f"val_{k}": v for k, v in val.items()})
            row["lr"] = lrs[0]
            if per_step:  # the rate of the epoch's last step (group 0's)
                row["lr_last"] = self._lr_last
            if len(lrs) > 1:  # each group's (e.g. mu and rho at different rates)
                row["lrs"] = lrs
            with self._collective_errors(f"writing epoch {self.epoch}'s files"):
                self._write_epoch(row, improved)
            if self.log:
                vtxt = f" val_{self.val_metric}={val[self.val_metric]:.4g}" if val else ""
                self.log(
                    f"epoch {self.epoch}/{self.epochs} loss={train_stats['loss']:.4g} "
                    f"nll={train_stats['nll']:.4g} kl={train_stats['kl']:.4g}{vtxt} "
                    f"({train_stats['train_seconds']:.1f}s)"
                )
            if self.epoch_callback is not None:
                why: str | None = None
                # an error raised on one rank is raised on every rank, naming it (the others
                # waited in their next collective until that rank's process ended)
                with self._collective_errors(f"running the epoch callback of epoch {self.epoch}"):
                    try:
                        self.epoch_callback(self.epoch, row)
                    except StopTraining as e:
                        # the caller's decision for this call (a time budget, a sweep's
                        # pruner): not saved, a resumed run trains on
                        why = str(e)
                if self.distributed:
                    # a decision taken on one rank (a wall-clock budget read a moment later
                    # than on the others) stops every rank: a rank training on alone would wait
                    # in its next collective until the timeout
                    why = next((w for w in _dist.gather_object(why) if w is not None), None)
                if why is not None:
                    stopped_by_callback = True
                    if self.log:
                        self.log(f"stopped after epoch {self.epoch}: {why}")
                    break
            if self._stop is not None:  # one held since the epoch's last step: stop here
                self._stop.exchange(self.device, f"after epoch {self.epoch} (saved)")
            if self._patience_ran_out():
                self.stopped = _EARLY
                if self.log:
                    self.log(f"early stopping: no improvement for {self.patience} epochs")
                break
        if self._stop is not None:  # held since the last exchange (a break above skipped it)
            self._stop.exchange(self.device, f"after epoch {self.epoch} (saved)")
        self._fit_returned = True
        # what this fit() trained on: a later fit() on other data must say new_round
        self._fitted_data = (self.train_loader, self.elbo.dataset_size)
        last = self.history[-1] if self.history else {}
        return {
            "epochs_trained": self.epoch,
            "best_epoch": self.best_epoch,
            "best_val": None if not math.isfinite(self.best_metric) else self._unscore(),
            "val_metric": self.val_metric,
            "stopped_early": self.stopped == _EARLY,
            "stopped_by_callback": stopped_by_callback,
            "train_seconds": sum(r.get("train_seconds", 0.0) for r in self.history),
            # the last epoch's training means (a row of metrics.jsonl; a resumed run's rows
            # written by an older version lack kl_weight: None)
            **{f"final_{k}": last.get(k) for k in ("loss", "nll", "kl", "kl_weight")},
        }

    def _collective_errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """:func:`bbb.train.distributed.collective_errors` for a distributed Trainer; nothing
        for one trained by this process alone (``distributed=False`` inside a process group:
        the other ranks take no part, and an exchange with them waited until the timeout)."""
        return _dist.collective_errors(what) if self.distributed else contextlib.nullcontext()

    def _patience_ran_out(self) -> str | None:
        """``"early stopping"`` when the last ``patience`` epochs brought no improvement."""
        return _EARLY if self.patience is not None and self.bad_epochs >= self.patience else None

    def _write_epoch(self, row: dict[str, Any], improved: bool) -> None:
        """Rank 0's files for the finished epoch: metrics line, ``best.pt``, checkpoint.

        A write error (disk full, ...) names the run directory and the last good checkpoint.
        """
        try:
            self._append_metrics(row)
            if self.out_dir is not None and self.is_writer:
                save_checkpoint(self.out_dir / "checkpoints", self.epoch, self._state())
            # best.pt after the checkpoint: a crash or Ctrl-C between the two leaves best.pt one
            # epoch behind, and the checkpoint (which then names its own epoch as the best)
            # holds the new best weights (_restore_best takes them from it). The other order
            # left best.pt ahead, and the checkpoint's best weights overwritten: lost.
            if improved:
                self._save_best()
            if self.out_dir is not None:  # on every rank (rank 0 wrote it)
                self._start_checkpoint = (
                    self.out_dir / "checkpoints" / f"checkpoint-{self.epoch:05d}.pt"
                )
        except OSError as e:
            if self.out_dir is None:
                raise
            last = self._start_checkpoint  # the newest written or resumed from (not a corrupt one)
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint yet"
            raise OSError(
                e.errno,
                f"could not write epoch {self.epoch}'s files in {self.out_dir} "
                f"({e.strerror or e}); {kept}: free disk space, then resume",
            ) from e

    def _unscore(self) -> float:
        v = self.best_metric
        return -v if self.val_metric in ("accuracy", "log_likelihood") else v

    def load_best(self) -> None:
        """Load the best-on-validation weights (model and ELBO, e.g. a learned noise)."""
        if self.best_state is not None:
            _plain_module(self.model).load_state_dict(_plain_state(self.best_state))
        if self.best_elbo_state is not None:
            self.elbo.load_state_dict(self.best_elbo_state)
