"""A data set's records and results: per-split files, the CSV, the plots, the summary."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig
from ..train.checkpoint import atomic_write_text
from .published import published_row, standard_error

SPLIT_FIELDS = ("split", "rmse", "ll", "epochs", "seconds")

#: Nominal levels of the central predictive intervals whose test coverage and mean width each
#: split records (`bbb.metrics.DEFAULT_COVERAGE_LEVELS`).
CALIBRATION_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)


def coverage_key(level: float) -> str:
    """Record key of the test coverage at nominal ``level``: ``coverage_95`` for 0.95."""
    return f"coverage_{round(100.0 * level, 6):g}"


def width_key(level: float) -> str:
    """Record key of the mean central-interval width at ``level`` (original units):
    ``width_95`` for 0.95."""
    return f"width_{round(100.0 * level, 6):g}"


#: A split record's calibration fields (`bbb.uci.train.calibration_metrics`), in CSV order:
#: coverage fractions, mean interval widths (original units), the calibration curve's mean
#: absolute and root-mean-square deviation (fractions), CRPS (original units). A record
#: written before these existed lacks them (None in ``metrics.json``, blank in the CSV).
CALIBRATION_FIELDS: tuple[str, ...] = (
    *(coverage_key(a) for a in CALIBRATION_LEVELS),
    *(width_key(a) for a in CALIBRATION_LEVELS),
    "calibration_error",
    "calibration_rmse",
    "crps",
)


def _split_path(out: Path, split: int) -> Path:
    return out / "splits" / f"split_{split}.json"


def _load_records(out: Path) -> dict[int, dict[str, Any]]:
    """The finished splits of the run in ``out``: split index -> its ``split_<i>.json`` record.

    A file that is not JSON (cannot happen with atomic writes) counts as unfinished; one
    that is JSON but not a split record raises ConfigError naming the file and the fault.
    Files not named ``split_<index>.json`` are not this engine's and are left alone.
    """
    records = {}
    folder = out / "splits"
    if folder.is_dir():
        for p in sorted(folder.glob("split_*.json")):
            name = _SPLIT_FILE.fullmatch(p.name)
            if name is None:
                continue
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # cannot happen with atomic writes; treat as unfinished
            if isinstance(rec, dict):  # a non-finite metric is written as null (strict JSON)
                for key in ("rmse", "ll"):
                    if key in rec and rec[key] is None:
                        rec[key] = math.nan
                for key in CALIBRATION_FIELDS:
                    if key in rec and rec[key] is None:
                        rec[key] = math.nan  # present but non-finite, unlike a missing key
            problem = _record_problem(rec, int(name.group(1)))
            if problem is not None:
                raise ConfigError(
                    f"{p} is not a split record ({problem}); delete it to train that split "
                    "again on --resume, or use another --out"
                )
            records[rec["split"]] = rec
    return records


_SPLIT_FILE = re.compile(r"split_(\d+)\.json", re.ASCII)


def _record_problem(rec: Any, index: int) -> str | None:
    """What makes ``rec`` (read from ``split_<index>.json``) not a split record, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in (*SPLIT_FIELDS, "noise_std", "settings") if k not in rec]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    split = rec["split"]
    if isinstance(split, bool) or not isinstance(split, int) or split != index:
        return f"its split is {split!r}, the file name says {index}"
    for key in ("rmse", "ll", "seconds"):
        value = rec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is {value!r}, not a number"
    if isinstance(rec["epochs"], bool) or not isinstance(rec["epochs"], int):
        return f"epochs is {rec['epochs']!r}, not an integer"
    if not isinstance(rec["settings"], dict):
        return f"settings is {rec['settings']!r}, not an object"
    for key in CALIBRATION_FIELDS:  # optional: records written before they existed lack them
        value = rec.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is {value!r}, not a number"
    return None


def has_calibration(rec: dict[str, Any]) -> bool:
    """Whether a split record holds every calibration field (one written before they
    existed, by an earlier version of the engine, holds none)."""
    return all(k in rec for k in CALIBRATION_FIELDS)


def _comparable(value: Any, key: str) -> Any:
    """An engine setting as compared on --resume: the data-set location may be spelled
    differently (a name, a relative or an absolute path), so it is left out."""
    if key == "path":
        return None
    if key == "requested_config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "uci_path"}
    return value


def _chosen(cfg: TrainConfig, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in keys}


