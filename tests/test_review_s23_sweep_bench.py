"""Review s23 of ``bbb sweep`` (issue 10) and the benchmarks (issue 8).

The sweep tests that need no real training replace :func:`bbb.runs.train_run` with a stub that
reports chosen validation values per epoch (the worker imports it at each trial), so a whole
study runs in about a second (mostly creating the SQLite study).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bbb import bench
from bbb.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None,
    reason="bbb sweep needs Optuna: pip install -e '.[sweep]'",
)

SPACE = """
[sweep]
command = "train"
{metric}

[train]
dataset = "toy"
toy_n = 64
hidden = [8]
epochs = {epochs}
batch_size = 32
val_samples = 2

[search]
{search}
"""


def write_space(tmp: Path, search: str, *, epochs: int = 1, metric: str = "") -> Path:
    path = tmp / "space.toml"
    metric_line = f'metric = "{metric}"' if metric else ""
    path.write_text(SPACE.format(metric=metric_line, epochs=epochs, search=search))
    return path


def load_study(out: Path, name: str = "bbb-sweep") -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'study.db').resolve()}")


def stub_train_run(
    monkeypatch: pytest.MonkeyPatch, curves: Callable[[Any], list[dict[str, float]]]
) -> None:
    """``train_run`` replaced: epoch e of a trial reports ``curves(cfg)[e - 1]``."""
    import bbb.runs

    def fake(cfg: Any, run_dir: Path, *, epoch_callback: Any, **_: Any) -> dict[str, Any]:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        rows = curves(cfg)
        for epoch, row in enumerate(rows, 1):
            epoch_callback(epoch, row)
        return {"epochs_trained": len(rows), "stopped_by_callback": False}

    monkeypatch.setattr(bbb.runs, "train_run", fake)


# ---------------------------------------------------------------------------- sweep
@needs_optuna
def test_a_second_study_in_the_same_sweep_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trial directories are named by number alone: a second --study-name (or --storage) in
    the same --out deleted the first study's trial-0000... as it reused the numbers, and took
    over sweep.json. It is now refused before anything runs; the first study is intact."""
    stub_train_run(monkeypatch, lambda cfg: [{"val_nll": 0.5}])
    space = write_space(tmp_path, "lr = [0.03]")
    out = tmp_path / "sweep"
    args = ["sweep", str(space), "--out", str(out), "--pruner", "none", "--no-trial-plots"]
    assert main(args) == 0
    first = (out / "trials" / "trial-0000" / "trial.json").read_text()
    capsys.readouterr()

    other_db = f"sqlite:///{(tmp_path / 'other.db').resolve()}"
    for extra in (["--study-name", "other"], ["--storage", other_db]):
        assert main([*args, *extra]) == 1
        err = capsys.readouterr().err
        assert f"{out} holds the trials of study 'bbb-sweep'" in err, err
        assert "give it another --out" in err
        assert (out / "trials" / "trial-0000" / "trial.json").read_text() == first
        assert json.loads((out / "sweep.json").read_text())["study_name"] == "bbb-sweep"
    # the same study in the same directory still resumes (nothing left to run)
    assert main(args) == 0
    assert len(load_study(out).get_trials()) == 1
    # and another study in another directory runs
    assert main([*args[:3], str(tmp_path / "b"), *args[4:], "--study-name", "other"]) == 0


@needs_optuna
def test_a_trial_whose_metric_is_never_finite_fails_instead_of_scoring_inf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial whose validation metric was NaN in every epoch returned inf: a COMPLETE trial
    (value inf, best epoch 0), and `best` exported it when no other trial finished. It is now
    failed with a message; a NaN epoch beside finite ones is skipped, not chosen."""
    nan = math.nan
    curves = {
        0.1: [nan, nan],  # never finite: failed
        0.01: [nan, 0.7],  # the finite epoch counts
        0.001: [0.9, 0.8],
    }
    stub_train_run(monkeypatch, lambda cfg: [{"val_nll": v} for v in curves[cfg.lr]])
    space = write_space(tmp_path, "lr = [0.1, 0.01, 0.001]", epochs=2)
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--pruner", "none"]) == 0
    by_lr = {t.params["lr"]: t for t in load_study(out).get_trials()}
    assert by_lr[0.1].state.name == "FAIL"
    assert "val_nll was not finite in any of the 2 epoch(s)" in by_lr[0.1].user_attrs["error"]
    assert by_lr[0.01].state.name == "COMPLETE" and by_lr[0.01].value == pytest.approx(0.7)
    assert by_lr[0.01].user_attrs["best_epoch"] == 2
    capsys.readouterr()
    assert main(["sweep", "best", str(out)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["lr"] == 0.01

    # a study of NaN trials only is a failed sweep with no best trial
    curves[0.01] = curves[0.001] = [nan, nan]
    out2 = tmp_path / "sweep2"
    assert main(["sweep", str(space), "--out", str(out2), "--pruner", "none"]) == 1
    assert "no trial completed: 3 of 3 failed" in capsys.readouterr().err


@needs_optuna
def test_a_maximised_metric_picks_the_largest_value_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """metric = log_likelihood is maximised: each trial's value is its best (largest) epoch,
    `show` ranks the largest first and `best` exports that trial's configuration."""
    curves = {0.1: [-3.0, -2.0], 0.01: [-0.5, -1.5], 0.001: [-1.0, -0.9]}
    stub_train_run(monkeypatch, lambda cfg: [{"val_log_likelihood": v} for v in curves[cfg.lr]])
    space = write_space(tmp_path, "lr = [0.1, 0.01, 0.001]", epochs=2, metric="log_likelihood")
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--pruner", "none"]) == 0
    study = load_study(out)
    assert study.direction.name == "MAXIMIZE"
    values = {t.params["lr"]: (t.value, t.user_attrs["best_epoch"]) for t in study.get_trials()}
    assert values == {0.1: (-2.0, 2), 0.01: (-0.5, 1), 0.001: (-0.9, 2)}
    capsys.readouterr()
    assert main(["sweep", "show", str(out), "--no-plots"]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines() if r[:1].isdigit()]
    assert [float(r[2]) for r in rows] == [-0.5, -0.9, -2.0]
    assert main(["sweep", "best", str(out)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["lr"] == 0.01


@needs_optuna
@pytest.mark.parametrize("top", ["0", "-1"])
def test_show_refuses_a_top_below_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], top: str
) -> None:
    """--top 0 printed "no finished trial yet" over finished trials; --top -1 silently left
    out the last row (a Python slice)."""
    stub_train_run(monkeypatch, lambda cfg: [{"val_nll": cfg.lr}])
    space = write_space(tmp_path, "lr = [0.1, 0.01]")
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--pruner", "none"]) == 0
    capsys.readouterr()
    assert main(["sweep", "show", str(out), "--no-plots", "--top", top]) != 0
    err = capsys.readouterr().err
    assert f"--top must be >= 1, got {top}" in err


