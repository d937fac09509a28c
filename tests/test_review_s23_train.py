"""Review (session 23) of the training engine: trainer, checkpoints, config, distributed.

Each test names what was wrong before its fix. Runs are tiny (32 toy points, an 8-unit hidden
layer, one to three epochs of 4 steps); nothing here is statistical: every check is exact.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import bbb
import bbb.train.checkpoint as C
import bbb.train.trainer as T
from bbb.config import ConfigError, TrainConfig
from bbb.models import bayes_mlp
from bbb.train import (
    NonFinitePredictionError,
    Trainer,
    TrainingDivergedError,
    evaluate,
    save_checkpoint,
)
from bbb.train import distributed as D

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N, BATCH = 32, 8  # 4 steps per epoch


def toy_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, N).unsqueeze(1)
    return TensorDataset(x, torch.sin(3 * x) + 0.1 * torch.randn(N, 1, generator=g))


def make(
    out_dir: Path | None, epochs: int, *, val: bool = False, **kw: Any
) -> tuple[Trainer, nn.Module]:
    torch.manual_seed(0)
    ds = toy_data()
    model = bayes_mlp(1, [8], 1, mu_init="fan_in")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen)
    trainer = Trainer(
        model,
        elbo,
        opt,
        loader,
        val_loader=DataLoader(ds, batch_size=16) if val else None,
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=gen,
        val_samples=2,
        **kw,
    )
    return trainer, model


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("momentum", [1.0, 9.0])
def test_sgd_momentum_of_one_or_more_is_refused(momentum: float) -> None:
    # before: accepted; SGD's velocity then never decays (1) or grows geometrically (9, a
    # typo for 0.9), and the run diverged with a loss message that did not name momentum
    with pytest.raises(ConfigError, match="momentum must lie in \\[0, 1\\)"):
        TrainConfig(optimizer="sgd", momentum=momentum).validate()
    TrainConfig(optimizer="sgd", momentum=0.99).validate()  # still accepted
    # a saved Adam run never read its momentum: not a reason to refuse it
    TrainConfig(optimizer="adam", momentum=momentum).validate(check_applicable=False)


# --------------------------------------------------------------------------- durability


def _record_dir_fsyncs(monkeypatch: pytest.MonkeyPatch, watch: Path) -> list[tuple[Path, bool]]:
    """Record every directory fsync: (directory, whether ``watch`` existed at that moment)."""
    calls: list[tuple[Path, bool]] = []
    real = C._fsync_dir

    def record(d: Path) -> None:
        calls.append((Path(d), watch.exists()))
        real(d)

    monkeypatch.setattr(C, "_fsync_dir", record)
    monkeypatch.setattr(T, "_fsync_dir", record, raising=False)
    return calls


def test_new_checkpoint_directories_are_fsynced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: mkdir(parents=True) without syncing the parents: the checkpoint file and its own
    # directory were fsync'ed, but a power cut could still lose the new directories' entries
    calls = _record_dir_fsyncs(monkeypatch, tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"epoch": 1})
    synced = [d for d, _ in calls]
    assert synced.index(tmp_path) < synced.index(tmp_path / "run")  # outermost first
    assert tmp_path / "run" / "checkpoints" in synced


def test_a_new_metrics_file_is_on_disk_before_the_epochs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: metrics.jsonl was fsync'ed, but not its directory entry; in a run that reuses a
    # directory (overwrite: checkpoints/ exists, best.pt is written before the metrics line),
    # the run directory was not synced between creating metrics.jsonl and the checkpoint
    run = tmp_path / "run"
    make(run, 1)[0].fit()
    metrics = run / "metrics.jsonl"
    calls = _record_dir_fsyncs(monkeypatch, metrics)
    real_save = T.save_checkpoint
    saved_at: list[int] = []

    def save(*a: Any, **k: Any) -> Path:
        saved_at.append(len(calls))
        return real_save(*a, **k)

    monkeypatch.setattr(T, "save_checkpoint", save)
    make(run, 1)[0].fit(overwrite=True)
    before_checkpoint = calls[: saved_at[0]]
    assert (run, True) in before_checkpoint, before_checkpoint


# --------------------------------------------------------------------------- divergence


def _nan_gradient_at(param: Tensor, step: int) -> list[int]:
    """Make ``param``'s gradient NaN at backward pass number ``step`` (1-based)."""
    count = [0]

    def hook(g: Tensor) -> Tensor:
        count[0] += 1
        return g * math.nan if count[0] == step else g

    param.register_hook(hook)
    return count