def _write_csv(path: Path, rows: list[dict[str, Any]], extra: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # the calibration columns come last: the earlier columns keep their positions
    writer.writerow([*SPLIT_FIELDS, "noise_std", *extra, *CALIBRATION_FIELDS])
    for r in rows:
        noise = "" if r.get("noise_std") is None else f"{r['noise_std']:.6g}"
        # blank: a split recorded before the calibration fields existed
        calibration = ["" if r.get(k) is None else f"{r[k]:.6g}" for k in CALIBRATION_FIELDS]
        writer.writerow(
            [
                r["split"],
                f"{r['rmse']:.6g}",
                f"{r['ll']:.6g}",
                r["epochs"],
                f"{r['seconds']:.2f}",
                noise,
                *(r["settings"].get(k, "") for k in extra),
                *calibration,
            ]
        )
    atomic_write_text(path, buf.getvalue())


def _plot_splits(rows: list[dict[str, Any]], name: str, path: Path) -> None:
    from ..plots import figure

    splits = [r["split"] for r in rows]
    fig = figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, label in ((ax1, "rmse", "test RMSE"), (ax2, "ll", "test log-likelihood")):
        vals = [r[key] for r in rows]
        ax.bar(splits, vals, color="C0" if key == "rmse" else "C1")
        mean = sum(vals) / len(vals)
        ax.axhline(mean, color="k", lw=1, ls="--", label=f"mean {mean:.3f}")
        pub = published_row(name)
        if pub is not None:
            ax.axhline(pub["PBP"][0 if key == "rmse" else 1], color="C3", lw=1, ls=":", label="PBP")
        ax.set_xlabel("split")
        ax.set_title(f"{name}: {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_tune(result: dict[str, Any], path: Path) -> None:
    """Validation curves of the search's grid points and the chosen epoch count.

    A grid point that diverged has no curve (only ``diverged_on_splits``): it is listed in
    the legend as diverged instead of plotted.
    """
    from ..plots import figure

    fig = figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for p in result["points"]:
        if "curve_ll" not in p:  # diverged on some search split: nothing to draw
            ax.plot([], [], ls="none", label=f"{p['overrides']}: diverged")
            continue
        ax.plot(p["curve_epochs"], p["curve_ll"], label=str(p["overrides"]), lw=1)
    ax.axvline(result["chosen"]["epochs"], color="k", ls="--", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation log-likelihood")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and standard errors (``std/sqrt(n)``, ddof=1) of ``rmse`` and ``ll`` over rows."""
    rmse = [r["rmse"] for r in rows]
    ll = [r["ll"] for r in rows]
    n = len(rows)
    return {
        "n_splits": n,
        "rmse_mean": sum(rmse) / n,
        "rmse_se": standard_error(rmse),
        "ll_mean": sum(ll) / n,
        "ll_se": standard_error(ll),
    }


def summarize_calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and standard errors over splits of every calibration field.

    Only the splits whose records hold the calibration fields count (a run resumed from
    splits written by an earlier engine version lacks them for those splits): ``n_splits``
    says how many, ``missing_splits`` lists the others. For each field ``f`` of
    :data:`CALIBRATION_FIELDS`: ``f_mean`` and ``f_se`` (``std / sqrt(n)``, ddof=1; None for
    fewer than 2 splits; both None when no split has the field). ``levels``: the nominal
    interval levels; ``units``: what each field measures.
    """
    have = [r for r in rows if has_calibration(r)]
    out: dict[str, Any] = {
        "n_splits": len(have),
        "missing_splits": [r["split"] for r in rows if not has_calibration(r)],
        "levels": list(CALIBRATION_LEVELS),
    }
    for key in CALIBRATION_FIELDS:
        values = [float(r[key]) for r in have]
        out[f"{key}_mean"] = sum(values) / len(values) if values else None
        out[f"{key}_se"] = standard_error(values)
    out["units"] = (
        "coverage_<100a>: fraction of test targets inside the central a-interval of the "
        "mixture predictive (exact quantiles); width_<100a>: its mean width, original units; "
        "calibration_error / calibration_rmse: mean absolute / root-mean-square deviation of "
        "the calibration curve (Kuleshov et al. 2018; 99-point grid) from the diagonal, "
        "fractions; crps: mean CRPS, original units; se = sample std (ddof=1) / sqrt(n_splits)"
    )
    return out
