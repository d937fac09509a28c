"""Review (session 22) of the training engine and the ``bbb`` command line: regression tests.

Each test names what was wrong before its fix. Runs are tiny (64 toy points or a 256-image
MNIST subset, one or two epochs, a 8-unit hidden layer) and called in-process through
``bbb.cli.main``; nothing here is statistical (every number compared is exact).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
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


# ------------------------------------------------- second pass (the review's leftovers)
def _strict_load(text: str) -> Any:
    """``json.loads`` that refuses NaN / Infinity (as strict JSON readers do)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_files_are_strict_json_when_a_metric_is_not_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs._json_default`` meant to write non-finite floats as null, but json.dumps never
    calls ``default`` for floats: a NaN / infinite metric went into ``metrics.json`` and
    ``metrics.jsonl`` as ``NaN`` / ``Infinity`` (not JSON). Now they are null, and the
    command's summary line prints them as nan."""
    import bbb.runs
    import bbb.train.trainer

    def bad_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {"nll": float("nan"), "rmse": float("inf"), "log_likelihood": -float("inf")}

    monkeypatch.setattr(bbb.train.trainer, "evaluate", bad_evaluate)
    monkeypatch.setattr(bbb.runs, "evaluate", bad_evaluate)
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    assert "val: nll=nan, rmse=nan, log_likelihood=nan" in capsys.readouterr().out
    metrics = _strict_load((run / "metrics.json").read_text())
    assert metrics["val"] == {"nll": None, "rmse": None, "log_likelihood": None}
    rows = [_strict_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_nll"] is None and rows[0]["val_rmse"] is None
    assert isinstance(rows[0]["loss"], float)


def test_strict_json_helper() -> None:
    """The shared helper: floats, tensors and containers; other objects as str()."""
    from bbb.train.checkpoint import strict_json

    value = {"a": [1.0, float("nan")], "t": torch.tensor([float("inf"), 2.0]), "p": Path("x")}
    assert _strict_load(strict_json(value)) == {"a": [1.0, None], "t": [None, 2.0], "p": "x"}


def test_resuming_a_finished_run_for_more_epochs_removes_its_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bbb train --resume RUN --epochs N`` beyond a finished run's epochs left its
    ``eval*.json`` and ``prune-*.json``, which then described a model that may no longer be
    the run's best. They are removed when training continues, and the output says so; a
    resume that trains no further epoch keeps them."""
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    assert cli("prune", run, "--split", "val", "--num-samples", "2", "--fraction", "0.5") == 0
    capsys.readouterr()
    assert cli("train", "--resume", run, "--epochs", "1", "--quiet") == 0  # nothing to train
    assert (run / "eval-val.json").is_file() and (run / "prune-0.5-val.json").is_file()
    assert "removed" not in capsys.readouterr().out
    assert cli("train", "--resume", run, "--epochs", "2", "--quiet") == 0
    out = capsys.readouterr().out
    assert "removed eval-val.json, prune-0.5-val.json: they evaluated the model before" in out
    assert not list(run.glob("eval*.json")) and not list(run.glob("prune-*.json"))
    assert json.loads((run / "metrics.json").read_text())["summary"]["epochs_trained"] == 2


def test_resume_counts_the_epochs_of_the_newest_readable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The epochs a resumed run had done were read from the newest checkpoint's file name
    even when that file was corrupt (the Trainer then resumes from the older one): a resume
    with the older one's epochs was refused ("has already done 3 epochs")."""
    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "3", "--out", run) == 0
    (run / "checkpoints" / "checkpoint-00003.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    # fewer epochs than the readable checkpoint holds: refused, naming it
    assert cli("train", "--resume", run, "--epochs", "1", "--quiet") == 1
    assert "already done 2 epochs (checkpoint-00002.pt)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="checkpoint-00003.pt is corrupt"):
        assert cli("train", "--resume", run, "--epochs", "2", "--quiet") == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["summary"]["epochs_trained"] == 2


def test_evaluate_into_a_read_only_run_is_refused_first_naming_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bbb evaluate`` / ``bbb prune`` of a run in a read-only directory evaluated the whole
    split, then failed naming its temporary file (``.eval.json.XXXX.tmp``). Now the directory
    is checked before the evaluation and named. (Root ignores file modes: there the failing
    file creation is simulated.)"""
    import os
    import tempfile

    import bbb.train.trainer

    run = tmp_path / "run"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    capsys.readouterr()

    def no_evaluation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("evaluated before checking the run directory")

    monkeypatch.setattr(bbb.train.trainer, "evaluate", no_evaluation)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> tuple[int, str]:
            if dir is not None and Path(dir) == run:
                raise PermissionError(13, "Permission denied", str(Path(dir) / ".x.tmp"))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        run.chmod(0o555)
    try:
        assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 1
        err = capsys.readouterr().err
        assert f"cannot write eval-val.json into the run directory {run} (" in err
        assert ".tmp" not in err
        assert cli("prune", run, "--num-samples", "2", "--fraction", "0.5") == 1
        assert f"cannot write prune-0.5.json into the run directory {run}" in (
            capsys.readouterr().err
        )
    finally:
        run.chmod(0o755)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    assert (run / "eval-val.json").is_file()
    assert not [p.name for p in run.iterdir() if p.name.endswith((".probe", ".tmp"))]


def _uci_dir(d: Path, n_rows: int = 40) -> Path:
    """A tiny data set in the UCI split format (2 features, one split of 8 test rows)."""
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, 2, generator=g)
    y = x @ torch.tensor([1.0, -1.0]) + 3.0
    rows = torch.cat([x, y[:, None]], 1).tolist()
    (d / "data.txt").write_text("".join(" ".join(f"{v:.6f}" for v in r) + "\n" for r in rows))
    (d / "index_features.txt").write_text("0\n1\n")
    (d / "index_target.txt").write_text("2\n")
    (d / "index_train_0.txt").write_text("".join(f"{i}\n" for i in range(8, n_rows)))
    (d / "index_test_0.txt").write_text("".join(f"{i}\n" for i in range(8)))
    return d


def test_a_relative_uci_path_is_saved_absolute_and_a_missing_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained with a relative ``--uci-path`` saved it as written: ``bbb evaluate``
    from another working directory failed ("UCI data set 'sets/tiny' not found"), and
    ``--data-dir`` could not help (it serves bare names under DATA_DIR/uci). The path is now
    saved absolute; a saved path that leads nowhere is named with config.json and the fix."""
    work = tmp_path / "work"
    _uci_dir(work / "sets" / "tiny")
    monkeypatch.chdir(work)
    run = tmp_path / "run"
    uci = ["--dataset", "uci", "--uci-path", "sets/tiny", "--hidden", "4", "--batch-size", "8"]
    assert cli("train", *uci, "--val-samples", "2", "--epochs", "1", "--quiet", "--out", run) == 0
    saved = json.loads((run / "config.json").read_text())["uci_path"]
    assert saved == str(work / "sets" / "tiny")
    # resuming with the same relative path repeated is not a change
    assert cli("train", "--resume", run, "--uci-path", "sets/tiny", "--epochs", "2", "--quiet") == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved path still leads to the data
    capsys.readouterr()
    assert cli("evaluate", run, "--num-samples", "2") == 0
    assert (run / "eval.json").is_file()
    # a run saved before (relative path), evaluated from elsewhere: named, with the remedy
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "uci_path": "sets/tiny"}))
    assert cli("evaluate", run, "--num-samples", "2") == 1
    err = capsys.readouterr().err
    assert f"the run's uci_path 'sets/tiny' (in {run / 'config.json'}) is relative" in err
    assert f"{tmp_path / 'sets' / 'tiny'} does not exist" in err
    # ... and a saved absolute path whose data moved
    (run / "config.json").write_text(json.dumps({**config, "uci_path": str(tmp_path / "gone")}))
    assert cli("evaluate", run, "--num-samples", "2") == 1
    assert f"UCI data set {tmp_path / 'gone'} (uci_path in {run / 'config.json'})" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("lean", [True, False])
