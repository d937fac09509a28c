"""Published results of the UCI benchmark and the markdown table beside ours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: Published test RMSE / log-likelihood (mean over splits), in original units. Sources:
#: PBP and VI (Graves 2011, as run by the PBP authors): Hernandez-Lobato & Adams (2015);
#: MC dropout: Gal & Ghahramani (2016); deep ensembles: Lakshminarayanan et al. (2017).
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "boston": {
        "PBP": (3.01, -2.57),
        "MC dropout": (2.97, -2.46),
        "Deep ens.": (3.28, -2.41),
        "VI (Graves)": (4.32, -2.90),
    },
    "concrete": {
        "PBP": (5.67, -3.16),
        "MC dropout": (5.23, -3.04),
        "Deep ens.": (6.03, -3.06),
        # 7.128 in the PBP paper's RMSE table; Gal & Ghahramani (2016) reprint it as 7.19
        "VI (Graves)": (7.13, -3.39),
    },
    "energy": {
        "PBP": (1.80, -2.04),
        "MC dropout": (1.66, -1.99),
        "Deep ens.": (2.09, -1.38),
        "VI (Graves)": (2.65, -2.39),
    },
    "kin8nm": {
        "PBP": (0.10, 0.90),
        "MC dropout": (0.10, 0.95),
        "Deep ens.": (0.09, 1.20),
        "VI (Graves)": (0.10, 0.90),
    },
    "power": {
        "PBP": (4.12, -2.84),
        "MC dropout": (4.02, -2.80),
        "Deep ens.": (4.11, -2.79),
        "VI (Graves)": (4.33, -2.89),
    },
    "wine": {
        "PBP": (0.64, -0.97),
        "MC dropout": (0.62, -0.93),
        "Deep ens.": (0.64, -0.94),
        "VI (Graves)": (0.65, -0.98),
    },
}
PUBLISHED_METHODS = ("PBP", "MC dropout", "Deep ens.", "VI (Graves)")
_ALIASES = {
    "bostonhousing": "boston",
    "housing": "boston",
    "power-plant": "power",
    "powerplant": "power",
    "wine-quality-red": "wine",
    "winequalityred": "wine",
}


def published_row(name: str) -> dict[str, tuple[float, float]] | None:
    """Published (RMSE, LL) per method for a data-set directory name, or None if unknown."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return PUBLISHED.get(key)


def standard_error(values: Sequence[float]) -> float | None:
    """``std / sqrt(n)`` with the sample standard deviation (ddof=1); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: our RMSE and LL (mean +- se) next to the published columns."""

    def pm(mean: float, se: float | None, digits: int) -> str:
        return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    head = [
        "data set",
        "splits",
        "BBB RMSE",
        "BBB LL",
        *(f"{m} RMSE / LL" for m in PUBLISHED_METHODS),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in results:
        digits = 3 if m["rmse_mean"] < 1 else 2
        pub = published_row(m["dataset"]) or {}
        cols = [
            f"{pub[k][0]:.2f} / {pub[k][1]:.2f}" if k in pub else "-" for k in PUBLISHED_METHODS
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    m["dataset"],
                    str(m["n_splits"]),
                    pm(m["rmse_mean"], m["rmse_se"], digits),
                    pm(m["ll_mean"], m["ll_se"], 2),
                    *cols,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


#: Columns of :func:`format_calibration_table`: (header, key in a data set's
#: ``metrics["calibration"]`` without ``_mean``/``_se``, formatting).
CALIBRATION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("50% coverage", "coverage_50", "fraction"),
    ("90% coverage", "coverage_90", "fraction"),
    ("95% coverage", "coverage_95", "fraction"),
    ("95% width", "width_95", "units"),
    ("calibration error", "calibration_error", "fraction"),
    ("CRPS", "crps", "units"),
)


def _pm_significant(mean: float | None, se: float | None, kind: str) -> str:
    """``mean ± se``: fractions with 3 decimals; quantities in original units with at least
    3 significant digits of the mean and 1 of the SE (``15.88 ± 0.04``, not ``15.9 ± 0.0``;
    at most 6 decimals), both with the same decimals; ``-`` for no value."""
    if mean is None:
        return "-"
    if kind == "fraction" or not math.isfinite(mean) or mean == 0.0:
        digits = 3
    else:
        digits = max(0, 2 - math.floor(math.log10(abs(mean))))
        if se is not None and math.isfinite(se) and se > 0.0:
            digits = max(digits, -math.floor(math.log10(se)))
        digits = min(6, digits)
    text = f"{mean:.{digits}f}"
    return text if se is None else f"{text} ± {se:.{digits}f}"


def format_calibration_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the test predictive's calibration per data set (mean ± SE over splits).

    Columns: the test coverage of the central 50%, 90% and 95% predictive intervals (a
    calibrated predictive gives 0.50, 0.90, 0.95; below: over-confident, too narrow), the
    mean width of the 95% interval and the CRPS (original units of the target), and the
    calibration error (mean absolute deviation of the Kuleshov calibration curve from the
    diagonal). ``results`` are `run_uci` metrics; their ``calibration`` entry is
    `bbb.uci.report.summarize_calibration`'s. The splits column reads ``k of n`` when only k
    of the n splits have calibration records (a run resumed from splits recorded before they
    existed), and a note under the table names the others; a result without a
    ``calibration`` entry (an older ``metrics.json``) gets ``-`` throughout.
    """
    head = ["data set", "splits", *(h for h, _, _ in CALIBRATION_COLUMNS)]
    lines = [
        "Calibration of the test predictive (mean ± SE over splits; 95% width and CRPS in "
        "original units):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    notes = []
    for m in results:
        cal = m.get("calibration") or {}
        n_total = m["n_splits"]
        n_cal = int(cal.get("n_splits", 0))
        splits = str(n_total) if n_cal == n_total else f"{n_cal} of {n_total}"
        cols = [
            _pm_significant(cal.get(f"{key}_mean"), cal.get(f"{key}_se"), kind)
            for _, key, kind in CALIBRATION_COLUMNS
        ]
        lines.append("| " + " | ".join([m["dataset"], splits, *cols]) + " |")
        if not cal:
            notes.append(f"{m['dataset']}: no calibration metrics (results of an older version)")
        elif cal.get("missing_splits"):
            notes.append(
                f"{m['dataset']}: splits {cal['missing_splits']} were recorded before the "
                "calibration metrics existed (not counted)"
            )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
