"""Active learning with bbb (issues #3 and #4): ``examples/active_learning.py`` end to end, and
the library defects met while writing it.

The example's runs are tiny (a pool of 200 MNIST images, a 16-unit network, 20 steps a round)
and skipped when the shared data directory is absent, as in ``tests/test_examples.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import bbb
from bbb.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "active_learning.py"
SHARED = ROOT / ".." / "shared" / "data"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(),
    reason=f"shared MNIST data absent ({SHARED.resolve() / 'mnist'})",
)
TINY = (
    *("--data-dir", SHARED, "--pool-subset", 200, "--test-subset", 200, "--val-subset", 50),
    *("--hidden", 16, "--steps", 20, "--val-every", 10, "--samples", 5, "--acquire", 5),
)


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_active_learning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: object, cwd: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BBB_DATA_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == returncode, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


# ----------------------------------------------------------------- ClassificationPrediction


def _sample_probs(s: int, b: int, c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.softmax(3 * torch.randn(s, b, c, generator=g), dim=-1)


def test_a_hand_built_prediction_with_the_samples_second_is_refused() -> None:
    """An MC-dropout or ensemble baseline's samples stacked batch-first (B, S, C) gave entropy
    (B,) but aleatoric and epistemic of shape (S,), averaged over the batch: a BALD ranking
    of the wrong axis (topk picked "pool indices" below S), silently."""
    sp = _sample_probs(20, 7, 10)  # (S, B, C)
    batch_first = sp.transpose(0, 1)  # (B, S, C)
    with pytest.raises(ValueError, match=r"batch-first \(B, S, C\).*transpose\(0, 1\)"):
        bbb.ClassificationPrediction(sp.mean(0), batch_first)
    with pytest.raises(ValueError, match=r"sample_probs \(S, B, C\)"):
        bbb.ClassificationPrediction(sp.mean(0), sp.mean(0))  # no sample dimension
    with pytest.raises(ValueError, match="log_probs must have the shape of probs"):
        bbb.ClassificationPrediction(sp.mean(0), sp, sp.mean(0).log()[:3])
    with pytest.raises(TypeError, match="sample_probs must be a tensor"):
        bbb.ClassificationPrediction(sp.mean(0), sp.tolist())  # type: ignore[arg-type]
    # the right layout: one MI per example, equal to entropy - aleatoric
    pred = bbb.ClassificationPrediction(sp.mean(0), sp)
    assert pred.epistemic.shape == (7,)
    torch.testing.assert_close(pred.epistemic, pred.entropy - pred.aleatoric, atol=1e-5, rtol=0)


def test_a_hand_built_prediction_of_logits_is_refused() -> None:
    """Logits passed for probabilities gave NaN or negative "uncertainties" (log of negative
    numbers), silently."""
    logits = 3 * torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*torch.softmax"):
        bbb.ClassificationPrediction(logits.mean(0), logits)


def test_nan_predictions_still_reach_evaluate_s_report() -> None:
    """The value check lets NaN through: a diverged model's predict still returns, and
    bbb.train.evaluate still says what happened (NonFinitePredictionError)."""
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 3))
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    x = torch.randn(6, 4)
    pred = bbb.predict(model, x, num_samples=3)
    assert torch.isnan(pred.probs).all()
    loader = [(x, torch.zeros(6, dtype=torch.long))]
    with pytest.raises(bbb.train.NonFinitePredictionError):
        evaluate(model, loader, bbb.Categorical(), num_samples=3)


# ------------------------------------------------------------------------- the example


def test_bald_acquires_the_unlabelled_inputs_of_highest_mutual_information() -> None:
    module = example()
    torch.manual_seed(0)
    model = module.bayesian_mlp(8, bbb.GaussianPrior(1.0))
    for layer in bbb.bayes_modules(model):  # wide posteriors: mutual informations differ
        layer.weight_rho.data.fill_(0.0)
    pool = torch.randn(40, 784, generator=torch.Generator().manual_seed(1))
    unlabelled = torch.arange(0, 40, 2)  # the even pool indices
    torch.manual_seed(5)
    chosen, scores = module.acquire(
        "bald", model, pool, unlabelled, 4, 200, torch.Generator().manual_seed(0)
    )
    torch.manual_seed(5)  # the same weight samples
    mi = bbb.predict(model, pool[unlabelled], num_samples=200).epistemic
    assert chosen.tolist() == unlabelled[torch.topk(mi, 4).indices].tolist()
    assert torch.equal(scores, torch.topk(mi, 4).values)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True) and bool((scores > 0).all())
    picked, nan = module.acquire(
        "random", model, pool, unlabelled, 4, 200, torch.Generator().manual_seed(0)
    )
    assert set(picked.tolist()) <= set(unlabelled.tolist()) and len(set(picked.tolist())) == 4
    assert bool(torch.isnan(nan).all())


def test_seeds_of_different_runs_and_rounds_are_unrelated() -> None:
    """seed + round gave seed 1's round 0 the training randomness of seed 0's round 1: a
    multi-seed study shared networks between its "independent" runs."""
    derived = example().derived_seed
    seeds = {derived(seed, r, stream) for seed in range(5) for r in range(12) for stream in (1, 2)}
    assert len(seeds) == 5 * 12 * 2
    assert all(0 <= s < 2**63 for s in seeds)


def test_impossible_settings_are_one_usage_error() -> None:
    module = example()
    args = module.parse_args([])
    assert args.out == "runs/examples/active_learning" and args.threads == 1
    for bad in (
        ["--pool-subset", "100", "--rounds", "10", "--acquire", "10"],  # 20 + 100 > 100
        ["--rounds", "-1"],
        ["--acquire", "0"],
        ["--pool-subset", "50001"],
        ["--threads", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            module.parse_args(bad)
        assert exc.value.code == 2, bad


def test_missing_mnist_is_a_one_line_error(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    proc = run("--data-dir", absent, cwd=tmp_path, returncode=1)
    assert proc.stderr.startswith(f"active_learning.py: error: Data directory {absent}")
    assert proc.stderr.count("\n") == 1


@needs_mnist
def test_active_learning_example_runs_and_writes_its_curves(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run(*TINY, "--rounds", 1, "--quiet", "--out", out, cwd=tmp_path)
    assert "labelled" in proc.stdout and "bald" in proc.stdout
    assert (out / "active_learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "active_learning.json").read_text())
    assert report["finished"] is True
    results = report["results"]
    start = report["initial_indices"]
    assert len(start) == 20 and len(set(start)) == 20
    # both strategies start from the same labelled set and the same network: equal errors
    assert results["bald"][0]["test_error"] == results["random"][0]["test_error"]
    for rows in results.values():
        assert [r["labelled"] for r in rows] == [20, 25]
        assert rows[0]["labelled_per_class"] == [2] * 10
        acquired = rows[0]["acquired"]
        assert len(set(acquired)) == 5 and not set(start) & set(acquired)  # new images only
        assert all(0 <= i < 200 for i in acquired)
        assert "acquired" not in rows[-1]
        for r in rows:
            assert 0.0 <= r["test_error"] <= 1.0 and math.isfinite(r["test_nll"])
    mi = results["bald"][0]["acquired_mutual_information"]
    assert mi == sorted(mi, reverse=True) and all(v >= 0 for v in mi)


@needs_mnist
def test_resume_after_an_interruption_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """The finished rounds are written after every round; --resume rebuilds the labelled sets
    from them and continues, with the same result as a run that was never interrupted."""
    module = example()
    args = [*map(str, TINY), "--rounds", "1", "--quiet", "--steps", "10", "--val-every", "5"]
    full = tmp_path / "full"
    report = module.main([*args, "--out", str(full)])
    partial = dict(report, finished=False)
    partial["results"] = {s: rows[:1] for s, rows in report["results"].items()}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "active_learning.json").write_text(json.dumps(partial))
    again = module.main([*args, "--out", str(resumed), "--resume"])
    assert again["results"] == report["results"] and again["finished"] is True
    # a finished run, or one started with other settings, is not continued
    with pytest.raises(module.UsageError, match="is finished"):
        module.main([*args, "--out", str(resumed), "--resume"])
    (resumed / "active_learning.json").write_text(json.dumps(partial))
    with pytest.raises(module.UsageError, match="started with --seed 0"):
        module.main([*args, "--seed", "1", "--out", str(resumed), "--resume"])
    with pytest.raises(module.UsageError, match="no .* to continue"):
        module.main([*args, "--out", str(tmp_path / "nothing"), "--resume"])


@needs_mnist
@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_resume_and_keeps_the_finished_rounds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "BBB_DATA_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, TINY), "--rounds", "30", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    report = out / "active_learning.json"
    try:
        deadline = time.monotonic() + 120
        while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report.exists(), "round 0 never finished"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("active_learning.py: interrupted") and "--resume" in stderr
    saved = json.loads(report.read_text())
    assert saved["finished"] is False and len(saved["results"]["bald"]) >= 1
