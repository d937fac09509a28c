"""SIGTERM stops ``bbb train``, ``bbb bandit``, ``bbb uci`` and ``bbb sweep`` like Ctrl-C.

Cluster schedulers (SLURM, Kubernetes) and torchrun stop a process with SIGTERM. The commands
died at once (exit -15) with no word of how to continue; now they stop cleanly, print the
Ctrl-C line ("continue ... with: ..."), exit 143 (128 + SIGTERM), and the run resumes with
``--resume`` to the result of an uninterrupted run.

Each command runs on tiny settings in a subprocess (one thread); the signal is sent once its
first checkpoint (or finished split, or trial) is on disk, found by polling the files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bbb.cli import _sigterm_as_interrupt, _sweep_hint, main
from bbb.data.checksums import MissingDataError, resolve_data_dir

TOY = [
    "--dataset", "toy", "--toy-n", "400", "--hidden", "16", "--batch-size", "8",
    "--val-samples", "2", "--seed", "7", "--quiet",
]  # fmt: skip


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # the in-process reference runs use this many threads: the same numbers
    e["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    e["MPLBACKEND"] = "Agg"
    e["PYTHONUNBUFFERED"] = "1"
    return e


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def terminate_when(
    argv: list[str],
    ready: Callable[[], bool],
    cwd: Path,
    timeout: float = 120,
    started: Callable[[int], None] | None = None,
    stop_timeout: float = 120,
) -> tuple[int, str]:
    """Run ``bbb ARGV``; SIGTERM it as soon as ``ready()``; its exit code and stderr (a
    failure when it takes more than ``stop_timeout`` seconds to exit after the signal)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bbb", *argv],
        cwd=cwd,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal to it alone, as a scheduler's kill PID
    )
    if started is not None:
        started(proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"bbb exited ({proc.returncode}) too early: {proc.communicate()[1]}")
            if time.monotonic() > deadline:
                pytest.fail("bbb did not reach its first checkpoint in time")
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bbb did not stop within {stop_timeout} s of SIGTERM")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def no_partial_files(root: Path) -> None:
    """No temporary file of an atomic write is left anywhere under ``root``."""
    left = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".probe"))]
    assert not left, left


def stub_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    import bbb.plots

    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)


def rows(run: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if "seconds" not in k})
    return out


# --------------------------------------------------------------------------- the handler


def test_the_handler_is_installed_by_the_command_only_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: SIGTERM to this process during `bbb train` stops it like Ctrl-C (exit 143,
    the resume line), and the handler this process had before is back afterwards."""
    stub_plots(monkeypatch)
    import bbb.runs

    before = signal.getsignal(signal.SIGTERM)
    assert before == signal.SIG_DFL  # importing bbb installed nothing
    seen: list[Any] = []
    original = bbb.runs.train_run

    def terminated(*args: Any, **kwargs: Any) -> Any:
        def kill(epoch: int, row: dict[str, Any]) -> None:
            seen.append(signal.getsignal(signal.SIGTERM))
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        return original(*args, **kwargs, epoch_callback=kill)

    monkeypatch.setattr(bbb.runs, "train_run", terminated)
    run = tmp_path / "run"
    argv = ["train", *TOY, "--toy-n", "64", "--batch-size", "16", "--epochs", "4"]
    assert main([*argv, "--out", str(run)]) == 143
    assert capsys.readouterr().err == (
        f"bbb: terminated (SIGTERM); continue the run with: bbb train --resume {run}\n"
    )
    assert seen and seen[0] is not before  # the command's own handler while it ran
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    import bbb.cli

    assert bbb.cli._ACTIVE_TERM is None  # nothing of the command's state is left behind
    monkeypatch.setattr(bbb.runs, "train_run", original)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]


def test_a_repeated_sigterm_is_ignored_during_the_stop_and_a_late_one_kills() -> None:
    """A second SIGTERM right after the first (SLURM's and torchrun's copies of the same stop)
    is ignored, so it cannot break into the clean-up; one after the repeat window kills at
    once (exit -15, as before): a stop that hangs needs no kill -9."""
    script = """
