"""A worker: asks the study for a trial, trains it with ``bbb train``, reports it."""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import anchored_uci_path
from .space import _DUPLICATE, TRIALS_DIR, Space, SweepError, _DuplicateTrial
from .storage import _import_optuna, _retry_callback


def _is_duplicate(t: Any) -> bool:
    return _DUPLICATE in t.user_attrs


def _prune_due(trial: Any, epoch: int, epochs: int) -> bool:
    """Whether the pruner stops ``trial`` after ``epoch`` (1-based) of ``epochs``.

    Never after the last epoch: the training is done by then, and pruning it would only turn a
    finished trial into a PRUNED one that ``show`` and ``best`` leave out.
    """
    return epoch < epochs and bool(trial.should_prune())


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
            # set by the objective once it runs: a Ctrl-C before that (while the sampler
            # chooses) must not re-queue the previous trial, which may have failed with an error
            self.current = None
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
        from ..runs import train_run
        from ..train.checkpoint import atomic_write_text, strict_json
        from ..train.trainer import StopTraining

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
            recorded = cfg.to_dict()
            if recorded.get("uci_path"):
                # as the trial's config.json holds it (see bbb.runs.train_run): a path relative
                # to this working directory made absolute, so `bbb sweep best`'s TOML works
                # from any directory (it printed the relative path as written)
                recorded["uci_path"] = anchored_uci_path(recorded["uci_path"])
            trial.set_user_attr("config", recorded)
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
                best["last"] = value
                # a NaN or infinite metric is never the best epoch (a trial whose every epoch
                # was NaN returned inf: a COMPLETE trial, the best one when no other finished)
                if math.isfinite(value) and sign * value < best["value"]:
                    best.update(value=sign * value, epoch=epoch)
                trial.report(value, epoch)
                if _prune_due(trial, epoch, cfg.epochs):
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
            if best["epoch"] == 0:
                raise SweepError(
                    f"{key} was not finite in any of the {summary['epochs_trained']} epoch(s) "
                    f"(last: {best.get('last')}): the trial has no score"
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
        # atomic (temporary file + rename): a worker killed mid-write leaves no half file
        atomic_write_text(run_dir / "trial.json", strict_json(info, indent=2) + "\n")
        self.say(
            f"trial {trial.number} {state.lower()}: {key}={value:.6g} (epoch {best['epoch']} "
            f"of {summary['epochs_trained']})"
        )
        if pruned:
            raise optuna.TrialPruned()
        return value
