"""Session 24 review of the examples and experiment scripts (issues #3, #5, #6, #7).

Each test names the defect it guards against; the scripts run as a user runs them (a subprocess
from another directory) where the message a user sees is the point, else in-process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXPERIMENTS = ROOT / "experiments"
SHARED = (ROOT / ".." / "shared" / "data").resolve()
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"shared MNIST data absent ({SHARED / 'mnist'})"
)
needs_mushroom = pytest.mark.skipif(
    not (SHARED / "mushroom").is_dir(), reason=f"shared mushroom data absent ({SHARED})"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BBB_DATA_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_script(
    script: Path, *args: object, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"s24_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- examples (#3) --------------------------------------------------------------------------

BAD_EXAMPLE_FLAGS = [
    ("mnist_uncertainty", "--epochs", "0", "must be at least 1, got 0"),
    ("mnist_uncertainty", "--samples", "0", "must be at least 1, got 0"),
    ("mnist_uncertainty", "--hidden", "0", "must be at least 1, got 0"),
    ("mnist_uncertainty", "--batch-size", "0", "must be at least 1, got 0"),
    ("mnist_uncertainty", "--subset", "60000", "must be in 1..50000, got 60000"),
    ("mnist_uncertainty", "--val-subset", "0", "must be in 1..10000, got 0"),
    ("mnist_uncertainty", "--test-subset", "10001", "must be in 1..10000, got 10001"),
    ("mnist_uncertainty", "--lr", "nan", "must be a finite number above 0, got nan"),
    ("mnist_uncertainty", "--prior-sigma", "0", "must be a finite number above 0, got 0"),
    ("heteroscedastic_regression", "--n-train", "0", "must be at least 1, got 0"),
    ("heteroscedastic_regression", "--epochs", "-1", "must be at least 1, got -1"),
    ("heteroscedastic_regression", "--samples", "0", "must be at least 1, got 0"),
    ("heteroscedastic_regression", "--lr", "-0.1", "must be a finite number above 0"),
    ("bayesianize_existing_model", "--pretrain-epochs", "0", "must be at least 1, got 0"),
    ("bayesianize_existing_model", "--finetune-epochs", "0", "must be at least 1, got 0"),
    ("bayesianize_existing_model", "--samples", "0", "must be at least 1, got 0"),
    ("bayesianize_existing_model", "--test-subset", "0", "must be in 1..10000, got 0"),
]


@pytest.mark.parametrize(("name", "flag", "value", "message"), BAD_EXAMPLE_FLAGS)
def test_example_refuses_a_bad_flag_value_with_a_usage_line(
    name: str, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--epochs 0, --samples 0, --subset 60000, --lr nan ... were tracebacks from deep in the
    library (ValueError from the Trainer, load_mnist, BayesLinear or Adam); --samples 0 only
    after the whole training had run (bbb.predict refused it)."""
    module = load_example(name)
    with pytest.raises(SystemExit) as exc:
        module.parse_args([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: {message}" in err, err


def test_example_bad_flag_is_one_line_without_traceback(tmp_path: Path) -> None:
    """As a user runs it: the usage and one error line, nothing written."""
    proc = run_script(
        EXAMPLES / "heteroscedastic_regression.py", "--samples", "0", "--out", "o", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "heteroscedastic_regression.py: error: argument --samples: must be at least 1, got 0"
    )
    assert not (tmp_path / "o").exists()


def test_example_defaults_still_parse() -> None:
    """The checks accept every documented default and quick setting."""
    for name in ("mnist_uncertainty", "heteroscedastic_regression", "bayesianize_existing_model"):
        assert load_example(name).parse_args([]).seed == 0
    args = load_example("mnist_uncertainty").parse_args(
        ["--epochs", "1", "--subset", "50000", "--test-subset", "10000", "--lr", "1e-3"]
    )
    assert (args.subset, args.test_subset, args.lr, args.val_subset) == (50000, 10000, 1e-3, 2000)
