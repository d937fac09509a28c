"""Training engine review (session 25, issue 4): the typing pass's findings and two defects.

- A Ctrl-C / SIGTERM on one rank of a distributed run reached the others only as a gloo
  "connection closed" error (NCCL: a hang until the timeout): now every rank stops at the same
  point, the stopped one with its own interrupt, the others with ``DistributedInterrupt``.
- ``metrics.jsonl`` recorded parameter group 0's learning rate only: now ``lrs`` too.
- A Trainer with a likelihood ``evaluate`` has no metrics for, and a ``val_loader``, trained a
  whole epoch before a bare ``AssertionError``: now a ``TypeError`` at construction.

The distributed checks run in one ``torch.multiprocessing.spawn`` of 2 CPU ranks (gloo).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bbb
from bbb.likelihoods import Likelihood
from bbb.train import Trainer
from bbb.train import distributed as D
from bbb.train.trainer import evaluate

WORLD = 2
SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of the suite


class Laplace(Likelihood):
    """A likelihood of the user's own: trainable, but evaluate() has no metrics for it."""

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        return -(output - target).abs().sum(-1) - output.shape[-1] * torch.log(torch.tensor(2.0))


def toy(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g))


# --------------------------------------------------------------------------- lr of every group


def test_metrics_record_every_parameter_groups_lr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ds = toy()
    model = bbb.models.bayes_mlp(1, [4], 1)
    mus = [p for n, p in model.named_parameters() if "rho" not in n]
    rhos = [p for n, p in model.named_parameters() if "rho" in n]
    optimizer = torch.optim.SGD([{"params": mus, "lr": 0.01}, {"params": rhos, "lr": 0.002}])
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Gaussian(), len(ds)),
        optimizer,
        DataLoader(ds, batch_size=8),
        epochs=1,
        out_dir=tmp_path / "run",
        progress=False,
        log=None,
    )
    trainer.fit()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lr"] == 0.01  # group 0's, as before (readers use it)
    assert row["lrs"] == [0.01, 0.002]
    assert trainer.history[0]["lrs"] == [0.01, 0.002]


def test_one_parameter_group_adds_no_lrs() -> None:
    torch.manual_seed(0)
    ds = toy()
    model = bbb.models.bayes_mlp(1, [4], 1)
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Gaussian(), len(ds)),
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(ds, batch_size=8),
        epochs=1,
        progress=False,
        log=None,
    )
    trainer.fit()
    assert trainer.history[0]["lr"] == 0.01 and "lrs" not in trainer.history[0]


# --------------------------------------------------------------------------- custom likelihoods


def test_validation_with_a_likelihood_evaluate_cannot_score_is_refused_at_construction() -> None:
    ds = toy()
    model = bbb.models.bayes_mlp(1, [4], 1)
    with pytest.raises(TypeError, match="got Laplace.*train without a val_loader"):
        Trainer(
            model,
            bbb.ELBO(Laplace(), len(ds)),
            torch.optim.SGD(model.parameters(), lr=0.01),
            DataLoader(ds, batch_size=8),
            val_loader=DataLoader(ds, batch_size=8),
            progress=False,
            log=None,
        )


def test_a_custom_likelihood_trains_without_validation_and_evaluate_names_it() -> None:
    torch.manual_seed(0)
    ds = toy()
    model = bbb.models.bayes_mlp(1, [4], 1)
    trainer = Trainer(
        model,
        bbb.ELBO(Laplace(), len(ds)),
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(ds, batch_size=8),
        epochs=1,
        progress=False,
        log=None,
    )
    assert trainer.fit()["epochs_trained"] == 1
    model.train()
    with pytest.raises(TypeError, match="evaluate supports Categorical and Gaussian.*got Laplace"):
        evaluate(model, DataLoader(ds, batch_size=8), Laplace())
    assert model.training  # refused before the model was switched or run


def test_evaluate_takes_a_subclass_of_gaussian() -> None:
    class Noisy(bbb.Gaussian):
        pass

    torch.manual_seed(0)
    report = evaluate(bbb.models.bayes_mlp(1, [4], 1), DataLoader(toy(), batch_size=8), Noisy())
    assert set(report) >= {"rmse", "log_likelihood", "nll"}


# --------------------------------------------------------------------------- a stop on one rank


def _trainer(r: int, out: Path, callback: Any = None) -> Trainer:
    torch.manual_seed(0)
    ds = toy(32)
    model = bbb.models.bayes_mlp(1, [4], 1)
    return Trainer(
        model,
        bbb.ELBO(bbb.Gaussian(), len(ds)),
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, seed=0)),
        epochs=4,
        out_dir=out,
        progress=False,
        log=None,
        distributed=True,
        epoch_callback=callback,
    )


def _outcome(trainer: Trainer, out: Path, exc: BaseException | None) -> dict[str, Any]:
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    ckpt = out / "checkpoints"
    return {
        "error": None if exc is None else type(exc).__name__,
        "message": "" if exc is None else str(exc),
        "interrupt": isinstance(exc, KeyboardInterrupt),
        "epoch": trainer.epoch,
        "params": params,
        "checkpoints": sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else [],
    }


