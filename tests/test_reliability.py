"""Reliability under faults and bad input (issue 9); the table is docs/RELIABILITY.md.

- ``kill -9`` at random moments (a subprocess, several kill points, one aimed at the moment a
  checkpoint is being written): every checkpoint file left behind loads, the temporary files of
  interrupted writes are never taken for checkpoints and are cleaned up, and the resumed run
  ends with exactly the tensors and metrics of an uninterrupted one (CPU). The CLI tests
  (tests/test_cli.py) kill at fixed epochs; these draw the kill points from a seeded RNG.
- Corrupt, truncated, bit-flipped and malicious checkpoints; a full disk (a real ``EFBIG``
  from ``RLIMIT_FSIZE``, and ``ENOSPC`` injected into ``fsync`` mid-run); an unwritable run
  directory (we may run as root, where ``chmod`` cannot make a directory read-only: a path
  under a regular file and an injected ``EACCES`` stand in for it).
- Bad input at every public entry point, each case asserting its message.
- Nothing loads a checkpoint without ``weights_only=True`` or executes code from a file.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
import bbb.plots
import bbb.runs
from bbb.cli import main
from bbb.config import ConfigError, TrainConfig, load_config_file
from bbb.data import load_toy
from bbb.models import bayes_mlp
from bbb.train import CheckpointError, Trainer, TrainingDivergedError, seed_everything
from bbb.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "bbb"
TIMING_KEYS = ("train_seconds", "wall_seconds")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No plots (slow, not looked at here), no dependence on BBB_DATA_DIR or the cwd."""
    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------- helpers


def rows(run: Path) -> list[dict[str, Any]]:
    text = (run / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in text if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out]


def assert_equal_tensors(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run: Path, ref: Path) -> None:
    """Same final checkpoint (model, optimizer, ELBO), best model and per-epoch metrics."""
    last_a, pa = load_checkpoint(run / "checkpoints")
    last_b, pb = load_checkpoint(ref / "checkpoints")
    assert pa.name == pb.name
    for key in ("model", "optimizer", "elbo", "epoch", "best_epoch"):
        assert_equal_tensors(last_a[key], last_b[key], key)
    best_a, _ = load_checkpoint(run / "best.pt")
    best_b, _ = load_checkpoint(ref / "best.pt")
    assert_equal_tensors(best_a, best_b, "best.pt")
    assert rows(run) == rows(ref)


def audit_run_dir(run: Path) -> dict[str, Any]:
    """What a killed run left: every checkpoint file must load and match its name."""
    ckpts = list_checkpoints(run / "checkpoints")
    for path in ckpts:
        state, _ = load_checkpoint(path)  # raises CheckpointError on a half-written file
        assert state["format"] == "bbb-checkpoint-1"
        assert path.name == f"checkpoint-{state['epoch']:05d}.pt"
    # between the rename of a new checkpoint and the removal of the oldest: at most 3
    assert len(ckpts) <= 3
    if (run / "best.pt").exists():
        load_checkpoint(run / "best.pt")
    json.loads((run / "config.json").read_text())
    if (run / "metrics.jsonl").exists():
        text = (run / "metrics.jsonl").read_text()
        lines = text.splitlines()
        complete = lines if text.endswith("\n") else lines[:-1]  # a line cut by the kill
        for line in complete:
            json.loads(line)
    temporaries = sorted(p.name for p in (run / "checkpoints").glob(".*"))
    assert all(name.endswith(".tmp") for name in temporaries), temporaries
    return {"checkpoints": [p.name for p in ckpts], "temporaries": temporaries}


def bbb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BBB_DATA_DIR", "WORLD_SIZE")}
    # the in-process reference uses this many threads: same numerics
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


# --------------------------------------------------------------------------- kill -9

# 20 steps per epoch, 8 epochs: short epochs, so checkpoints are written often
KILL_ARGS = [
    "--dataset", "toy", "--toy-n", "160", "--hidden", "16", "--batch-size", "8",
    "--epochs", "8", "--val-samples", "2", "--estimator", "reparam", "--seed", "3", "--quiet",
]  # fmt: skip


