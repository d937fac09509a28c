"""Tests of the ``bbb`` command line: train / evaluate / prune end to end, exact resume after
``kill -9``, divergence, configuration files, help, and one clear line for every bad input.

Runs are tiny (a 512-image MNIST subset or a few hundred toy points, 2-6 epochs). Most commands
are called in-process through ``bbb.cli.main``; the error paths and the killed trainings run as
real subprocesses (``python -m bbb``), the error-path ones concurrently to keep the file fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

import bbb.elbo
from bbb.cli import build_parser, main
from bbb.config import ConfigError, TrainConfig, load_config_file
from bbb.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HAVE_MNIST = (SHARED / "mnist").is_dir()
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f"shared MNIST data absent ({SHARED.resolve() / 'mnist'})"
)

MNIST_TINY = [
    "--dataset", "mnist", "--data-dir", str(SHARED), "--subset", "512", "--hidden", "32",
    "--batch-size", "64", "--val-samples", "2", "--quiet",
]  # fmt: skip
TOY_TINY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2", "--quiet",
]  # fmt: skip
# The killed runs: 50 steps per epoch, 6 epochs (a few seconds with the interpreter start).
TOY_KILL = [
    "--dataset", "toy", "--toy-n", "400", "--hidden", "16", "16", "--batch-size", "8",
    "--epochs", "6", "--val-samples", "2", "--estimator", "flipout", "--seed", "7", "--quiet",
]  # fmt: skip
# An error below this beats chance on 512 images: a network that guesses (error 0.9) has
# a binomial standard error sqrt(0.9 * 0.1 / 512) = 0.013 on 512 images, and the bound is
# 5 of those below 0.9 (0.834); 0.9 itself was passed by half of the guessing networks.
BEATS_CHANCE = 0.9 - 5 * math.sqrt(0.9 * 0.1 / 512)
TIMING_KEYS = ("train_seconds", "wall_seconds")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test depends on the caller's BBB_DATA_DIR or writes into the working directory."""
    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # argparse help on one line per option
    monkeypatch.chdir(tmp_path)


def cli(*args: str) -> int:
    """``bbb ARGS`` in-process; returns the exit code."""
    return main([str(a) for a in args])


def _stub_plots(mp: pytest.MonkeyPatch) -> None:
    """Skip drawing PNGs (most of an in-process tiny run's time) where no test looks at them."""
    import bbb.metrics
    import bbb.plots

    mp.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    mp.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    mp.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    mp.setattr(bbb.metrics, "plot_reliability_diagram", lambda *a, **k: None)


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_plots(monkeypatch)


def bbb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BBB_DATA_DIR"}
    # Same intra-op thread count as this process, so numerics match in-process runs exactly.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["COLUMNS"] = "250"
    return env


def bbb_subprocess(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bbb", *args],
        cwd=cwd,
        env=bbb_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out]


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert set(a) == set(b), f"{what}: different keys"
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}.{k}: tensors differ"
        else:
            assert a[k] == b[k], f"{what}.{k}: {a[k]!r} != {b[k]!r}"


