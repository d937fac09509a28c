"""The Trainer for real training recipes (issue #4): per-step learning-rate schedules
(``scheduler_interval``), epochs of a chosen number of steps on a tiny data set
(``steps_per_epoch``) and a Trainer reused for several active-learning rounds (``new_round``).

Runs are tiny (20 toy points, an 8-unit hidden layer, a few steps); nothing here is
statistical: every check is exact (resumed runs are compared with ``torch.equal``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bbb
from bbb.models import bayes_mlp
from bbb.train import CheckpointError, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N = 20


def toy_data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    return TensorDataset(x, torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=g))


def make(
    out_dir: Path | None = None,
    epochs: int = 2,
    *,
    batch: int = 5,
    shuffle: bool = True,
    val: bool = False,
    scheduler: Any = None,
    kl_weighting: str = "uniform",
    lr: float = 1e-2,
    ds: TensorDataset | None = None,
    **kw: Any,
) -> Trainer:
    """A Trainer over 20 points, batch 5 (4 minibatches per pass) by default; ``scheduler``:
    a function of the optimizer."""
    torch.manual_seed(0)
    ds = toy_data() if ds is None else ds
    model = bayes_mlp(1, [8], 1, mu_init="fan_in")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), len(ds), kl_weighting=kl_weighting)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    return Trainer(
        model,
        elbo,
        opt,
        DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=gen if shuffle else None),
        val_loader=DataLoader(toy_data(10, seed=1), batch_size=10) if val else None,
        scheduler=None if scheduler is None else scheduler(opt),
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=gen if shuffle else None,
        val_samples=2,
        **kw,
    )


def warmup(steps: int) -> Any:
    """A linear warm-up over the first ``steps`` optimizer steps (LambdaLR)."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / steps))


def one_cycle(total_steps: int) -> Any:
    return lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=total_steps
    )


def one_cycle_rates(total_steps: int) -> list[float]:
    """The rates of ``one_cycle(total_steps)`` at each of its steps, on its own."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = one_cycle(total_steps)(opt)
    rates = []
    for _ in range(total_steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def step_lrs(trainer: Trainer) -> list[float]:
    """Group 0's learning rate at each optimizer step the trainer takes (appended by a hook)."""
    seen: list[float] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )
    return seen