def _kill_when(
    argv: list[str], cwd: Path, trigger: Callable[[], bool], delay: float, timeout: float = 120
) -> None:
    """Start ``python -m bbb ARGV``; SIGKILL it ``delay`` s after ``trigger()`` is true."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bbb", *argv],
        cwd=cwd,
        env=bbb_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not trigger():
            if proc.poll() is not None:
                pytest.fail(f"the run exited ({proc.returncode}) before its kill point:\n"
                            f"{proc.communicate()[1][-2000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach its kill point in time")
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    assert main(["train", *KILL_ARGS, "--out", str(ref)]) == 0
    # a typical epoch: the median (the max was the first epoch's warm-up, several epochs long
    # at times, and a kill delayed by it could land after the run had finished)
    epoch_s = statistics.median(r["train_seconds"] for r in map(json.loads, _lines(ref)))
    rng = random.Random(9)  # the kill points are random but reproducible
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    first = ["train", *KILL_ARGS, "--out", str(run)]
    resume = ["train", "--resume", str(run), "--quiet"]

    def newest() -> str:
        last = latest_checkpoint(ckpts)
        return "" if last is None else last.name

    seen: list[dict[str, Any]] = []
    plan = ["after-checkpoint", "while-writing", "after-checkpoint"]
    for i, how in enumerate(plan):
        before, stale = newest(), {p.name for p in ckpts.glob(".*.tmp")}
        if how == "while-writing":
            # the moment a checkpoint's temporary file appears (or, if the poll misses that
            # short window, the moment its rename lands), with no delay
            def trigger(before: str = before, stale: set[str] = stale) -> bool:
                fresh = {p.name for p in ckpts.glob(".*.tmp")} - stale
                return bool(fresh) or newest() > before

            delay = 0.0
        else:

            def trigger(before: str = before) -> bool:
                return newest() > before

            delay = rng.uniform(0.0, 1.5) * epoch_s  # anywhere in the next epoch or so
        _kill_when(first if i == 0 else resume, tmp_path, trigger, delay)
        seen.append(audit_run_dir(run))
        assert not (run / "metrics.json").exists()  # it really was interrupted

    assert main(resume) == 0
    assert [r["epoch"] for r in rows(run)] == list(range(1, 9))
    assert_same_run(run, ref)
    # the temporaries of interrupted writes are gone; the last two checkpoints are kept
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "checkpoint-00007.pt",
        "checkpoint-00008.pt",
    ]
    assert not list(run.glob(".*.tmp"))
    print("kills left:", seen)


def _lines(run: Path) -> list[str]:
    return [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- corrupt checkpoints


def small_trainer(out_dir: Path | None, epochs: int = 3, **kwargs: Any) -> Trainer:
    generator = seed_everything(0)
    train, val = load_toy(n_train=48, n_val=16, seed=0)
    likelihood = bbb.Gaussian("learned", sigma=0.5)
    model = bayes_mlp(1, [8], 1, estimator="flipout", mu_init="fan_in")
    elbo = bbb.ELBO(likelihood, len(train))
    opt = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=1e-2)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=generator)
    args: dict[str, Any] = {
        "val_loader": DataLoader(val, batch_size=16),
        "epochs": epochs,
        "out_dir": out_dir,
        "val_samples": 2,
        "progress": False,
        "log": None,
        "loader_generator": generator,
    }
    args.update(kwargs)
    return Trainer(model, elbo, opt, loader, **args)


def test_all_checkpoints_corrupt_is_a_clear_error_that_keeps_the_files(tmp_path: Path) -> None:
    small_trainer(tmp_path, epochs=3).fit()
    a, b = list_checkpoints(tmp_path / "checkpoints")
    a.write_bytes(a.read_bytes()[:50])  # truncated
    b.write_bytes(b"\0" * 64)  # garbage
    before = {p: p.read_bytes() for p in (a, b, tmp_path / "metrics.jsonl")}
    with pytest.warns(UserWarning) as warned, pytest.raises(CheckpointError) as info:
        small_trainer(tmp_path, epochs=5).fit(resume=True)
    # each corrupt file is reported as it is skipped, newest first (load_checkpoint's doc)
    skipped = [str(w.message) for w in warned if "trying an older checkpoint" in str(w.message)]
    assert len(skipped) == 2 and str(b) in skipped[0] and str(a) in skipped[1], skipped
    message = str(info.value)
    assert "no readable checkpoint" in message
    assert str(a) in message and str(b) in message and "corrupt or truncated" in message
    for p, data in before.items():  # nothing deleted or overwritten: the user can inspect
        assert p.read_bytes() == data, p


def test_truncated_newest_resumes_from_the_previous_and_keeps_two(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    small_trainer(ref, epochs=4).fit()
    run = tmp_path / "run"
    small_trainer(run, epochs=3).fit()
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == "checkpoint-00003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    with pytest.warns(UserWarning, match=r"checkpoint-00003\.pt is corrupt or truncated"):
        small_trainer(run, epochs=4).fit(resume=True)  # from epoch 2: redoes 3, then 4
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "checkpoint-00003.pt",
        "checkpoint-00004.pt",
    ]
    for p in list_checkpoints(run / "checkpoints"):
        load_checkpoint(p)
    assert_same_run(run, ref)


def test_corrupt_best_pt_on_resume_names_the_file(tmp_path: Path) -> None:
    """The epoch checkpoints are intact: resuming warns (naming best.pt and the problem),
    trains on and replaces best.pt: from the checkpoint when it names its own epoch the best
    (its weights are then the best), else with the next best epoch's weights."""
    small_trainer(tmp_path, epochs=2).fit()
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 truncated")
    best_epoch = load_checkpoint(tmp_path / "checkpoints" / "checkpoint-00002.pt")[0]["best_epoch"]
    with pytest.warns(
        UserWarning, match=r"best\.pt is unreadable \(.*best\.pt is corrupt or truncated"
    ):
        summary = small_trainer(tmp_path, epochs=3).fit(resume=True)
    # recovered from the checkpoint (epoch 2) or lost and chosen again (epoch 3)
    assert summary["best_epoch"] in ((2, 3) if best_epoch == 2 else (3,))
    assert load_checkpoint(tmp_path / "best.pt")[0]["epoch"] == summary["best_epoch"]


