"""Calibration metrics of the UCI benchmark (`bbb uci`): coverage, widths, calibration error, CRPS.

Every split records the test set's central-interval coverage and mean width, the calibration
error and the CRPS from the same predictions its RMSE and log-likelihood use; they reach the
CSV, ``metrics.json`` and a separate table after the (unchanged) RMSE/LL table. A tiny
synthetic directory in the split format (60 rows, 3 features, 3 splits of 54/6 rows, 5
hidden units) and a few epochs keep the file to a few seconds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bbb.uci as U
from bbb import metrics as M
from bbb.cli import main
from bbb.config import ConfigError, TrainConfig
from bbb.data.uci import UCIDataset
from bbb.predictive import predict
from bbb.train.trainer import evaluate
from bbb.uci.train import _run_data, _train

N_ROWS, N_SPLITS, N_TEST = 60, 3, 6


def _write_uci_dir(root: Path, name: str = "tiny") -> Path:
    """A data set in the split format: y = x . w + 10 + noise (sd 0.3), 3 features."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ROWS, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 10.0 + 0.3 * rng.normal(size=N_ROWS)
    np.savetxt(d / "data.txt", np.c_[x, y])
    (d / "index_features.txt").write_text("0\n1\n2\n")
    (d / "index_target.txt").write_text("3\n")
    for i in range(N_SPLITS):
        perm = rng.permutation(N_ROWS)
        np.savetxt(d / f"index_train_{i}.txt", perm[N_TEST:], fmt="%d")
        np.savetxt(d / f"index_test_{i}.txt", perm[:N_TEST], fmt="%d")
    (d / "n_splits.txt").write_text(f"{N_SPLITS}\n")
    (d / "n_hidden.txt").write_text("5\n")
    (d / "n_epochs.txt").write_text("40\n")
    return d


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write_uci_dir(tmp_path / "data")


def _config(**kw: object) -> TrainConfig:
    values: dict[str, object] = {"epochs": 10, "num_samples": 2}
    values.update(kw)
    return U.uci_config(**values)


def _settings() -> U.UCIRunSettings:
    return U.UCIRunSettings(splits=[], test_samples=10, passes=5)


def test_field_names_and_levels() -> None:
    assert U.CALIBRATION_LEVELS == M.DEFAULT_COVERAGE_LEVELS
    assert U.CALIBRATION_FIELDS == (
        "coverage_50", "coverage_80", "coverage_90", "coverage_95", "coverage_99",
        "width_50", "width_80", "width_90", "width_95", "width_99",
        "calibration_error", "calibration_rmse", "crps",
    )  # fmt: skip


