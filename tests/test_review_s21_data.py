"""Review (session 21): the UCI benchmark, the sweep, the data loaders, the README's commands.

Each test failed before the fix it names.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_sweep import FIXED
from test_uci import _write_uci_dir as write_uci_dir

from bbb.cli import main

HAVE_OPTUNA = importlib.util.find_spec("optuna") is not None
needs_optuna = pytest.mark.skipif(
    not HAVE_OPTUNA, reason="bbb sweep needs Optuna: pip install -e '.[sweep]'"
)

TOY_SPACE = FIXED.format(epochs=1) + "\n[search]\n"  # test_sweep's tiny toy options


@needs_optuna
@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            'prior_sigma = { grid = ["a"], transform = "exp(-x)" }',
            "prior_sigma = 'a': prior_sigma: transform 'exp(-x)' needs a number, got 'a'",
        ),
        (
            'prior_sigma = { choices = [[1], [2]], transform = "exp(x)" }',
            "prior_sigma = '[1]': prior_sigma: transform 'exp(x)' needs a number, got [1]",
        ),
        (
            'prior_sigma = { grid = [1000], transform = "exp(x)" }',
            "prior_sigma = 1000: prior_sigma: transform 'exp(x)' of 1000 overflows a float",
        ),
        (
            'prior_sigma = { float = [1, 400], transform = "10^x" }',
            "prior_sigma = 400: prior_sigma: transform '10^x' of 400 overflows a float",
        ),
    ],
)
def test_a_value_a_transform_cannot_take_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], search: str, expected: str
) -> None:
    """(#10) A transform applied to a string or list, or overflowing, was a bare
    ``bbb: error: could not convert string to float: 'a'`` / ``math range error`` naming
    neither the space file nor the option."""
    space = tmp_path / "space.toml"
    space.write_text(TOY_SPACE + search + "\n")
    assert main(["sweep", str(space), "--out", str(tmp_path / "sweep"), "--trials", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0] == f"bbb: error: {space}: {expected}", err[0]
    assert not (tmp_path / "sweep" / "trials").exists()


# --------------------------------------------------------------------------- UCI (#7)


def _write_uci_dir(root: Path, name: str) -> Path:
    """A tiny data set in the split format (40 rows, 2 splits of 36 / 4, no n_epochs.txt)."""
    return write_uci_dir(root, name, n_rows=40, n_splits=2, n_test=4, n_hidden=4, n_epochs=None)


def _uci_args(root: Path, out: Path) -> list[str]:
    return [
        "uci",
        "--all",
        str(root),
        "--out",
        str(out),
        "--splits",
        "1",
        "--epochs",
        "2",
        "--passes",
        "1",
        "--num-samples",
        "1",
        "--test-samples",
        "2",
        "--quiet",
    ]


def test_uci_all_resume_starts_the_data_sets_not_reached_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(#7) ``bbb uci --all ROOT --resume`` after an interruption in the first data set
    stopped with ``cannot resume: OUT/second/uci.json does not exist`` at the next data set
    (each one was resumed, and one never started has no uci.json); the documented resume
    command of experiments/uci/README.md could not finish an interrupted --all run."""
    root = tmp_path / "uci"
    _write_uci_dir(root, "first")
    _write_uci_dir(root, "second")
    out = tmp_path / "runs"
    # the interrupted --all run: 'first' started (one split done), 'second' never reached
    args = _uci_args(root, out)  # uci --all ROOT --out OUT, then the settings
    assert main(["uci", str(root / "first"), "--out", str(out / "first"), *args[5:]]) == 0
    done = json.loads((out / "first" / "splits" / "split_0.json").read_text())
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "| first | 1 |" in text and "| second | 1 |" in text
    # the finished split of 'first' was kept, not trained again
    assert json.loads((out / "first" / "splits" / "split_0.json").read_text()) == done
    assert (out / "second" / "metrics.json").is_file() and (out / "table.md").is_file()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"grid = { lr = [0.01 }\n", "search file {path} is not valid TOML: Unclosed array"),
        (b"\xff\xfe", "search file {path} is not UTF-8 text"),
        (b'smooth = "a"\n', "{path}: smooth must be an integer >= 1, got 'a'"),
        (
            b'validation_fraction = "a"\n',
            "{path}: validation_fraction must be a number in (0, 1), got 'a'",
        ),
        (b"grid = 3\n", "{path}: grid must be a table of TrainConfig keys"),
        (b"search = 3\n", "{path}: [search] must be a table"),
    ],
)
def test_a_bad_uci_search_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    """(#7) ``bbb uci --tune --search FILE``: invalid TOML, a binary file or a value of the
    wrong type gave ``bbb: error: Unclosed array (at line 1, column 21)``, ``'utf-8' codec
    can't decode byte 0xff ...`` or ``'<' not supported between instances of 'str' and
    'int'``, naming neither the file nor the key."""
    d = _write_uci_dir(tmp_path / "uci", "tiny")
    search = tmp_path / "search.toml"
    search.write_bytes(content)
    out = tmp_path / "run"
    args = ["uci", str(d), "--tune", "--search", str(search), "--epochs", "2", "--out", str(out)]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("bbb: error: " + expected.format(path=search)), err[0]
    assert not out.exists()


@needs_optuna
@pytest.mark.parametrize(
    ("fixed", "search", "expected"),
    [
        ("val_fraction = 0.0", "lr = [0.01, 0.001]", "[train] val_fraction = 0: a trial is"),
        ("", "val_fraction = [0.2, 0.0]", "val_fraction = 0.0: a trial is scored on the"),
        ("", "val_fraction = [0.0, 0.2]\nlr = [0.01]", "val_fraction = 0.0, lr = 0.01: a trial"),
    ],
)
def test_a_uci_sweep_without_a_validation_split_is_refused_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed: str, search: str, expected: str
) -> None:
    """(#10) A UCI space with val_fraction 0 ran every trial for an epoch, failed each one
    with "the epoch report has no val_nll" and exited 0; it is now refused up front (and a
    failing first grid point names all the options at their first values, not only the one
    being checked)."""
    d = _write_uci_dir(tmp_path / "uci", "tiny")
    space = tmp_path / "space.toml"
    space.write_text(
        f'[train]\ndataset = "uci"\nuci_path = "{d}"\nhidden = [4]\nepochs = 1\n'
        f"{fixed}\n[search]\n{search}\n"
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(space), "--out", str(out), "--trials", "2"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"bbb: error: {space}: {expected}"), err[0]
    assert "give val_fraction > 0" in err[0]
    assert not (out / "trials").exists()
