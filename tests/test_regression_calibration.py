"""Calibration metrics of the regression predictive (issue #3): PIT values, central-interval
coverage from the exact mixture quantiles, the calibration curve of Kuleshov et al. (2018),
the closed-form CRPS of a Gaussian mixture, the plot, and `bbb evaluate` on a regression run.

Statistical checks: every tolerance is derived from a standard error or a distribution-free
bound (named where it is used), and the seeds are fixed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import bbb
from bbb import metrics as M
from bbb.cli import main

F64 = torch.float64


def _phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _draw_from_mixture(m: Tensor, v: Tensor, gen: torch.Generator) -> Tensor:
    """One target per (b, d) from the equal-weight mixture: a component s per example (shared
    by its outputs, as a weight sample is), then its Gaussian."""
    S, B, D = m.shape
    s = torch.randint(S, (B,), generator=gen)
    rows = torch.arange(B)
    eps = torch.randn(B, D, generator=gen, dtype=m.dtype)
    return m[s, rows] + v[s, rows].sqrt() * eps


def _mixture(s: int, b: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random (S, B, D) = (s, b, d) component means and variances (in [0.2, 1.2])."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(s, b, d, generator=gen, dtype=F64)
    v = 0.2 + torch.rand(s, b, d, generator=gen, dtype=F64)
    return m, v


# ------------------------------------------------------------------------ exact values


def test_pit_of_one_component_is_the_gaussian_cdf() -> None:
    m = torch.tensor([[0.0, 1.0, -2.0, 3.0]], dtype=F64)  # (S=1, B=4): D = 1
    v = torch.tensor([[1.0, 4.0, 0.25, 9.0]], dtype=F64)
    y = torch.tensor([0.5, -1.0, -2.0, 10.0], dtype=F64)
    want = torch.tensor(
        [_phi_cdf((yb - mb) / math.sqrt(vb)) for yb, mb, vb in zip(y, m[0], v[0], strict=True)],
        dtype=F64,
    )
    got = M.pit_values(m, v, y)
    assert got.shape == (4, 1) and got.dtype == F64
    torch.testing.assert_close(got[:, 0], want, rtol=0, atol=1e-15)
    # the prediction form and RegressionPrediction.cdf give the same numbers
    pred = bbb.RegressionPrediction(m.unsqueeze(-1), v.unsqueeze(-1))
    torch.testing.assert_close(M.pit_values(pred, y), got, rtol=0, atol=0)
    torch.testing.assert_close(pred.cdf(y.unsqueeze(-1)), got, rtol=0, atol=0)


def test_pit_of_a_two_component_mixture_is_its_integrated_density() -> None:
    m = torch.tensor([[-1.0, 0.5], [2.0, 0.0]], dtype=F64)  # (S=2, B=2)
    v = torch.tensor([[0.5, 1.0], [1.5, 0.1]], dtype=F64)
    y = torch.tensor([0.3, 0.2], dtype=F64)
    got = M.pit_values(m, v, y)[:, 0]
    for b in range(2):
        x = torch.linspace(-30.0, float(y[b]), 600_001, dtype=F64)
        dens = sum(
            torch.exp(-0.5 * (x - m[s, b]) ** 2 / v[s, b]) / torch.sqrt(2 * math.pi * v[s, b])
            for s in range(2)
        )
        integral = torch.trapezoid(dens / 2, x)  # the trapezoid rule's error is O(h^2) ~ 1e-11
        assert abs(float(got[b]) - float(integral)) < 1e-9


def test_exact_quantiles_invert_the_mixture_cdf_without_random_draws() -> None:
    m, v = _mixture(7, 40, 2, seed=1)
    pred = bbb.RegressionPrediction(m, v)
    levels = [0.0, 1e-6, 0.025, 0.3, 0.5, 0.9, 0.999, 1.0]
    state = torch.get_rng_state()
    q = pred.quantiles(levels, method="exact")
    assert torch.equal(torch.get_rng_state(), state)  # no draws
    assert q.shape == (8, 40, 2) and q.dtype == F64
    assert bool((q[0] == -math.inf).all()) and bool((q[-1] == math.inf).all())
    for i, level in enumerate(levels[1:-1], start=1):
        # the mixture CDF at the quantile, to float64 rounding of the CDF
        torch.testing.assert_close(
            pred.cdf(q[i]), torch.full_like(q[i], level), rtol=1e-9, atol=1e-14
        )
    # increasing in q; a single level gives (B, D), a float32 prediction float32 quantiles
    assert bool((q[1:] >= q[:-1]).all())
    assert torch.equal(pred.quantiles(0.3, method="exact"), q[3])
    p32 = bbb.RegressionPrediction(m.float(), v.float())
    assert p32.quantiles([0.3], method="exact").dtype == torch.float32
    # S = 1: the Gaussian quantile mu + sd * Phi^-1(q)
    one = bbb.RegressionPrediction(m[:1], v[:1])
    z = torch.special.ndtri(torch.tensor([0.1, 0.8], dtype=F64)).view(2, 1, 1)
    torch.testing.assert_close(one.quantiles([0.1, 0.8], method="exact"), m[:1] + v[:1].sqrt() * z)
    # the default Monte-Carlo estimate is unchanged and lands near the exact value: the CDF at
    # it is off by sqrt(q (1 - q) / (S * num_draws)) per standard error (5 allowed)
    est = pred.quantiles([0.9], num_draws=400, generator=torch.Generator().manual_seed(0))[0]
    se = math.sqrt(0.9 * 0.1 / (7 * 400))
    assert float((pred.cdf(est) - 0.9).abs().max()) < 5 * se


# ------------------------------------------------------------------------ statistics


def test_a_well_specified_predictive_has_uniform_pit_and_nominal_coverage() -> None:
    """Targets drawn from the predictive mixture itself."""
    S, B, D = 4, 4000, 2
    m, v = _mixture(S, B, D, seed=2)
    y = _draw_from_mixture(m, v, torch.Generator().manual_seed(3))
    data = M.regression_calibration_data(m, v, y)
    # DKW: P(sup_p |ECDF(p) - p| > e) <= 2 exp(-2 B e^2); e for a 1e-6 chance, per output
    dkw = math.sqrt(math.log(2 / 1e-6) / (2 * B))
    assert float(data.calibration_error_per_output("max").max()) < dkw
    assert data.calibration_error("max") < dkw  # pooled: the mean of two such curves
    cov = M.interval_coverage(m, v, y)
    # binomial standard error of each output's coverage for a calibrated predictive, 5 allowed
    gap = (cov.coverage_per_output - cov.levels.unsqueeze(1)).abs()
    assert bool((gap < 5 * cov.standard_error().unsqueeze(1)).all()), gap


def test_an_over_confident_predictive_under_covers_by_the_normal_cdf() -> None:
    """Variance / 4 (sd / 2): the central a-interval mu +- z sd / 2 holds a target of
    N(mu, sd^2) with probability 2 Phi(z / 2) - 1."""
    B = 4000
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(1, B, 1, generator=gen, dtype=F64)
    v = 0.5 + torch.rand(1, B, 1, generator=gen, dtype=F64)
    y = m[0] + v[0].sqrt() * torch.randn(B, 1, generator=gen, dtype=F64)
    cov = M.interval_coverage(m, v / 4, y)
    for a, c in zip(cov.levels.tolist(), cov.coverage.tolist(), strict=True):
        z = float(torch.special.ndtri(torch.tensor((1 + a) / 2, dtype=F64)))
        p = 2 * _phi_cdf(z / 2) - 1
        assert p < a - 0.1  # a real gap, far beyond the noise
        assert abs(c - p) < 5 * math.sqrt(p * (1 - p) / B), (a, c, p)  # 5 binomial SE
    # the curve is S-shaped: too many targets below the low quantiles
    data = M.regression_calibration_data(m, v / 4, y, levels=[0.1, 0.9])
    assert float(data.observed[0]) > 0.1 and float(data.observed[1]) < 0.9


def test_over_confident_mixture_coverage_is_the_true_mass_of_its_intervals() -> None:
    """S = 3: the expected coverage of the narrowed mixture's exact interval is the true
    mixture's mass in it, mean_b [F(hi_b) - F(lo_b)]; its standard error is
    sqrt(sum_b p_b (1 - p_b)) / B (independent Bernoulli examples)."""
    S, B, D = 3, 3000, 1
    m, v = _mixture(S, B, D, seed=5)
    y = _draw_from_mixture(m, v, torch.Generator().manual_seed(6))
    narrow = bbb.RegressionPrediction(m, v / 4)
    true = bbb.RegressionPrediction(m, v)
    cov = M.interval_coverage(narrow, y, levels=[0.5, 0.9])
    for i, a in enumerate([0.5, 0.9]):
        lo, hi = narrow.quantiles([(1 - a) / 2, (1 + a) / 2], method="exact")
        p_b = true.cdf(hi) - true.cdf(lo)
        want = float(p_b.mean())
        se = float((p_b * (1 - p_b)).sum().sqrt()) / B
        assert want < a - 0.05
        assert abs(float(cov.coverage[i]) - want) < 5 * se
        # coverage counted from the PIT values is the count of targets inside the bounds
        assert float(cov.coverage[i]) == float(((y >= lo) & (y <= hi)).double().mean())
        torch.testing.assert_close(cov.mean_width[i], (hi - lo).mean())


# ------------------------------------------------------------------------ CRPS


def test_crps_of_one_gaussian_is_the_closed_form() -> None:
    m = torch.tensor([[0.0, 1.0, -3.0]], dtype=F64)
    v = torch.tensor([[1.0, 0.25, 4.0]], dtype=F64)
    y = torch.tensor([0.3, 2.0, -3.0], dtype=F64)
    per = []
    for yb, mb, vb in zip(y.tolist(), m[0].tolist(), v[0].tolist(), strict=True):
        sd = math.sqrt(vb)
        z = (yb - mb) / sd
        pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        per.append(sd * (z * (2 * _phi_cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi)))
    want = sum(per) / 3
    assert M.crps(m, v, y) == pytest.approx(want, rel=1e-13)
    # original units: the CRPS scales with y
    assert M.crps(m, v, y, y_scale=2.5) == pytest.approx(2.5 * want, rel=1e-13)


def test_crps_of_a_mixture_is_its_integral_and_chunking_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m, v = _mixture(3, 2, 1, seed=7)
    y = torch.tensor([[0.4], [-1.1]], dtype=F64)
    pred = bbb.RegressionPrediction(m, v)
    x = torch.linspace(-40.0, 40.0, 400_001, dtype=F64)
    total = 0.0
    for b in range(2):
        cdf = torch.special.ndtr((x.view(1, -1) - m[:, b]) / v[:, b].sqrt()).mean(0)
        total += float(torch.trapezoid((cdf - (x >= y[b]).double()) ** 2, x))
    # trapezoid rule, h = 2e-4: the jump at y costs at most h / 2 per example
    assert M.crps(pred, y) == pytest.approx(total / 2, abs=2e-4)
    m, v = _mixture(5, 30, 2, seed=8)
    y = torch.randn(30, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    whole = M.crps(m, v, y)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 7)  # one example per chunk
    assert M.crps(m, v, y) == pytest.approx(whole, rel=1e-14)
    q = M.interval_coverage(m, v, y).mean_width
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 1 << 22)
    torch.testing.assert_close(M.interval_coverage(m, v, y).mean_width, q)


# ------------------------------------------------------------------------ summaries


def test_calibration_curve_and_errors_on_hand_made_pit_values() -> None:
    # standard normal predictive, targets at known quantiles: PIT = 0.05, 0.2, 0.2, 0.7
    pits = torch.tensor([0.05, 0.2, 0.2, 0.7], dtype=F64)
    y = torch.special.ndtri(pits)
    m, v = torch.zeros(1, 4, dtype=F64), torch.ones(1, 4, dtype=F64)
    data = M.regression_calibration_data(m, v, y, levels=[0.75, 0.25, 0.5])
    torch.testing.assert_close(data.pit[:, 0], pits)
    assert data.expected.tolist() == [0.25, 0.5, 0.75]  # sorted
    assert data.observed.tolist() == [0.75, 0.75, 1.0]
    gaps = [0.5, 0.25, 0.25]
    assert data.calibration_error() == pytest.approx(sum(gaps) / 3)
    assert data.calibration_error("root_mean_square") == pytest.approx(
        math.sqrt(sum(g * g for g in gaps) / 3)
    )
    assert data.calibration_error("max") == pytest.approx(0.5)
    assert M.regression_calibration_error(m, v, y, levels=[0.25, 0.5, 0.75], kind="max") == 0.5
    # the default grid: j / 100, j = 1..99
    grid = M.regression_calibration_data(m, v, y).expected
    assert grid.numel() == 99 and grid[0] == 0.01 and grid[-1] == 0.99
    assert M.regression_calibration_data(m, v, y, levels=3).expected.tolist() == [0.25, 0.5, 0.75]
    cov = M.interval_coverage(m, v, y, levels=[0.5, 0.9])
    # [0.25, 0.75] holds 0.7 only; [0.05, 0.95] holds 0.05 (the closed end), 0.2, 0.2, 0.7
    assert cov.coverage.tolist() == [0.25, 1.0]
    assert cov.as_dict() == {"coverage_50": 0.25, "coverage_90": 1.0}


def test_multi_output_targets_are_judged_per_output_and_pooled() -> None:
    S, B = 3, 500
    m, v = _mixture(S, B, 2, seed=10)
    m = 0.1 * m  # the noise dominates the predictive spread
    v_pred = v.clone()
    v_pred[..., 1] = v[..., 1] / 9  # output 1 over-confident, output 0 right
    y = _draw_from_mixture(m, v, torch.Generator().manual_seed(11))
    data = M.regression_calibration_data(m, v_pred, y)
    per = data.calibration_error_per_output("max")
    # DKW bound on a calibrated output's max deviation (a 1e-6 chance of exceeding it)
    dkw = math.sqrt(math.log(2 / 1e-6) / (2 * B))
    assert per.shape == (2,) and float(per[1]) > dkw > float(per[0])
    torch.testing.assert_close(data.observed, data.observed_per_output.mean(1))
    cov = M.interval_coverage(m, v_pred, y, y_scale=3.0)
    torch.testing.assert_close(cov.coverage, cov.coverage_per_output.mean(1))
    assert bool((cov.coverage_per_output[:, 1] < cov.coverage_per_output[:, 0]).all())
    # each output alone gives its own column (its marginal mixture)
    one = M.interval_coverage(m[..., 1:], v_pred[..., 1:], y[:, 1:], y_scale=3.0)
    torch.testing.assert_close(one.coverage, cov.coverage_per_output[:, 1])
    torch.testing.assert_close(one.mean_width, cov.mean_width_per_output[:, 1])
    # widths are in original units
    unit = M.interval_coverage(m, v_pred, y)
    torch.testing.assert_close(cov.mean_width, 3.0 * unit.mean_width)
    report = M.regression_calibration_report(bbb.RegressionPrediction(m, v_pred), y, y_scale=3.0)
    assert list(report) == [
        "coverage_50", "coverage_80", "coverage_90", "coverage_95", "coverage_99",
        "calibration_error", "calibration_rmse", "crps",
    ]  # fmt: skip
    assert report["crps"] == pytest.approx(3.0 * M.crps(m, v_pred, y))
    assert report["calibration_error"] == pytest.approx(data.calibration_error())


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_are_refused_with_the_reason() -> None:
    m, v = _mixture(2, 5, 1, seed=12)
    y = torch.zeros(5, 1, dtype=F64)
    pred = bbb.RegressionPrediction(m, v)
    fns = [M.pit_values, M.interval_coverage, M.regression_calibration_data, M.crps]
    for fn in fns:
        with pytest.raises(ValueError, match="target must have shape"):
            fn(m, v, torch.zeros(4, 1))
        with pytest.raises(ValueError, match="NaN"):
            fn(m, v, torch.full((5, 1), math.nan))
        with pytest.raises(ValueError, match="vars must be strictly positive"):
            fn(m, torch.zeros_like(v), y)
        with pytest.raises(ValueError, match="same shape as means"):
            fn(m, v[:, :3], y)
        with pytest.raises(TypeError, match="is missing target"):
            fn(m, v)
        with pytest.raises(TypeError, match="needs the targets"):
            fn(pred)
        with pytest.raises(TypeError, match="ClassificationPrediction"):
            fn(bbb.ClassificationPrediction(torch.full((2, 2), 0.5), torch.full((1, 2, 2), 0.5)), y)
    for bad in (0.0, 1.0, 1.5, -0.1, [], [0.5, 0.5], [True], "0.9", torch.ones(2, 2) / 2):
        with pytest.raises(ValueError, match="levels must"):
            M.interval_coverage(pred, y, levels=bad)  # type: ignore[arg-type]
    for bad_grid in (0, -3, [0.0, 0.5], [0.5, 0.5]):
        with pytest.raises(ValueError, match="levels must"):
            M.regression_calibration_data(pred, y, levels=bad_grid)
    with pytest.raises(ValueError, match="'mean_absolute', 'root_mean_square', 'max'"):
        M.regression_calibration_error(pred, y, kind="l2")
    with pytest.raises(ValueError, match="'mean_absolute', 'root_mean_square', 'max'"):
        M.regression_calibration_data(pred, y).calibration_error("rms")
    for bad_scale in (0.0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="y_scale must be a finite positive number"):
            M.crps(pred, y, y_scale=bad_scale)
        with pytest.raises(ValueError, match="y_scale must be a finite positive number"):
            M.interval_coverage(pred, y, y_scale=bad_scale)
    with pytest.raises(ValueError, match="method must be one of 'draws', 'exact'"):
        pred.quantiles([0.5], method="analytic")
    with pytest.raises(ValueError, match="cdf: targets of shape"):
        pred.cdf(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="cdf: targets contain NaN"):
        pred.cdf(torch.full((5,), math.nan))
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.plot_regression_calibration(pred, y, path="x.png", n_bins=0)


def test_plot_regression_calibration_writes_a_png(tmp_path: Path) -> None:
    m, v = _mixture(3, 50, 2, seed=13)
    y = _draw_from_mixture(m, v, torch.Generator().manual_seed(14))
    out = M.plot_regression_calibration(
        bbb.RegressionPrediction(m, v), y, path=tmp_path / "sub" / "cal.png", title="t"
    )
    assert out == tmp_path / "sub" / "cal.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ CLI


def _cli(*args: Any) -> int:
    return main([str(a) for a in args])


def test_bbb_evaluate_reports_coverage_calibration_error_and_crps_of_a_toy_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bbb.plots

    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    run = tmp_path / "run"
    args = ["--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16"]
    assert _cli("train", *args, "--val-samples", "2", "--epochs", "1", "--quiet", "--out", run) == 0
    capsys.readouterr()
    assert _cli("evaluate", run, "--split", "val", "--num-samples", "4") == 0
    out = capsys.readouterr().out
    table = out.split("uncertainty:")[1]
    for key in ("coverage_50", "coverage_95", "calibration_error", "calibration_rmse", "crps"):
        assert key in table, key
    result = json.loads((run / "eval-val.json").read_text())
    u = result["uncertainty"]
    assert set(result["metrics"]) == {"rmse", "log_likelihood", "nll"}  # unchanged
    levels = [50, 80, 90, 95, 99]
    cover = [u[f"coverage_{a}"] for a in levels]
    n = u["n_examples"]
    # fractions of n examples, nested intervals: non-decreasing with the level
    assert all(0 <= c <= 1 and abs(c * n - round(c * n)) < 1e-9 for c in cover)
    assert cover == sorted(cover)
    assert 0 <= u["calibration_error"] <= u["calibration_rmse"] <= 1 and u["crps"] > 0
    # a prediction that is not finite (an overflowed noise variance) gives NaN (null), no error
    from bbb.cli import _regression_calibration

    nan_pred = bbb.RegressionPrediction(torch.zeros(2, 3, 1), torch.full((2, 3, 1), math.inf))
    nans = _regression_calibration(nan_pred, torch.zeros(3, 1), 1.0)
    assert list(nans) == [*(f"coverage_{a}" for a in levels), "calibration_error",
                          "calibration_rmse", "crps"]  # fmt: skip
    assert all(math.isnan(x) for x in nans.values())