def test_a_flipped_bit_in_a_checkpoint_is_detected(tmp_path: Path) -> None:
    small_trainer(tmp_path, epochs=1).fit()
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path is not None
    data = bytearray(path.read_bytes())
    state, _ = load_checkpoint(path)
    raw = state["model"]["0.weight_mu"].numpy().tobytes()
    at = bytes(data).index(raw)  # the tensor's bytes are stored uncompressed
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=path.name):
        load_checkpoint(path)


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this would create ``marker`` (the stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("where", ["checkpoint", "best.pt", "evaluate"])
def test_a_malicious_pickle_in_checkpoint_position_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    assert main(["train", "--dataset", "toy", "--toy-n", "32", "--hidden", "4", "--batch-size",
                 "16", "--epochs", "1", "--val-samples", "1", "--quiet", "--out", str(run)]) == 0  # fmt: skip
    evil = {"format": "bbb-checkpoint-1", "epoch": 1, "model": _Payload(marker)}
    if where == "checkpoint":
        target = run / "checkpoints" / "checkpoint-00001.pt"
        torch.save(evil, target)
        with pytest.raises(CheckpointError, match=r"checkpoint-00001\.pt is corrupt") as info:
            load_checkpoint(target)
        assert "Weights only load failed" in str(info.value) or "weights_only" in str(info.value)
    elif where == "best.pt":
        run = tmp_path / "trainer-run"  # a run of small_trainer's network, to resume
        small_trainer(run, epochs=1).fit()
        torch.save(evil, run / "best.pt")
        # refused (never unpickled): resuming warns and replaces it (from the checkpoint, whose
        # epoch 1 is the best so far: a one-epoch run's best is its only epoch)
        with pytest.warns(UserWarning, match=r"best\.pt is unreadable \(.*best\.pt is corrupt"):
            summary = small_trainer(run, epochs=2).fit(resume=True)
        assert load_checkpoint(run / "best.pt")[0]["epoch"] == summary["best_epoch"]
    else:
        with open(run / "best.pt", "wb") as f:  # a plain pickle, not even a torch file
            pickle.dump(evil, f)
        assert main(["evaluate", str(run), "--num-samples", "2"]) == 1
    assert not marker.exists(), "code from the file was executed"


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_code_in_the_package_can_execute_a_file() -> None:
    """Every torch.load passes weights_only=True; no pickle/marshal/eval/exec anywhere."""
    loads = 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                for bad in ("pickle", "dill", "marshal", "shelve", "cloudpickle", "yaml"):
                    assert not any(n == bad or n.startswith(bad + ".") for n in names), (
                        f"{path.name} imports {bad}"
                    )
        for call in _calls(tree):
            f = call.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                pytest.fail(f"{path.name}:{call.lineno} calls {f.id}")
            if isinstance(f, ast.Attribute) and f.attr == "load":
                base = f.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    loads += 1
                    kw = {k.arg: k.value for k in call.keywords}
                    value = kw.get("weights_only")
                    assert isinstance(value, ast.Constant) and value.value is True, (
                        f"{path.name}:{call.lineno}: torch.load without weights_only=True"
                    )
    assert loads >= 1


def test_config_files_are_data_only(tmp_path: Path) -> None:
    """A config value that looks like code stays a string and is rejected as a bad value."""
    marker = tmp_path / "PWNED"
    toml = tmp_path / "c.toml"
    toml.write_text(f"estimator = \"__import__('os').mkdir('{marker}')\"\n")
    with pytest.raises(ConfigError, match="unknown estimator"):
        TrainConfig.from_dict(load_config_file(toml)).validate()
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"__class__": "os.system", "epochs": 1}))
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict(load_config_file(j))
    assert not marker.exists()


