"""Review session 22: the UCI regression engine (bbb.uci) against the standard protocol.

Each test pins a bug found in the review (fixed in src/bbb/uci) or a protocol property the
engine must keep. All runs are tiny (a few epochs on the synthetic split directory of
``test_uci._write_uci_dir``) and seeded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_uci import _write_uci_dir

from bbb import uci as U
from bbb.cli import main as bbb_main
from bbb.data.uci import UCIDataset
from bbb.metrics import mixture_gaussian_log_likelihood


def _cfg(**kw: object) -> object:
    return U.uci_config(**{"epochs": 4, "num_samples": 2, **kw})


def _cli(*args: object) -> int:
    return bbb_main([str(a) for a in args])


def test_tune_with_a_diverged_grid_point_finishes_the_run(tmp_path: Path) -> None:
    """A grid point that diverged has no curve: ``_plot_tune`` used to raise KeyError
    ('curve_epochs') after tune.json was written, so the run stopped before any split."""
    d = _write_uci_dir(tmp_path / "data")
    space = U.SearchSpace.from_dict({"grid": {"lr": [0.01, 1e8]}, "smooth": 1})
    st = U.UCIRunSettings(splits=[0], test_samples=3, passes=2, tune=True, search=space)
    out = tmp_path / "run"
    metrics = U.run_uci(d, out, config=_cfg(), settings=st, log=None)  # type: ignore[arg-type]
    assert metrics["n_splits"] == 1 and metrics["settings"]["chosen"]["lr"] == 0.01
    assert (out / "tune.png").is_file() and (out / "splits" / "split_0.json").is_file()


def test_run_uci_leaves_the_callers_settings_alone(tmp_path: Path) -> None:
    """run_uci wrote the chosen splits back into the caller's settings: the same settings
    reused for a data set with fewer splits then failed ('split 2 out of range'), and one
    with more splits silently ran only the first set's selection."""
    three = _write_uci_dir(tmp_path / "data", name="three", n_splits=3)
    two = _write_uci_dir(tmp_path / "data", name="two", n_splits=2)
    st = U.UCIRunSettings(splits=[], test_samples=3, passes=2)
    a = U.run_uci(three, tmp_path / "a", config=_cfg(epochs=2), settings=st, log=None)  # type: ignore[arg-type]
    b = U.run_uci(two, tmp_path / "b", config=_cfg(epochs=2), settings=st, log=None)  # type: ignore[arg-type]
    assert (a["n_splits"], b["n_splits"]) == (3, 2)
    assert st.splits == []


