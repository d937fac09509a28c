"""Typed run configuration: defaults, TOML/JSON files, and validation.

One flat dataclass, :class:`TrainConfig`, describes a training run. It is filled from defaults,
then a config file (a TOML file a user writes, or the ``config.json`` a run saved), then
command-line flags (flags win). Unknown keys and out-of-range values are errors that name the
key and list what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._text import read_text
from .elbo import KL_WEIGHTINGS
from .kernels import KERNEL_BACKENDS
from .kl import KL_MODES
from .likelihoods import NOISE_MODELS
from .models import METHODS
from .nn.estimators import ESTIMATORS
from .priors import PRIOR_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    # tomli is installed (a dependency) on Python < 3.11 alone: mypy, which checks as 3.10
    # (pyproject), reaches this line whether it is installed here or not
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["TrainConfig", "load_config_file", "DATASETS", "OPTIMIZERS", "ConfigError"]

DATASETS = ("mnist", "toy", "uci")
OPTIMIZERS = ("adam", "sgd")
#: learning-rate schedules: ``constant``; ``cosine``: lr * (1 + cos(pi * epoch / epochs)) / 2,
#: stepped once per epoch (torch.optim.lr_scheduler.CosineAnnealingLR, down to 0 at the end).
#: With ``lr_warmup_steps`` N > 0 both are laid out in optimizer steps instead: a linear
#: warm-up over the first N steps, then the constant rate, or the cosine decay over the
#: remaining steps (see :func:`bbb.runs.warmup_multiplier`)
LR_SCHEDULES = ("constant", "cosine")
MU_INITS = ("paper", "fan_in")
#: the largest ``seed`` a TrainConfig accepts (see :meth:`TrainConfig.validate`)
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A configuration value or file is invalid (the message names the key)."""


