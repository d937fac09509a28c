"""Distributed review (session 21, issue 9): regressions for bugs found in data-parallel training.

One ``torch.multiprocessing.spawn`` of 2 CPU ranks (gloo) runs every check that needs a process
group; the rest run in this process. Exact checks only (float64, reordered sums), no timing.
"""

from __future__ import annotations

import datetime
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks

# the setting of test_distributed: 2 gloo ranks, N = 40, a global batch of 8, float64 bounds
from test_distributed import (
    ATOL,
    GLOBAL_BATCH,
    RTOL,
    SPAWN_TIMEOUT_S,
    WORLD,
    N,
    pytestmark,  # noqa: F401 - skipped where gloo is unavailable
)
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset, TensorDataset

import bbb
from bbb.train import StopTraining, Trainer
from bbb.train import distributed as D


def global_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)
    return x, y


def blundell_model() -> tuple[nn.Module, bbb.ELBO]:
    """A mean network (no noise) with the closed-form KL and the blundell KL weighting."""
    torch.manual_seed(3)
    model = bbb.models.bayes_mlp(3, [4], 2, kl="closed_form", mu_init="fan_in", rho_init=-1.0)
    model = model.double()
    bbb.set_sampling(model, "mean")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", output_dim=2).double(), N, kl_weighting="blundell")
    return model, elbo


def blundell_grads(model: nn.Module, step: Any, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    step(x, y, batch_index=0, num_batches=3).loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _uneven_trainer(r: int) -> str:
    """A Trainer whose ranks hold 9 and 6 rows (3 and 2 batches of 3): the error it raises."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(18, 1), torch.randn(18, 1))
    shard = Subset(ds, list(range(r, 18 if r == 0 else 12, 2)))
    model = bbb.models.bayes_mlp(1, [4], 1)
    elbo = bbb.ELBO(bbb.Gaussian(), len(ds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no DistributedSampler, the shard's own length
        trainer = Trainer(
            model,
            elbo,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(shard, batch_size=3),
            epochs=1,
            progress=False,
            log=None,
            distributed=True,
        )
    try:
        trainer.fit()
    except D.DistributedError as e:
        return str(e)
    finally:
        del trainer
    return "no error"


def _stop_on_one_rank(r: int) -> dict[str, Any]:
    """A Trainer whose epoch callback raises StopTraining after epoch 1 on rank 1 only (a
    wall-clock budget read a moment later there): the summary each rank returns."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(16, 1), torch.randn(16, 1))
    model = bbb.models.bayes_mlp(1, [4], 1)

    def callback(epoch: int, row: dict[str, Any]) -> None:
        if r == 1 and epoch == 1:
            raise StopTraining("time budget spent")

    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Gaussian(), len(ds)),
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds)),
        val_loader=DataLoader(ds, batch_size=8),
        epochs=3,
        progress=False,
        log=None,
        distributed=True,
        epoch_callback=callback,
    )
    summary = trainer.fit()
    del trainer
    return summary


def _sharded_val_warnings() -> list[str]:
    """The warnings of a Trainer given a val_loader with a DistributedSampler."""
    ds = TensorDataset(torch.randn(16, 1), torch.randn(16, 1))
    model = bbb.models.bayes_mlp(1, [4], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(
            model,
            bbb.ELBO(bbb.Gaussian(), len(ds)),
            torch.optim.SGD(model.parameters(), lr=0.01),
            DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds)),
            val_loader=DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds)),
            progress=False,
            log=None,
            distributed=True,
        )
    del trainer
    return [str(w.message) for w in caught]