def test_uci_all_checks_every_config_before_the_first_data_set_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all read a data set's config file only when its turn came: a bad [uci] split
    selection (or a bad key) in the last set's file stopped the run after the others had
    trained. Now every file is checked first and the error names the data set."""
    root = tmp_path / "uci"
    _write_uci_dir(root, name="aaa", n_splits=2)
    _write_uci_dir(root, name="zzz", n_splits=2)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "zzz.toml").write_text('[train]\nepochs = 2\n[uci]\nsplits = "0-5"\n')
    out = tmp_path / "all"
    args = ["uci", "--all", root, "--config", configs, "--out", out, "--epochs", "2"]
    assert _cli(*args, "--test-samples", "2", "--quiet") == 1
    err = capsys.readouterr().err
    assert "zzz" in err and "split 2 out of range" in err
    assert not (out / "aaa").exists()
    (configs / "zzz.toml").write_text("[train]\nepochz = 2\n")
    assert _cli(*args, "--test-samples", "2", "--quiet") == 1
    assert "epochz" in capsys.readouterr().err and not (out / "aaa").exists()


def test_test_rows_never_enter_the_normalisation(tmp_path: Path) -> None:
    """x / y statistics come from the training rows only (ddof 0, as in the reference code);
    with a validation part, from the training rows minus the validation part."""
    d = _write_uci_dir(tmp_path / "data")
    ds = UCIDataset(d)
    train_idx, test_idx = ds.split_indices(0)
    sp = ds.split(0, dtype=torch.float64)
    assert np.allclose(sp.y_mean.numpy(), ds.targets[train_idx].mean())
    assert np.allclose(sp.y_std.numpy(), ds.targets[train_idx].std())
    assert np.allclose(sp.x_mean.numpy(), ds.features[train_idx].mean(0))
    # changing every test row's values leaves the statistics and the training part unchanged
    ds.features[test_idx] += 1e3
    ds.targets[test_idx] -= 1e3
    moved = ds.split(0, dtype=torch.float64)
    assert torch.equal(moved.y_std, sp.y_std) and torch.equal(moved.x_mean, sp.x_mean)
    assert torch.equal(moved.train.tensors[1], sp.train.tensors[1])
    val = ds.split(0, validation_fraction=0.2, seed=3, dtype=torch.float64)
    assert val.val_index is not None
    fit = val.train_index.numpy()
    assert not set(val.val_index.tolist()) & set(fit.tolist())
    assert not set(val.val_index.tolist()) & set(test_idx.tolist())
    assert np.allclose(val.y_mean.numpy(), ds.targets[fit].mean())
    # the carve is reproducible
    again = ds.split(0, validation_fraction=0.2, seed=3)
    assert again.val_index is not None and torch.equal(again.val_index, val.val_index)


def test_test_log_likelihood_is_the_log_of_the_mixture_in_original_units() -> None:
    """log (1/S) sum_s N(y; mu_s, s2_s) - log(y_std), not the mean over s of the log-density,
    checked against a float64 hand computation in original units."""
    g = torch.Generator().manual_seed(0)
    s, b, y_mean, y_std = 7, 11, 22.5, 9.2
    mu = torch.randn(s, b, 1, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(s, b, 1, generator=g, dtype=torch.float64)
    y = torch.randn(b, 1, generator=g, dtype=torch.float64)
    got = mixture_gaussian_log_likelihood(mu, var, y, y_scale=y_std)
    # original units: y_o = y * y_std + y_mean, mu_o likewise, var_o = var * y_std^2
    yo, muo, varo = y * y_std + y_mean, mu * y_std + y_mean, var * y_std**2
    dens = torch.exp(-0.5 * (yo - muo) ** 2 / varo) / torch.sqrt(2 * math.pi * varo)
    want = torch.log(dens.mean(0)).mean().item()
    assert got == pytest.approx(want, abs=1e-10)
    mean_of_logs = torch.log(dens).mean().item()
    assert got > mean_of_logs + 1e-3  # Jensen: strictly above for components that differ


def test_a_float_range_for_an_integer_option_is_refused_when_the_space_is_read(
    tmp_path: Path,
) -> None:
    """``num_samples = { float = [1, 5] }``: the range's ends are TOML ints, so the up-front
    check passed, then every trial failed ('num_samples must be an integer, got 2.7')."""
    from bbb.sweep.space import SweepError, load_space

    d = _write_uci_dir(tmp_path / "data")
    space = tmp_path / "space.toml"
    head = f'[sweep]\ntrials = 2\n[train]\ndataset = "uci"\nuci_path = "{d}"\nval_fraction = 0.2\n'
    space.write_text(head + "[search]\nnum_samples = { float = [1, 5] }\n")
    with pytest.raises(
        SweepError, match="num_samples = 1: num_samples must be an integer, got 1.0"
    ):
        load_space(space)
    # the same range as ints, and a float range of a float option, are accepted
    space.write_text(head + "[search]\nnum_samples = { int = [1, 5] }\nlr = { float = [1, 2] }\n")
    assert [p.kind for p in load_space(space).params] == ["int", "float"]


def test_a_shared_copys_n_splits_and_n_hidden_files_are_verified(tmp_path: Path) -> None:
    """n_splits.txt and n_hidden.txt set how many splits run and the network's width, and
    their digests are in the table, but only data.txt and the index files were checked: a
    changed n_splits.txt silently dropped splits."""
    from bbb.data.checksums import ChecksumError, clear_verification_cache

    src = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "uci" / "concrete"
    if not (src / "data.txt").is_file():
        pytest.skip("shared UCI data not available")
    copy = tmp_path / "concrete"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    clear_verification_cache()
    assert UCIDataset(copy).n_splits == 20
    (copy / "n_splits.txt").write_text("19\n")
    with pytest.raises(ChecksumError, match="n_splits.txt"):
        UCIDataset(copy)
    assert UCIDataset(copy, verify=False).n_splits == 19
