"""Review (session 21): the UCI benchmark, the sweep, the data loaders, the README's commands.

Each test failed before the fix it names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bbb.cli import main

HAVE_OPTUNA = importlib.util.find_spec("optuna") is not None
needs_optuna = pytest.mark.skipif(
    not HAVE_OPTUNA, reason="bbb sweep needs Optuna: pip install -e '.[sweep]'"
)

TOY_SPACE = """
[sweep]
command = "train"

[train]
dataset = "toy"
toy_n = 64
hidden = [8]
epochs = 1
batch_size = 32
val_samples = 2

[search]
"""


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
