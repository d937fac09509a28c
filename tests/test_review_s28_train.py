"""Session 28 review of the training engine's session-27 changes (issue #4): exact resume with
every kind of loader, the checkpoints' generators, ``set_epoch``, and checkpoints written before
session 27.

Everything is tiny and exact (no statistical check): 20 toy points, a 4-unit hidden layer, a
resumed run compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import bbb
from bbb.models import bayes_mlp
from bbb.train import Trainer
from bbb.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N = 20
X = torch.rand(N, 1, generator=torch.Generator().manual_seed(1))
DS = TensorDataset(X, torch.sin(3 * X))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Stream(IterableDataset):
    """An iterable data set with a length, shuffled by the global RNG at each pass."""

    def __len__(self) -> int:
        return N

    def __iter__(self) -> Any:
        for i in torch.randperm(N).tolist():
            yield DS[i]


class RecordingSampler(DistributedSampler):
    """Rank 0's shard of 2 replicas (no process group needed), recording ``set_epoch``."""

    def __init__(self) -> None:
        super().__init__(DS, num_replicas=2, rank=0, shuffle=True, seed=3)
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)
        super().set_epoch(epoch)


LOADERS: dict[str, Callable[[], Any]] = {
    # a BatchSampler given as the sampler (batch_size=None: it yields whole minibatches)
    "sampler=BatchSampler": lambda: DataLoader(
        DS, batch_size=None, sampler=BatchSampler(RandomSampler(DS, generator=gen(7)), 5, False)
    ),
    "batch_sampler=BatchSampler": lambda: DataLoader(
        DS, batch_sampler=BatchSampler(RandomSampler(DS, generator=gen(7)), 5, False)
    ),
    "replacement": lambda: DataLoader(
        DS, batch_size=5, sampler=RandomSampler(DS, replacement=True, generator=gen(6))
    ),
    "weighted": lambda: DataLoader(
        DS,
        batch_size=5,
        sampler=WeightedRandomSampler(
            torch.rand(N, generator=gen(2)).tolist(), N, generator=gen(8)
        ),
    ),
    "two generators": lambda: DataLoader(
        DS, batch_size=5, sampler=RandomSampler(DS, generator=gen(6)), generator=gen(10)
    ),
    "distributed": lambda: DataLoader(DS, batch_size=5, sampler=RecordingSampler()),
    "iterable": lambda: DataLoader(Stream(), batch_size=5),
    "global shuffle": lambda: DataLoader(DS, batch_size=5, shuffle=True),
}


def make_trainer(
    out_dir: Path | None, epochs: int, loader: Any, steps_per_epoch: int | None = None, **kw: Any
) -> Trainer:
    torch.manual_seed(0)
    model = bayes_mlp(1, [4], 1)
    return Trainer(
        model,
        bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N),
        torch.optim.SGD(model.parameters(), lr=1e-2),
        loader,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        out_dir=out_dir,
        progress=False,
        log=None,
        **kw,
    )


def params(t: Trainer) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(t.model.parameters())


def resumed_equals_straight(tmp: Path, make: Callable[[], Any], spe: int | None) -> bool:
    """3 epochs straight against 2 epochs, then a resume (in a fresh Trainer, with the global
    RNG moved, as in a new process) to 3."""
    straight = make_trainer(tmp / "straight", 3, make(), spe)
    straight.fit()
    make_trainer(tmp / "resumed", 2, make(), spe).fit()
    resumed = make_trainer(tmp / "resumed", 3, make(), spe)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact resume warns about nothing
        resumed.fit(resume=True)
    return torch.equal(params(resumed), params(straight))


def test_a_batch_sampler_given_as_sampler_is_resumed_exactly(tmp_path: Path) -> None:
    # before: only loader.batch_sampler.sampler was looked in, so the generator of the
    # RandomSampler inside sampler=BatchSampler(...) was never saved: the resumed epoch 3
    # reshuffled from the generator's start, silently
    assert resumed_equals_straight(tmp_path, LOADERS["sampler=BatchSampler"], 3)


@pytest.mark.parametrize("name", [n for n in LOADERS if n != "sampler=BatchSampler"])
def test_every_kind_of_loader_is_resumed_exactly(tmp_path: Path, name: str) -> None:
    # steps_per_epoch=3 does not divide the loader's 4 minibatches: every epoch cuts a pass
    assert resumed_equals_straight(tmp_path, LOADERS[name], 3)


def test_a_distributed_sampler_inside_a_batch_sampler_given_as_sampler_is_set_per_epoch() -> None:
    inner = RecordingSampler()
    loader = DataLoader(DS, batch_size=None, sampler=BatchSampler(inner, 5, False))
    make_trainer(None, 2, loader).fit()
    # before: never set: every epoch took the shard's epoch-0 shuffle
    assert inner.epochs_set == [0, 1]
    inner = RecordingSampler()
    loader = DataLoader(DS, batch_size=None, sampler=BatchSampler(inner, 5, False))
    make_trainer(None, 1, loader, steps_per_epoch=4).fit()  # 2 minibatches per pass
    assert inner.epochs_set == [0, 1]


def test_steps_per_epoch_below_an_unshuffled_batch_sampler_given_as_sampler_is_refused() -> None:
    loader = DataLoader(DS, batch_size=None, sampler=BatchSampler(SequentialSampler(DS), 5, False))
    # before: accepted; every epoch took the same first 2 of the 4 minibatches
    with pytest.raises(ValueError, match=r"does not shuffle \(a SequentialSampler\)"):
        make_trainer(None, 2, loader, steps_per_epoch=2)


