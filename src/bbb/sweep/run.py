"""``run_sweep``: create or join a study and run its workers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .space import DEFAULT_DB, SPACE_COPY, SWEEP_FILE, TRIALS_DIR, SweepError, load_space
from .storage import (
    _default_storage,
    _has_password,
    _import_optuna,
    _masked,
    _open_study,
    _resolve_sampler,
    open_storage,
)
from .worker import _is_duplicate, _Worker


@dataclass
class SweepOptions:
    """Options of ``bbb sweep SPACE``."""

    space: Path
    out: Path
    trials: int | None = None
    workers: int = 1
    storage: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    study_name: str = "bbb-sweep"
    heartbeat: int = 60
    verbose: bool = False
    trial_plots: bool = True
    worker_id: int | None = None  # set in the processes that --workers starts


def _saved_info(out: Path) -> dict[str, Any]:
    path = out / SWEEP_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON: {e}") from e
    return info if isinstance(info, dict) else {}


def _storage_url(out: Path, given: str | None, info: dict[str, Any]) -> str:
    """``--storage``, else the one the sweep directory recorded, else its SQLite file."""
    if given:
        return given
    saved = info.get("storage")
    if saved is None:
        return _default_storage(out)
    if info.get("storage_password"):
        raise SweepError(
            f"the study storage of {out} ({saved}) needs a password: pass --storage URL"
        )
    return str(saved)


def _check_same_study(out: Path, info: dict[str, Any], study_name: str, url: str) -> None:
    """Refuse a second study in a sweep directory that holds another study's trials.

    Trial run directories are named by trial number alone (``trials/trial-NNNN``) and each
    study numbers its trials from 0: another ``--study-name`` (or ``--storage``) in the same
    ``--out`` deleted the first study's run directories one by one as its own trials reused
    the numbers, and overwrote ``sweep.json``, so ``show``/``best`` found the new study only.
    """
    trials = out / TRIALS_DIR
    if not info or not trials.is_dir() or not any(trials.iterdir()):
        return
    recorded = info.get("study_name", study_name)
    stored = None if url == _default_storage(out) else _masked(url)
    if recorded == study_name and info.get("storage") == stored:
        return
    where = info.get("storage") or str(out / DEFAULT_DB)
    raise SweepError(
        f"{out} holds the trials of study {recorded!r} in {where}; study {study_name!r} in "
        f"{stored or out / DEFAULT_DB} would overwrite their run directories ({TRIALS_DIR}/"
        "trial-NNNN): give it another --out"
    )


def run_sweep(opts: SweepOptions) -> int:
    """``bbb sweep SPACE --out DIR``: create or join the study, run workers; exit status."""
    _import_optuna()
    space = load_space(opts.space)
    if opts.workers < 1:
        raise SweepError(f"--workers must be >= 1, got {opts.workers}")
    if opts.heartbeat < 1:
        raise SweepError(f"--heartbeat must be >= 1 second, got {opts.heartbeat}")
    sampler = _resolve_sampler(opts.sampler or space.sampler, space)
    pruner = opts.pruner or space.pruner
    # --trials 0 is a budget to refuse below, not "no --trials" (it ran the whole grid)
    n_trials = opts.trials if opts.trials is not None else space.trials
    if sampler != "grid" and n_trials is None:
        raise SweepError(
            "the space has ranges or lists: give a budget with --trials N (or trials = N in "
            "[sweep])"
        )
    if n_trials is not None and n_trials < 1:
        raise SweepError(f"--trials must be >= 1, got {n_trials}")
    notes: list[str] = []
    if opts.worker_id is None:
        # refused before anything is written or any trial starts (the processes --workers
        # starts were checked by this one)
        notes = space.check_step_plans()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    info = _saved_info(out)
    url = _storage_url(out, opts.storage, info)
    _check_same_study(out, info, opts.study_name, url)
    storage = open_storage(url, opts.heartbeat)
    study = _open_study(space, storage, opts.study_name, sampler, pruner, create=True)
    if opts.worker_id is None:
        from ..train.checkpoint import atomic_write_text

        masked = _masked(url)
        record = {
            "study_name": opts.study_name,
            "storage": None if url == _default_storage(out) else masked,
            "storage_password": _has_password(url),
            "space": SPACE_COPY,
            "metric": space.metric,
            "direction": space.direction,
        }
        atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
        if not (out / SPACE_COPY).exists() or opts.space.resolve() != (out / SPACE_COPY).resolve():
            atomic_write_text(out / SPACE_COPY, space.raw_text)
        what = (
            f"grid of {len(space.grid_points())} points"
            if sampler == "grid"
            else f"{n_trials} trials"
        )
        print(
            f"study {opts.study_name!r} in {_masked(url)}: {what}, sampler {sampler}, pruner "
            f"{pruner}, objective val_{space.metric} ({space.direction})",
            flush=True,
        )
        for note in notes:
            print(f"note: {note}", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    worker_id = opts.worker_id
    if opts.workers > 1 and worker_id is None:  # this process is worker 0, the others start
        procs = _spawn_workers(opts, url, sampler, pruner, n_trials)
        worker_id = 0
    if opts.workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    worker = _Worker(
        space,
        study,
        out,
        sampler,
        n_trials,
        poll=min(2.0, opts.heartbeat / 2),
        prefix="" if worker_id is None else f"[worker {worker_id}] ",
        verbose=opts.verbose,
        trial_plots=opts.trial_plots,
    )
    try:
        worker.run()
        if worker_id is not None:
            worker.say(f"done ({worker.ran} trial(s) run here)")
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            p.wait()
        raise
    if opts.worker_id is None:
        _print_counts(study)
        print(f"see the results: bbb sweep show {out}", flush=True)
    bad = [i + 1 for i, c in enumerate(codes) if c != 0]
    if bad:
        raise SweepError(f"worker process(es) {bad} exited with an error (see above)")
    if opts.worker_id is None:
        _check_some_trial_completed(study)
    return 0


def _check_some_trial_completed(study: Any) -> None:
    """A study whose trials all failed is an error (exit 1), not a finished sweep: it has no
    best trial, and a script that checks the exit status would carry on with nothing."""
    import optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    failed = sum(s == optuna.trial.TrialState.FAIL for s in states)
    if failed and not any(s == optuna.trial.TrialState.COMPLETE for s in states):
        raise SweepError(
            f"no trial completed: {failed} of {len(states)} failed (each error is printed above "
            "and in the error column of report/trials.csv written by bbb sweep show)"
        )


def _spawn_workers(
    opts: SweepOptions, url: str, sampler: str, pruner: str, n_trials: int | None
) -> list[subprocess.Popen[bytes]]:
    """Start worker processes 1 .. ``opts.workers - 1`` on this machine (this one is 0)."""
    base = [
        sys.executable,
        "-m",
        "bbb",
        "sweep",
        str(opts.space),
        "--out",
        str(opts.out),
        "--workers",
        str(opts.workers),
        "--sampler",
        sampler,
        "--pruner",
        pruner,
        "--study-name",
        opts.study_name,
        "--heartbeat",
        str(opts.heartbeat),
    ]
    if n_trials is not None:
        base += ["--trials", str(n_trials)]
    if opts.verbose:
        base.append("--verbose")
    if not opts.trial_plots:
        base.append("--no-trial-plots")
    env = {**os.environ, "BBB_SWEEP_STORAGE": url}  # not on the command line (a password)
    return [
        subprocess.Popen([*base, "--worker-id", str(i)], env=env) for i in range(1, opts.workers)
    ]


def _print_counts(study: Any) -> None:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = "duplicate" if _is_duplicate(t) else t.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"study {study.study_name!r}: {sum(counts.values())} trials ({text})", flush=True)
