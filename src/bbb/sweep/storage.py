"""Optuna storage (SQLite or PostgreSQL), samplers, pruners and the study."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .space import DEFAULT_DB, MAX_RETRY, Space, SweepError


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

        # optuna is the lazily imported module, a local variable (Any) that mypy cannot use
        # as a base class
        class _SweepGridSampler(optuna.samplers.GridSampler):  # type: ignore[name-defined]
            """GridSampler; the worker loop, not ``after_trial``, decides when to stop."""

            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                return None

        return _SweepGridSampler({p.optuna_name: p.encoded_values() for p in space.params})
    if name == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


#: Epochs of a trial that the median pruner never stops after (a slow first epoch is not a bad
#: setting).
WARMUP_EPOCHS = 1


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
    # A trial reports its validation metric as step = epoch, from 1 (the worker's
    # trial.report(value, epoch)), and Optuna prunes at any step >= n_warmup_steps, counting
    # from 0: n_warmup_steps=1 was the default's behaviour, pruning on the first, noisiest
    # epoch. The first WARMUP_EPOCHS epochs are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=WARMUP_EPOCHS + 1)


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
            "run the changed space with another --out (with a shared --storage, also another "
            "--study-name)"
        )
    return study