# --------------------------------------------------------------------------- disk full, read-only


def _toy_cfg(**kw: Any) -> TrainConfig:
    values: dict[str, Any] = {"dataset": "toy", "toy_n": 48, "hidden": [8], "batch_size": 16,
                              "epochs": 2, "val_samples": 2}  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def test_full_disk_is_a_clear_error_before_training(tmp_path: Path) -> None:
    """A real write failure from the kernel: files may not grow past 64 KiB (EFBIG)."""
    resource = pytest.importorskip("resource")

    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(OSError, match="is not writable") as info:
            bbb.runs.train_run(_toy_cfg(), out, progress=False, log=None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert f"run directory {out}" in message and "File too large" in message
    assert "free disk space" in message
    assert list(out.iterdir()) == []  # no config.json, nothing trained


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_disk_full_during_training_names_the_last_good_checkpoint_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tmp_path / "ref"
    small_trainer(ref, epochs=3).fit()
    run = tmp_path / "run"
    real_fsync = os.fsync

    def full_disk_fsync(fd: int) -> None:
        if "checkpoint-00002.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OSError) as info:
        small_trainer(run, epochs=3).fit()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"could not write epoch 2's files in {run}" in message
    assert "No space left on device" in message
    assert "checkpoint-00001.pt is intact" in message
    # the interrupted write left nothing: one good checkpoint, no temporary file
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-00001.pt"]
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    small_trainer(run, epochs=3).fit(resume=True)
    assert_same_run(run, ref)


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "permission-denied"])
def test_unwritable_run_dir_is_a_clear_error_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {"under-a-file": blocker / "run", "is-a-file": blocker}.get(where, tmp_path / "ro")
    if where == "permission-denied":  # what a read-only directory does to a non-root user
        import bbb.train.checkpoint as ck

        def denied(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(ck.tempfile, "mkstemp", denied)
    problem = {
        "under-a-file": f"is under {blocker}, which is a file, not a directory",
        "is-a-file": "is a file, not a directory",
    }.get(where, "is not writable")
    with pytest.raises(OSError, match=f"run directory {out} {problem}"):
        bbb.runs.train_run(_toy_cfg(), out, progress=False, log=None)
    assert blocker.read_text() == "x"
    if where == "permission-denied":
        assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- bad input

L = bbb.BayesLinear


def _trainer(**kw: Any) -> Trainer:
    model = bayes_mlp(1, [4], 1)
    ds = TensorDataset(torch.zeros(8, 1), torch.zeros(8, 1))
    args: dict[str, Any] = {"progress": False, "log": None}
    args.update(kw)
    loader = args.pop("loader", DataLoader(ds, batch_size=4))
    return Trainer(model, bbb.ELBO(bbb.Gaussian(), 8), torch.optim.SGD(model.parameters(), 0.1),
                   loader, **args)  # fmt: skip


def _elbo_call(x: torch.Tensor, y: torch.Tensor, n: int = 10, **kw: Any) -> Any:
    model = nn.Sequential(L(3, 2))
    return bbb.ELBO(bbb.Gaussian(output_dim=2), n)(model, x, y, **kw)


def _run(cfg: TrainConfig, tmp: Path) -> Any:
    return bbb.runs.train_run(cfg, tmp / "r", progress=False, log=None)


def _run_with_data(tmp: Path, mutate: Callable[[Any], None]) -> Any:
    """train_run on toy data altered by ``mutate`` (NaN values, an empty split, ...)."""
    real = bbb.runs.build_data

    def build(cfg: TrainConfig) -> Any:
        data = real(cfg)
        mutate(data)
        return data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bbb.runs, "build_data", build)
        return _run(_toy_cfg(), tmp)


