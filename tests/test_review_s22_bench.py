"""Session 22 review of the benchmark (#8): regression tests (tiny sizes, no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from bbb import bench, bench_peers
from bbb.allocator import tune_allocator

ROOT = Path(__file__).resolve().parents[1]


def _load_tta(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/time_to_accuracy.py as a module."""
    path = ROOT / "benchmarks" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    assert spec is not None and spec.loader is not None
    tta = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "time_to_accuracy", tta)
    spec.loader.exec_module(tta)
    return tta


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--samples", "0"], 1, "--samples: values must be positive integers, got 0"),
        (["--samples", ""], 1, "--samples is empty: give comma-separated positive integers"),
        (["--sizes", "x"], 2, "argument --sizes: expected comma-separated positive integers"),
        (["--sizes", "-5"], 1, "--sizes: values must be positive integers, got -5"),
        (["--batch", "0"], 1, "--batch must be an integer >= 1, got 0"),
        (["--repeats", "0"], 1, "--repeats must be an integer >= 1, got 0"),
        (["--warmup", "-1"], 1, "--warmup must be an integer >= 0, got -1"),
        (["--threads", "0"], 1, "--threads must be an integer >= 1, got 0"),
        (["--inference-inputs", "0"], 1, "--inference-inputs must be an integer >= 1, got 0"),
        (["--variance-draws", "1"], 1, "--variance-draws must be an integer >= 2, got 1"),
    ],
)
def test_bench_cli_names_a_bad_number(
    args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad number is refused naming the option (it used to give a table without the
    Bayesian rows, a traceback, or a NaN variance): a value out of range with exit code 1,
    one that is not a number with 2 (a usage error), as the README's "Exit codes" say."""
    from bbb.cli import main as cli_main

    assert cli_main(["bench", "--no-peers", *args]) == code
    captured = capsys.readouterr()
    assert captured.err.startswith(f"bbb: error: {message}") and captured.out == ""


def test_bench_rejects_an_unknown_net() -> None:
    """--nets cnn used to print an empty table and exit 0."""
    with pytest.raises(
        bench.BenchError, match=r"--nets: unknown net 'cnn'; accepted values: mlp, conv"
    ):
        bench.main(["--quick", "--no-peers", "--nets", "cnn"])
    with pytest.raises(bench.BenchError, match="--priors is empty"):
        bench.main(["--quick", "--no-peers", "--priors", ","])


def test_grad_variance_needs_two_draws() -> None:
    """One draw has no unbiased variance (it was NaN); two give a positive finite one."""
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        bench.run_grad_variance(8, 1, 0, ["reparam"])
    (row,) = bench.run_grad_variance(8, 2, 1, ["reparam"])
    assert 0 < row["var_grad_mu"] < math.inf and 0 < row["var_grad_rho"] < math.inf


def test_peak_rss_fallback_is_kib_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off Linux the peak comes from ru_maxrss, which macOS reports in bytes, not KiB."""

    def no_proc(*_: Any, **__: Any) -> Any:
        raise OSError("no /proc")

    monkeypatch.setattr(bench, "open", no_proc, raising=False)
    usage = SimpleNamespace(ru_maxrss=3 * 1024 * 1024)
    monkeypatch.setattr(bench.resource, "getrusage", lambda _who: usage)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bench._peak_rss_kib() == 3 * 1024
    monkeypatch.setattr(sys, "platform", "linux")
    assert bench._peak_rss_kib() == 3 * 1024 * 1024


def test_memory_children_get_the_allocator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_memory passes its allocator setting to each fresh subprocess (which used to run on
    glibc's defaults whatever the step-time table ran with)."""
    specs: list[dict[str, Any]] = []

    def fake_run(cmd: list[str], **_: Any) -> SimpleNamespace:
        specs.append(json.loads(cmd[-1]))
        out = {"base_kib": 1024, "peak_kib": 2048, "offered": True, "allocator_tuned": True}
        return SimpleNamespace(returncode=0, stdout=json.dumps(out) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    rows = bench.run_memory([("mlp", 8)], ["reparam"], [], batch=4, tuned_allocator=True)
    assert [r["library"] for r in rows] == ["deterministic", "bbb"]
    assert all(s["tune_allocator"] is True for s in specs)
    specs.clear()
    bench.run_memory([("mlp", 8)], ["reparam"], [], batch=4, tuned_allocator=False)
    assert all(s["tune_allocator"] is False for s in specs)


@pytest.mark.parametrize("tune", [False, True])
def test_memory_child_applies_the_allocator_setting(tune: bool) -> None:
    """The child process itself tunes the allocator when asked (and only then)."""
    spec = {
        "net": "mlp", "hidden": 8, "library": "deterministic", "estimator": "-", "prior": "-",
        "num_samples": 1, "threads": 1, "batch": 4, "device": "cpu", "tune_allocator": tune,
    }  # fmt: skip
    code = "import sys; from bbb.bench import _memory_child; _memory_child(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["offered"] and res["peak_kib"] >= res["base_kib"] > 0
    assert res["allocator_tuned"] is (tune and tune_allocator())


def test_pyro_size_check_covers_every_layer() -> None:
    """Above H = 784 the second layer's (batch, H + 1, H) tensor is the largest; the check
    looked at the first layer's (batch, 785, H) only."""
    assert bench_peers.pyro_elements(128, 400) == 128 * 785 * 400
    assert bench_peers.pyro_elements(16, 4000) == 16 * 4001 * 4000
    x, y = torch.zeros(16, 784), torch.zeros(16, dtype=torch.long)
    # 16 * 785 * 4000 = 50M is under the bound, 16 * 4001 * 4000 = 256M is not: skipped
    assert bench_peers.PYRO_MAX_ELEMENTS >= 16 * 785 * 4000
    step = bench_peers.build_peer_step("pyro", "mlp", 4000, "local", "gaussian", 1, x, y, 60_000)
    assert step is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--libraries", "bbb,torchbnn"], "--libraries: unknown library 'torchbnn'"),
        (["--libraries", ","], "--libraries is empty"),
        (["--target", "0"], "--target must be a validation error in (0, 1], got 0.0"),
        (["--eval-every", "0"], "--eval-every must be positive, got 0"),
        (["--eval-samples", "0"], "--eval-samples must be positive, got 0"),
        (["--max-seconds", "-1"], "--max-seconds must be positive, got -1.0"),
    ],
)
def test_time_to_accuracy_names_a_bad_argument(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown library used to be trained as blitz under the given name; --eval-every 0
    divided by zero after loading the data. Both are refused before any data is read."""
    tta = _load_tta(monkeypatch)
    # exit 1, one error line, as `bbb bench` (exit 2 is for what argparse cannot parse)
    assert tta.main(["--libraries", "bbb", *args, "--data-dir", "/nonexistent"]) == 1
    assert message in capsys.readouterr().err


def test_time_to_accuracy_refuses_a_missing_peer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tta = _load_tta(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "blitz" else real(name, *a)
    )
    assert tta.main(["--libraries", "bbb,blitz", "--data-dir", "/nonexistent"]) == 1
    assert "--libraries: blitz is not installed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown library 'torchbnn'"):
        tta.run("torchbnn", SimpleNamespace(seed=0), (torch.zeros(4, 784),) * 4)