def changed_settings(
    saved: Mapping[str, Any], now: Mapping[str, Any], allowed: Sequence[str] = ()
) -> list[str]:
    """``"key: old -> new"`` for each setting of ``now`` that differs from ``saved``, except the
    ``allowed`` keys (what a resumed run may change)."""
    return [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in allowed and saved.get(k) != v
    ]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run directory)."""

    # data
    dataset: str = "mnist"  # mnist | toy | uci
    data_dir: str | None = (
        None  # root holding mnist/, uci/, mushroom/ (default: BBB_DATA_DIR, ../shared/data)
    )
    uci_path: str | None = None  # a UCI split-format directory (dataset = uci)
    uci_split: int = 0
    # use the first N training examples (quick runs); MNIST also keeps at most the first N
    # validation and test examples, and `bbb evaluate` of the run scores those
    subset: int | None = None
    val_fraction: float = 0.1  # uci: share of the training split held out for validation
    toy_n: int = 300  # toy: number of training points
    # model
    method: str = "bbb"  # bbb | sgd | dropout (deterministic baselines)
    hidden: list[int] = field(default_factory=lambda: [400, 400])
    dropout: float = 0.5
    estimator: str = "local"
    prior: str = "gaussian"  # gaussian | scale_mixture | laplace
    prior_sigma: float = 1.0  # gaussian sigma / laplace scale
    prior_pi: float = 0.5
    prior_sigma1: float = 1.0
    prior_sigma2: float = math.exp(-6)
    kl: str = "auto"
    mu_init: str = "fan_in"
    rho_init: float = -5.0
    # objective
    noise: str = "learned"  # regression likelihood: fixed | learned | heteroscedastic
    noise_sigma: float = 1.0
    kl_weighting: str = "uniform"
    kl_scale: float = 1.0
    kl_anneal_steps: int = 0  # linear KL warm-up over this many steps (0: none)
    num_samples: int = 1
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (over `epochs`, stepped per epoch)
    # linear learning-rate warm-up over the first N optimizer steps, then lr_schedule laid
    # out in optimizer steps (0: none, lr_schedule stepped per epoch as before); N must be
    # smaller than the run's total steps (epochs x steps per epoch)
    lr_warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0  # for the deterministic baselines
    batch_size: int = 128
    epochs: int = 10
    # optimizer steps per epoch (None: one pass over the training set, ceil(N / batch_size)
    # steps); more steps than one pass train several passes per epoch (a tiny data set),
    # fewer cut the epoch short. With kl_weighting blundell: a multiple of the steps per pass
    steps_per_epoch: int | None = None
    patience: int | None = None
    grad_clip: float | None = None
    seed: int = 0
    val_samples: int = 10
    device: str = "cpu"
    # bbb.kernels backend for the sample's and the KL's elementwise work: eager | compile
    # (torch.compile) | native (C kernels and noise, float32 on CPU); compile and native fall
    # back to eager with a warning where they cannot be built
    kernels: str = "eager"

    def validate(
        self, *, check_applicable: bool = True, given: Collection[str] = ()
    ) -> TrainConfig:
        """Check every field; raise :class:`ConfigError` naming the key and accepted values.

        ``check_applicable=False`` skips the refusal of settings the run never reads
        (:meth:`unused_settings`): for the ``config.json`` of a run that has already trained
        (evaluated, pruned or resumed), which versions before that check could write with
        such settings, ignored then as they would be now. ``given``: the keys the user set
        explicitly (the command line's flags), refused when the run never reads them even
        at their default value (``--noise-sigma 1`` for MNIST).
        """
        self._check_types()
        choices = {
            "dataset": DATASETS,
            "method": METHODS,
            "estimator": ESTIMATORS,
            "prior": PRIOR_NAMES,
            "kl": KL_MODES,
            "mu_init": MU_INITS,
            "noise": NOISE_MODELS,
            "kl_weighting": KL_WEIGHTINGS,
            "optimizer": OPTIMIZERS,
            "lr_schedule": LR_SCHEDULES,
            "kernels": KERNEL_BACKENDS,
        }
        for key, accepted in choices.items():
            value = getattr(self, key)
            if value not in accepted:
                raise ConfigError(
                    f"unknown {key} {value!r}; accepted values: {', '.join(accepted)}"
                )
        positive_int = ["batch_size", "epochs", "num_samples", "val_samples", "toy_n"]
        for key in positive_int:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")
        for key in ("subset", "patience", "steps_per_epoch"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be a positive integer or unset, got {v!r}")
        for key in ("lr", "prior_sigma", "prior_sigma1", "prior_sigma2", "noise_sigma"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{key} must be a finite positive number, got {v!r}")
        if not 0 < self.prior_pi < 1:
            raise ConfigError(f"prior_pi must lie in (0, 1), got {self.prior_pi!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(
                "lr_warmup_steps must be a non-negative integer (optimizer steps of the linear "
                f"warm-up; 0: none), got {self.lr_warmup_steps!r}"
            )
        for key in ("kl_scale", "kl_anneal_steps", "weight_decay", "momentum"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.optimizer == "sgd" and self.momentum >= 1:
            # SGD's velocity v = momentum * v + g then never decays (1) or grows geometrically
            # (only SGD reads it: a saved Adam run's unused value is no reason to refuse it)
            raise ConfigError(
                f"momentum must lie in [0, 1) (e.g. 0.9: a typo such as 9 makes SGD diverge), "
                f"got {self.momentum!r}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or unset, got {self.grad_clip!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.seed > MAX_SEED:
            # torch's generators take seeds below 2**64 (a larger one failed with "Overflow
            # when unpacking long long"), and a DistributedSampler seeds its shuffle with
            # seed + epoch: 2**63 - 1 leaves room for any number of epochs
            raise ConfigError(f"seed must be at most 2**63 - 1, got {self.seed!r}")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(
                f"hidden must be a non-empty list of positive integers, got {self.hidden!r}"
            )
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v!r}")
        if self.uci_split < 0:
            raise ConfigError(f"uci_split must be >= 0, got {self.uci_split!r}")
        try:
            import torch

            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"device {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
            ) from None
        if self.dataset == "uci" and not self.uci_path:
            raise ConfigError("dataset 'uci' needs uci_path (a directory in the UCI split format)")
        # settings that would be silently ignored
        if self.dataset != "uci" and self.uci_path:
            raise ConfigError(
                f"uci_path applies to dataset 'uci' only (dataset is {self.dataset!r})"
            )
        if self.dataset == "toy" and self.subset is not None:
            raise ConfigError("subset does not apply to dataset 'toy'; set toy_n instead")
        if check_applicable:
            self._check_applicable(given)
        if self.dataset == "uci" and self.val_fraction == 0 and self.patience is not None:
            raise ConfigError(
                "patience needs a validation split (early stopping watches it); val_fraction is 0"
            )
        return self

    def unused_settings(self, given: Collection[str] = ()) -> dict[str, str]:
        """Settings changed from their defaults, or named in ``given`` (set explicitly), that
        the chosen dataset, method or optimizer never reads: ``{key: where it applies}``
        (empty when there are none)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        bbb_only = [
            "estimator", "prior", "prior_sigma", "prior_pi", "prior_sigma1", "prior_sigma2",
            "kl", "mu_init", "rho_init", "kl_weighting", "kl_scale", "kl_anneal_steps",
            "num_samples", "val_samples",
        ]  # fmt: skip
        groups = [
            (self.dataset != "toy", ["toy_n"], "dataset 'toy' only"),
            (self.dataset != "uci", ["uci_split", "val_fraction"], "dataset 'uci' only"),
            (self.dataset == "mnist", ["noise", "noise_sigma"], "regression (toy, uci) only"),
            (self.method != "bbb", bbb_only, "method 'bbb' only"),
            (self.method != "dropout", ["dropout"], "method 'dropout' only"),
            (self.optimizer != "sgd", ["momentum"], "optimizer 'sgd' only"),
        ]
        return {
            key: where
            for applies, keys, where in groups
            if applies
            for key in keys
            if getattr(self, key) != defaults[key] or key in given
        }

    def _check_applicable(self, given: Collection[str] = ()) -> None:
        """:meth:`unused_settings` is an error naming each (they were ignored silently)."""
        unused = self.unused_settings(given)
        if unused:
            listed = "; ".join(f"{k}={getattr(self, k)!r} ({w})" for k, w in unused.items())
            raise ConfigError(
                f"setting(s) that do not apply here (dataset {self.dataset!r}, method "
                f"{self.method!r}, optimizer {self.optimizer!r}) and would be ignored: {listed}"
            )

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type (a config file can hold anything)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected, optional, is_list = _field_kind(hints[f.name])
            if value is None and optional:
                continue
            if is_list:
                ok = isinstance(value, list) and all(_is_a(v, expected) for v in value)
            else:
                ok = _is_a(value, expected)
            if not ok:
                what = _KIND_NAMES[expected]
                what = (
                    f"a list of {what}s"
                    if is_list
                    else f"{'an' if what == 'integer' else 'a'} {what}"
                )
                raise ConfigError(
                    f"{f.name} must be {what}{' or unset' if optional else ''}, got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .train.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys are an error naming them and the valid keys."""
        names = cls.field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}"
            )
        cfg = cls(**values)
        return cfg


