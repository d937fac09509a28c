"""``bbb sweep`` (issue 10): tiny toy searches on SQLite and PostgreSQL, resume, bad input.

Trials are tiny toy-regression runs (64 points, one hidden layer of 8, 2 epochs); the sweep
commands run in subprocesses where several processes or a kill are the point.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bbb.cli import main
from bbb.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HAVE_OPTUNA = importlib.util.find_spec("optuna") is not None
needs_optuna = pytest.mark.skipif(
    not HAVE_OPTUNA, reason="bbb sweep needs Optuna: pip install -e '.[sweep]'"
)

FIXED = """
[sweep]
command = "train"

[train]
dataset = "toy"
toy_n = 64
hidden = [8]
epochs = {epochs}
batch_size = 32
val_samples = 2
"""


def write_space(tmp: Path, search: str, *, epochs: int = 2, name: str = "space.toml") -> Path:
    """A space file with the tiny toy fixed options and the given ``[search]`` lines."""
    path = tmp / name
    path.write_text(FIXED.format(epochs=epochs) + "\n[search]\n" + search + "\n")
    return path


def bbb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bbb ARGS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "bbb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def load_study(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name="bbb-sweep", storage=url)


def sqlite_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def check_grid_once(study: Any, expected: int) -> None:
    """Every grid point finished exactly once (COMPLETE), nothing else completed."""
    import optuna

    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    keys = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(done) == expected, [(t.number, t.state, t.params) for t in study.get_trials()]
    assert len(set(keys)) == expected, keys


# ---------------------------------------------------------------------------- engine hooks
def test_epoch_callback_stops_training_and_test_split_is_left_out(tmp_path: Path) -> None:
    """The Trainer hook a sweep prunes with: the run directory stays complete."""
    from bbb.runs import train_run
    from bbb.train.trainer import StopTraining

    seen: list[tuple[int, float]] = []

    def cb(epoch: int, row: dict[str, Any]) -> None:
        seen.append((epoch, row["val_nll"]))
        if epoch == 2:
            raise StopTraining("enough")

    cfg = TrainConfig(
        dataset="toy", toy_n=64, hidden=[8], epochs=5, batch_size=32, val_samples=2, seed=1
    )
    summary = train_run(
        cfg,
        tmp_path / "run",
        progress=False,
        log=None,
        epoch_callback=cb,
        evaluate_test=False,
        write_plots=False,
    )
    assert [e for e, _ in seen] == [1, 2]
    assert summary["stopped_by_callback"] and summary["epochs_trained"] == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val" in metrics and "test" not in metrics
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and (tmp_path / "run" / "checkpoints").is_dir()


# ---------------------------------------------------------------------------- SQLite
@needs_optuna
def test_tiny_sweep_show_and_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(
        tmp_path,
        'lr = { grid = [0.01, 0.001] }\nprior_sigma = { grid = [0, 1], transform = "exp(-x)" }',
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--no-trial-plots"]) == 0
    study = load_study(sqlite_url(out))
    check_grid_once(study, 4)
    assert len(list((out / "trials").iterdir())) == 4
    for run in (out / "trials").iterdir():  # ordinary run directories, no test metrics
        assert (run / "config.json").is_file() and (run / "best.pt").is_file()
        assert "test" not in json.loads((run / "metrics.json").read_text())
    capsys.readouterr()

    assert main(["sweep", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "rank" in shown and "val_nll" in shown and "4 complete" in shown
    for name in ("trials.csv", "history.png", "importances.png", "parallel_coordinates.png"):
        assert (out / "report" / name).stat().st_size > 0, name

    assert main(["sweep", "best", str(out)]) == 0
    best = tomllib.loads(capsys.readouterr().out)
    run_dir = out / study.best_trial.user_attrs["run_dir"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert best == {k: v for k, v in saved.items() if v is not None}
    cfg = TrainConfig.from_dict(best).validate()  # ready for `bbb train --config`
    assert cfg.prior_sigma == pytest.approx(
        __import__("math").exp(-study.best_params["prior_sigma [exp(-x)]"])
    )

    # re-running a finished grid starts nothing new
    assert main(["sweep", str(space), "--out", str(out), "--no-trial-plots"]) == 0
    assert len(load_study(sqlite_url(out)).get_trials()) == 4


@needs_optuna
def test_two_workers_share_a_sqlite_study(tmp_path: Path) -> None:
    space = write_space(tmp_path, "lr = [0.03, 0.01, 0.003]\nnum_samples = [1, 2]")
    out = tmp_path / "sweep"
    r = bbb(
        "sweep",
        str(space),
        "--out",
        str(out),
        "--workers",
        "2",
        "--pruner",
        "none",
        "--no-trial-plots",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    study = load_study(sqlite_url(out))
    check_grid_once(study, 6)
    # Two workers can race for the same grid point; the loser records itself as a duplicate
    # (user attribute bbb_duplicate_of) and trains nothing. Every other trial is a grid point.
    extra = [t for t in study.get_trials() if "bbb_duplicate_of" in t.user_attrs]
    assert len(study.get_trials()) == 6 + len(extra)
    assert all(t.state.name == "COMPLETE" for t in study.get_trials() if t not in extra)
    assert "[worker 0] done" in r.stdout and "[worker 1] done" in r.stdout


@needs_optuna
def test_killed_worker_trial_is_retried_on_rerun(tmp_path: Path) -> None:
    import optuna

    space = write_space(tmp_path, "lr = [0.03, 0.01, 0.003]", epochs=15)
    out = tmp_path / "sweep"
    cmd = [str(space), "--out", str(out), "--heartbeat", "1", "--no-trial-plots"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bbb", "sweep", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not (out / "trials" / "trial-0000" / "config.json").exists():
            assert proc.poll() is None, "the sweep ended before its first trial"
            assert time.monotonic() < deadline, "no trial started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = {t.number: t.state for t in load_study(sqlite_url(out)).get_trials()}
    assert states == {0: optuna.trial.TrialState.RUNNING}, states

    r = bbb("sweep", *cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    study = load_study(sqlite_url(out))
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == trials[0].params
    check_grid_once(study, 3)
    assert "retry of trial 0" in r.stdout


# ---------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server on a loopback port (skipped without the binaries)."""
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        pytest.skip(
            "no PostgreSQL driver (psycopg or psycopg2) is installed (pip install -e '.[sweep]')"
        )
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (pg_ctl) not found (apt-get install postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except (ImportError, KeyError):
            runuser = None
        if runuser is None:
            pytest.skip("running as root without a 'postgres' user and runuser")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="bbb-pg-"))
    root.chmod(0o755)
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        log = str(root / "log")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", log, "-o", opts, "-w", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {e}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@needs_optuna
def test_two_workers_on_a_postgresql_study(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    space = write_space(tmp_path, "lr = [0.03, 0.01]\nnum_samples = [1, 2]")
    out = tmp_path / "sweep"
    args = ["sweep", str(space), "--out", str(out), "--storage", postgres_url]
    r = bbb(*args, "--workers", "2", "--pruner", "none", "--no-trial-plots")
    assert r.returncode == 0, r.stdout + r.stderr
    study = load_study(postgres_url)
    check_grid_once(study, 4)
    # as in the SQLite two-worker test: a worker that loses the race for a grid point records
    # a duplicate trial and trains nothing (the test counted them and failed now and then)
    extra = [t for t in study.get_trials() if "bbb_duplicate_of" in t.user_attrs]
    assert len(study.get_trials()) == 4 + len(extra)
    assert not (out / "study.db").exists()
    # show and best find the study through the URL the sweep directory recorded
    capsys.readouterr()
    assert main(["sweep", "show", str(out), "--no-plots"]) == 0
    assert "4 complete" in capsys.readouterr().out
    assert main(["sweep", "best", str(out)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["lr"] == study.best_trial.params["lr"]


# ---------------------------------------------------------------------------- bad input
@needs_optuna
@pytest.mark.parametrize(
    ("search", "storage", "expected"),
    [
        ("lrr = [0.1, 0.01]", None, "unknown option(s) lrr in [search]"),
        ("lr = { float = [0.1, 0.01] }", None, "empty range"),
        ("lr = { grid = [] }", None, "the grid is empty"),
        ("lr = { log_float = [0.0, 0.1] }", None, "a log range needs low > 0"),
        ("lr = [0.1, -1.0]", None, "lr must be a finite positive number"),
        ("lr = [0.1]", "postgresql://nobody@127.0.0.1:{port}/db", "cannot open the study storage"),
        ("lr = [0.1]", "nosuchdb://x/y", "cannot open the study storage"),
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    search: str,
    storage: str | None,
    expected: str,
) -> None:
    space = write_space(tmp_path, search)
    args = ["sweep", str(space), "--out", str(tmp_path / "sweep")]
    if storage:
        args += ["--storage", storage.format(port=_free_port())]
    assert main(args) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("bbb: error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "sweep" / "trials").exists()


@needs_optuna
def test_uci_base_command_and_grid_sampler_with_ranges_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "uci.toml"
    space.write_text('[sweep]\ncommand = "uci"\n[search]\nlr = [0.1]\n')
    assert main(["sweep", str(space), "--out", str(tmp_path / "a")]) == 1
    assert "base command 'uci' is not supported" in capsys.readouterr().err
    space = write_space(tmp_path, "lr = { log_float = [1e-3, 1e-1] }")
    assert main(["sweep", str(space), "--out", str(tmp_path / "b"), "--sampler", "grid"]) == 1
    assert "grid sampler needs every option" in capsys.readouterr().err
    assert main(["sweep", str(space), "--out", str(tmp_path / "b")]) == 1
    assert "--trials N" in capsys.readouterr().err


@needs_optuna
def test_a_zero_trial_budget_and_a_binary_space_file_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trials 0 fell back to "no budget" (``0 or None``) and ran the whole grid; a space file
    that is not text gave a bare UnicodeDecodeError naming no file."""
    space = write_space(tmp_path, "lr = [0.01, 0.001]")
    assert main(["sweep", str(space), "--out", str(tmp_path / "a"), "--trials", "0"]) == 1
    assert "--trials must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "a" / "trials").exists()
    space.write_bytes(b"\xff\xfe")
    assert main(["sweep", str(space), "--out", str(tmp_path / "b")]) == 1
    assert f"space file {space} is not UTF-8 text" in capsys.readouterr().err


@needs_optuna
def test_fallback_importance_plot(tmp_path: Path) -> None:
    """Where Optuna's importance evaluator fails, a labelled rank-correlation plot is drawn."""
    import optuna

    from bbb.sweep.results import _fallback_importances

    study = optuna.create_study()
    dist = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
        "hidden": optuna.distributions.CategoricalDistribution(["[8]", "[16]"]),
    }
    for lr, hidden, value in [(0.001, "[8]", 3.0), (0.01, "[16]", 2.0), (0.1, "[8]", 1.0)]:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr, "hidden": hidden}, distributions=dist, value=value
            )
        )
    fig = _fallback_importances(study, "val_nll", "no evaluator")
    assert fig is not None and "fallback" in fig.axes[0].get_title()
    widths = {
        t.get_text(): p.get_width()
        for t, p in zip(fig.axes[0].get_yticklabels(), fig.axes[0].patches, strict=True)
    }
    assert widths["lr"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name,points", [("space.toml", 324), ("space-cpu.toml", 9), ("space-cpu-gaussian.toml", 3)]
)
def test_the_mnist_space_files_load_and_every_setting_is_a_valid_config(
    name: str, points: int
) -> None:
    """The search spaces of issue 5 cannot rot: each parses and each grid point validates."""
    from bbb.sweep import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "experiments" / "mnist" / name)
    grid = space.grid_points()
    assert space.is_grid and len(grid) == points
    for point in grid:
        cfg = space.config({p.name: point[p.optuna_name] for p in space.params})
        assert cfg.dataset == "mnist" and cfg.hidden == [1200, 1200]


def test_a_sweep_whose_trials_all_failed_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every trial failing (here: a data directory that does not exist) left no best trial,
    yet the sweep exited 0; it is now an error naming the count, and `show` still reports
    each trial's error in its CSV."""
    space = tmp_path / "space.toml"
    missing = tmp_path / "no-data"
    space.write_text(
        f'[sweep]\ncommand = "train"\n\n[train]\ndataset = "mnist"\ndata_dir = "{missing}"\n'
        "hidden = [8]\nepochs = 1\n\n[search]\nlr = [0.01, 0.001]\n"
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--no-trial-plots"]) == 1
    err = capsys.readouterr().err
    assert "no trial completed: 2 of 2 failed" in err
    assert main(["sweep", "show", str(out), "--no-plots"]) == 0
    rows = (out / "report" / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all("does not exist" in r for r in rows[1:])