def test_nan_parameters_left_by_the_last_step_are_not_saved_as_good(tmp_path: Path) -> None:
    # before: a NaN gradient at an epoch's last step (finite loss) left NaN parameters that,
    # without validation data, were saved in the checkpoint and best.pt, and fit() returned
    # normally: a finished run holding a NaN model
    trainer, model = make(tmp_path / "run", 1)
    _nan_gradient_at(model[0].weight_mu, step=4)
    with pytest.raises(TrainingDivergedError, match="parameters became NaN or Inf during epoch 1"):
        trainer.fit()
    assert not (tmp_path / "run" / "best.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-00001.pt").exists()


def test_the_nan_parameter_check_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer, model = make(tmp_path / "run", 2, val=True)
    _nan_gradient_at(model[0].weight_mu, step=8)  # epoch 2's last step
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit()
    message = str(info.value)
    assert "0.weight_mu" in message and "checkpoint-00001.pt is intact" in message
    # before: validation of the NaN model failed first, with "probs/means contains NaN values"
    assert "contains NaN" not in message


def test_the_nan_parameter_check_ignores_frozen_parameters(tmp_path: Path) -> None:
    # a parameter no step can change (requires_grad=False: a user's fixed -inf bound) is not
    # a divergence
    trainer, model = make(tmp_path / "run", 1)
    model.register_parameter("bound", nn.Parameter(torch.tensor(-math.inf), requires_grad=False))
    assert trainer.fit()["epochs_trained"] == 1