def assert_same_run(run: Path, ref: Path) -> None:
    """Two run directories hold exactly the same trained state and per-epoch metrics."""
    best_a = torch.load(run / "best.pt", weights_only=True)
    best_b = torch.load(ref / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    assert_same_tensors(best_a["model"], best_b["model"], "best.pt model")
    assert_same_tensors(best_a["elbo"], best_b["elbo"], "best.pt elbo")
    last_a, path_a = load_checkpoint(run / "checkpoints")
    last_b, path_b = load_checkpoint(ref / "checkpoints")
    assert path_a.name == path_b.name
    for key in ("model", "elbo", "optimizer"):
        assert_same_tensors(last_a[key], last_b[key], f"last checkpoint {key}")
    assert rows(run) == rows(ref)
    ma = json.loads((run / "metrics.json").read_text())
    mb = json.loads((ref / "metrics.json").read_text())
    assert ma["val"] == mb["val"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch MNIST-subset run trained in-process (shared by the evaluate/prune tests)."""
    if not HAVE_MNIST:
        pytest.skip(f"shared MNIST data absent ({SHARED.resolve() / 'mnist'})")
    run = tmp_path_factory.mktemp("mnist") / "run"
    assert cli("train", *MNIST_TINY, "--epochs", "3", "--out", run) == 0
    return run


@needs_mnist
def test_train_writes_the_run_directory(mnist_run: Path) -> None:
    names = {p.name for p in mnist_run.iterdir()}
    expected = {"config.json", "metrics.jsonl", "checkpoints", "best.pt", "metrics.json"}
    assert expected | {"learning_curves.png", "reliability.png"} <= names
    cfg = TrainConfig.from_dict(json.loads((mnist_run / "config.json").read_text()))
    assert (cfg.dataset, cfg.subset, cfg.hidden, cfg.epochs) == ("mnist", 512, [32], 3)
    lines = (mnist_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # one line per epoch
    assert [p.name for p in list_checkpoints(mnist_run / "checkpoints")] == [
        "checkpoint-00002.pt",
        "checkpoint-00003.pt",
    ]  # the last two are kept
    best = torch.load(mnist_run / "best.pt", weights_only=True)
    assert 1 <= best["epoch"] <= 3
    metrics = json.loads((mnist_run / "metrics.json").read_text())
    assert metrics["summary"]["epochs_trained"] == 3
    for split in ("val", "test"):
        assert set(metrics[split]) >= {"error", "accuracy", "nll", "ece", "brier"}
        # 3 epochs on 512 digits beat chance (measured: error 0.29 val, 0.31 test)
        assert 0.0 <= metrics[split]["error"] < BEATS_CHANCE
    for png in ("learning_curves.png", "reliability.png"):
        assert (mnist_run / png).read_bytes()[:8] == PNG_MAGIC


@needs_mnist
def test_train_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    assert cli("train", *MNIST_TINY, "--epochs", "1", "--out", run) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out
    assert "best epoch 1 of 1" in out
    assert "val: error=" in out and "test: error=" in out


@needs_mnist
def test_evaluate_prints_metrics_and_writes_eval_json(
    mnist_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("evaluate", mnist_run, "--num-samples", "4") == 0
    out = capsys.readouterr().out
    for word in ("metrics:", "error", "accuracy", "nll", "uncertainty:", "mean_epistemic"):
        assert word in out
    result = json.loads((mnist_run / "eval.json").read_text())
    assert result["split"] == "test" and result["num_samples"] == 4
    assert result["n_examples"] == 512  # the run's --subset 512 also caps the test images
    assert 0.0 <= result["metrics"]["error"] < BEATS_CHANCE  # measured: 0.31
    u = result["uncertainty"]
    # (entropy = aleatoric + epistemic holds by construction; check the parts' own ranges:
    # 4 weight samples of a 3-epoch network disagree, and no entropy exceeds log 10 nats)
    assert 0.0 < u["mean_epistemic"] < u["mean_entropy"] <= math.log(10)
    assert 0.0 < u["mean_aleatoric"] < u["mean_entropy"]
    assert f"written: {mnist_run / 'eval.json'}" in out


@needs_mnist
def test_prune_prints_metrics_and_writes_prune_json(
    mnist_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = (mnist_run / "best.pt").read_bytes()
    assert cli("prune", mnist_run, "--fraction", "0.9", "--num-samples", "4") == 0
    out = capsys.readouterr().out
    assert "pruned:" in out and "metrics:" in out and "error" in out
    result = json.loads((mnist_run / "prune-0.9.json").read_text())
    pruned = result["pruned"]
    assert pruned["removed"] == math.floor(Fraction("0.9") * pruned["total"])  # exactly
    assert pruned["fraction"] == pytest.approx(pruned["removed"] / pruned["total"])
    assert 0.0 <= result["metrics"]["error"] < BEATS_CHANCE  # still (measured: 0.33)
    # pruning is applied to a loaded copy: the run's best.pt is untouched by `bbb prune`
    assert (mnist_run / "best.pt").read_bytes() == best


def test_toy_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression runs write the band plot; evaluating a split the data set lacks is an error."""
    run = tmp_path / "toy"
    assert cli("train", *TOY_TINY, "--epochs", "2", "--out", run) == 0
    for name in ("config.json", "metrics.json", "learning_curves.png", "regression_band.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"rmse", "log_likelihood", "nll"}
    assert "test" not in metrics
    capsys.readouterr()
    assert cli("evaluate", run, "--split", "val", "--num-samples", "3") == 0
    assert "mean_epistemic_variance" in capsys.readouterr().out
    assert cli("evaluate", run) == 1  # the toy data set has no test split
    err = capsys.readouterr().err
    assert err.startswith("bbb: error:") and "no test split" in err


# --------------------------------------------------------------------------- reproducibility


TOY_REF = [*TOY_TINY, "--epochs", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def toy_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch toy run (TOY_REF) that the reproducibility and resume tests must match."""
    run = tmp_path_factory.mktemp("toy-ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _stub_plots(mp)
        assert cli("train", *TOY_REF, "--out", run) == 0
    return run


@pytest.mark.usefixtures("no_plots")
def test_same_seed_gives_identical_runs(tmp_path: Path, toy_ref: Path) -> None:
    torch.rand(11)  # the global RNG state before a run must not matter
    assert cli("train", *TOY_REF, "--out", tmp_path / "b") == 0
    a, b = rows(toy_ref), rows(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a == b
    assert_same_run(tmp_path / "b", toy_ref)
    assert cli("train", *TOY_TINY, "--epochs", "3", "--seed", "6", "--out", tmp_path / "c") == 0
    assert [r["loss"] for r in rows(tmp_path / "c")] != [r["loss"] for r in a]


# --------------------------------------------------------------------------- resume


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before the kill point:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not reach the kill point in time")
        time.sleep(0.005)


def _start_and_kill(argv: list[str], cwd: Path, ready: Callable[[], bool], delay: float) -> None:
    """Run ``bbb ARGV`` in a subprocess; SIGKILL it ``delay`` seconds after ``ready()``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bbb", *argv],
        cwd=cwd,
        env=bbb_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(proc, ready)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.usefixtures("no_plots")
def test_resume_after_repeated_sigkill_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    """kill -9 a training (and then its resumptions) at several moments; the final resume
    ends with exactly the tensors and metrics of an uninterrupted run with the same seed."""
    ref = tmp_path / "reference"
    assert cli("train", *TOY_KILL, "--out", ref) == 0
    epoch_seconds = sum(json.loads(line)["train_seconds"] for line in _lines(ref)) / 6

    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    resume = ["train", "--resume", str(run), "--quiet"]
    kill_points = [
        # (command, wait for this checkpoint, then sleep this share of an epoch)
        (["train", *TOY_KILL, "--out", str(run)], 1, 0.0),  # as the first checkpoint appears
        (resume, 3, 0.5),  # a resumed run, in the middle of epoch 4
        (resume, 5, 0.3),  # early in the last epoch
    ]
    for argv, epoch, share in kill_points:
        path = ckpts / f"checkpoint-{epoch:05d}.pt"
        _start_and_kill(argv, tmp_path, path.exists, share * epoch_seconds)
        newest = latest_checkpoint(ckpts)
        assert newest is not None and newest.name >= path.name
        assert not (run / "metrics.json").exists()  # it really was interrupted

    assert cli(*resume) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    assert_same_run(run, ref)
    assert not list(run.rglob("*.tmp")), "temporary files of the killed writes are left over"


def _lines(run: Path) -> list[str]:
    return [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.usefixtures("no_plots")
def test_resume_with_more_epochs_extends_a_finished_run(tmp_path: Path, toy_ref: Path) -> None:
    run = tmp_path / "short"
    assert cli("train", *TOY_TINY, "--epochs", "1", "--seed", "5", "--out", run) == 0
    assert cli("train", "--resume", run, "--epochs", "3", "--quiet") == 0
    assert_same_run(run, toy_ref)
    # config.json describes the run as trained: the extended epochs
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


@pytest.mark.usefixtures("no_plots")
def test_resume_skips_a_truncated_newest_checkpoint(tmp_path: Path, toy_ref: Path) -> None:
    run = tmp_path / "run"
    assert cli("train", *TOY_REF, "--out", run) == 0
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == "checkpoint-00003.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=newest.name):
        assert cli("train", "--resume", run, "--quiet") == 0
    assert_same_run(run, toy_ref)


# --------------------------------------------------------------------------- divergence


def test_nan_loss_stops_naming_epoch_and_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = bbb.elbo.ELBO.forward

    def flaky(self: bbb.elbo.ELBO, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if self.training and int(self.step) == 7:  # 64 points / 16 = 4 steps per epoch
            result.loss = result.loss * math.nan
        return result

    monkeypatch.setattr(bbb.elbo.ELBO, "forward", flaky)
    run = tmp_path / "nan"
    assert cli("train", *TOY_TINY, "--epochs", "3", "--out", run) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("bbb: error: loss became nan at epoch 2, step 3 of 4")
    assert "checkpoint-00001.pt" in err and "Traceback" not in err
    state, path = load_checkpoint(run / "checkpoints")  # the last good checkpoint is intact
    assert path.name == "checkpoint-00001.pt" and state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1
    assert not (run / "metrics.json").exists()


def test_absurd_learning_rate_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "lr"
    args = ["--optimizer", "sgd", "--lr", "1e6", "--epochs", "3", "--out", run]
    assert cli("train", *TOY_TINY, *args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.match(r"bbb: error: loss became (nan|inf) at epoch 1, step \d+ of 4", err), err
    assert "smaller learning rate" in err
    assert not (run / "metrics.json").exists()


# --------------------------------------------------------------------------- config files


@pytest.mark.usefixtures("no_plots")
def test_config_file_round_trip_and_flags_override(tmp_path: Path) -> None:
    toml = tmp_path / "f.toml"
    toml.write_text(
        "[train]\n"
        'dataset = "toy"\n'
        "toy_n = 64\n"
        "hidden = [8, 4]\n"
        "epochs = 5\n"
        "batch_size = 16\n"
        "lr = 0.005\n"
        'estimator = "reparam"\n'
        'prior = "scale_mixture"\n'
        "prior_pi = 0.25\n"
        "val_samples = 2\n"
        "seed = 3\n"
    )
    run1 = tmp_path / "run1"
    assert cli("train", "--config", toml, "--epochs", "1", "--lr", "0.01", "--out", run1) == 0
    expected = TrainConfig(
        dataset="toy",
        toy_n=64,
        hidden=[8, 4],
        epochs=1,  # flag beats the file's 5
        batch_size=16,
        lr=0.01,  # flag beats the file's 0.005
        estimator="reparam",
        prior="scale_mixture",
        prior_pi=0.25,
        val_samples=2,
        seed=3,
    )
    saved = TrainConfig.from_dict(load_config_file(run1 / "config.json"))
    assert saved == expected
    assert len(_lines(run1)) == 1

    # The saved config.json is itself a valid --config: it rebuilds the identical TrainConfig
    # and reproduces the run.
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(run1 / "config.json")])
    from bbb.cli import _train_config

    cfg, _, resume = _train_config(args)
    assert cfg == expected and not resume
    run2 = tmp_path / "run2"
    assert cli("train", "--config", run1 / "config.json", "--out", run2, "--quiet") == 0
    assert (run2 / "config.json").read_text() == (run1 / "config.json").read_text()
    assert_same_run(run2, run1)


def test_config_file_keys_at_top_level(tmp_path: Path) -> None:
    toml = tmp_path / "top.toml"
    toml.write_text('dataset = "toy"\nhidden = [3]\nprior_sigma = 0.5\n')
    cfg = TrainConfig.from_dict(load_config_file(toml))
    assert cfg == dataclasses.replace(TrainConfig(), dataset="toy", hidden=[3], prior_sigma=0.5)


def test_config_file_keys_beside_a_train_table_are_refused(tmp_path: Path) -> None:
    """Top-level keys of a file that also has a [train] table were dropped silently: this file
    trained MNIST (the default) for 10 epochs."""
    toml = tmp_path / "mixed.toml"
    toml.write_text('dataset = "toy"\nepochs = 1\n[train]\nhidden = [4]\n[uci]\nsplits = 2\n')
    with pytest.raises(ConfigError, match=r"key\(s\) dataset, epochs at the top level beside"):
        load_config_file(toml)
    assert cli("train", "--config", toml, "--out", tmp_path / "run") == 1
    assert not (tmp_path / "run").exists()
    # other tables beside [train] are for other readers (bbb uci's [uci], a sweep's [search])
    toml.write_text('[train]\ndataset = "toy"\n[uci]\nsplits = 2\n')
    assert load_config_file(toml) == {"dataset": "toy"}


def test_a_config_file_that_is_not_text_or_a_directory_is_named(tmp_path: Path) -> None:
    """A binary --config gave a bare "'utf-8' codec can't decode byte 0xff" (no file named);
    a directory was said not to exist."""
    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"config file .*c\.toml is not UTF-8 text"):
        load_config_file(binary)
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config_file(tmp_path)


# --------------------------------------------------------------------------- help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def _help(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    """``bbb ARGS --help`` split into option entries: first option string -> its whole entry."""
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    entries: dict[str, str] = {}
    key = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):  # a new option entry
            key = line.split()[0].rstrip(",")
            entries[key] = line.strip()
        elif key is not None and line.startswith("    ") and line.strip():  # its continuation
            entries[key] += " " + line.strip()
        else:
            key = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _commands(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


def test_top_level_help_lists_commands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = _commands(capsys)
    for command in ("demo", "train", "evaluate", "prune"):
        assert f"    {command} " in text, command
    entries = _help(capsys)
    assert "(default: False)" in entries["--debug"]


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: bbb" in capsys.readouterr().out


def test_train_help_lists_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries = _help(capsys, "train")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, flag
        if f.name == "data_dir":  # None: the help says in words where the data is looked for
            assert entries[flag].endswith("(default: $BBB_DATA_DIR, then ../shared/data)")
            continue
        default = getattr(defaults, f.name)
        if default is None:  # the help says in words what happens without the option
            assert re.search(r"\(default: [a-z][a-z ]+\)$", entries[flag]), entries[flag]
            continue
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    for flag in ("--config", "--out", "--resume", "--quiet"):
        assert flag in entries, flag
    assert "(default: runs/<dataset>-<method>)" in entries["--out"]


@pytest.mark.parametrize("command", ["demo", "evaluate", "prune"])
def test_subcommand_help_lists_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    entries = _help(capsys, command)
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert flag in entries, flag
        if action.default is None:  # the help says in words what happens without the option
            assert re.search(r"\(default: [a-z][a-z' ]+\)$", entries[flag]), entries[flag]
            continue
        assert entries[flag].endswith(f"(default: {action.default})"), entries[flag]


# --------------------------------------------------------------------------- bad inputs


def words(text: str, *more: object) -> list[str]:
    """``"a b c", x`` -> ``["a", "b", "c", str(x)]``."""
    return [*text.split(), *map(str, more)]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_mnist(base: Path) -> Path:
    """A data dir whose train labels decompress to different bytes (one label changed)."""
    d = base / "data" / "mnist"
    d.mkdir(parents=True)
    for f in (SHARED / "mnist").iterdir():
        if f.name != "train-labels-idx1-ubyte.gz":
            (d / f.name).symlink_to(f.resolve())
    content = bytearray(
        gzip.decompress((SHARED / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    )
    content[100] = (content[100] + 1) % 10
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(content)))
    return base / "data"


def _config_only(base: Path) -> Path:
    run = base / "config-only"
    run.mkdir()
    TrainConfig(dataset="toy", toy_n=64, hidden=[8], batch_size=16).save(run / "config.json")
    return run


# name -> (argv builder given a scratch dir, substrings of the one error line)
ERROR_CASES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "missing-data-dir": (
        lambda d: ["train", "--data-dir", "/nonexistent", "--subset", "64", "--out", str(d / "r")],
        ["Data directory /nonexistent", "does not exist"],
    ),
    "bogus-estimator": (
        lambda d: ["train", "--estimator", "bogus", "--out", str(d / "r")],
        ["unknown estimator 'bogus'", "accepted values: reparam, local, flipout"],
    ),
    "bogus-prior": (
        lambda d: ["train", "--prior", "bogus", "--out", str(d / "r")],
        ["unknown prior 'bogus'", "accepted values: gaussian, scale_mixture, laplace"],
    ),
    "bogus-dataset": (
        lambda d: ["train", "--dataset", "cifar", "--out", str(d / "r")],
        ["unknown dataset 'cifar'", "accepted values: mnist, toy, uci"],
    ),
    "non-positive-epochs": (
        lambda d: ["train", *TOY_TINY, "--epochs", "0", "--out", str(d / "r")],
        ["epochs must be a positive integer, got 0"],
    ),
    "toml-unknown-key": (
        lambda d: [
            "train",
            "--config",
            str(_write(d / "bad.toml", 'dataset = "toy"\nlearning_rate = 0.1\n')),
        ],
        ["bad.toml: unknown key(s) learning_rate", "valid keys: dataset"],
    ),
    "toml-syntax": (
        lambda d: ["train", "--config", str(_write(d / "syntax.toml", "epochs = = 3\n"))],
        ["syntax.toml is not valid toml", "line 1"],
    ),
    "config-missing": (
        lambda d: ["train", "--config", str(d / "nope.toml")],
        ["config file", "nope.toml does not exist"],
    ),
    "batch-larger-than-data": (
        lambda d: words("train --dataset toy --toy-n 50 --batch-size 64 --out", d / "r"),
        ["batch_size=64 is larger than the training set (50 examples)"],
    ),
    "resume-without-config": (
        lambda d: ["train", "--resume", str(_write(d / "empty-run" / "x.txt", "").parent)],
        ["cannot resume:", "empty-run/config.json does not exist"],
    ),
    "resume-without-checkpoint": (
        lambda d: ["train", "--resume", str(_config_only(d)), "--quiet"],
        ["nothing to resume: no checkpoint in", "config-only/checkpoints"],
    ),
    "evaluate-not-a-run": (
        lambda d: ["evaluate", str(d)],
        ["is not a run directory", "config.json is missing"],
    ),
    "evaluate-without-best": (
        lambda d: ["evaluate", str(_config_only(d))],
        ["best.pt is missing"],
    ),
}
if HAVE_MNIST:
    ERROR_CASES["checksum-mismatch"] = (
        lambda d: [
            "train",
            "--data-dir",
            str(_bad_mnist(d)),
            "--subset",
            "64",
            "--out",
            str(d / "r"),
        ],
        ["SHA-256 mismatch for", "train-labels-idx1-ubyte.gz", "expected 65a50cbb", "got "],
    )
# These run as real subprocesses (the rest in-process, for speed): exit code, one stderr line.
SUBPROCESS_CASES = (
    "missing-data-dir",
    "checksum-mismatch",
    "bogus-estimator",
    "toml-unknown-key",
    "resume-without-config",
)
DEBUG_RUN = ["--debug", "train", "--estimator", "bogus"]


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the subprocess bad-input commands (and one with --debug), four at a time."""
    jobs: dict[str, list[str]] = {}
    dirs: dict[str, Path] = {}
    for name in SUBPROCESS_CASES:
        if name in ERROR_CASES:
            dirs[name] = tmp_path_factory.mktemp(name)
            jobs[name] = ERROR_CASES[name][0](dirs[name])
    dirs["debug"] = tmp_path_factory.mktemp("debug")
    jobs["debug"] = [*DEBUG_RUN, "--out", str(dirs["debug"] / "r")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {n: pool.submit(bbb_subprocess, argv, dirs[n]) for n, argv in jobs.items()}
        results = {n: f.result() for n, f in futures.items()}
    return {"results": results, "dirs": dirs}


CASES = list(ERROR_CASES)
if not HAVE_MNIST:
    CASES.append(pytest.param("checksum-mismatch", marks=needs_mnist))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_error_line(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    build, expected = ERROR_CASES[case]
    if case in SUBPROCESS_CASES:
        runs = request.getfixturevalue("error_runs")
        proc, scratch = runs["results"][case], runs["dirs"][case]
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        scratch = tmp_path
        code = cli(*build(scratch))
        out, err = capsys.readouterr()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bbb: error: ")
    assert "Traceback" not in err + out
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    # Bad input is reported before the run directory (--out DIR/r, or runs/) is created.
    assert not (scratch / "r").exists()
    assert not (scratch / "runs").exists()


def test_debug_shows_the_traceback(error_runs: dict[str, Any]) -> None:
    proc = error_runs["results"]["debug"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: unknown estimator 'bogus'" in proc.stderr


def test_bad_flag_value_is_one_line_with_usage_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--epochs", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbb: error: argument --epochs: invalid int value: 'abc'")
    assert "bbb train --help" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# --------------------------------------------------------------------------- unwritable --out


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_out_path_blocked_by_a_regular_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "run" if where == "under-a-file" else blocker
    assert cli("train", *TOY_TINY, "--epochs", "1", "--out", out) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("bbb: error: ") and len(err.strip().splitlines()) == 1
    assert "epoch" not in captured.out  # reported before training started
    assert blocker.read_text() == "x"
    what = f"is under {blocker}, which is" if where == "under-a-file" else "is"
    assert f"run directory {out} {what} a file, not a directory: choose another --out" in err


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: root ignores directory permissions",
)
def test_read_only_run_dir_is_a_clear_error_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        assert cli("train", *TOY_TINY, "--epochs", "1", "--out", run) == 1
        captured = capsys.readouterr()
        err = captured.err
        assert "epoch" not in captured.out  # reported before training started
        assert err.startswith("bbb: error: ") and len(err.strip().splitlines()) == 1
        assert f"run directory {run} is not writable" in err
        assert list(run.iterdir()) == []
    finally:
        run.chmod(0o700)


@pytest.mark.usefixtures("no_plots")
def test_train_with_compiled_kernels_matches_eager(
    tmp_path: Path, toy_ref: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--kernels compile`` runs the fused code paths (torch.compile replaced by the identity
    here) and gives the eager run's losses to rounding; the backend is restored afterwards."""
    import bbb
    from bbb import kernels as K

    for k in K._ALL:
        k._compiled, k.failed = None, None
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    assert cli("train", *TOY_REF, "--kernels", "compile", "--out", tmp_path / "k") == 0
    assert bbb.get_kernels() == "eager"
    assert json.loads((tmp_path / "k" / "config.json").read_text())["kernels"] == "compile"
    got, ref = rows(tmp_path / "k"), rows(toy_ref)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in K._ALL:
        k._compiled, k.failed = None, None


def test_train_help_states_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    """--data-dir's help said "(default: $BBB_DATA_DIR, then ../shared/data) (default: None)"."""
    with pytest.raises(SystemExit):
        cli("train", "--help")
    lines = capsys.readouterr().out.splitlines()
    data_dir = [line for line in lines if line.strip().startswith("--data-dir")]
    assert data_dir and "$BBB_DATA_DIR" in data_dir[0], lines
    assert all(line.count("(default") <= 1 for line in lines), lines
    # options without a value by default say what happens then, not "(default: None)"
    assert "(default: None)" not in " ".join(lines)