def _nan_x(data: Any) -> None:
    data.train.tensors[0][3, 0] = math.nan


def _inf_y(data: Any) -> None:
    data.val.tensors[1][0] = math.inf


def _empty_val(data: Any) -> None:
    data.val = TensorDataset(torch.zeros(0, 1), torch.zeros(0, 1))


def _toml(tmp: Path, text: str, suffix: str = ".toml") -> dict[str, Any]:
    path = tmp / f"c{suffix}"
    path.write_text(text)
    return TrainConfig.from_dict(load_config_file(path), source=str(path)).validate().to_dict()


# id -> (call given a scratch dir, exception type, regex the message must match)
BAD_INPUT: dict[str, tuple[Callable[[Path], Any], type[BaseException], str]] = {
    # layers
    "linear-wrong-features": (lambda t: L(3, 2)(torch.ones(4, 5)), ValueError,
                              r"BayesLinear expected input of shape \(N, \.\.\., 3\), got \(4, 5\)"),
    "linear-scalar-input": (lambda t: L(3, 2)(torch.tensor(1.0)), ValueError,
                            r"expected input of shape \(N, \.\.\., 3\), got \(\)"),
    "linear-zero-features": (lambda t: L(0, 2), ValueError,
                             "in_features must be a positive integer, got 0"),
    "conv-wrong-channels": (lambda t: bbb.BayesConv2d(3, 4, 3)(torch.ones(2, 5, 8, 8)), ValueError,
                            r"BayesConv2d expected input of shape \(N, 3, \.\.\., \.\.\.\)"),
    "layer-unknown-estimator": (lambda t: L(3, 2, estimator="exact"), ValueError,
                                "unknown estimator 'exact'; accepted values: reparam, local, flipout"),
    "layer-unknown-kl": (lambda t: L(3, 2, kl="analytic"), ValueError,
                         "unknown kl mode 'analytic'; accepted values: auto, closed_form, mc"),
    "layer-closed-form-mixture": (lambda t: L(3, 2, kl="closed_form",
                                              prior=bbb.ScaleMixturePrior(0.5, 1.0, 0.1)),
                                  ValueError, "kl='closed_form' is not available"),
    "layer-prior-not-a-prior": (lambda t: L(3, 2, prior="gaussian"), TypeError,  # type: ignore[arg-type]
                                "prior must be a bbb Prior"),
    "layer-unknown-mu-init": (lambda t: L(3, 2, mu_init="xavier"), ValueError,
                              "unknown mu_init 'xavier'"),
    "unknown-sampling-mode": (lambda t: bbb.set_sampling(L(3, 2), "map"), ValueError,
                              "unknown sampling mode 'map'; accepted values: sample, mean, frozen"),
    "vectorized-zero-samples": (lambda t: bbb.vectorized_samples(L(3, 2), 0).__enter__(),
                                ValueError, "num_samples must be a positive integer, got 0"),
    # priors
    "gaussian-prior-sigma-0": (lambda t: bbb.GaussianPrior(0.0), ValueError,
                               "sigma must be a finite positive number, got 0.0"),
    "gaussian-prior-sigma-nan": (lambda t: bbb.GaussianPrior(math.nan), ValueError,
                                 "sigma must be a finite positive number, got nan"),
    "mixture-pi-out-of-range": (lambda t: bbb.ScaleMixturePrior(1.5, 1.0, 0.1), ValueError,
                                r"pi must lie in the open interval \(0, 1\), got 1.5"),
    "laplace-negative-scale": (lambda t: bbb.LaplacePrior(-1.0), ValueError,
                               "scale must be a finite positive number, got -1.0"),
    "unknown-prior-name": (lambda t: bbb.make_prior("cauchy"), ValueError,
                           "unknown prior 'cauchy'; accepted values: gaussian, scale_mixture"),
    # ELBO and likelihoods
    "elbo-dataset-size-0": (lambda t: bbb.ELBO(bbb.Gaussian(), 0), ValueError,
                            "dataset_size must be a positive integer, got 0"),
    "elbo-num-samples-0": (lambda t: bbb.ELBO(bbb.Gaussian(), 5, num_samples=0), ValueError,
                           "num_samples must be a positive integer, got 0"),
    "elbo-unknown-weighting": (lambda t: bbb.ELBO(bbb.Gaussian(), 5, kl_weighting="graves"),
                               ValueError, "unknown kl_weighting 'graves'; accepted values"),
    "elbo-negative-kl-scale": (lambda t: bbb.ELBO(bbb.Gaussian(), 5, kl_scale=-1.0), ValueError,
                               "kl_scale must be a finite number >= 0, got -1.0"),
    "elbo-nan-kl-scale": (lambda t: bbb.ELBO(bbb.Gaussian(), 5, kl_scale=math.nan), ValueError,
                          "kl_scale must be a finite number >= 0, got nan"),
    "elbo-not-a-likelihood": (lambda t: bbb.ELBO(nn.MSELoss(), 5), TypeError,  # type: ignore[arg-type]
                              "likelihood must be a bbb Likelihood"),
    "elbo-empty-batch": (lambda t: _elbo_call(torch.ones(0, 3), torch.ones(0, 2)), ValueError,
                         r"ELBO needs a non-empty minibatch, got x of shape \(0, 3\)"),
    "elbo-x-y-mismatch": (lambda t: _elbo_call(torch.ones(4, 3), torch.ones(3, 2)), ValueError,
                          "x has 4 examples but y has 3"),
    "elbo-batch-larger-than-dataset": (lambda t: _elbo_call(torch.ones(4, 3), torch.ones(4, 2), n=3),
                                       ValueError, "minibatch of 4 examples is larger than dataset_size=3"),
    "elbo-blundell-without-index": (
        lambda t: bbb.ELBO(bbb.Gaussian(output_dim=2), 10, kl_weighting="blundell")(
            nn.Sequential(L(3, 2)), torch.ones(2, 3), torch.ones(2, 2)),
        ValueError, "kl_weighting='blundell' needs batch_index and num_batches"),
    "gaussian-target-shape": (lambda t: _elbo_call(torch.ones(4, 3), torch.ones(4, 3)), ValueError,
                              r"Gaussian target shape \(4, 3\) does not match"),
    "gaussian-unknown-noise": (lambda t: bbb.Gaussian("student"), ValueError,
                               "unknown noise 'student'; accepted values: fixed, learned, heteroscedastic"),
    "gaussian-sigma-0": (lambda t: bbb.Gaussian(sigma=0.0), ValueError,
                         "Gaussian sigma must be a finite positive number, got 0.0"),
    "categorical-float-targets": (lambda t: bbb.Categorical().log_prob(torch.zeros(1, 2, 3),
                                                                       torch.zeros(2)),
                                  ValueError, "targets must be integer class indices"),
    "categorical-out-of-range": (lambda t: bbb.Categorical().log_prob(
        torch.zeros(1, 2, 3), torch.tensor([0, 3])), ValueError, r"must lie in \[0, 3\)"),
    # prediction, pruning
    "predict-nan-inputs": (lambda t: bbb.predict(nn.Sequential(L(3, 2)),
                                                 torch.full((2, 3), math.nan)),
                           ValueError, "predict: inputs contain NaN or Inf values"),
    "predict-empty-batch": (lambda t: bbb.predict(nn.Sequential(L(3, 2)), torch.ones(0, 3)),
                            ValueError, "predict needs a non-empty batch"),
    "predict-zero-samples": (lambda t: bbb.predict(nn.Sequential(L(3, 2)), torch.ones(2, 3),
                                                   num_samples=0),
                             ValueError, "num_samples must be a positive integer, got 0"),
    "prune-fraction-out-of-range": (lambda t: bbb.prune_by_snr(nn.Sequential(L(3, 2)), 1.5),
                                    ValueError, r"fraction must lie in \[0, 1\), got 1.5"),
    # the training loop
    "trainer-epochs-0": (lambda t: _trainer(epochs=0), ValueError,
                         "epochs must be a positive integer, got 0"),
    "trainer-patience-0": (lambda t: _trainer(patience=0), ValueError,
                           "patience must be a positive integer or None, got 0"),
    "trainer-val-samples-0": (lambda t: _trainer(val_samples=0), ValueError,
                              "val_samples must be >= 1, got 0"),
    "trainer-negative-grad-clip": (lambda t: _trainer(grad_clip=-1.0), ValueError,
                                   "grad_clip must be a finite positive number or None, got -1.0"),
    "trainer-unknown-val-metric": (lambda t: _trainer(val_metric="accuracy"), ValueError,
                                   "unknown val_metric 'accuracy'; accepted values: rmse"),
    "trainer-empty-loader": (lambda t: _trainer(loader=DataLoader(
        TensorDataset(torch.zeros(0, 1), torch.zeros(0, 1)), batch_size=4)),
        ValueError, "the training data loader is empty"),
    "trainer-nan-in-a-batch": (lambda t: _trainer(loader=DataLoader(TensorDataset(
        torch.tensor([[0.0], [math.nan], [1.0], [2.0]]), torch.zeros(4, 1)), batch_size=2)).fit(),
        TrainingDivergedError,
        r"loss became nan at epoch 1, step 1 of 2 .*minibatch inputs contain NaN or Inf"),
    "trainer-seed-negative": (lambda t: seed_everything(-1), ValueError,
                              "seed must be a non-negative integer, got -1"),
    # runs (the library behind `bbb train`)
    "run-nan-in-training-set": (lambda t: _run_with_data(t, _nan_x), ValueError,
                                "the training set contains NaN or Inf values"),
    "run-inf-in-validation-set": (lambda t: _run_with_data(t, _inf_y), ValueError,
                                  "the validation set contains NaN or Inf values"),
    "run-empty-validation-set": (lambda t: _run_with_data(t, _empty_val), ValueError,
                                 "the validation set is empty"),
    "run-batch-larger-than-data": (lambda t: _run(_toy_cfg(batch_size=64), t), ValueError,
                                   r"batch_size=64 is larger than the training set \(48 examples\)"),
    # configuration: values, unknown options, unknown keys, wrong types
    "config-empty-data-set": (lambda t: _run(_toy_cfg(toy_n=0), t), ConfigError,
                              "toy_n must be a positive integer, got 0"),
    "config-unknown-optimizer": (lambda t: _toy_cfg(optimizer="rmsprop").validate(), ConfigError,
                                 "unknown optimizer 'rmsprop'; accepted values: adam, sgd"),
    "config-unknown-kl-mode": (lambda t: _toy_cfg(kl="exact").validate(), ConfigError,
                               "unknown kl 'exact'; accepted values: auto, closed_form, mc"),
    "config-lr-negative": (lambda t: _toy_cfg(lr=-0.1).validate(), ConfigError,
                           "lr must be a finite positive number, got -0.1"),
    "config-prior-pi-1": (lambda t: _toy_cfg(prior_pi=1.0).validate(), ConfigError,
                          r"prior_pi must lie in \(0, 1\), got 1.0"),
    "config-kl-scale-nan": (lambda t: _toy_cfg(kl_scale=math.nan).validate(), ConfigError,
                            "kl_scale must be a finite number, got nan"),
    "config-bad-device": (lambda t: _toy_cfg(device="gpu0").validate(), ConfigError,
                          "device 'gpu0' is not a torch device"),
    "config-toml-unknown-key": (lambda t: _toml(t, "learning_rate = 0.1\n"), ConfigError,
                                r"c\.toml: unknown key\(s\) learning_rate; valid keys: dataset"),
    "config-json-unknown-key": (lambda t: _toml(t, '{"epoch": 3}', ".json"), ConfigError,
                                r"c\.json: unknown key\(s\) epoch"),
    "config-toml-string-for-int": (lambda t: _toml(t, 'epochs = "3"\n'), ConfigError,
                                   "epochs must be an integer, got '3'"),
    "config-toml-hidden-not-a-list": (lambda t: _toml(t, "hidden = 400\n"), ConfigError,
                                      "hidden must be a list of integers, got 400"),
    "config-toml-bool-for-int": (lambda t: _toml(t, "batch_size = true\n"), ConfigError,
                                 "batch_size must be an integer, got True"),
    "config-toml-string-for-float": (lambda t: _toml(t, 'prior_pi = "half"\n'), ConfigError,
                                     "prior_pi must be a number, got 'half'"),
    "config-not-a-table": (lambda t: _toml(t, "[1, 2]", ".json"), ConfigError,
                           "must hold a table of keys"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error(tmp_path: Path, case: str) -> None:
    call, exc, pattern = BAD_INPUT[case]
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c.startswith(("run-", "config-empty"))])
def test_bad_run_input_is_reported_before_the_run_directory_exists(
    tmp_path: Path, case: str
) -> None:
    call, exc, pattern = BAD_INPUT[case]
    with pytest.raises(exc, match=pattern):  # the documented error, not any of its type
        call(tmp_path)
    assert not (tmp_path / "r").exists()