# ---------------------------------------------------------------------------- benchmarks
def test_samples_ratio_pairs_rows_of_the_same_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a network listed twice (--sizes 8,8) the first round-robin's S=2 rows were given
    the ratio to the second round-robin's S=1 time. Timings are stubbed: round k times every
    S=1 step at k ms and every S=2 step at 10 k ms, so each ratio must be exactly 10."""
    rounds = itertools.count(1)

    def fake(steps: dict[str, Any], warmup: int, repeats: int, inner: int = 1) -> dict:
        k = next(rounds)
        return {key: [k * (10.0 if key.endswith("S=2") else 1.0)] for key in steps}

    monkeypatch.setattr(bench, "_interleaved", fake)
    rows = bench.run_step_times(
        [("mlp", 8), ("mlp", 8)], ["reparam"], [1, 2], ["gaussian"], [], 0, 1, lambda _: None, 4
    )
    two = [r for r in rows if r.num_samples == 2]
    assert [r.ms for r in two] == [10.0, 20.0]
    assert [r.samples_ratio for r in two] == [10.0, 10.0]


def test_time_to_accuracy_refuses_a_subset_smaller_than_a_batch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--subset 100 (< the batch of 128) left no full minibatch: the training loop took no
    step, so its clock never advanced and it spun forever. Refused before the data is read."""
    path = ROOT / "benchmarks" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    assert spec is not None and spec.loader is not None
    tta = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "time_to_accuracy", tta)
    spec.loader.exec_module(tta)
    assert tta.main(["--libraries", "bbb", "--subset", "100", "--data-dir", "/nonexistent"]) == 1
    assert "--subset must be at least the batch size 128, got 100" in capsys.readouterr().err


@needs_optuna
def test_ctrl_c_before_a_trial_starts_does_not_requeue_a_trial_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial that fails with an error is not retried. A Ctrl-C that came in the next
    optimize call before its objective ran (the sampler choosing) found the worker's
    ``current`` still naming the failed trial and queued it again as "interrupted"."""
    import optuna

    import bbb.runs
    from bbb.sweep import load_space
    from bbb.sweep.worker import _Worker

    def broken(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("diverged")

    monkeypatch.setattr(bbb.runs, "train_run", broken)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_space(write_space(tmp_path, "lr = [0.1, 0.01]"))
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [0.1, 0.01]}))
    worker = _Worker(space, study, tmp_path / "sweep", "grid", None, poll=0.01)
    real = study.optimize
    calls = itertools.count()

    def optimize(*args: Any, **kwargs: Any) -> None:
        if next(calls) == 1:  # the second trial: interrupted before its objective runs
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(study, "optimize", optimize)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL"], states
    assert study.get_trials()[0].user_attrs["error"] == "diverged"


def test_bench_json_keeps_the_parts_measured_before_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON was written only at the very end: a failure in a later part (the inference
    part running out of GPU memory, say) or a time limit (benchmarks/gpu.sh) lost the whole
    step-time table. It is now written after each part, ``complete`` false until the end."""

    def out_of_memory(*_: Any, **__: Any) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "run_inference", out_of_memory)
    out = tmp_path / "bench.json"
    args = ["--quick", "--no-peers", "--nets", "mlp", "--samples", "1", "--repeats", "1"]
    args += ["--estimators", "reparam", "--priors", "gaussian", "--no-memory", "--no-variance"]
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.main([*args, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and "inference" not in data
    assert {r["library"] for r in data["step_time"]} == {"deterministic", "bbb"}
    monkeypatch.undo()
    assert bench.main([*args, "--no-inference", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True
