"""Review (session 22) of the training engine and the ``bbb`` command line: regression tests.

Each test names what was wrong before its fix. Runs are tiny (64 toy points or a 256-image
MNIST subset, one or two epochs, a 8-unit hidden layer) and called in-process through
``bbb.cli.main``; nothing here is statistical (every number compared is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bbb
from bbb.cli import main
from bbb.config import ConfigError, TrainConfig
from bbb.runs import load_run, train_run
from bbb.train.trainer import seed_everything

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"shared MNIST data absent ({SHARED / 'mnist'})"
)
TOY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2", "--quiet",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BBB_DATA_DIR from the caller, no PNGs (not looked at), the working directory in tmp."""
    import bbb.metrics
    import bbb.plots

    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: None)
    monkeypatch.setattr(bbb.metrics, "plot_reliability_diagram", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)


def cli(*args: object) -> int:
    """``bbb ARGS`` in-process; returns the exit code."""
    return main([str(a) for a in args])


def _edit_config(run: Path, **changes: object) -> None:
    path = run / "config.json"
    saved = json.loads(path.read_text())
    saved.update(changes)
    path.write_text(json.dumps(saved, indent=2))


def test_a_saved_setting_the_run_never_read_does_not_block_evaluate_prune_or_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs written before settings the run never reads became an error (momentum with Adam,
    a classifier's noise, ...) hold such settings in config.json: ``bbb evaluate``, ``bbb
    prune`` and ``bbb train --resume`` refused them ("setting(s) that do not apply here"),
    so those runs could no longer be used at all. A new run is still refused."""
    run = tmp_path / "old"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    _edit_config(run, momentum=0.5)  # as an older bbb train --momentum 0.5 (Adam) saved it
    capsys.readouterr()
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    assert cli("prune", run, "--split", "val", "--num-samples", "2", "--fraction", "0.5") == 0
    cfg, _, _, _ = load_run(run)
    assert cfg.momentum == 0.5
    assert cli("train", "--resume", run, "--epochs", "2", "--quiet") == 0
    assert json.loads((run / "metrics.json").read_text())["summary"]["epochs_trained"] == 2
    assert json.loads((run / "config.json").read_text())["momentum"] == 0.5
    capsys.readouterr()
    # a new run with the same setting is refused as before
    assert cli("train", *TOY, "--epochs", "1", "--momentum", "0.5", "--out", tmp_path / "n") == 1
    assert "momentum=0.5 (optimizer 'sgd' only)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="would be ignored: momentum=0.5"):
        TrainConfig(dataset="toy", momentum=0.5).validate()
    TrainConfig(dataset="toy", momentum=0.5).validate(check_applicable=False)


@needs_mnist
def test_evaluate_and_prune_take_a_data_dir_for_a_run_trained_with_a_relative_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained with a relative ``--data-dir`` (or moved to another machine) saves that
    path; from another working directory ``bbb evaluate`` failed with "Pass --data-dir DIR or
    set BBB_DATA_DIR", yet had no ``--data-dir`` and the saved path wins over BBB_DATA_DIR."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "data").symlink_to(SHARED.resolve(), target_is_directory=True)
    monkeypatch.chdir(work)
    relative = "data"
    run = tmp_path / "run"
    args = ["--dataset", "mnist", "--data-dir", relative, "--subset", "256", "--hidden", "8"]
    assert cli("train", *args, "--batch-size", "64", "--val-samples", "2", "--epochs", "1",
               "--quiet", "--out", run) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the relative path no longer leads to the data
    capsys.readouterr()
    assert cli("evaluate", run, "--num-samples", "2") == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli("evaluate", run, "--num-samples", "2", "--data-dir", SHARED) == 0
    first = json.loads((run / "eval.json").read_text())["metrics"]
    assert cli("prune", run, "--num-samples", "2", "--data-dir", SHARED) == 0
    assert (run / "prune-0.95.json").is_file()
    # the same numbers as from the directory the run was trained in
    monkeypatch.chdir(work)
    assert cli("evaluate", run, "--num-samples", "2") == 0
    assert json.loads((run / "eval.json").read_text())["metrics"] == first
    # the run's config.json is left as it was
    assert json.loads((run / "config.json").read_text())["data_dir"] == relative


def test_a_seed_beyond_64_bits_is_named_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed 10**23`` failed with torch's bare "Overflow when unpacking long long"."""
    huge = 10**23
    with pytest.raises(ConfigError, match=r"seed must be at most 2\*\*63 - 1, got 1"):
        TrainConfig(dataset="toy", seed=huge).validate()
    TrainConfig(dataset="toy", seed=2**63 - 1).validate()  # the largest accepted
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*64"):
        seed_everything(2**64)
    seed_everything(2**64 - 1)  # what torch.manual_seed takes
    out = tmp_path / "r"
    assert cli("train", *TOY, "--epochs", "1", "--seed", huge, "--out", out) == 1
    assert "seed must be at most 2**63 - 1" in capsys.readouterr().err
    assert not out.exists()
    run = tmp_path / "ok"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    capsys.readouterr()
    assert cli("evaluate", run, "--split", "val", "--seed", huge) == 1
    assert "--seed must be a non-negative integer below 2**64" in capsys.readouterr().err


def test_a_pt_file_without_model_weights_as_best_pt_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``best.pt`` that is a torch file but not a bbb one (no ``model``) made ``bbb
    evaluate`` print ``bbb: error: 'model'`` (a KeyError); a resume did not check it either."""
    run = tmp_path / "r"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    torch.save({"weights": torch.zeros(2)}, run / "best.pt")
    capsys.readouterr()
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 1
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'best.pt'} is not a bbb training checkpoint" in err
    assert "no model, elbo" in err
    # resuming: the epoch checkpoints are intact, so a warning and training goes on
    cfg = TrainConfig(
        dataset="toy", toy_n=64, hidden=[8], batch_size=16, val_samples=2, epochs=2
    ).validate()
    with pytest.warns(UserWarning, match=r"best\.pt is unreadable .*no model, elbo, epoch"):
        summary = train_run(cfg, run, resume=True, progress=False, log=None)
    assert summary["epochs_trained"] == 2
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] == 2
    assert isinstance(bbb.train.load_checkpoint(run / "best.pt")[0]["model"], dict)


def test_overwrite_removes_the_previous_runs_plots_and_normalization(tmp_path: Path) -> None:
    """``--overwrite`` deleted the old run's checkpoints, metrics and evaluations but left its
    plots and a UCI run's ``normalization.json``: a toy run written over an MNIST or UCI run
    kept the old ``reliability.png`` and training statistics beside its own files."""
    run = tmp_path / "r"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    old = ["reliability.png", "normalization.json", "learning_curves.png"]
    for name in old:  # as an MNIST run (reliability diagram) or a UCI run left them
        (run / name).write_text("the previous run's")
    assert cli("train", *TOY, "--epochs", "1", "--seed", "3", "--out", run, "--overwrite") == 0
    for name in old:
        assert not (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["seed"] == 3
