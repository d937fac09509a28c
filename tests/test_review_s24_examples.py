"""Session 24 review of the examples and experiment scripts (issues #3, #5, #6, #7).

Each test names the defect it guards against; the scripts run as a user runs them (a subprocess
from another directory) where the message a user sees is the point, else in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

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


# --- experiments/mnist/run.py (#5) ------------------------------------------------------------

MNIST_DRIVER = EXPERIMENTS / "mnist" / "run.py"


def _driver() -> dict[str, object]:
    return runpy.run_path(str(MNIST_DRIVER), run_name="s24_mnist_driver")


TINY = ["table1", "--subset", "128", "--epochs", "1", "--widths", "8", "--quiet"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('lr_shedule="cosine"', "--set: unknown key 'lr_shedule' (did you mean lr_schedule?)"),
        ("lr_schedule=cosine", "a string needs quotes, e.g. --set 'lr_schedule=\"cosine\"'"),
        ("seed=3", "--set seed: each row sets seed itself; use --seeds"),
        ("hidden=[5]", "--set hidden: each row sets hidden itself; use --widths"),
        ("epochs=3", "--set epochs: each row sets epochs itself; use --epochs"),
    ],
)
def test_mnist_driver_set_refuses_a_typo_or_a_row_key_naming_the_option(
    setting: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo'd --set key was a ConfigError traceback blaming experiments/mnist/sgd.toml, an
    unquoted string a TOMLDecodeError traceback; --set seed=3 trained seed 3 into the directory
    `sgd-8-s0` (hidden, epochs alike), which the report then labelled with the wrong seed."""
    monkeypatch.setenv("BBB_DATA_DIR", str(tmp_path / "no-data"))  # nothing may train
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _driver()["main"]([*TINY, "--methods", "sgd", "--set", setting, "--out", str(out)])
    assert message in str(exc.value), exc.value
    assert "sgd.toml" not in str(exc.value)
    assert not out.exists()


def test_mnist_driver_errors_and_ctrl_c_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing data directory, a config value the library refuses (--subset 0) or a
    batch larger than --subset were tracebacks; Ctrl-C a KeyboardInterrupt traceback that did
    not say the run resumes. Now one line each (exit 1; Ctrl-C 130, naming the resume)."""
    d = _driver()
    out = str(tmp_path / "out")
    cases = [
        (["--data-dir", str(tmp_path / "absent")], f"Data directory {tmp_path / 'absent'}"),
        (["--subset", "0"], "subset must be a positive integer or unset, got 0"),
    ]
    for extra, message in cases:
        argv = ["run.py", *TINY, "--methods", "sgd", "--out", out]
        argv = [a for a in argv if a not in ("--subset", "128")] + extra
        if "--subset" not in extra:
            argv += ["--subset", "128"]
        monkeypatch.setattr(sys, "argv", argv)
        assert d["_entry"]() == 1
        err = capsys.readouterr().err
        assert err.startswith(f"run.py: error: {message}") and err.count("\n") == 1, err

    def interrupted(argv: object = None) -> int:
        raise KeyboardInterrupt

    entry = d["_entry"]
    entry.__globals__["main"] = interrupted  # type: ignore[attr-defined]
    assert entry() == 130  # type: ignore[operator]
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two widths of the SGD row, a finished and an unfinished BBB scale-mixture row."""
    if not (SHARED / "mnist").is_dir():
        pytest.skip("shared MNIST data absent")
    out = tmp_path_factory.mktemp("mnist") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = _driver()
        common = ["--subset", "128", "--epochs", "1", "--quiet", "--data-dir", str(SHARED)]
        d["main"](["table1", *common, "--methods", "sgd", "--widths", "8", "16", "--out", str(out)])
        d["main"](
            ["table1", *common, "--methods", "bbb-mixture", "--widths", "8", "--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    # a second row "interrupted": its checkpoints and best.pt are there, its metrics.json is not
    shutil.copytree(out / "bbb-mixture-8-s0", out / "bbb-mixture-8-s1")
    (out / "bbb-mixture-8-s1" / "metrics.json").unlink()
    return out


@needs_mnist
def test_mnist_driver_table2_and_extras_skip_an_unfinished_run(
    mnist_runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """extras crashed with FileNotFoundError (metrics.json) on a run still training or
    interrupted, after evaluating the runs before it and writing nothing; table2 pruned the
    unfinished network's last checkpoint and wrote its table2.json as "end of training"."""
    d = _driver()
    out = mnist_runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d["main"](
            ["table2", "--width", "8", "--fractions", "0", "0.5", "--num-samples", "1"]
            + ["--out", str(out)]
        )
        d["main"](["extras", "--num-samples", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert text.count("[skip] " + str(out / "bbb-mixture-8-s1") + ": unfinished") == 2
    assert (out / "bbb-mixture-8-s0" / "table2.json").is_file()
    assert not (out / "bbb-mixture-8-s1" / "table2.json").exists()
    extras = json.loads((out / "extras.json").read_text())
    assert sorted(extras) == ["bbb-mixture-8-s0", "sgd-16-s0", "sgd-8-s0"]


@needs_mnist
def test_mnist_driver_figure3_shows_the_widest_network_of_each_method(
    mnist_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several widths of a method (the paper budget: 400, 800, 1200), Figure 3's curve
    labelled "sgd" held the weights of whichever run came last in name order (sgd-8 after
    sgd-16, sgd-800 after sgd-1200), not the paper's 1200-unit network."""
    import bbb.plots

    figures: list[object] = []
    real = bbb.plots.figure

    def recording(*args: object, **kwargs: object) -> object:
        fig = real(*args, **kwargs)
        figures.append(fig)
        return fig

    monkeypatch.setattr(bbb.plots, "figure", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _driver()["main"](["extras", "--num-samples", "1", "--out", str(mnist_runs)])
    finally:
        torch.set_num_threads(threads)
    fig3 = figures[-1]  # drawn after every run's Figure 4
    (ax,) = fig3.axes  # type: ignore[attr-defined]
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["bbb-scale_mixture (bbb-mixture-8-s0)", "sgd (sgd-16-s0)"]