def state(trainer: Trainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------- 1. scheduler_interval


@pytest.mark.parametrize("bad", ["steps", "Epoch", None, 1])
def test_an_unknown_scheduler_interval_is_refused_listing_the_accepted_values(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"scheduler_interval .*accepted values: 'epoch', 'step'"):
        make(scheduler_interval=bad)
    t = make()
    with pytest.raises(ValueError, match=r"accepted values: 'epoch', 'step'"):
        t.scheduler_interval = bad
    assert t.scheduler_interval == "epoch"


def test_a_per_step_warmup_sets_the_rate_of_every_step_and_the_metrics_say_it(
    tmp_path: Path,
) -> None:
    # before: the scheduler was stepped once per epoch, so a warm-up over 6 steps took 6
    # epochs (every step of an epoch at one rate), silently
    t = make(tmp_path, 2, scheduler=warmup(6), scheduler_interval="step")
    seen = step_lrs(t)
    t.fit()
    expected = [1e-2 * min(1.0, (s + 1) / 6) for s in range(8)]  # 2 epochs of 4 steps
    assert seen == pytest.approx(expected, rel=1e-12)
    r = rows(tmp_path)
    assert [row["lr"] for row in r] == [seen[0], seen[4]]
    assert [row["lr_last"] for row in r] == [seen[3], seen[7]]
    # per epoch (the default): one rate per epoch, and no lr_last
    t = make(None, 2, scheduler=warmup(6))
    seen = step_lrs(t)
    t.fit()
    assert seen == pytest.approx([1e-2 / 6] * 4 + [1e-2 * 2 / 6] * 4, rel=1e-12)
    assert "lr_last" not in t.history[0]


def test_reduce_on_plateau_per_step_is_refused() -> None:
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # noqa: E731
    with pytest.raises(
        ValueError, match="ReduceLROnPlateau scheduler cannot be stepped per optimizer"
    ):
        make(scheduler=plateau, scheduler_interval="step")
    t = make(scheduler=plateau)  # per epoch: fine
    with pytest.raises(
        ValueError, match="ReduceLROnPlateau scheduler cannot be stepped per optimizer"
    ):
        t.scheduler_interval = "step"
    t = make(scheduler_interval="step")
    with pytest.raises(
        ValueError, match="ReduceLROnPlateau scheduler cannot be stepped per optimizer"
    ):
        t.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(t.optimizer)
    assert t.scheduler is None


def test_a_scheduler_set_later_is_validated() -> None:
    t = make(val=True)  # selects on nll: lower is better
    with pytest.raises(ValueError, match="create it with mode='min'"):
        t.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(t.optimizer, mode="max")
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler"):
        t.scheduler = 0.5
    assert t.scheduler is None


def test_a_one_cycle_without_enough_steps_is_refused_before_training() -> None:
    # before: torch raised "Tried to step 9 times" at the first step past the cycle, mid-epoch
    with pytest.raises(ValueError, match=r"total_steps=8 steps left.*step it 12 times.*"
                       r"total_steps=12"):  # fmt: skip
        make(None, 3, scheduler=one_cycle(8), scheduler_interval="step")
    # exactly enough steps: trains to the end of the cycle
    t = make(None, 3, scheduler=one_cycle(12), scheduler_interval="step")
    seen = step_lrs(t)
    t.fit()
    assert seen == one_cycle_rates(12)


def test_a_one_cycle_laid_out_in_steps_but_stepped_per_epoch_warns() -> None:
    with pytest.warns(UserWarning, match=r"total_steps=12.*scheduler_interval='step'"):
        make(None, 3, scheduler=one_cycle(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(None, 3, scheduler=one_cycle(3))  # per epoch on purpose: no warning


def test_a_per_step_one_cycle_resumed_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = make(tmp_path / "straight", 3, scheduler=one_cycle(12), scheduler_interval="step")
    straight.fit()
    make(tmp_path / "resumed", 1, scheduler=one_cycle(12), scheduler_interval="step").fit()
    torch.manual_seed(123)  # another program's draws: the resume must not depend on them
    resumed = make(tmp_path / "resumed", 3, scheduler=one_cycle(12), scheduler_interval="step")
    resumed.fit(resume=True)
    assert_same(state(resumed), state(straight))
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    drop = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "resumed")] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "straight")
    ]


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ({"scheduler_interval": "step"}, {}, "scheduler_interval: 'step' -> 'epoch'"),
        ({"steps_per_epoch": 6}, {"steps_per_epoch": 5}, "steps_per_epoch: 6 -> 5"),
        ({}, {"steps_per_epoch": 4}, "steps_per_epoch: None -> 4"),
    ],
)
def test_a_resume_with_another_layout_is_refused(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any], named: str
) -> None:
    make(tmp_path, 1, scheduler=warmup(6), **first).fit()
    with pytest.raises(CheckpointError, match=f"other settings \\({named}\\)"):
        make(tmp_path, 2, scheduler=warmup(6), **second).fit(resume=True)


def test_a_checkpoint_without_the_layout_keys_resumes_as_per_epoch(tmp_path: Path) -> None:
    # a checkpoint of an earlier version (no scheduler_interval, steps_per_epoch keys)
    make(tmp_path, 1).fit()
    path = tmp_path / "checkpoints" / "checkpoint-00001.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["scheduler_interval"], ckpt["steps_per_epoch"]
    torch.save(ckpt, path)
    assert make(tmp_path, 2).fit(resume=True)["epochs_trained"] == 2
    with pytest.raises(CheckpointError, match="scheduler_interval: 'epoch' -> 'step'"):
        make(tmp_path, 3, scheduler_interval="step").fit(resume=True)


# --------------------------------------------------------------------- 2. steps_per_epoch


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_a_bad_steps_per_epoch_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        make(steps_per_epoch=bad)