def _worker(r: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=r,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results: dict[str, Any] = {}
        x, y = global_batch()
        lo, hi = r * GLOBAL_BATCH // WORLD, (r + 1) * GLOBAL_BATCH // WORLD
        # 1. wrap_elbo alone (a user's own loop, no Trainer): the blundell weight must use the
        #    global batch without the caller setting elbo.replicas
        model, elbo = blundell_model()
        ddp = D.wrap_elbo(model, elbo)
        results["replicas"] = elbo.replicas
        results["blundell"] = blundell_grads(model, ddp, x[lo:hi], y[lo:hi])
        del ddp
        # 2. uneven shards: a clear error on every rank, not a gloo abort or a hang
        results["uneven"] = [None] * WORLD
        dist.all_gather_object(results["uneven"], _uneven_trainer(r))
        results["sharded-val"] = _sharded_val_warnings()
        # 3. StopTraining on one rank: every rank stops after the same epoch
        results["stop"] = [None] * WORLD
        dist.all_gather_object(results["stop"], _stop_on_one_rank(r))
        if r == 0:
            torch.save(results, out)
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp-s21") / "results.pt"
    return spawn_ranks(_worker, (free_port(), str(out)), WORLD, out, SPAWN_TIMEOUT_S)  # type: ignore[return-value]


@pytest.mark.usefixtures("float64_default")
def test_wrap_elbo_alone_gives_the_blundell_weight_of_the_global_batch(
    ddp_results: dict[str, Any],
) -> None:
    """wrap_elbo used to leave ``elbo.replicas`` at 1 (only the Trainer set it): a user's own
    DDP loop with ``kl_weighting="blundell"`` then weighted the KL by pi_i / B instead of
    pi_i / (R B), R times too much."""
    assert ddp_results["replicas"] == WORLD
    model, elbo = blundell_model()
    x, y = global_batch()
    expected = blundell_grads(model, lambda *a, **k: elbo(model, *a, **k), x, y)
    got = ddp_results["blundell"]
    for k, v in expected.items():
        # tolerance: float64 with reordered sums
        torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=k)


def test_uneven_batch_counts_are_a_clear_error_on_every_rank(ddp_results: dict[str, Any]) -> None:
    """Ranks with different numbers of batches used to pair one rank's DDP gradient all-reduce
    with another's end-of-epoch reduction: gloo aborted the process ("Received data size
    doesn't match expected size"), nccl would hang until the timeout."""
    for msg in ddp_results["uneven"]:
        assert "3 batches on rank 0" in msg and "2 on rank 1" in msg, msg
        assert "DistributedSampler" in msg, msg


def test_stop_training_on_one_rank_stops_every_rank(ddp_results: dict[str, Any]) -> None:
    """A StopTraining raised by the epoch callback on rank 1 alone used to end rank 1's fit
    while rank 0 trained on into its next collective: both waited until the timeout."""
    for summary in ddp_results["stop"]:
        assert summary["epochs_trained"] == 1 and summary["stopped_by_callback"], summary


def test_a_sharded_val_loader_is_warned_about(ddp_results: dict[str, Any]) -> None:
    """Validation runs on rank 0 over what its val_loader gives: with the usual DDP idiom (a
    DistributedSampler on the validation loader too) the val metrics, the best model and early
    stopping silently used half the validation set."""
    got = [m for m in ddp_results["sharded-val"] if "validation runs on rank 0" in m]
    assert len(got) == 1 and "1/2 of the validation set" in got[0], ddp_results["sharded-val"]


def test_set_epoch_reaches_a_distributed_sampler_inside_a_batch_sampler() -> None:
    """``DataLoader(batch_sampler=BatchSampler(DistributedSampler(ds), ...))``: the loader's
    ``sampler`` is then a SequentialSampler, and set_epoch was never called: the same shard
    order every epoch (and, under DDP, a false warning that there is no DistributedSampler)."""
    ds = TensorDataset(torch.randn(32, 1), torch.randn(32, 1))
    shard = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_sampler=BatchSampler(shard, batch_size=4, drop_last=False))
    model = bbb.models.bayes_mlp(1, [4], 1)
    epochs_seen: list[int] = []
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Gaussian(), len(ds)),
        torch.optim.SGD(model.parameters(), lr=0.01),
        loader,
        epochs=3,
        progress=False,
        log=None,
        epoch_callback=lambda epoch, row: epochs_seen.append(shard.epoch),
    )
    trainer.fit()
    assert epochs_seen == [0, 1, 2]


def test_batch_sampler_lookup_without_a_group() -> None:
    """The Trainer's warning about a missing DistributedSampler looks inside a batch sampler
    too (checked on the helper: the warning itself needs a process group)."""
    from bbb.train.trainer import _epoch_sampler

    ds = TensorDataset(torch.randn(8, 1), torch.randn(8, 1))
    shard = DistributedSampler(ds, num_replicas=2, rank=1)
    assert _epoch_sampler(DataLoader(ds, sampler=shard, batch_size=2)) is shard
    inner = DataLoader(ds, batch_sampler=BatchSampler(shard, batch_size=2, drop_last=False))
    assert _epoch_sampler(inner) is shard
    assert _epoch_sampler(DataLoader(ds, batch_size=2, shuffle=True)) is None
    assert _epoch_sampler([(torch.zeros(1), torch.zeros(1))]) is None
