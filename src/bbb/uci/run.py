"""``run_uci``: every split of a data set (resumable, in parallel processes); ``run_all``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TrainConfig
from ..data.checksums import MissingDataError, resolve_data_dir
from ..data.uci import UCIDataset, dataset_name, find_uci_datasets
from ..runs import check_device
from ..train.checkpoint import atomic_write_text, strict_json
from .published import format_calibration_table, format_table, published_row
from .report import (
    CALIBRATION_FIELDS,
    SPLIT_FIELDS,
    _chosen,
    _comparable,
    _load_records,
    _plot_splits,
    _plot_tune,
    _split_path,
    _write_csv,
    summarize,
    summarize_calibration,
)
from .search import tune
from .settings import (
    PathLike,
    SearchSpace,
    UCIRunSettings,
    check_uci_settings,
    parse_splits,
    uci_config,
)
from .train import _results_of, run_split


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
    # a device this machine lacks: refused with the way out before anything is written
    check_device(cfg.device, remedy="run on the CPU with --device cpu (device='cpu')")
    st = settings if settings is not None else UCIRunSettings(splits=[])
    check_uci_settings(cfg, tuning=st.tune)  # before any split or worker starts
    chosen_splits = parse_splits(
        splits if splits is not None else (st.splits or None), info.n_splits
    )
    # a copy: the caller's settings keep their own selection (one settings object may serve
    # several data sets, each with its own number of splits)
    st = dataclasses.replace(st, splits=chosen_splits)
    if st.tune and st.search is not None:  # before uci.json is written, not in the search
        bad = [i for i in st.search.splits if i >= info.n_splits]
        if bad:
            raise ConfigError(
                f"search splits {bad} out of range: {info.name} has splits 0..{info.n_splits - 1}"
            )
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
    atomic_write_text(out / "uci.json", strict_json(engine, indent=2, sort_keys=True) + "\n")
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
            atomic_write_text(tune_path, strict_json(result, indent=2) + "\n")
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
        atomic_write_text(_split_path(out, rec["split"]), strict_json(rec, indent=2) + "\n")
        records[rec["split"]] = rec
        log(
            f"{info.name} split {rec['split']}: rmse {rec['rmse']:.4g} ll {rec['ll']:.4g} "
            f"coverage95 {rec['coverage_95']:.3f} ({rec['seconds']:.1f}s)"
        )

    (out / "splits").mkdir(exist_ok=True)
    if st.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(
            max_workers=min(st.jobs, len(todo)), mp_context=mp.get_context("spawn")
        )
        try:
            futures = [
                pool.submit(
                    run_split,
                    dataset.path,
                    s,
                    cfg,
                    test_samples=st.test_samples,
                    passes=st.passes,
                    threads=st.threads,
                    verify=verify,
                )
                for s in todo
            ]
            _results_of(futures, finish)  # a failed split keeps the others' results
        except BaseException:
            # Ctrl-C / SIGTERM: the queued splits are dropped (leaving a `with` block waited
            # for every one of them to train); the finished ones are on disk for --resume
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    else:
        for s in todo:
            finish(
                run_split(
                    dataset.path,
                    s,
                    cfg,
                    test_samples=st.test_samples,
                    passes=st.passes,
                    verify=verify,
                )
            )
    rows = [records[s] for s in chosen_splits]
    _write_csv(out / "splits.csv", rows, extra_keys)
    calibration = summarize_calibration(rows)
    if calibration["missing_splits"]:
        log(
            f"{info.name}: split(s) {calibration['missing_splits']} were recorded before the "
            "calibration metrics existed: their coverage, widths, calibration error and CRPS "
            "are blank (the calibration summary is over the other "
            f"{calibration['n_splits']} split(s)); run them again in a fresh --out to get them"
        )
    metrics = {
        "dataset": info.name,
        **summarize(rows),
        "calibration": calibration,
        "splits": [
            {
                **{k: r[k] for k in (*SPLIT_FIELDS, "noise_std")},
                **{k: r.get(k) for k in CALIBRATION_FIELDS},  # None: recorded before them
            }
            for r in rows
        ],
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
        "se = sample std (ddof=1) / sqrt(n_splits); calibration: see calibration.units",
        "published": published_row(info.name),
    }
    atomic_write_text(out / "metrics.json", strict_json(metrics, indent=2) + "\n")
    _plot_splits(rows, info.name, out / "splits.png")
    return metrics


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
    `uci_config()` and all splits). With ``resume``, the data sets already started in
    ``out_dir/<name>`` (those with a ``uci.json``) are resumed and the others started, so an
    interrupted ``--all`` run continues past the data set it stopped in.
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
        # a data set the interrupted run had not reached yet has nothing to resume: start it
        started = (out / name / "uci.json").is_file()
        results.append(
            run_uci(
                d,
                out / name,
                config=cfg,
                settings=st,
                resume=resume and started,
                verify=verify,
                log=log,
            )
        )
    # the RMSE/LL table unchanged, then the calibration table after a blank line
    table = format_table(results) + "\n" + format_calibration_table(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "summary.json", strict_json(results, indent=2) + "\n")
    return results