def _sigterm_mid_step(r: int, out: Path) -> dict[str, Any]:
    """SIGTERM (the bbb command's handler) reaches rank 1 in the forward pass of epoch 2's
    third step: a stop in the middle of a step, as a scheduler's signal comes."""
    from bbb.cli import _sigterm_as_interrupt

    trainer = _trainer(r, out)
    calls = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[0] += 1
        if r == 1 and calls[0] == 4 + 3:  # 4 steps per epoch and rank
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.model.register_forward_hook(hook)
    exc: BaseException | None = None
    with _sigterm_as_interrupt() as term:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            exc = e
    result = _outcome(trainer, out, exc)
    result["term_fired"] = term.fired  # the CLI's exit code 143 reads it
    return result


def _sigint_in_callback(r: int, out: Path) -> dict[str, Any]:
    """Ctrl-C reaches rank 1 in its epoch callback of epoch 1 (inside a collective_errors
    block, after the epoch's files): every rank stops there, epoch 1 saved."""

    def callback(epoch: int, row: dict[str, Any]) -> None:
        if r == 1 and epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    trainer = _trainer(r, out, callback)
    exc: BaseException | None = None
    try:
        trainer.fit()
    except BaseException as e:  # noqa: BLE001 - recorded for the test
        exc = e
    return _outcome(trainer, out, exc)


def _collective_errors(r: int, error: type[BaseException]) -> str:
    try:
        with D.collective_errors("testing"):
            if r == 1:
                raise error("stop here")
    except BaseException as e:  # noqa: BLE001 - recorded for the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(r: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # Ctrl-C as KeyboardInterrupt even where the test runner was started with SIGINT ignored
    # (a background job of a shell without job control: Python then keeps SIG_IGN, and the
    # SIGINT scenario trained on without a stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=r,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    results: dict[str, Any] = {}
    root = Path(out).parent
    try:
        # each scenario ends every rank in step; one that does not (the bug) ends the run
        results["sigterm"] = _sigterm_mid_step(r, root / "sigterm")
        assert results["sigterm"]["interrupt"], results["sigterm"]
        results["sigint"] = _sigint_in_callback(r, root / "sigint")
        assert results["sigint"]["interrupt"], results["sigint"]
        results["kbd"] = _collective_errors(r, KeyboardInterrupt)
        results["exit"] = _collective_errors(r, SystemExit)
    except BaseException:  # noqa: BLE001 - recorded for the test, never a hang
        results["failure"] = traceback.format_exc()
    finally:
        torch.save(results, root / f"rank{r}.pt")
        if "failure" not in results:
            D.cleanup()
    if r == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def stop_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp-s25") / "results.pt"
    spawn_ranks(_worker, (free_port(), str(out)), WORLD, out, SPAWN_TIMEOUT_S)
    return [torch.load(out.parent / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


pytestmark_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


@pytestmark_gloo
def test_sigterm_mid_step_on_one_rank_stops_every_rank_at_that_step(
    stop_results: list[dict[str, Any]],
) -> None:
    assert all("failure" not in r for r in stop_results), [r.get("failure") for r in stop_results]
    r0, r1 = stop_results[0]["sigterm"], stop_results[1]["sigterm"]
    # the stopped rank: its own SIGTERM interrupt (the CLI's handler fired: exit 143)
    assert r1["error"] == "_Terminated" and r1["term_fired"]
    # the other: a clean stop, not a backend error or a hang
    assert r0["error"] == "DistributedInterrupt" and not r0["term_fired"]
    assert "step 3 of epoch 2" in r0["message"]
    # both after epoch 1, whose checkpoint is the last; the same weights on both ranks
    assert r0["epoch"] == r1["epoch"] == 1
    assert r0["checkpoints"] == ["checkpoint-00001.pt"]
    assert torch.equal(r0["params"], r1["params"])


@pytestmark_gloo
def test_ctrl_c_in_one_ranks_epoch_callback_stops_every_rank_after_that_epoch(
    stop_results: list[dict[str, Any]],
) -> None:
    assert all("failure" not in r for r in stop_results), [r.get("failure") for r in stop_results]
    r0, r1 = stop_results[0]["sigint"], stop_results[1]["sigint"]
    assert r1["error"] == "KeyboardInterrupt"
    assert r0["error"] == "DistributedInterrupt" and "after epoch 1 (saved)" in r0["message"]
    assert r0["epoch"] == r1["epoch"] == 1
    assert r0["checkpoints"] == ["checkpoint-00001.pt"]
    assert torch.equal(r0["params"], r1["params"])


@pytestmark_gloo
def test_collective_errors_tells_the_others_of_any_base_exception(
    stop_results: list[dict[str, Any]],
) -> None:
    assert all("failure" not in r for r in stop_results), [r.get("failure") for r in stop_results]
    assert stop_results[1]["kbd"] == "KeyboardInterrupt: stop here"
    assert stop_results[0]["kbd"].startswith("DistributedInterrupt: rank 1 was interrupted")
    assert stop_results[1]["exit"] == "SystemExit: stop here"
    assert stop_results[0]["exit"] == (
        "DistributedError: rank 1 failed while testing: SystemExit: stop here"
    )