def test_adam_steps_move_the_version_counters_so_a_cached_kl_is_current(lean: bool) -> None:
    """The trainer's Adam (fused) updated the parameters without moving their version
    counters: after a forward pass, a step with no backward pass in between (gradients of an
    earlier pass) left kl() returning the KL cached by that forward, of the parameters before
    the step. Both its own fused path and torch's fused step (the fallback, here forced by a
    step hook) now move the counters."""
    import torch.distributions as D

    from bbb.nn import BayesLinear
    from bbb.priors import GaussianPrior
    from bbb.train.optim import Adam, adam

    torch.manual_seed(0)
    layer = BayesLinear(5, 3, prior=GaussianPrior(1.0), kl="closed_form", rho_init=-2.0)
    opt = adam(layer.parameters(), lr=0.5)
    assert isinstance(opt, Adam)
    if not lean:
        opt.register_step_post_hook(lambda *a: None)
    x = torch.randn(4, 5)
    (layer(x).square().sum() + layer.kl()).backward()
    opt.step()
    layer(x)  # caches softplus(rho) for kl(); the gradients are the earlier pass's
    versions = [p._version for p in layer.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(layer.parameters(), versions, strict=True))
    with torch.no_grad():
        expected = sum(
            D.kl_divergence(
                D.Normal(mu.double(), torch.nn.functional.softplus(rho.double())),
                D.Normal(0.0, 1.0),
            ).sum()
            for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho))
        )
    assert layer.kl().item() == pytest.approx(float(expected), rel=1e-5)