def test_a_resume_with_persistent_workers_is_warned_about(tmp_path: Path) -> None:
    make_trainer(tmp_path, 1, DataLoader(DS, batch_size=5, shuffle=True, generator=gen(5))).fit()
    # the same loader, keeping its worker between epochs: its base seed was drawn once, at the
    # uninterrupted run's first epoch, and the resumed run draws it again (no epoch is left
    # to train here, so no worker starts)
    loader = DataLoader(
        DS, batch_size=5, shuffle=True, generator=gen(5), num_workers=1, persistent_workers=True
    )
    resumed = make_trainer(tmp_path, 1, loader)
    # before: no warning, and the resumed run's shuffles and noise differed from the
    # uninterrupted one's
    with pytest.warns(UserWarning, match=r"persistent_workers=True.*not the uninterrupted"):
        resumed.fit(resume=True)


def test_a_resume_with_a_generator_fewer_is_warned_about(tmp_path: Path) -> None:
    make_trainer(tmp_path, 1, LOADERS["two generators"]()).fit()
    one = DataLoader(DS, batch_size=5, sampler=RandomSampler(DS, generator=gen(6)))
    with pytest.warns(UserWarning, match=r"holds the states of 2 generator\(s\).*draws from 1"):
        make_trainer(tmp_path, 2, one).fit(resume=True)


def test_a_resume_with_a_generator_the_checkpoint_lacks_is_warned_about(tmp_path: Path) -> None:
    make_trainer(tmp_path, 1, LOADERS["global shuffle"]()).fit()
    own = DataLoader(DS, batch_size=5, shuffle=True, generator=gen(5))
    with pytest.warns(UserWarning, match="the checkpoint holds no state of the generator"):
        make_trainer(tmp_path, 2, own).fit(resume=True)


def as_written_before_session_27(directory: Path) -> None:
    """Rewrite the newest checkpoint of ``directory`` as session 26 wrote it: without the
    states of every generator and without the ``set_epoch`` bookkeeping (the first
    generator's state under ``loader_generator`` was written by then)."""
    path = latest_checkpoint(directory / "checkpoints")
    assert path is not None
    state = torch.load(path, weights_only=True)
    del state["loader_generators"], state["sampler_epochs_used"]
    torch.save(state, path)


def test_a_checkpoint_from_before_session_27_resumes_exactly(tmp_path: Path) -> None:
    def loader() -> DataLoader[Any]:
        return DataLoader(DS, batch_size=5, sampler=RecordingSampler(), generator=gen(4))

    straight = make_trainer(tmp_path / "straight", 3, loader(), 4)
    straight.fit()
    make_trainer(tmp_path / "old", 2, loader(), 4).fit()
    as_written_before_session_27(tmp_path / "old")
    resumed = make_trainer(tmp_path / "old", 3, loader(), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.fit(resume=True)
    # its loader generator restored from loader_generator, set_epoch at epoch * passes + pass
    sampler = resumed.train_loader.sampler
    assert isinstance(sampler, RecordingSampler) and sampler.epochs_set == [4, 5]
    assert torch.equal(params(resumed), params(straight))


def test_the_meta_device_is_refused_at_construction() -> None:
    model = bayes_mlp(1, [4], 1).to("meta")
    # before: accepted; fit() failed at its first step ("Tensor.item() cannot be called on
    # meta tensors")
    with pytest.raises(ValueError, match=r"device='meta' cannot train: .*model.to_empty"):
        Trainer(
            model,
            bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N),
            torch.optim.SGD(model.parameters(), lr=1e-2),
            DataLoader(DS, batch_size=5),
            device="meta",
            progress=False,
            log=None,
        )


@pytest.mark.parametrize("which", ["train", "val"])
def test_a_loader_emptied_by_drop_last_says_so(which: str) -> None:
    short = DataLoader(DS, batch_size=N + 1, drop_last=True)  # its one minibatch is dropped
    loaders = {"train": DataLoader(DS, batch_size=5), "val": None, which: short}
    # before: "the ... data loader is empty", of a data set holding 20 examples
    with pytest.raises(ValueError, match=r"is empty \(a pass gives 20 examples, fewer than "
                       r"batch_size=21, and drop_last=True"):  # fmt: skip
        make_trainer(None, 1, loaders["train"], val_loader=loaders["val"])


def shuffled_val_trainer(out_dir: Path, epochs: int, val_generator: bool = True) -> Trainer:
    g = gen(4) if val_generator else None
    val = DataLoader(DS, batch_size=3, shuffle=True, generator=g)
    return make_trainer(out_dir, epochs, LOADERS["global shuffle"](), val_loader=val, val_samples=2)


def test_a_shuffled_val_loaders_generator_is_resumed(tmp_path: Path) -> None:
    straight = shuffled_val_trainer(tmp_path / "straight", 3)
    straight.fit()
    shuffled_val_trainer(tmp_path / "resumed", 2).fit()
    resumed = shuffled_val_trainer(tmp_path / "resumed", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.fit(resume=True)
    # before: the val_loader's generator restarted, so the resumed epoch 3 scored the examples
    # with other weight samples (val_nll 0.0384 for 0.0315): another best epoch, early stop
    # or ReduceLROnPlateau step than the uninterrupted run's
    assert [r["val_nll"] for r in resumed.history] == [r["val_nll"] for r in straight.history]
    # a val_loader built without its generator is warned about
    with pytest.warns(UserWarning, match=r"1 generator\(s\) that the validation loader drew"):
        shuffled_val_trainer(tmp_path / "resumed", 3, val_generator=False).fit(resume=True)
