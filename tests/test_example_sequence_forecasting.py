"""``examples/sequence_forecasting.py`` runs end to end on tiny settings (issue #3).

The example is imported and its ``main`` called in-process (a subprocess would add the
interpreter's and torch's start-up to the suite's time); ``--threads`` is restored after.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sequence_forecasting.py"
TINY = (
    *("--length", 30, "--window", 10, "--horizon", 2, "--stride", 6),
    *("--n-train-series", 12, "--n-test-series", 4, "--hidden", 4, "--epochs", 2),
    *("--batch-size", 16, "--samples", 4, "--quiet"),
)


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_sequence_forecasting", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite_numbers(value: object) -> list[float]:
    """Every number inside a JSON value (None is not a number and is refused here)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    if isinstance(value, (bool, str)):
        return []
    assert isinstance(value, (int, float)), value
    assert math.isfinite(value), value
    return [float(value)]


def test_tiny_run_writes_the_report_and_the_plot(tmp_path: Path) -> None:
    module = load()
    threads = torch.get_num_threads()
    try:
        returned = module.main([*map(str, TINY), "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))
    assert (tmp_path / "forecasts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("bayesian", "deterministic"):
        assert (tmp_path / f"{name}_run" / "best.pt").is_file()
    settings = report["settings"]
    # 12 series of 30 steps, windows of 10 + 2 every 6 steps: starts 0, 6, 12, 18 -> 48
    assert settings["train_windows"] == 48 and settings["test_windows_per_split"] == 16
    bayes, plain = report["bayesian"], report["deterministic"]
    assert bayes["steps"] == plain["steps"] == 2 * 3  # same data, same number of steps
    keys = {
        "rmse", "log_likelihood", "crps", "coverage_50", "coverage_90", "coverage_95",
        "calibration_error", "aleatoric_var", "epistemic_var", "epistemic_fraction",
        "true_noise_var", "rmse_by_step", "aleatoric_var_by_step", "epistemic_var_by_step",
    }  # fmt: skip
    for net in (bayes, plain):
        for split in ("in_distribution", "shifted"):
            m = net[split]
            assert set(m) == keys
            finite_numbers(m)
            assert all(len(m[k]) == 2 for k in keys if k.endswith("_by_step"))
            assert m["rmse"] > 0 and m["aleatoric_var"] > 0 and m["crps"] > 0
            cov = [m["coverage_50"], m["coverage_90"], m["coverage_95"]]
            assert 0 <= cov[0] <= cov[1] <= cov[2] <= 1  # nested intervals
            # the true noise std lies in [0.05, 0.25] at every step
            assert 0.05**2 <= m["true_noise_var"] <= 0.25**2
    # weight samples disagree for the Bayesian network; the deterministic one has one network
    assert bayes["in_distribution"]["epistemic_var"] > 0 and bayes["shifted"]["epistemic_var"] > 0
    assert plain["in_distribution"]["epistemic_var"] == plain["shifted"]["epistemic_var"] == 0
    assert plain["epistemic_ratio_shifted_over_in"] is None
    assert bayes["epistemic_ratio_shifted_over_in"] > 0
    # the posterior's diagnostics: one row per Bayesian layer (the LSTM's one layer, the head)
    assert set(bayes["posterior"]) == {"rnn.l0", "head"} and "posterior" not in plain
    for row in bayes["posterior"].values():
        assert row["median_sigma"] > 0
        assert 0 <= row["fraction_near_prior"] <= 1 and 0 <= row["fraction_snr_above_2"] <= 1
    finite_numbers({k: v for k, v in report.items() if k != "deterministic"})


def test_series_follow_the_documented_law() -> None:
    """The generator's noise std follows the first sine's phase within [0.05, 0.25], and the
    observed values differ from the clean ones by that noise: the standardised residuals of
    4000 values have mean 0 and variance 1 within 5 standard errors (1/sqrt(n) for the mean,
    sqrt(2/n) for the variance of a standard normal sample)."""
    module = load()
    gen = torch.Generator().manual_seed(0)
    s = module.make_series(40, 100, module.TRAIN_FREQUENCIES, gen)
    assert s.clean.shape == s.noise_std.shape == s.observed.shape == (40, 100)
    assert float(s.noise_std.min()) >= 0.05 - 1e-6 and float(s.noise_std.max()) <= 0.25 + 1e-6
    z = ((s.observed - s.clean) / s.noise_std).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    x, y, noise, clean = module.windows(s, 10, 3, 5)
    assert x.shape[1] == 10 and y.shape[1] == noise.shape[1] == clean.shape[1] == 3
    # the first window of series 0 and its continuation are the series' first 13 values
    assert torch.equal(torch.cat([x[0], y[0]]), s.observed[0, :13])
    with pytest.raises(ValueError, match="shorter than window"):
        module.windows(s, 90, 20, 1)
    with pytest.raises(ValueError, match="0 < low <= high"):
        module.make_series(2, 10, (0.2, 0.1), gen)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--length", "20", "--window", "18", "--horizon", "4"], "must be at least --window"),
        (["--cell", "rnn"], "invalid choice: 'rnn' (choose from"),
        (["--epochs", "0"], "must be at least 1, got 0"),
        (["--lr", "nan"], "must be a finite number above 0, got nan"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
    ],
)
def test_bad_flags_are_a_usage_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load()
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_write_under_runs_examples_with_one_thread() -> None:
    """As the other examples (tests/test_examples.py): the default output directory is
    runs/examples/<name>, and one torch thread unless --threads says otherwise."""
    module = load()
    args = module.parse_args([])
    assert args.out == "runs/examples/sequence_forecasting" and args.threads == 1
    assert module.parse_args(["--threads", "2"]).threads == 2


def test_forecaster_refuses_an_unknown_cell_and_a_bad_window_shape() -> None:
    module = load()
    with pytest.raises(ValueError, match="accepted values: lstm, gru"):
        module.Forecaster("rnn", 4, 2, bayesian=True)
    net = module.Forecaster("gru", 4, 2, bayesian=True)
    assert net(torch.zeros(3, 7)).shape == (3, 4)  # means and log-variances of 2 steps
    with pytest.raises(ValueError, match=r"shape \(batch, window\), got \(3, 7, 1\)"):
        net(torch.zeros(3, 7, 1))
