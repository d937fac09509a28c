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


# --- experiments/bandit (#6) ----------------------------------------------------------------

BANDIT = EXPERIMENTS / "bandit"


@pytest.fixture(scope="module")
def bandit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bbb bandit run (4 steps, one seed, 8 hidden units) reading the shared data."""
    if not (SHARED / "mushroom").is_dir():
        pytest.skip("shared mushroom data absent")
    from bbb.bandit import BanditConfig, run_bandit

    run = tmp_path_factory.mktemp("bandit") / "run"
    cfg = BanditConfig(
        agents=["bbb-thompson", "greedy-0"],
        steps=4,
        seeds=[0],
        updates_per_step=1,
        batch_size=4,
        buffer_size=8,
        hidden=8,
        checkpoint_every=2,
        data_dir=str(SHARED),
    )
    run_bandit(cfg, run, progress=False, log=None)
    return run


def _diagnose() -> dict[str, object]:
    return runpy.run_path(str(BANDIT / "diagnose.py"), run_name="s24_diagnose")


@needs_mushroom
def test_diagnose_draws_below_two_is_a_usage_line(
    bandit_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--draws 0 was a traceback (torch.stack of an empty list) after loading the data and the
    checkpoint; --draws 1 printed sd(eat) = nan with a torch warning (a standard deviation over
    one draw)."""
    main = _diagnose()["main"]
    for draws in ("0", "1"):
        with pytest.raises(SystemExit) as exc:
            main([str(bandit_run), "--draws", draws])  # type: ignore[operator]
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert (
            f"error: --draws must be at least 2 (sd(eat) is a spread over them), got {draws}" in err
        )


