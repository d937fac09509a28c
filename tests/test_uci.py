"""The UCI benchmark engine (`bbb.uci`) and the ``bbb uci`` command.

Most tests use a tiny synthetic directory in the split format (60 rows, 3 features, 3 splits
of 54/6 rows, 5 hidden units) and a few epochs, so the whole file runs in seconds. One test
trains a real split (boston split 0) under the reference budget (about 2 s).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bbb.uci as U
from bbb.cli import main
from bbb.config import ConfigError
from bbb.data.checksums import MissingDataError, resolve_data_dir
from bbb.data.uci import UCIDataset
from bbb.metrics import mixture_gaussian_log_likelihood

N_ROWS, N_SPLITS, N_TEST = 60, 3, 6


def _write_uci_dir(
    root: Path,
    name: str = "tiny",
    n_rows: int = N_ROWS,
    n_splits: int = N_SPLITS,
    n_test: int = N_TEST,
    n_hidden: int = 5,
    n_epochs: int | None = 40,
) -> Path:
    """A data set in the split format: y = x . w + 10 + noise, in original units ~ N(10, 2)
    (3 features; ``n_splits`` splits with ``n_test`` test rows; ``n_epochs`` None: no
    n_epochs.txt)."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_rows, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 10.0 + 0.3 * rng.normal(size=n_rows)
    np.savetxt(d / "data.txt", np.c_[x, y])
    (d / "index_features.txt").write_text("0\n1\n2\n")
    (d / "index_target.txt").write_text("3\n")
    for i in range(n_splits):
        perm = rng.permutation(n_rows)
        np.savetxt(d / f"index_train_{i}.txt", perm[n_test:], fmt="%d")
        np.savetxt(d / f"index_test_{i}.txt", perm[:n_test], fmt="%d")
    (d / "n_splits.txt").write_text(f"{n_splits}\n")
    (d / "n_hidden.txt").write_text(f"{n_hidden}\n")
    if n_epochs is not None:
        (d / "n_epochs.txt").write_text(f"{n_epochs}\n")
    return d


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write_uci_dir(tmp_path / "data")


def _fast_config(**kw: object) -> torch.nn.Module:
    values: dict[str, object] = {"epochs": 10, "num_samples": 2}
    values.update(kw)
    return U.uci_config(**values)  # type: ignore[return-value,arg-type]


def _settings(**kw: object) -> U.UCIRunSettings:
    values: dict[str, object] = {"splits": [], "test_samples": 10, "passes": 5}
    values.update(kw)
    return U.UCIRunSettings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure helpers


def test_standard_error_is_sample_std_over_sqrt_n() -> None:
    vals = [1.0, 2.0, 4.0]
    mean = 7 / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    assert U.standard_error(vals) == pytest.approx(sd / math.sqrt(3))
    assert U.standard_error([5.0]) is None


def test_parse_splits() -> None:
    assert U.parse_splits(None, 4) == [0, 1, 2, 3]
    assert U.parse_splits("2", 4) == [0, 1]
    assert U.parse_splits(3, 4) == [0, 1, 2]
    assert U.parse_splits("1-3", 4) == [1, 2, 3]
    assert U.parse_splits("3,0,1-2", 4) == [0, 1, 2, 3]
    for bad in ("5", "0", "3-1", "a", "1-x", "0,7", ""):
        with pytest.raises(ValueError, match="valid splits are 0..3"):
            U.parse_splits(bad, 4)


def test_repeated_batches_cover_every_row_once_per_pass() -> None:
    g = torch.Generator().manual_seed(0)
    sampler = U.RepeatedBatches(10, 4, passes=3, generator=g)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    assert [len(b) for b in batches[:3]] == [4, 4, 2]
    for p in range(3):
        rows = torch.cat(batches[3 * p : 3 * p + 3]).sort().values
        assert rows.tolist() == list(range(10))


