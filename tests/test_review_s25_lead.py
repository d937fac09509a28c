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


def test_kl_and_snr_on_fsdp_shards_are_refused_with_the_remedy(tmp_path: Any) -> None:
    """Outside an FSDP module's forward its parameters are shards (DTensors):
    ``bbb.kl_divergence`` returned a DTensor (one rank) or failed with "Cannot flatten
    unevenly sharded tensor" (several), and ``prune_by_snr`` ranked a rank's shard. Both are
    refused, naming ``unshard()``; between ``unshard()`` and ``reshard()`` they work. One
    gloo process (world size 1): its parameters are DTensors all the same."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import bbb
    from bbb.train.distributed import ELBOStep

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(bbb.BayesLinear(4, 5), nn.ReLU(), bbb.BayesLinear(5, 2))
        plain_kl = float(bbb.kl_divergence(model))  # before any forward: the KL at init
        step = ELBOStep(model, bbb.ELBO(bbb.Categorical(), dataset_size=10))
        fsdp.fully_shard(step)
        step(torch.randn(3, 4), torch.tensor([0, 1, 0])).loss.backward()
        with pytest.raises(RuntimeError, match=r"kl_divergence: .*FSDP-sharded.*unshard\(\)"):
            bbb.kl_divergence(model)
        with pytest.raises(RuntimeError, match=r"prune_by_snr.*layer 0 holds FSDP-sharded"):
            bbb.prune_by_snr(model, 0.5)
        step.unshard()
        assert float(bbb.kl_divergence(model)) == pytest.approx(plain_kl, rel=1e-6)
        assert bbb.prune_by_snr(model, 0.5).removed == 15
        step.reshard()
    finally:
        dist.destroy_process_group()
