"""Results of a sweep: the table of best trials, plots, importances, the best config."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .run import _saved_info, _storage_url
from .space import REPORT_DIR, SWEEP_FILE, SweepError
from .storage import _import_optuna, _masked, open_storage
from .worker import _is_duplicate


def _load_finished(out: Path, storage: str | None, study_name: str | None) -> tuple[Any, str]:
    """The study of a sweep directory and its metric name, for ``show`` and ``best``."""
    optuna = _import_optuna()
    info = _saved_info(out)
    if not info and storage is None:
        raise SweepError(f"{out} is not a sweep directory: {out / SWEEP_FILE} is missing")
    url = _storage_url(out, storage, info)
    name = study_name or info.get("study_name", "bbb-sweep")
    st = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        raise SweepError(f"no study named {name!r} in {_masked(url)}") from None
    metric = study.user_attrs.get("bbb_metric") or info.get("metric", "objective")
    return study, str(metric)


def _sorted_complete(study: Any) -> list[Any]:
    optuna = _import_optuna()
    done = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: (t.value if not reverse else -t.value, t.number))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def show_sweep(
    out: Path,
    *,
    top: int = 10,
    storage: str | None = None,
    study_name: str | None = None,
    plots: bool = True,
) -> str:
    """Print (return) the best trials as a table; write ``report/`` (CSV and PNG plots)."""
    study, metric = _load_finished(out, storage, study_name)
    trials = study.get_trials(deepcopy=False)
    best = _sorted_complete(study)
    names: list[str] = []
    for t in trials:
        names += [n for n in t.params if n not in names]
    key = f"val_{metric}"
    header = ["rank", "trial", key, "epoch", *names, "run_dir"]
    rows = [header]
    for rank, t in enumerate(best[:top], 1):
        rows.append(
            [
                str(rank),
                str(t.number),
                _fmt(t.value),
                str(t.user_attrs.get("best_epoch", "")),
                *[_fmt(t.params.get(n, "")) for n in names],
                str(t.user_attrs.get("run_dir", "")),
            ]
        )
    counts: dict[str, int] = {}
    for t in trials:
        s = "duplicate" if _is_duplicate(t) else t.state.name.lower()
        counts[s] = counts.get(s, 0) + 1
    text = [
        f"study {study.study_name!r}: {len(trials)} trials ("
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"); objective {key} ({study.direction.name.lower()})",
    ]
    text.append(_table(rows) if len(rows) > 1 else "no finished trial yet")
    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    with open(report / "trials.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", key, "best_epoch", *names, "run_dir", "host", "error"])
        for t in trials:
            state = "DUPLICATE" if _is_duplicate(t) else t.state.name
            w.writerow(
                [
                    t.number,
                    state,
                    "" if t.value is None else t.value,
                    t.user_attrs.get("best_epoch", ""),
                    *[t.params.get(n, "") for n in names],
                    t.user_attrs.get("run_dir", ""),
                    t.user_attrs.get("host", ""),
                    t.user_attrs.get("error", ""),
                ]
            )
    (report / "best_trials.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    written = [report / "trials.csv", report / "best_trials.txt"]
    if plots:
        written += _plots(study, key, report, text)
    text.append("written: " + ", ".join(str(p) for p in written))
    return "\n".join(text)


def _plots(study: Any, key: str, report: Path, notes: list[str]) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written: list[Path] = []
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("history.png", lambda: ovm.plot_optimization_history(study, target_name=key)),
        ("importances.png", lambda: ovm.plot_param_importances(study, target_name=key)),
        ("parallel_coordinates.png", lambda: ovm.plot_parallel_coordinate(study, target_name=key)),
    ]
    for name, make in jobs:
        path = report / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        except Exception as e:  # noqa: BLE001 - too few trials, a missing optional package...
            plt.close("all")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if name != "importances.png":
                notes.append(f"{name} skipped: {reason}")
                continue
            fig = _fallback_importances(study, key, reason)
            if fig is None:
                notes.append(f"{name} skipped: {reason}")
                continue
            notes.append(
                f"{name}: Optuna's importance evaluator failed ({reason}); wrote the "
                "|Spearman rank correlation| fallback"
            )
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _fallback_importances(study: Any, key: str, reason: str) -> Any:
    """A clearly labelled |Spearman rank correlation| bar chart (no extra packages)."""
    import matplotlib.pyplot as plt

    done = _sorted_complete(study)
    if len(done) < 2:
        return None
    names = sorted({n for t in done for n in t.params})
    y = _ranks([float(t.value) for t in done])
    scores = []
    for n in names:
        raw = [t.params.get(n) for t in done]
        if all(isinstance(v, (int, float)) for v in raw):
            xs = [float(v) for v in raw]
        else:
            levels = sorted({json.dumps(v) for v in raw})
            xs = [float(levels.index(json.dumps(v))) for v in raw]
        r = _ranks(xs)
        mr, my = sum(r) / len(r), sum(y) / len(y)
        cov = sum((a - mr) * (b - my) for a, b in zip(r, y, strict=True))
        var = math.sqrt(sum((a - mr) ** 2 for a in r) * sum((b - my) ** 2 for b in y))
        scores.append(abs(cov / var) if var > 0 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(names)))
    ax.barh(names, scores)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"|Spearman rank correlation| with {key}")
    ax.set_title(
        f"Parameter importance (fallback)\nOptuna's evaluator failed: {reason[:70]}", fontsize=9
    )
    return fig


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise SweepError(f"cannot write {v!r} as TOML")


def best_config_toml(
    out: Path, *, storage: str | None = None, study_name: str | None = None
) -> str:
    """The best trial's configuration as TOML (top-level TrainConfig keys; unset keys left out)."""
    study, metric = _load_finished(out, storage, study_name)
    done = _sorted_complete(study)
    if not done:
        raise SweepError(f"no finished trial yet in study {study.study_name!r}")
    t = done[0]
    cfg = t.user_attrs.get("config")
    if cfg is None:
        path = out / str(t.user_attrs.get("run_dir", "")) / "config.json"
        if not path.is_file():
            raise SweepError(f"trial {t.number} has no recorded config and {path} is missing")
        cfg = json.loads(path.read_text())
    lines = [
        f"# best trial {t.number} of study {study.study_name!r}: val_{metric} = {t.value:.6g} "
        f"(epoch {t.user_attrs.get('best_epoch', '?')} of {t.user_attrs.get('epochs_trained', '?')})",
        "# searched: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in t.params.items()),
        f"# run directory: {out / str(t.user_attrs.get('run_dir', ''))}",
        "# use: bbb train --config THIS_FILE",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if v is not None]
    return "\n".join(lines) + "\n"
