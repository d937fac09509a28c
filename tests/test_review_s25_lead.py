"""Session 25, the lead's own fixes: the sweep never prunes a trial after its last epoch."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None,
    reason="bbb sweep needs Optuna: pip install -e '.[sweep]'",
)


@needs_optuna
def test_a_trial_worse_than_the_median_is_not_pruned_after_its_last_epoch() -> None:
    """The worker asked the pruner after every epoch, the last one too: a trial that had
    trained all its epochs but was worse than the median there ended PRUNED, and `bbb sweep
    show` / `best` left it out although it was finished."""
    import optuna

    from bbb.sweep.worker import _prune_due

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
    )
    for _ in range(5):  # finished trials, all far better than the one below
        study.add_trial(
            optuna.trial.create_trial(
                value=0.05, intermediate_values={1: 0.1, 2: 0.05}, params={}, distributions={}
            )
        )
    trial: Any = study.ask()
    trial.report(1.0, 1)
    assert _prune_due(trial, 1, 2)  # mid-training: the pruner stops it
    trial.report(1.0, 2)
    assert trial.should_prune()  # what the pruner says after the last epoch ...
    assert not _prune_due(trial, 2, 2)  # ... and the worker no longer acts on it
    assert _prune_due(trial, 2, 3)


def test_a_number_given_as_the_gaussian_noise_model_names_sigma() -> None:
    """``bbb.Gaussian(0.1)`` (the sd given positionally) said only "unknown noise 0.1"."""
    import bbb

    with pytest.raises(ValueError, match=r"unknown noise 0\.1; .*Gaussian\(sigma=0\.1\)"):
        bbb.Gaussian(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown noise 'fixd'; accepted values: fixed, "):
        bbb.Gaussian("fixd")


def test_the_public_types_module_runs() -> None:
    """tests/typing/public_api.py is type-checked by `make test` (mypy); its code must also
    run, so that the calls it type-checks are real ones."""
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parent / "typing" / "public_api.py"), run_name="__main__")


def test_only_rank_0_says_how_to_resume_an_interrupted_run(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun every rank printed "continue the run with: bbb train --resume R"."""
    from bbb.cli import _resume_hint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-00001.pt").write_bytes(b"")
    monkeypatch.setenv("RANK", "0")
    assert "continue the run with: bbb train --resume" in _resume_hint(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert _resume_hint(tmp_path) == "interrupted (rank 1; rank 0 says how to continue)"
    monkeypatch.delenv("RANK")
    assert "continue the run with: bbb train --resume" in _resume_hint(tmp_path)


@needs_optuna
def test_an_interrupted_show_with_the_storage_first_has_nothing_to_continue() -> None:
    """`bbb sweep --storage URL show DIR` interrupted said "continue the sweep with: bbb sweep
    --storage URL show DIR" (show was only recognised as the first word)."""
    from bbb.cli import _sweep_hint

    assert _sweep_hint(["--storage", "sqlite:///x.db", "show", "DIR"]) == "interrupted"
    assert _sweep_hint(["--storage=sqlite:///x.db", "best", "DIR"]) == "interrupted"
    assert _sweep_hint(["space.toml", "--out", "DIR"]).startswith(
        "interrupted; continue the sweep with: bbb sweep space.toml --out DIR"
    )


def test_seed_everything_takes_a_numpy_integer() -> None:
    """A loop over ``np.arange(5)`` seeds failed: "seed must be a non-negative integer, got
    np.int64(3)" (the ELBO's dataset_size took NumPy integers already)."""
    import numpy as np
    import torch

    from bbb.train.trainer import seed_everything

    g = seed_everything(np.int64(3))
    a = torch.rand(3, generator=g)
    assert torch.equal(a, torch.rand(3, generator=seed_everything(3)))
    for bad in (True, -1, 2.0, np.float64(3.0)):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            seed_everything(bad)  # type: ignore[arg-type]