def test_split_rmse_ll_are_evaluates_and_calibration_comes_from_the_same_predictions(
    tiny: Path,
) -> None:
    """run_split's RMSE/LL equal, bit for bit, those of the former path (train, then
    bbb.train.evaluate from the same random state): the calibration adds no random draw
    before them. Its calibration fields equal bbb.metrics on the same predictive."""
    cfg = _config()
    rec = U.run_split(tiny, 1, cfg, test_samples=10, passes=5)
    ds = UCIDataset(tiny)
    split = ds.split(1)
    data = _run_data(split, split.train, None)
    trainer, likelihood = _train(cfg, data, passes=5, seed=cfg.seed * 10007 + 1)
    state = torch.get_rng_state()
    report = evaluate(
        trainer.model,
        DataLoader(split.test, batch_size=len(split.test)),
        likelihood,
        num_samples=10,
        y_scale=data.y_std,
    )
    assert (rec["rmse"], rec["ll"]) == (report["rmse"], report["log_likelihood"])
    # the same predictive again, from the same random state (iterating the DataLoader draws
    # its base seed from the global generator, as in evaluate), scored by bbb.metrics directly
    torch.set_rng_state(state)
    trainer.model.eval()
    with torch.no_grad():
        (x, y), *rest = list(DataLoader(split.test, batch_size=len(split.test)))
        pred = predict(trainer.model, x, likelihood=likelihood, num_samples=10)
    assert rest == []
    expected = M.regression_calibration_report(pred, y, y_scale=data.y_std)
    for key in ("coverage_50", "coverage_90", "coverage_95", "calibration_error", "crps"):
        assert rec[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    cov = M.interval_coverage(pred, y, levels=(0.95,), y_scale=data.y_std)
    assert rec["width_95"] == pytest.approx(float(cov.mean_width[0]), rel=1e-9)
    # coverage is a multiple of 1/6 on 6 test rows; widths grow with the level
    for key in ("coverage_50", "coverage_80", "coverage_90", "coverage_95", "coverage_99"):
        assert rec[key] * N_TEST == pytest.approx(round(rec[key] * N_TEST), abs=1e-9)
    widths = [rec[f"width_{k}"] for k in (50, 80, 90, 95, 99)]
    assert all(a < b for a, b in zip(widths, widths[1:], strict=False))
    assert rec["crps"] > 0 and 0 <= rec["calibration_error"] <= 1


def test_calibration_metrics_of_a_well_specified_gaussian() -> None:
    """S = 1 predictive N(0, 1) for N(0, 1) targets in normalised units, y_scale 3: the
    coverage is within 3 binomial standard errors (sqrt(a (1 - a) / B)) of each level, the
    widths are 2 z_a * 3 exactly, the CRPS is 3 * E[CRPS(N(0,1), y)] = 3 / sqrt(pi) within 3
    of its standard errors (sd of CRPS(N(0,1), Y) measured 0.40 on 2e5 draws, so SE = 3 * 0.40 / sqrt(B))."""
    B = 4000
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(B, 1, generator=gen, dtype=torch.float64)
    means = torch.zeros(1, B, 1, dtype=torch.float64)
    variances = torch.ones(1, B, 1, dtype=torch.float64)
    out = U.calibration_metrics(means, variances, y, 3.0)
    normal = torch.distributions.Normal(0.0, 1.0)
    for a in U.CALIBRATION_LEVELS:
        se = math.sqrt(a * (1 - a) / B)
        key = f"{round(100 * a, 6):g}"
        assert abs(out[f"coverage_{key}"] - a) < 3 * se, (a, out[f"coverage_{key}"])
        z = float(normal.icdf(torch.tensor((1 + a) / 2)))
        assert out[f"width_{key}"] == pytest.approx(2 * z * 3.0, rel=1e-6)
    assert out["crps"] == pytest.approx(3.0 / math.sqrt(math.pi), abs=3 * 3.0 * 0.40 / math.sqrt(B))
    # the curve's mean absolute deviation is at most its largest one, the Kolmogorov-Smirnov
    # statistic of B uniform PIT values, under 1.95 / sqrt(B) with probability 0.999
    assert out["calibration_error"] < 1.95 / math.sqrt(B)
    assert out["calibration_rmse"] >= out["calibration_error"]


def test_all_writes_csv_metrics_and_a_separate_table(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all"
    args = ["uci", "--all", str(tiny.parent), "--out", str(out), "--epochs", "10"]
    args += ["--num-samples", "2", "--test-samples", "10", "--passes", "5", "--splits", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "tiny" / "metrics.json").read_text())
    cal = saved["calibration"]
    assert cal["n_splits"] == 2 and cal["missing_splits"] == []
    with open(out / "tiny" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    # the earlier columns keep their positions; the calibration columns come last
    assert header[:6] == ["split", "rmse", "ll", "epochs", "seconds", "noise_std"]
    assert header[-len(U.CALIBRATION_FIELDS) :] == list(U.CALIBRATION_FIELDS)
    for key in U.CALIBRATION_FIELDS:
        values = [float(r[key]) for r in rows]
        per_split = [s[key] for s in saved["splits"]]
        assert values == pytest.approx(per_split, rel=1e-5), key
        assert cal[f"{key}_mean"] == pytest.approx(np.mean(per_split), rel=1e-12), key
        assert cal[f"{key}_se"] == pytest.approx(
            np.std(per_split, ddof=1) / math.sqrt(2), rel=1e-9, abs=1e-15
        ), key
    table = (out / "table.md").read_text()
    rmse_table = U.format_table([saved])
    # the RMSE/LL table first and unchanged, then the calibration table after a blank line
    assert table == rmse_table + "\n" + U.format_calibration_table([saved])
    assert rmse_table in printed and U.format_calibration_table([saved]) in printed
    lines = table.splitlines()
    head = "| data set | splits | 50% coverage | 90% coverage | 95% coverage | 95% width |"
    assert any(line.startswith(head) for line in lines)
    row = next(line for line in lines if line.startswith("| tiny | 2 | 0."))
    c95 = f"{cal['coverage_95_mean']:.3f} ± {cal['coverage_95_se']:.3f}"
    assert c95 in row


def test_resume_over_splits_recorded_without_calibration(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Split records written before the calibration fields existed are kept: blank in the
    CSV, None in metrics.json, left out of the calibration summary, and said so."""
    out = tmp_path / "run"
    first = U.run_uci(tiny, out, config=_config(), settings=_settings(), splits="0-1", log=None)
    path = out / "splits" / "split_0.json"
    old = json.loads(path.read_text())
    for key in U.CALIBRATION_FIELDS:
        del old[key]  # as an earlier version of the engine wrote it
    path.write_text(json.dumps(old))
    lines: list[str] = []
    m = U.run_uci(
        tiny,
        out,
        config=_config(),
        settings=_settings(),
        resume=True,
        log=lines.append,
    )
    assert m["n_splits"] == 3
    assert m["splits"][0]["rmse"] == first["splits"][0]["rmse"]  # the old record is kept
    assert all(m["splits"][0][k] is None for k in U.CALIBRATION_FIELDS)
    assert all(m["splits"][2][k] is not None for k in U.CALIBRATION_FIELDS)
    cal = m["calibration"]
    assert cal["n_splits"] == 2 and cal["missing_splits"] == [0]
    assert cal["crps_mean"] == pytest.approx((m["splits"][1]["crps"] + m["splits"][2]["crps"]) / 2)
    assert any("[0] were recorded before the calibration metrics" in line for line in lines)
    with open(out / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(rows[0][k] == "" for k in U.CALIBRATION_FIELDS)
    assert all(rows[1][k] != "" for k in U.CALIBRATION_FIELDS)
    table = U.format_calibration_table([m])
    assert "| tiny | 2 of 3 |" in table
    assert "tiny: splits [0] were recorded before the calibration metrics existed" in table
    # a results dict from before the calibration summary existed: a row of dashes
    bare = {k: v for k, v in m.items() if k != "calibration"}
    assert "| tiny | 0 of 3 | - | - | - | - | - | - |" in U.format_calibration_table([bare])


def test_a_calibration_field_that_is_not_a_number_is_refused(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    U.run_uci(tiny, out, config=_config(), settings=_settings(), splits=[0], log=None)
    path = out / "splits" / "split_0.json"
    rec = json.loads(path.read_text())
    rec["coverage_95"] = "0.9"
    path.write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match=r"split_0\.json is not a split record \(coverage_95"):
        U.run_uci(tiny, out, config=_config(), settings=_settings(), resume=True, log=None)
    # a non-finite value is written as null: read back as NaN, not as a missing field
    rec["coverage_95"] = None
    path.write_text(json.dumps(rec))
    m = U.run_uci(
        tiny, out, config=_config(), settings=_settings(), splits=[0], resume=True, log=None
    )
    assert m["calibration"]["n_splits"] == 1 and math.isnan(m["splits"][0]["coverage_95"])


def test_calibration_table_digits() -> None:
    """Fractions with 3 decimals; widths and CRPS with 3 significant digits and at least one
    of the SE (an SE of 0.04 on a width of 15.9 is not printed as 0.0)."""
    cal: dict[str, object] = {"n_splits": 20, "missing_splits": []}
    for key, mean, se in (
        ("coverage_50", 0.5271, 0.0041),
        ("coverage_90", 0.9, 0.002),
        ("coverage_95", 0.95, None),
        ("width_95", 15.8812, 0.0412),
        ("calibration_error", 0.0183, 0.0021),
        ("crps", 0.04413, 0.00031),
    ):
        cal[f"{key}_mean"], cal[f"{key}_se"] = mean, se
    table = U.format_calibration_table([{"dataset": "power", "n_splits": 20, "calibration": cal}])
    row = "| power | 20 | 0.527 ± 0.004 | 0.900 ± 0.002 | 0.950 | 15.88 ± 0.04 | 0.018 ± 0.002 "
    assert row + "| 0.0441 ± 0.0003 |" in table