import os, signal, sys, time
import bbb.cli as C
with C._sigterm_as_interrupt() as state:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        sys.exit(3)  # the handler did not raise
    except C._Terminated:
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # the same stop again: ignored
    for _ in range(100):
        time.sleep(0.001)
    print("cleaned up", state.fired, flush=True)
    C._REPEAT_SECONDS = 0.0
    os.kill(os.getpid(), signal.SIGTERM)  # a later one: the default action
    time.sleep(5)
print("survived", flush=True)
"""
    r = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60
    )
    assert r.stdout == "cleaned up True\n" and r.returncode == -signal.SIGTERM, r


def test_other_commands_and_threads_keep_the_default_handler(tmp_path: Path) -> None:
    """`bbb evaluate` (short, nothing to resume) keeps the process's handler; so does a call
    from another thread, where Python cannot install one."""
    import threading

    with _sigterm_as_interrupt(False) as state:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert not state.fired
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(_sigterm_as_interrupt().__enter__()))
    t.start()
    t.join()
    assert got and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_sweep_hint_names_the_same_command_without_a_storage_password() -> None:
    url = "postgresql://me:secret@db.example/sweeps"
    for argv in (["s.toml", "--out", "d", "--storage", url], ["s.toml", "--storage=" + url]):
        hint = _sweep_hint(argv)
        assert hint.startswith("interrupted; continue the sweep with: bbb sweep s.toml ")
        assert "secret" not in hint and "postgresql://" in hint, hint
    # the worker processes a sweep starts, show and best: nothing to continue
    assert _sweep_hint(["s.toml", "--out", "d", "--worker-id", "1"]) == "interrupted"
    assert _sweep_hint(["show", "d"]) == "interrupted"


# --------------------------------------------------------------------------- bbb train


def test_sigterm_during_train_exits_143_and_the_resumed_run_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["train", *TOY, "--epochs", "20"]
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    code, err = terminate_when(
        [*argv, "--out", str(run)], lambda: any(ckpts.glob("checkpoint-*.pt")), tmp_path
    )
    assert code == 143, err
    assert err == f"bbb: terminated (SIGTERM); continue the run with: bbb train --resume {run}\n"
    no_partial_files(run)
    done = sorted(ckpts.glob("checkpoint-*.pt"))
    assert 1 <= len(done) < 20 and not (run / "metrics.json").exists()
    for path in done:  # every checkpoint left is whole
        torch.load(path, weights_only=True)

    stub_plots(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    ref = tmp_path / "reference"
    assert main([*argv, "--out", str(ref)]) == 0
    assert rows(run) == rows(ref)
    last = "checkpoint-00020.pt"
    a = torch.load(ckpts / last, weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / last, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bbb bandit


def _data_dir() -> Path:
    """The shared data root, or a path that does not exist (the tests needing it skip): a
    missing root made the whole file fail to collect."""
    try:
        return resolve_data_dir(None)
    except MissingDataError:
        return Path("/nonexistent-bbb-data")


DATA = _data_dir()


@pytest.mark.skipif(not (DATA / "mushroom").is_dir(), reason="no Mushroom data")
def test_sigterm_during_bandit_checkpoints_the_step_reached_and_resumes_to_the_same_regret(
    tmp_path: Path,
) -> None:
    """SIGTERM stops `bbb bandit` after the step under way, which is checkpointed (as with
    --max-minutes; breaking in mid-step lost up to --checkpoint-every steps), exit 143 with
    the resume line; the resumed run's regret is that of an uninterrupted run."""
    from bbb.train.checkpoint import list_checkpoints

    argv = [
        "bandit", "--agents", "bbb-thompson", "greedy-0", "--steps", "400", "--seeds", "0",
        "--updates-per-step", "1", "--batch-size", "8", "--buffer-size", "16", "--hidden", "8",
        "--checkpoint-every", "150", "--quiet", "--data-dir", str(DATA),
    ]  # fmt: skip
    out = tmp_path / "b"
    ckpts = out / "checkpoints"
    code, err = terminate_when(
        [*argv, "--out", str(out)],
        lambda: ckpts.is_dir() and any(p.suffix == ".pt" for p in ckpts.iterdir()),
        tmp_path,
    )
    assert code == 143, err
    assert err.startswith("bbb: terminated (SIGTERM); continue (from its last checkpoint) with: ")
    assert err.rstrip().endswith(f"--out {out} --resume"), err
    no_partial_files(out)
    # the step reached is checkpointed: the newest checkpoint is at the results' last step
    steps_done = len((out / "regret.csv").read_text().splitlines()) - 1
    newest = list_checkpoints(ckpts)[-1]
    assert 150 < steps_done < 400 and newest.name == f"checkpoint-{steps_done:05d}.pt"
    assert json.loads((out / "metrics.json").read_text())["steps_done"] == steps_done
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    assert (out / "regret.csv").read_text() == (ref / "regret.csv").read_text()


