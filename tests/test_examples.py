"""The scripts in ``examples/`` run end to end on tiny settings and write their outputs.

Each example runs as a subprocess (as a user would run it) with flags that make it take a few
seconds; the MNIST ones are skipped when the shared data directory is absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED = ROOT / ".." / "shared" / "data"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(),
    reason=f"shared MNIST data absent ({SHARED.resolve() / 'mnist'})",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = (
    "mnist_uncertainty",
    "heteroscedastic_regression",
    "bayesianize_existing_model",
    "active_learning",
    "bayesian_last_layer",
    "sequence_forecasting",
)


def run_example(
    name: str, *args: object, cwd: Path, returncode: int = 0
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BBB_DATA_DIR"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: fastest single-threaded, even on a busy machine
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == returncode, (
        f"{name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    return proc


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(NAMES)
    for name in NAMES:
        assert f"python examples/{name}.py" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_default_output_directory(name: str) -> None:
    args = load_example(name).parse_args([])
    assert args.out == f"runs/examples/{name}"


@pytest.mark.parametrize("name", NAMES)
def test_one_torch_thread_by_default(name: str) -> None:
    """With torch's default of one thread per core these small networks ran 2-6x slower on a
    busy 2-core machine (heteroscedastic_regression: 89 s against 16 s single-threaded), past
    examples/README.md's "under a minute"; --threads chooses another count, at least 1."""
    module = load_example(name)
    assert module.parse_args([]).threads == 1
    assert module.parse_args(["--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        module.parse_args(["--threads", "0"])


@pytest.mark.parametrize("name", ["mnist_uncertainty", "bayesianize_existing_model"])
def test_missing_mnist_is_a_one_line_error(name: str, tmp_path: Path) -> None:
    """A wrong --data-dir (or no MNIST files) was a traceback ending in MissingDataError."""
    absent = tmp_path / "absent"
    proc = run_example(name, "--data-dir", absent, cwd=tmp_path, returncode=1)
    assert proc.stderr.startswith(f"{name}.py: error: Data directory {absent}"), proc.stderr
    assert "--data-dir DIR" in proc.stderr and proc.stderr.count("\n") == 1


@needs_mnist
def test_mnist_uncertainty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_example(
        "mnist_uncertainty",
        *("--data-dir", SHARED, "--subset", 500, "--val-subset", 200, "--test-subset", 300),
        *("--hidden", 32, "--epochs", 1, "--samples", 3, "--quiet", "--out", out),
        cwd=tmp_path,
    )
    assert "test error" in proc.stdout
    assert is_png(out / "most_uncertain.png")
    assert (out / "run" / "metrics.jsonl").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    # one epoch on 500 images beats chance (measured: error 0.64): by 5 binomial standard
    # errors of a guessing network's error on the 300 test images
    assert 0.0 <= metrics["test"]["error"] < 0.9 - 5 * math.sqrt(0.9 * 0.1 / 300)
    shown = metrics["most_uncertain"]
    assert len(shown) == 16
    entropies = [d["entropy"] for d in shown]
    assert entropies == sorted(entropies, reverse=True)
    assert entropies[-1] >= metrics["mean_entropy"] - 1e-6  # the most uncertain ones
    for d in shown:  # (entropy = aleatoric + epistemic by construction: check the ranges)
        assert 0 <= d["aleatoric"] <= d["entropy"] + 1e-6 and d["entropy"] <= math.log(10) + 1e-6
        assert d["epistemic"] >= 0


def test_heteroscedastic_regression(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_example(
        "heteroscedastic_regression",
        *("--epochs", 2, "--n-train", 400, "--samples", 20, "--quiet", "--out", out),
        cwd=tmp_path,
    )
    assert "learned noise std" in proc.stdout and "true noise std" in proc.stdout
    assert is_png(out / "regression.png")
    assert (out / "run" / "best.pt").is_file()
    noise = json.loads((out / "noise.json").read_text())
    assert len(noise["x"]) == len(noise["learned_noise_std"]) == len(noise["true_noise_std"])
    assert all(v > 0 and math.isfinite(v) for v in noise["learned_noise_std"])
    # the true noise grows with x
    assert noise["true_noise_std"] == sorted(noise["true_noise_std"])
    # "val" is the best epoch's validation metrics (it held the whole history row: training
    # loss, KL, timings, learning rate); nll is -log_likelihood by definition
    assert set(noise["val"]) == {"rmse", "log_likelihood", "nll"}
    assert noise["val"]["nll"] == -noise["val"]["log_likelihood"] and noise["val"]["rmse"] > 0


def test_example_writes_under_runs_examples_by_default(tmp_path: Path) -> None:
    run_example(
        "heteroscedastic_regression",
        *("--epochs", 1, "--n-train", 200, "--samples", 10, "--threads", 2, "--quiet"),
        cwd=tmp_path,
    )
    out = tmp_path / "runs" / "examples" / "heteroscedastic_regression"
    assert is_png(out / "regression.png")
    noise = json.loads((out / "noise.json").read_text())
    assert noise["threads"] == 2  # --threads wins over OMP_NUM_THREADS=1


@needs_mnist
def test_bayesianize_existing_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_example(
        "bayesianize_existing_model",
        *("--data-dir", SHARED, "--subset", 500, "--test-subset", 200, "--samples", 3),
        *("--pretrain-epochs", 1, "--finetune-epochs", 1, "--quiet", "--out", out),
        cwd=tmp_path,
    )
    assert "to_deterministic" in proc.stdout
    assert is_png(out / "epistemic.png")
    report = json.loads((out / "report.json").read_text())
    assert report["converted_layers"] == ["BayesConv2d", "BayesConv2d", "BayesLinear"]
    assert report["mean_network_equals_original_after_conversion"] is True
    assert report["export_max_abs_error"] <= 1e-5
    assert report["round_trip_max_abs_error"] <= 1e-5
    assert report["accuracy_exported"] == report["accuracy_mean_network_after_finetuning"]
    # the pretrained network and the fine-tuned predictive beat chance (measured: 0.445 and
    # 0.655) by 5 binomial standard errors of a guessing network's accuracy on 200 images
    beats_chance = 0.1 + 5 * math.sqrt(0.1 * 0.9 / 200)
    for key in ("accuracy_plain", "accuracy_predictive", "accuracy_exported"):
        assert beats_chance < report[key] <= 1.0, key
    assert report["accuracy_plain"] == report["accuracy_mean_network_before_finetuning"]
    # The exported mean network is a plain nn.Sequential state_dict of the same architecture.
    state = torch.load(out / "deterministic.pt", weights_only=True)
    module = load_example("bayesianize_existing_model")
    net = module.convnet()
    net.load_state_dict(state)
    assert set(state) == set(net.state_dict())


@needs_mnist
def test_the_readme_quickstart_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Quickstart block, executed as written (one epoch of MNIST with the shared
    data, ~15 s on 2 cores): every name it uses is defined, and the network it trains is a
    working classifier (measured: 4.6% test error, ECE 0.009; 10% and 0.05 leave room for
    other machines' floating-point order while catching a broken block; chance is 90%)."""
    import re

    monkeypatch.setenv("BBB_DATA_DIR", str(SHARED))
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert code is not None, "README.md has no Quickstart python block"
    torch.manual_seed(0)
    ns: dict[str, object] = {}
    exec(compile(code.group(1), "README.md:Quickstart", "exec"), ns)  # noqa: S102
    pred, y_test = ns["pred"], ns["y_test"]
    error = float((pred.probs.argmax(1) != y_test).float().mean())  # type: ignore[attr-defined]
    ece = float(ns["bbb"].metrics.expected_calibration_error(pred.probs, y_test))  # type: ignore[attr-defined]
    assert error < 0.10 and ece < 0.05