def test_unknown_command_line_option_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["train", "--learning-rate", "0.1"])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning-rate" in err and "Traceback" not in err


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float64])
def test_layer_input_of_the_wrong_dtype_is_a_clear_error(dtype: torch.dtype) -> None:
    """src/bbb/nn/linear.py BayesLinear._check_input checks only the shape: an integer, bool
    or float64 input to a float32 layer fails inside F.linear with "mat1 and mat2 must have
    the same dtype, but got Long and Float" (BayesConv2d: "Input type (long int) and bias type
    (float) should be the same"), which names neither the layer nor the expected dtype."""
    with pytest.raises(ValueError, match=r"BayesLinear.*dtype"):
        L(3, 2)(torch.ones(4, 3, dtype=dtype))


def test_non_finite_rho_init_is_a_clear_error() -> None:
    """src/bbb/nn/module.py reset_parameters: rho_init=nan reaches Tensor.uniform_, which
    raises "from is out of bounds for float"; mu_init=(nan, 1) likewise."""
    with pytest.raises(ValueError, match="rho_init"):
        L(3, 2, rho_init=math.nan)


def test_conv_kernel_size_zero_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        bbb.BayesConv2d(3, 4, 0)


def test_nan_inputs_propagate_through_a_layer_as_in_torch() -> None:
    """Documented behaviour: layers, like torch.nn.Linear, do not inspect values (a check per
    forward pass would cost a device synchronisation); the data entry points do (train_run,
    predict), and the Trainer names a minibatch holding NaN when the loss becomes NaN."""
    y = L(3, 2)(torch.tensor([[math.nan, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("key", ["kl_scale", "kl_anneal_steps", "weight_decay", "momentum"])
def test_negative_config_values_are_named_with_their_value(key: str) -> None:
    value = -1 if key == "kl_anneal_steps" else -0.5
    cfg = TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^{key} must be >= 0, got {value}$"):
        cfg.validate()