# --------------------------------------------------------------------------- bbb uci


def _uci(tmp_path: Path, n_splits: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_uci import _write_uci_dir
    finally:
        sys.path.pop(0)
    return _write_uci_dir(tmp_path / "data", n_splits=n_splits)


def test_sigterm_during_uci_exits_143_and_resumes_to_the_uninterrupted_splits(
    tmp_path: Path,
) -> None:
    tiny = _uci(tmp_path, 6)
    argv = ["uci", str(tiny), "--epochs", "40", "--num-samples", "2", "--passes", "5", "--quiet"]
    out = tmp_path / "u"
    code, err = terminate_when(
        [*argv, "--out", str(out)], lambda: any((out / "splits").glob("split_*.json")), tmp_path
    )
    assert code == 143, err
    assert err.startswith("bbb: terminated (SIGTERM); continue (finished splits are kept) with:")
    assert not (out / "metrics.json").exists()
    no_partial_files(out)
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0

    def splits(d: Path) -> list[dict[str, Any]]:
        rows = json.loads((d / "metrics.json").read_text())["splits"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert len(splits(out)) == 6 and splits(out) == splits(ref)


def children(pid: int) -> dict[int, bytes]:
    """The child processes of ``pid``: their command lines by process id (from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(d.name)] = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def spawned_children(pid: int) -> int:
    """How many multiprocessing workers (spawned) process ``pid`` has."""
    return sum(b"spawn_main" in cmd for cmd in children(pid).values())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_a_uci_jobs_run_stops_its_pool_instead_of_finishing_every_split(
    tmp_path: Path,
) -> None:
    """With --jobs the splits train in a process pool, and the scheduler's SIGTERM may reach
    the command alone: leaving the pool then waited for every queued split (8 splits of 2000
    epochs here, minutes) before the command exited; its workers are now stopped with it."""
    tiny = _uci(tmp_path, 8)
    argv = ["uci", str(tiny), "--epochs", "2000", "--num-samples", "2", "--passes", "5"]
    out = tmp_path / "u"
    pid: list[int] = []
    code, err = terminate_when(
        [*argv, "--jobs", "2", "--quiet", "--out", str(out)],
        lambda: spawned_children(pid[0]) >= 2,
        tmp_path,
        started=pid.append,
        stop_timeout=30,  # the queued splits take minutes: a stop after them times out
    )
    assert code == 143, err
    assert "continue (finished splits are kept) with:" in err
    assert not list((out / "splits").glob("split_*.json"))
    no_partial_files(out)


# --------------------------------------------------------------------------- bbb sweep


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="bbb sweep needs Optuna")
def test_sigterm_during_a_two_worker_sweep_requeues_both_trials_and_the_rerun_finishes(
    tmp_path: Path,
) -> None:
    """SIGTERM to `bbb sweep --workers 2`: each worker's trial is failed and queued again at
    once (was: the command died, its second worker process kept running on, and a killed
    worker's trial stayed RUNNING until its heartbeat went stale); the line names the command
    that continues the sweep, which then finishes the grid."""
    import optuna

    space = tmp_path / "space.toml"
    space.write_text(
        '[sweep]\ncommand = "train"\n\n[train]\ndataset = "toy"\ntoy_n = 400\nhidden = [16]\n'
        "epochs = 20\nbatch_size = 8\nval_samples = 2\n\n[search]\nlr = [0.03, 0.01]\n"
    )
    out = tmp_path / "sweep"
    argv = ["sweep", str(space), "--out", str(out), "--workers", "2", "--no-trial-plots"]

    def both_training() -> bool:
        trials = out / "trials"
        return (
            trials.is_dir() and sum(any(d.glob("checkpoints/*.pt")) for d in trials.iterdir()) == 2
        )

    code, err = terminate_when(argv, both_training, tmp_path)
    assert code == 143, err
    assert err.splitlines()[-1] == (
        f"bbb: terminated (SIGTERM); continue the sweep with: bbb sweep {space} --out {out} "
        "--workers 2 --no-trial-plots"
    )
    assert "bbb: terminated (SIGTERM)\n" in err  # worker 1 (the parent's SIGTERM stopped it)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    states = [t.state for t in optuna.load_study(study_name="bbb-sweep", storage=url).get_trials()]
    S = optuna.trial.TrialState
    # every trial stopped is failed and queued again (one may have finished before the
    # signal on a slow machine); none is left RUNNING
    assert S.RUNNING not in states and states.count(S.FAIL) == states.count(S.WAITING) >= 1
    no_partial_files(out)
    r = subprocess.run(
        [sys.executable, "-m", "bbb", *argv],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="bbb-sweep", storage=url)
    done = [t for t in study.get_trials() if t.state == S.COMPLETE]
    assert sorted(t.params["lr"] for t in done) == [0.01, 0.03]


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("target", ["rank 1", "torchrun"])
def test_sigterm_under_torchrun_stops_both_ranks_cleanly_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """2 gloo ranks under torchrun. torchrun gets SIGTERM (a scheduler's stop) and forwards it
    to each rank; or rank 1 alone gets it (a kill of one process), stops with the resume
    line and exit 143, and torchrun then sends SIGTERM to rank 0, which may be blocked in a
    collective with rank 1. Both ranks stop, nothing hangs (the
    collective fails at once, as its peer has gone), no checkpoint is damaged, and the run
    resumes in one process."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "bbb",
        "train", *TOY, "--epochs", "40", "--out", str(run),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )

    def rank1() -> int | None:
        for pid in children(proc.pid):
            with contextlib.suppress(OSError):
                if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                    return pid
        return None

    try:
        deadline = time.monotonic() + 180
        while not any(ckpts.glob("checkpoint-*.pt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        pid = rank1() if target == "rank 1" else proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resume = f"continue the run with: bbb train --resume {run}"
    # rank 1 stops on its SIGTERM and leaves the command to rank 0 (since session 25 only
    # rank 0 prints it; every rank did)
    assert "bbb: terminated (SIGTERM) (rank 1; rank 0 says how to continue)" in err, err[-3000:]
    if target == "rank 1":  # torchrun names the first rank to end: 1 (143) or 0, told by it (130)
        ended = "exitcode: 143) local_rank: 1" in err or "exitcode: 130) local_rank: 0" in err
        assert ended, err[-3000:]
    else:  # torchrun itself ends with its SignalException (its own way)
        assert proc.returncode != 0, err[-3000:]
    # rank 0 stops at the same step (told by rank 1 in their next collective, or by torchrun's
    # SIGTERM, whichever comes first) and gives the command once; or, if rank 1's process was
    # gone before that collective, on the backend's error; which comes first is a race, a hang
    # is neither
    rank0 = err.count(resume) == 1 or ("Connection closed by peer" in err and "bbb: error:" in err)
    assert rank0, err[-3000:]
    no_partial_files(run)
    done = sorted(ckpts.glob("checkpoint-*.pt"))
    for path in done:
        torch.load(path, weights_only=True)
    stub_plots(monkeypatch)
    assert main(["train", "--resume", str(run), "--epochs", str(len(done) + 1), "--quiet"]) == 0
    assert [r["epoch"] for r in rows(run)] == list(range(1, len(done) + 2))