def _nan_output_once(model: nn.Module) -> None:
    """The model's next forward returns NaN (a divergence at the next step)."""
    done = [False]

    def hook(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        if done[0]:
            return out
        done[0] = True
        return out * math.nan

    model.register_forward_hook(hook)


def test_a_divergence_at_an_epochs_first_step_does_not_call_the_newest_checkpoint_good(
    tmp_path: Path,
) -> None:
    # before: "the last good checkpoint checkpoint-00002.pt is intact", although that
    # checkpoint holds exactly the parameters the diverging step started from
    run = tmp_path / "run"
    make(run, 2)[0].fit()
    trainer, model = make(run, 3)
    _nan_output_once(model)  # the resumed run's first step (epoch 3, step 1)
    with pytest.raises(TrainingDivergedError, match="epoch 3, step 1 of 4") as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert "is intact" not in message
    assert "checkpoint-00002.pt holds the parameters this step started from" in message, message
    assert "checkpoint-00001.pt" in message  # the one to fall back to
    # later in an epoch, the newest checkpoint did train on: it is still named as intact
    trainer, model = make(run, 3)
    calls = [0]

    def nan_at_second_forward(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        calls[0] += 1
        return out * math.nan if calls[0] == 2 else out

    model.register_forward_hook(nan_at_second_forward)
    with pytest.raises(TrainingDivergedError, match="epoch 3, step 2 of 4") as info:
        trainer.fit(resume=True)
    assert "the last good checkpoint" in str(info.value)
    assert "checkpoint-00002.pt is intact" in str(info.value)


def test_a_divergence_after_resuming_past_a_corrupt_checkpoint_names_the_one_resumed_from(
    tmp_path: Path,
) -> None:
    # before: "the last good checkpoint checkpoint-00002.pt is intact", the newest file, which
    # was corrupt (the resume had skipped it, with a warning, for checkpoint-00001.pt)
    run = tmp_path / "run"
    make(run, 2)[0].fit()
    (run / "checkpoints" / "checkpoint-00002.pt").write_bytes(b"not a checkpoint")
    trainer, model = make(run, 3)
    calls = [0]

    def nan_at_second_forward(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        calls[0] += 1
        return out * math.nan if calls[0] == 2 else out

    model.register_forward_hook(nan_at_second_forward)
    with (
        pytest.warns(UserWarning, match="trying an older checkpoint"),
        pytest.raises(TrainingDivergedError, match="epoch 2, step 2 of 4") as info,
    ):
        trainer.fit(resume=True)
    assert "the last good checkpoint" in str(info.value)
    assert "checkpoint-00001.pt is intact" in str(info.value), str(info.value)


# --------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_evaluate_of_a_diverged_model_says_so(task: str) -> None:
    # before: ValueError("probs contains NaN values" / "means contains NaN values") from the
    # metrics, which said neither where the NaN came from nor what to do
    torch.manual_seed(0)
    if task == "classification":
        model, lik = bayes_mlp(2, [4], 3), bbb.Categorical()
        y = torch.tensor([0, 1, 2, 0, 1, 2])
    else:
        model, lik = bayes_mlp(2, [4], 1), bbb.Gaussian("fixed", sigma=0.5)
        y = torch.zeros(6, 1)
    x = torch.randn(6, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    before = evaluate(model, loader, lik, num_samples=2)
    assert all(math.isfinite(v) for v in before.values())
    with torch.no_grad():
        model[0].weight_mu[0, 0] = math.nan  # every example's prediction is NaN
    with pytest.raises(NonFinitePredictionError, match="for 6 of 6 examples .*diverged"):
        evaluate(model, loader, lik, num_samples=2)
    assert issubclass(NonFinitePredictionError, ValueError)  # what evaluate raised before


# --------------------------------------------------------------------------- 2 ranks (gloo)
#
# One spawn of 2 CPU processes runs every scenario (a few seconds, mostly importing torch).
# Each rank saves what it saw to its own file: no collective outside the scenarios, so a
# scenario that leaves the ranks out of step fails its test instead of hanging the others.

WORLD = 2
SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of the suite


class Indexed(Dataset):
    """32 toy points that record which indices were read (the shards a rank trained on)."""

    def __init__(self, nan_at: int | None = None) -> None:
        self.x, self.y = toy_data().tensors
        if nan_at is not None:
            self.x = self.x.clone()
            self.x[nan_at] = math.nan
        self.seen: list[int] = []

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def ddp_trainer(
    out_dir: Path | None,
    epochs: int,
    ds: Dataset | None = None,
    *,
    sharded: bool = True,
    init_seed: int = 0,
    distributed: bool = True,
    **kw: Any,
) -> Trainer:
    """The same network, ELBO and optimizer on each rank (weight noise on: "sample" mode)."""
    torch.manual_seed(init_seed)
    ds = Indexed() if ds is None else ds
    model = bayes_mlp(1, [8], 1, mu_init="fan_in")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N)
    if sharded and distributed:  # the CLI's sampler: a shuffled shard per rank, reshuffled by epoch
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=dist.get_rank(), seed=3)
        loader = DataLoader(ds, batch_size=BATCH // WORLD, sampler=sampler)
    else:
        loader = DataLoader(ds, batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sharded=False: "every rank sees the whole set"
        return Trainer(
            model,
            elbo,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            loader,
            epochs=epochs,
            out_dir=out_dir,
            progress=False,
            log=None,
            distributed=distributed,
            **kw,
        )


def _params(trainer: Trainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _scenarios(r: int, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # 1. two epochs straight, and one epoch then a resume with 2 ranks: the same parameters
    t = ddp_trainer(tmp / "straight", 2)
    t.fit()
    res["straight"] = _params(t)
    seen = t.train_loader.dataset.seen  # type: ignore[attr-defined]
    res["shards"] = [seen[:16], seen[16:]]  # epoch 1, epoch 2: 16 rows per rank
    del t
    ddp_trainer(tmp / "resumed", 1).fit()
    t = ddp_trainer(tmp / "resumed", 2, init_seed=1)  # another initialisation: resume replaces it
    t.fit(resume=True)
    res["resumed"] = _params(t)
    del t
    # 1b. a run of one process (rank 0 alone, distributed=False inside the group) resumed on
    # 2 ranks. Before: that Trainer exchanged its epoch-file errors with the other ranks,
    # which took no part: rank 0 hung in its first epoch (this spawn timed out)
    if r == 0:
        t = ddp_trainer(tmp / "one", 1, distributed=False)
        t.fit()
        res["one"] = t.history[0]["loss"]
        del t
    dist.barrier()
    t = ddp_trainer(tmp / "one", 2, init_seed=1)
    t.fit(resume=True)
    res["one-then-two"] = [(row["epoch"], row["loss"]) for row in t.history]
    res["one-then-two-params"] = _params(t)
    del t
    # 2. every rank draws its own weight noise: the same rows on both ranks, outputs differ
    t = ddp_trainer(None, 1, sharded=False)
    outputs: list[Tensor] = []
    t.model.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    t.fit()
    res["first_output"] = outputs[0]
    del t
    # 3. a NaN input in rank 1's shard only: the message on rank 0 names it
    sampler_rows = list(range(1, N, WORLD))  # shuffle off: rank 1 reads rows 1, 3, ...
    t = ddp_trainer(None, 1, Indexed(nan_at=sampler_rows[0]), sharded=True)
    t.train_loader.sampler.shuffle = False  # type: ignore[union-attr]
    try:
        t.fit()
        res["nan_message"] = "no error"
    except TrainingDivergedError as e:
        res["nan_message"] = str(e)
    del t

    # 4. last (it may leave the ranks out of step): an error in the epoch callback of rank 1
    def callback(epoch: int, row: dict[str, Any]) -> None:
        if r == 1:
            raise RuntimeError("rank 1's callback failed")

    t = ddp_trainer(None, 3, epoch_callback=callback)
    try:
        t.fit()
        res["callback"] = "no error"
    except Exception as e:  # noqa: BLE001 - what each rank raised
        res["callback"] = f"{type(e).__name__}: {e}"
    del t
    return res


def _worker(r: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD)
    try:
        res = _scenarios(r, Path(out).parent)
    finally:
        D.cleanup()
    torch.save(res, f"{out}.{r}")
    if r == 0:  # spawn_ranks reads this file once both ranks have finished
        torch.save(True, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ddp") / "done.pt"
    spawn_ranks(_worker, (free_port(), str(out)), WORLD, out, SPAWN_TIMEOUT_S)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


def test_a_two_rank_run_resumed_on_two_ranks_ends_like_an_uninterrupted_one(
    ranks: list[dict[str, Any]],
) -> None:
    for r in range(WORLD):
        for k, v in ranks[r]["straight"].items():
            # exact: the resumed run restores every generator, and the shards depend only on
            # the sampler's seed and the epoch
            assert torch.equal(ranks[r]["resumed"][k], v), (r, k)
            assert torch.equal(ranks[0]["straight"][k], v), k  # DDP: one model on every rank


def test_a_one_process_run_resumes_on_two_ranks(ranks: list[dict[str, Any]]) -> None:
    rows = ranks[0]["one-then-two"]
    assert rows == ranks[1]["one-then-two"]  # the same history on every rank
    # epoch 1 is the one-process run's (resumed, not trained again), epoch 2 the 2 ranks'
    assert [e for e, _ in rows] == [1, 2] and rows[0][1] == ranks[0]["one"]
    for k, v in ranks[0]["one-then-two-params"].items():
        assert torch.equal(ranks[1]["one-then-two-params"][k], v), k


def test_the_ranks_shards_are_disjoint_and_reshuffled_every_epoch(
    ranks: list[dict[str, Any]],
) -> None:
    for epoch in range(2):
        a, b = ranks[0]["shards"][epoch], ranks[1]["shards"][epoch]
        assert sorted(a + b) == list(range(N))  # disjoint, and together the whole set
    assert ranks[0]["shards"][0] != ranks[0]["shards"][1]


def test_the_ranks_draw_independent_weight_noise(ranks: list[dict[str, Any]]) -> None:
    # the same 8 rows and the same parameters on both ranks: only the noise differs
    a, b = ranks[0]["first_output"], ranks[1]["first_output"]
    assert a.shape == b.shape == (BATCH, 1)
    assert not torch.allclose(a, b)


def test_a_nan_input_on_one_rank_is_named_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    # before: each rank looked at its own minibatch only; rank 0 (the one whose log is read)
    # blamed the learning rate, and printed its own finite nll
    for r in range(WORLD):
        message = ranks[r]["nan_message"]
        assert "step 1 of 4" in message, message
        assert "The minibatch inputs on rank 1 contain NaN or Inf values" in message, message
        assert "rank 0: nll=" in message and "rank 1: nll=nan" in message, message


def test_an_epoch_callback_error_on_one_rank_is_raised_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    # before: rank 0 waited in its next collective until rank 1's process left the group,
    # then failed with gloo's "Connection closed by peer" (no word of the callback)
    assert ranks[1]["callback"] == "RuntimeError: rank 1's callback failed"
    assert ranks[0]["callback"].startswith(
        "DistributedError: rank 1 failed while running the "
        "epoch callback of epoch 1: RuntimeError: rank 1's"
    )