_KIND_NAMES = {int: "integer", float: "number", str: "string"}


def _field_kind(tp: Any) -> tuple[type, bool, bool]:
    """(element type, optional, is a list) of a TrainConfig annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _is_a(value: Any, expected: type) -> bool:
    if isinstance(value, bool):  # True is an int to Python, not to a config file
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def anchored_uci_path(path: str) -> str:
    """``uci_path`` as a run saves it in ``config.json``, readable from any working directory.

    A path that leads to a directory from the current working directory is made absolute
    (``~`` expanded, symbolic links kept); a bare name that is no directory here (looked up
    under ``DATA_DIR/uci`` by :func:`bbb.data.load_uci`, so ``--data-dir`` can point
    elsewhere later) and a path that leads nowhere (refused when the data is loaded) are
    returned as written.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return os.path.abspath(p) if p.is_dir() else path


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (``.json``, e.g. a run's ``config.json``) config file.

    A TOML file may put the keys at the top level or under a ``[train]`` table. Returns the raw
    mapping (validated by :meth:`TrainConfig.from_dict`).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}")
    text = read_text(path, ConfigError, what="config file")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"config file {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {e}"
        ) from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of keys")
    if "train" in data and isinstance(data["train"], dict):
        # settings outside the [train] table would be dropped silently (other tables, such
        # as a sweep's [search] or bbb uci's [uci], are for other readers)
        outside = sorted(k for k, v in data.items() if k != "train" and not isinstance(v, dict))
        if outside:
            raise ConfigError(
                f"config file {path}: key(s) {', '.join(outside)} at the top level beside a "
                "[train] table would be ignored; put every setting under [train] (or none: "
                "all at the top level)"
            )
        data = data["train"]
    return data