@needs_mushroom
def test_diagnose_reads_a_moved_run_with_data_dir(
    bandit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose saved data_dir no longer exists (made on another machine, or relative to
    another directory) could not be diagnosed: the error said "Pass --data-dir DIR or set
    BBB_DATA_DIR", but diagnose.py had no --data-dir and ignored BBB_DATA_DIR for a run that
    saved a data_dir. Now --data-dir points it at the data."""
    main = _diagnose()["main"]
    moved = tmp_path / "moved"
    shutil.copytree(bandit_run, moved)
    saved = json.loads((moved / "config.json").read_text())
    saved["data_dir"] = str(tmp_path / "old-machine" / "data")
    (moved / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exc:
        main([str(moved), "--draws", "2"])  # type: ignore[operator]
    assert exc.value.code == 1 and "Data directory" in capsys.readouterr().err
    main([str(moved), "--draws", "2", "--data-dir", str(SHARED)])  # type: ignore[operator]
    out = capsys.readouterr().out
    main([str(bandit_run), "--draws", "2"])  # type: ignore[operator]
    assert out == capsys.readouterr().out  # the same numbers as the run in place
    assert "bbb-thompson/seed0" in out and "greedy-0/seed0" in out


@needs_mushroom
def test_diagnose_is_seeded(bandit_run: Path) -> None:
    """The Thompson-decision regret and sd(eat) came from unseeded weight draws: the same
    command printed other numbers each time (measured on a 4-step run: 6.91 then 2.85 for
    the Thompson column). They are drawn from --seed (default 0) now, without touching the
    caller's random state."""
    diagnose = _diagnose()["diagnose"]
    torch.manual_seed(123)
    first = json.dumps(diagnose(bandit_run, 2))  # (json: nan == nan)
    after = torch.rand(3)
    torch.manual_seed(456)
    assert json.dumps(diagnose(bandit_run, 2)) == first  # type: ignore[operator]
    assert json.dumps(diagnose(bandit_run, 2, seed=1)) != first  # type: ignore[operator]
    torch.manual_seed(123)
    diagnose(bandit_run, 2)  # type: ignore[operator]
    assert torch.equal(torch.rand(3), after)  # the caller's stream is where it was


@needs_mushroom
def test_diagnose_reads_a_run_saved_before_later_settings_and_names_a_bad_one(
    bandit_run: Path, tmp_path: Path
) -> None:
    """A config.json with a key this version does not know was a TypeError traceback; a
    missing --step said "checkpoint ... does not exist" without the steps there are. A
    config.json written before kl_data_size / kernels / adam_eps / prior_update existed is
    read with the values such runs used (bbb.bandit's legacy settings, as --resume does; today
    these equal the defaults, so this part guards a future change of a default)."""
    from bbb.bandit.config import _LEGACY_SETTINGS

    d = _diagnose()
    old = tmp_path / "old"
    shutil.copytree(bandit_run, old)
    saved = json.loads((old / "config.json").read_text())
    for key in _LEGACY_SETTINGS:
        saved.pop(key)
    (old / "config.json").write_text(json.dumps(saved))
    rows_old = d["diagnose"](old, 2)  # type: ignore[operator]
    rows = d["diagnose"](bandit_run, 2)  # type: ignore[operator]
    assert json.dumps(rows_old) == json.dumps(rows)
    saved["hiden"] = 8
    (old / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config.json is not a bandit config .* 'hiden'"):
        d["diagnose"](old, 2)  # type: ignore[operator]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 \(steps: 2, 4\)"):
        d["diagnose"](bandit_run, 2, 3)  # type: ignore[operator]


@needs_mushroom
def test_interim_on_a_directory_without_checkpoints_is_one_line(
    bandit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """interim.py on a mistyped run directory, or on a merged run (which keeps no
    checkpoints), was a CheckpointError traceback."""
    main = runpy.run_path(str(BANDIT / "interim.py"), run_name="s24_interim")["main"]
    for bad, what in (
        (tmp_path / "typo", "does not exist"),
        (bandit_run / "checkpoints", "holds no"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(bandit_run), str(bad)])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"interim.py: error: {bad} {what}") and err.count("\n") == 1
        assert "give the runs that were merged" in err
    assert main([str(bandit_run)]) == 0
    assert "cumulative regret at 4" in capsys.readouterr().out


def test_short_runs_script_continues_after_an_interruption(tmp_path: Path) -> None:
    """experiments/bandit/short_runs.sh (14 runs of about a minute, set -e) could not be
    continued: run again after an interruption or a failed run, its first `bbb bandit` refused
    the finished directory ("already holds a bandit run") and the script stopped there. Now a
    finished run (metrics.json) is skipped and one with a checkpoint resumes.

    `python` is a stand-in here (first on PATH) that records its arguments and writes the
    run's metrics.json, failing once on the fourth run after writing a checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stub = bin_dir / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'out=""; prev=""\n'
        'for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done\n'
        f'echo "$*" >> "{log}"\n'
        'mkdir -p "$out/checkpoints"\n'
        f'if [[ $out == */mixture-s1e-2 && ! -e "{tmp_path}/failed" ]]; then\n'
        f'  touch "{tmp_path}/failed" "$out/checkpoints/checkpoint-00700.pt"; exit 1\n'
        "fi\n"
        'echo "{}" > "$out/metrics.json"\n'
    )
    stub.chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "o o")}
    script = BANDIT / "short_runs.sh"
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert first.returncode == 1  # the failed run stops the script (set -e)
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and all(c.startswith("-m bbb bandit --steps 1500") for c in calls)
    second = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    calls = log.read_text().splitlines()[4:]
    assert len(calls) == 14 - 3  # the three finished runs are not run again
    assert calls[0].endswith(f"--out {tmp_path}/o o/mixture-s1e-2 --resume")
    assert not any(c.endswith("--resume") for c in calls[1:])
    assert second.stdout.count("[done] ") == 3
    runs = sorted(p.name for p in (tmp_path / "o o").iterdir())
    assert len(runs) == 14 and all((tmp_path / "o o" / r / "metrics.json").is_file() for r in runs)


# --- experiments/uci (#7): the shipped files, as the README uses them -------------------------

UCI = EXPERIMENTS / "uci"


def test_uci_shipped_configs_search_and_space_load() -> None:
    """Every configs/<name>.toml is a valid `bbb uci` config for a data set the README's
    --all finds, search.toml is the built-in default it says it is, and space.toml is a
    valid `bbb sweep` space (a typo in any of them is refused naming the key)."""
    from bbb.sweep.space import load_space
    from bbb.uci import DEFAULT_SEARCH, SearchSpace, load_uci_config_file, uci_table

    configs = sorted(UCI.glob("configs/*.toml"))
    assert [p.stem for p in configs] == [
        "bostonHousing",
        "concrete",
        "energy",
        "kin8nm",
        "power-plant",
        "wine-quality-red",
    ]
    for path in configs:
        cfg = load_uci_config_file(path)
        assert cfg.dataset == "uci" and cfg.epochs >= 300, path
        assert uci_table(path) == {}  # no [uci] table: every split
        if (SHARED / "uci").is_dir():
            assert (SHARED / "uci" / path.stem / "data.txt").is_file(), path
    shipped = SearchSpace.load(UCI / "search.toml")
    assert shipped == SearchSpace.from_dict(json.loads(json.dumps(DEFAULT_SEARCH)), "default")
    space = load_space(UCI / "space.toml")
    assert space is not None


@pytest.mark.skipif(not (SHARED / "uci").is_dir(), reason="shared UCI data absent")
def test_uci_readme_command_runs_on_tiny_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first command (config + --tune + search.toml), cut to 40 epochs, one
    split and 10 test samples, run from the repository root as written; then --resume
    reuses the finished split and the search."""
    from bbb.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("BBB_DATA_DIR", str(SHARED))
    out = tmp_path / "bostonHousing"
    argv = ["uci", "bostonHousing", "--config", "experiments/uci/configs/bostonHousing.toml"]
    argv += ["--tune", "--search", "experiments/uci/search.toml", "--out", str(out)]
    argv += ["--epochs", "40", "--splits", "1", "--test-samples", "10", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
        first = json.loads((out / "metrics.json").read_text())
        assert main([*argv, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    again = json.loads((out / "metrics.json").read_text())
    assert again.pop("wall_seconds_this_call") < first.pop("wall_seconds_this_call")
    assert again == first  # nothing retrained: the same numbers
    assert (out / "tune.json").is_file()
    assert "bostonHousing" in capsys.readouterr().out