def test_original_units_log_likelihood_matches_hand_computation() -> None:
    """Mixture of S=2 Gaussians in normalised units, mapped to original units by hand."""
    y_mean, y_std = 22.5, 9.2
    mu = torch.tensor([[[0.1], [-0.4]], [[0.3], [-0.2]]])  # (S=2, B=2, 1), normalised
    var = torch.tensor([[[0.04], [0.09]], [[0.25], [0.01]]])
    y_norm = torch.tensor([[0.2], [-0.5]])
    got = mixture_gaussian_log_likelihood(mu, var, y_norm, y_scale=y_std)
    total = 0.0
    for b in range(2):
        y = float(y_norm[b, 0]) * y_std + y_mean  # original units
        dens = 0.0
        for s in range(2):
            m = float(mu[s, b, 0]) * y_std + y_mean
            v = float(var[s, b, 0]) * y_std**2
            dens += math.exp(-((y - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v) / 2
        total += math.log(dens)
    assert got == pytest.approx(total / 2, rel=1e-6)


def test_published_rows_and_table() -> None:
    assert U.published_row("bostonHousing")["PBP"] == (3.01, -2.57)  # type: ignore[index]
    assert U.published_row("power-plant")["VI (Graves)"] == (4.33, -2.89)  # type: ignore[index]
    assert U.published_row("wine-quality-red") is not None
    assert U.published_row("yacht") is None
    table = U.format_table(
        [{"dataset": "concrete", "n_splits": 2, "rmse_mean": 5.1, "rmse_se": 0.2,
          "ll_mean": -3.0, "ll_se": 0.05}]
    )  # fmt: skip
    assert "| concrete | 2 | 5.10 ± 0.20 | -3.00 ± 0.05 | 5.67 / -3.16 |" in table


# --------------------------------------------------------------------------- engine


def test_run_writes_splits_csv_and_metrics(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 200 epochs (about 400 steps of 5 hidden units; seconds): enough to learn the linear map
    m = U.run_uci(tiny, out, config=_fast_config(epochs=200), settings=_settings(), log=None)
    for name in ("config.json", "uci.json", "metrics.json", "splits.csv", "splits.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("rmse_mean", "rmse_se", "ll_mean", "ll_se", "n_splits", "settings", "splits"):
        assert key in saved
    assert saved["n_splits"] == N_SPLITS == m["n_splits"]
    assert saved["settings"]["config"]["hidden"] == [5]  # from n_hidden.txt
    assert saved["settings"]["config"]["estimator"] == "local"
    with open(out / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["split"]) for r in rows] == [0, 1, 2]
    assert {"split", "rmse", "ll", "epochs", "seconds", "lr", "prior_sigma"} <= set(rows[0])
    rmse = [float(r["rmse"]) for r in rows]
    ll = [float(r["ll"]) for r in rows]
    assert saved["rmse_mean"] == pytest.approx(np.mean(rmse), rel=1e-5)
    assert saved["rmse_se"] == pytest.approx(np.std(rmse, ddof=1) / math.sqrt(3), rel=1e-4)
    assert saved["ll_mean"] == pytest.approx(np.mean(ll), rel=1e-5)
    assert saved["ll_se"] == pytest.approx(np.std(ll, ddof=1) / math.sqrt(3), rel=1e-4)
    rec = json.loads((out / "splits" / "split_1.json").read_text())
    assert (rec["n_train"], rec["n_test"]) == (N_ROWS - N_TEST, N_TEST)  # the split's indices
    # it learns: each split's RMSE is under half that of predicting the training mean (measured
    # 0.23-0.74 against 2.19-2.72 at commit e289d62; the noise sd is 0.3), and the LL is above
    # that of N(train mean, train sd^2), the best model that ignores x
    data = np.loadtxt(tiny / "data.txt")
    for i in range(N_SPLITS):
        y_tr = data[np.loadtxt(tiny / f"index_train_{i}.txt", dtype=int), 3]
        y_te = data[np.loadtxt(tiny / f"index_test_{i}.txt", dtype=int), 3]
        base_rmse = float(np.sqrt(np.mean((y_te - y_tr.mean()) ** 2)))
        sd = float(y_tr.std())
        base_ll = float(
            np.mean(-0.5 * ((y_te - y_tr.mean()) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi)))
        )
        assert rmse[i] < 0.5 * base_rmse, (i, rmse[i], base_rmse)
        assert math.isfinite(ll[i]) and ll[i] > base_ll, (i, ll[i], base_ll)


def test_split_metrics_are_in_original_units(tiny: Path, tmp_path: Path) -> None:
    """Scaling the target by 100 scales RMSE by 100 and shifts LL by -log(100)."""
    scaled = tmp_path / "scaled"
    scaled_dir = _write_uci_dir(scaled)
    data = np.loadtxt(scaled_dir / "data.txt")
    data[:, 3] *= 100.0
    np.savetxt(scaled_dir / "data.txt", data)
    cfg = _fast_config()
    a = U.run_split(tiny, 0, cfg, test_samples=10, passes=10)
    b = U.run_split(scaled_dir, 0, cfg, test_samples=10, passes=10)
    assert b["rmse"] == pytest.approx(100 * a["rmse"], rel=1e-4)
    assert b["ll"] == pytest.approx(a["ll"] - math.log(100.0), abs=1e-4)


def test_resume_skips_finished_splits(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    U.run_uci(tiny, out, config=_fast_config(), settings=_settings(), splits="0-1", log=None)
    first = (out / "splits" / "split_0.json").read_text()
    with pytest.raises(ConfigError, match="--resume"):
        U.run_uci(tiny, out, config=_fast_config(), settings=_settings(), log=None)
    calls: list[int] = []
    real = U.run_split

    def counting(path: Path, split: int, *args: object, **kw: object) -> dict[str, object]:
        calls.append(split)
        return real(path, split, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(U.run, "run_split", counting)  # where run_uci looks it up
    monkeypatch.chdir(tiny.parent)  # the data set spelled differently (a relative name)
    m = U.run_uci("tiny", out, config=_fast_config(), settings=_settings(), resume=True, log=None)
    assert calls == [2]
    assert m["n_splits"] == 3
    assert (out / "splits" / "split_0.json").read_text() == first
    with pytest.raises(ConfigError, match="settings differ"):
        U.run_uci(
            tiny, out, config=_fast_config(lr=0.5), settings=_settings(), resume=True, log=None
        )


def test_tune_records_search_and_never_reads_test_rows(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    space = U.SearchSpace.from_dict({"grid": {"lr": [0.003, 0.03]}, "smooth": 1})
    seen: list[tuple[int, float]] = []
    real_split = UCIDataset.split

    def spy(self: UCIDataset, split: int, **kw: object) -> object:
        seen.append((split, float(kw.get("validation_fraction", 0.0))))  # type: ignore[arg-type]
        return real_split(self, split, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(UCIDataset, "split", spy)
    st = _settings(tune=True, search=space)
    m = U.run_uci(tiny, out, config=_fast_config(), settings=st, splits="1", log=None)
    # the search used split 0 with a validation part carved from its training rows
    assert seen[:2] == [(0, 0.2), (0, 0.2)]
    result = json.loads((out / "tune.json").read_text())
    assert len(result["points"]) == 2
    assert result["chosen"]["lr"] in (0.003, 0.03)
    assert result["chosen"]["epochs"] in (5, 10)
    assert m["settings"]["chosen"] == result["chosen"]
    assert json.loads((out / "config.json").read_text())["lr"] == result["chosen"]["lr"]
    assert (out / "tune.png").is_file()


# spawns two worker processes (a torch import each): ~4 s on an idle machine
def test_parallel_jobs_give_the_same_results(tiny: Path, tmp_path: Path) -> None:
    serial = U.run_uci(tiny, tmp_path / "a", config=_fast_config(), settings=_settings(), log=None)
    par = U.run_uci(
        tiny, tmp_path / "b", config=_fast_config(), settings=_settings(jobs=2), log=None
    )
    # every per-split result, not only the RMSE (a worker that scored the log-likelihood
    # differently, e.g. without the run's y_scale, would show in ll alone)
    assert [r["split"] for r in par["splits"]] == [r["split"] for r in serial["splits"]]
    for key in ("rmse", "ll", "noise_std"):
        assert [r[key] for r in par["splits"]] == pytest.approx(
            [r[key] for r in serial["splits"]], rel=1e-6
        ), key


# --------------------------------------------------------------------------- command line


def test_cli_uci_on_tiny_dir(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = ["uci", str(tiny), "--out", str(out), "--epochs", "20", "--num-samples", "2"]
    args += ["--test-samples", "10", "--noise", "heteroscedastic"]
    rc = main([*args, "--splits", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| tiny | 2 |" in text
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_splits"] == 2 and saved["settings"]["config"]["noise"] == "heteroscedastic"
    assert main([*args, "--resume"]) == 0  # adds split 2
    assert json.loads((out / "metrics.json").read_text())["n_splits"] == 3


def test_cli_uci_all(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_uci_dir(tiny.parent, "second")
    out = tmp_path / "all"
    rc = main(
        ["uci", "--all", str(tiny.parent), "--out", str(out), "--epochs", "10", "--splits", "1"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| second | 1 |" in text and "| tiny | 1 |" in text
    assert (out / "table.md").is_file() and (out / "tiny" / "metrics.json").is_file()


def test_cli_uci_bad_input(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["uci", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["uci", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "data.txt" in capsys.readouterr().err
    for bad in ("7", "2-1", "x"):
        assert main(["uci", str(tiny), "--splits", bad, "--out", str(tmp_path / "o")]) == 1
        assert "valid splits are 0..2" in capsys.readouterr().err
    assert main(["uci", "--out", str(tmp_path / "o")]) == 1
    assert "PATH" in capsys.readouterr().err
    with pytest.raises(MissingDataError, match=r"UCI root .*nowhere is not a directory"):
        U.run_all(tmp_path / "nowhere", tmp_path / "o", log=None)


def test_cli_uci_refuses_a_missing_device_before_writing(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bbb uci --device cuda` without CUDA failed inside the first split with torch's "Torch
    not compiled with CUDA enabled", after writing uci.json and config.json into --out."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    assert main(["uci", str(tiny), "--device", "cuda", "--epochs", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "device 'cuda' is not available here" in err and "--device cpu" in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- real data


def test_boston_split0_reference_budget(tmp_path: Path) -> None:
    """Boston split 0, 40 epochs (the reference budget) of minibatch 32, local reparam.

    Bound: test RMSE < 4.0 and LL > -3.0 (VI (Graves) reports 4.32 / -2.90 averaged over
    splits). Measured: RMSE 2.61 / LL -2.67 (seed 0), 2.71 / -2.67 (seed 1); about 2 s on an
    idle 2-core machine (25 s under heavy load), so it is not marked slow.
    """
    try:
        root = resolve_data_dir(None) / "uci" / "bostonHousing"
    except MissingDataError:
        pytest.skip("shared data not available")
    if not root.is_dir():
        pytest.skip("bostonHousing not available")
    cfg = U.uci_config(epochs=40, batch_size=32, num_samples=2, lr=0.01)
    rec = U.run_split(root, 0, cfg, test_samples=100, passes=10, threads=1)
    assert rec["rmse"] < 4.0
    assert rec["ll"] > -3.0