def spy_calls(trainer: Trainer) -> list[tuple[int, int, int]]:
    """(batch size, batch_index, num_batches) of every ELBO call the trainer makes."""
    calls: list[tuple[int, int, int]] = []
    forward = trainer.elbo.forward

    def spy(model: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> Any:
        calls.append((x.shape[0], kw["batch_index"], kw["num_batches"]))
        return forward(model, x, y, **kw)

    trainer.elbo.forward = spy  # type: ignore[method-assign]
    return calls


def test_a_tiny_data_set_trains_steps_per_epoch_steps_per_epoch() -> None:
    # 20 labelled points and a batch of 128: one minibatch per pass over the data
    t = make(None, 2, batch=128, steps_per_epoch=5)
    calls = spy_calls(t)
    seen = step_lrs(t)
    t.fit()
    assert len(seen) == 10 and calls == [(20, 0, 1)] * 10
    assert [r["epoch"] for r in t.history] == [1, 2]


def test_blundell_weights_run_over_each_pass(tmp_path: Path) -> None:
    # 4 minibatches per pass, 8 steps per epoch: two passes, each weighted 1 in total
    t = make(tmp_path, 1, kl_weighting="blundell", steps_per_epoch=8)
    calls = spy_calls(t)
    t.fit()
    assert [(i, m) for _, i, m in calls] == [(0, 4), (1, 4), (2, 4), (3, 4)] * 2
    # the logged mean weight: each minibatch's pi_i / B (B = 5), averaged over the 40 examples
    pis = [2 ** (4 - i) / (2**4 - 1) for i in range(1, 5)] * 2
    assert rows(tmp_path)[0]["kl_weight"] == pytest.approx(sum(p / 5 * 5 for p in pis) / 40)


def test_blundell_with_part_of_a_pass_is_refused() -> None:
    with pytest.raises(ValueError, match=r"multiple of len\(train_loader\)=4 \(e.g. 4, 8, 16\)"):
        make(kl_weighting="blundell", steps_per_epoch=6)
    t = make(steps_per_epoch=6)
    t.elbo.kl_weighting = "blundell"  # changed after construction: refused when fit starts
    with pytest.raises(ValueError, match=r"multiple of len\(train_loader\)=4"):
        t.fit()
    assert t.epoch == 0


def test_fewer_steps_than_a_pass_need_a_shuffling_loader() -> None:
    with pytest.raises(ValueError, match="does not shuffle.*same first 2 minibatches"):
        make(shuffle=False, steps_per_epoch=2)
    t = make(None, 2, steps_per_epoch=2)  # shuffled: each epoch a new draw of 2 minibatches
    calls = spy_calls(t)
    t.fit()
    assert [(i, m) for _, i, m in calls] == [(0, 4), (1, 4)] * 2


def test_steps_per_epoch_resumed_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    # 6 steps of a 4-minibatch pass: each epoch a pass and a half (the half cut at the end)
    kw: dict[str, Any] = {"steps_per_epoch": 6, "val": True}
    straight = make(tmp_path / "straight", 3, **kw)
    straight.fit()
    make(tmp_path / "resumed", 2, **kw).fit()
    torch.manual_seed(7)
    resumed = make(tmp_path / "resumed", 3, **kw)
    resumed.fit(resume=True)
    assert_same(state(resumed), state(straight))
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [
        r["loss"] for r in rows(tmp_path / "straight")
    ]


class RecordingSampler(DistributedSampler):  # type: ignore[type-arg]
    """A DistributedSampler that records its set_epoch calls."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)
        super().set_epoch(epoch)


def test_a_distributed_sampler_gets_its_own_shuffle_for_every_pass() -> None:
    # rank 0's shard of 2 replicas (no process group needed): 10 points, 2 minibatches of 5
    ds = toy_data()
    torch.manual_seed(0)
    model = bayes_mlp(1, [8], 1, mu_init="fan_in")
    sampler = RecordingSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    t = Trainer(
        model,
        bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N, kl_weighting="blundell"),
        torch.optim.SGD(model.parameters(), lr=1e-2),
        DataLoader(ds, batch_size=5, sampler=sampler),
        epochs=2,
        steps_per_epoch=4,
        progress=False,
        log=None,
    )
    calls = spy_calls(t)
    t.fit()
    assert sampler.epochs_set == [0, 1, 2, 3]  # epoch * passes + pass, passes = 2
    assert [(i, m) for _, i, m in calls] == [(0, 2), (1, 2)] * 4
    # without steps_per_epoch: set once per epoch, continuing after the values used (2 and 3
    # would repeat the first fit's second-epoch shuffles)
    sampler.epochs_set.clear()
    t.epochs, t.steps_per_epoch = 4, None
    t.fit()
    assert sampler.epochs_set == [4, 5]


# --------------------------------------------------------------------- 3. several rounds


def new_round_data(t: Trainer) -> None:
    """What an active-learning round does: a larger labelled set, 3 more epochs, and here a
    harder validation set (its targets shifted: every nll of the round is far above the
    first round's)."""
    ds = toy_data(30, seed=5)
    gen = torch.Generator().manual_seed(1)
    t.train_loader = DataLoader(ds, batch_size=5, shuffle=True, generator=gen)
    t.loader_generator = gen
    t.elbo.dataset_size = 30
    x, y = toy_data(10, seed=1).tensors
    t.val_loader = DataLoader(TensorDataset(x, y + 3.0), batch_size=10)
    t.epochs += 3


def test_a_second_round_on_other_data_must_say_whether_it_is_a_new_round() -> None:
    t = make(None, 2, val=True)
    t.fit()
    new_round_data(t)
    before = state(t)
    with pytest.raises(RuntimeError, match=r"training data changed.*train_loader was replaced; "
                       r"elbo.dataset_size 20 -> 30.*fit\(new_round=True\)"):  # fmt: skip
        t.fit()
    assert_same(state(t), before)  # nothing trained
    # the same data, more epochs: the same run trained on (no question asked)
    t2 = make(None, 1, val=True)
    t2.fit()
    t2.epochs = 2
    assert t2.fit()["epochs_trained"] == 2


@pytest.mark.parametrize("new_round", [True, False])
def test_a_new_round_chooses_its_best_among_its_own_epochs(tmp_path: Path, new_round: bool) -> None:
    # before (no new_round): the first round's best metric was kept, so a round validated on
    # a harder set never saved its best; load_best() gave the first round's weights
    t = make(tmp_path, 2, val=True)
    t.fit()
    new_round_data(t)
    t.fit(new_round=new_round)
    scores = [r["val_nll"] for r in t.history]
    assert min(scores[2:]) > max(scores[:2])  # the harder validation set
    offset = 2 if new_round else 0
    pool = scores[offset:]  # the round's epochs, or every epoch
    j = min(range(len(pool)), key=pool.__getitem__)
    assert (t.best_epoch, t.best_metric) == (offset + j + 1, pool[j])
    assert (t.best_epoch > 2) is new_round
    on_disk = torch.load(tmp_path / "best.pt", weights_only=True)
    assert on_disk["epoch"] == t.best_epoch
    # a resume from the last checkpoint keeps the round's choice
    resumed = make(tmp_path, 5, val=True, ds=toy_data(30, seed=5))
    resumed.fit(resume=True)
    assert (resumed.best_epoch, resumed.best_metric) == (t.best_epoch, t.best_metric)


def test_a_new_round_restarts_patience() -> None:
    t = make(None, 40, val=True, patience=1)
    first = t.fit()
    assert first["stopped_early"]
    new_round_data(t)
    t.epochs = first["epochs_trained"] + 2
    summary = t.fit(new_round=True)
    assert summary["epochs_trained"] > first["epochs_trained"]
    assert summary["best_epoch"] > first["epochs_trained"]


def test_new_round_is_refused_where_it_means_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="new_round applies to a second fit.*not trained yet"):
        make(tmp_path).fit(new_round=True)
    make(tmp_path, 1).fit()
    with pytest.raises(ValueError, match="a resumed run continues its checkpoint's round"):
        make(tmp_path, 2).fit(resume=True, new_round=True)
    t = make(None, 1)
    t.fit()
    t.epochs = 2
    with pytest.raises(TypeError, match="new_round must be True, False or None"):
        t.fit(new_round="yes")  # type: ignore[arg-type]


def test_a_spent_one_cycle_is_refused_in_the_next_round_and_a_new_one_trains() -> None:
    t = make(None, 1, scheduler=one_cycle(4), scheduler_interval="step")
    t.fit()
    t.epochs = 2
    with pytest.raises(ValueError, match=r"has 0 of its total_steps=4 steps left"):
        t.fit()
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(t.optimizer, max_lr=0.05, total_steps=4)
    seen = step_lrs(t)
    assert t.fit()["epochs_trained"] == 2
    assert seen == one_cycle_rates(4)


# --------------------------------------------------------------------- 4. torch.distributed

WORLD = 2


def _per_step_worker(r: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from bbb.train import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=r,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        ds = toy_data()
        model = bayes_mlp(1, [8], 1, mu_init="fan_in")
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=r, seed=3)
        t = Trainer(
            model,
            bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N, kl_weighting="blundell"),
            opt,
            DataLoader(ds, batch_size=5, sampler=sampler),  # 2 minibatches per rank and pass
            scheduler=one_cycle(8)(opt),
            scheduler_interval="step",
            steps_per_epoch=4,
            epochs=2,
            out_dir=Path(out).parent / "run" if r == 0 else None,
            progress=False,
            log=None,
            distributed=True,
        )
        seen = step_lrs(t)
        t.fit()
        everything = [None] * WORLD
        dist.all_gather_object(everything, (seen, state(t), t.history))
        if r == 0:
            torch.save(everything, out)
    finally:
        D.cleanup()


@pytest.mark.slow  # two spawned processes (~25 s on a loaded 2-core machine); the fast tests above
# cover the same code (set_epoch per pass, the per-step scheduler)
def test_every_rank_steps_a_per_step_schedule_the_same(tmp_path: Path) -> None:
    import torch.distributed as dist
    from conftest import free_port, spawn_ranks

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ranks.pt"
    res: Any = spawn_ranks(_per_step_worker, (free_port(), str(out)), WORLD, out, 120)
    (lrs0, params0, hist0), (lrs1, params1, hist1) = res
    assert lrs0 == lrs1 == one_cycle_rates(8)
    assert_same(params0, params1)
    assert [r["lr_last"] for r in hist0] == [lrs0[3], lrs0[7]]
    assert rows(tmp_path / "run")[1]["lr"] == lrs0[4]
