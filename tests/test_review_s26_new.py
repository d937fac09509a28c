"""Review of the session's new features (issues #3, #4): regression calibration metrics and
exact quantiles, the Trainer's new_round / per-step schedules / steps_per_epoch, and
bayesianize's include/exclude and MOPED. Each test here failed before its fix.

Tiny sizes throughout; the checks are exact (or against float64 references with tolerances
derived from float64 rounding), nothing here is statistical.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.models import bayes_mlp
from bbb.train import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


# --------------------------------------------------------------------- Trainer (#4)


def _toy(n: int = 20, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    return TensorDataset(x, torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=g))


def _trainer(out_dir: Path | None, epochs: int, **kw: Any) -> Trainer:
    torch.manual_seed(0)
    ds = _toy()
    model = bayes_mlp(1, [4], 1)
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), len(ds), kl_weighting="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    return Trainer(
        model,
        elbo,
        opt,
        DataLoader(ds, batch_size=10, shuffle=True, generator=gen),
        val_loader=DataLoader(_toy(6, seed=1), batch_size=6),
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=gen,
        val_samples=2,
        **kw,
    )


def _new_round(t: Trainer) -> None:
    """An active-learning round's new data: a larger labelled set."""
    ds = _toy(30, seed=5)
    gen = torch.Generator().manual_seed(1)
    t.train_loader = DataLoader(ds, batch_size=10, shuffle=True, generator=gen)
    t.loader_generator = gen
    t.elbo.dataset_size = 30


def _best(t: Trainer) -> tuple[Any, ...]:
    assert t.best_state is not None
    return (t.best_epoch, t.best_metric, t.bad_epochs, t.stopped, dict(t.best_state))


def test_a_refused_new_round_keeps_the_previous_best_model() -> None:
    # before: fit(new_round=True) reset the best model, its metric and the patience count,
    # then refused to train (epochs not raised): the earlier round's best was lost, and a
    # fit(new_round=False) after raising epochs kept "the best of every epoch" without it
    t = _trainer(None, 2)
    t.fit()
    before = _best(t)
    _new_round(t)
    with pytest.raises(RuntimeError, match="would train nothing"):
        t.fit(new_round=True)
    after = _best(t)
    assert after[:4] == before[:4]
    assert after[4].keys() == before[4].keys()
    assert all(torch.equal(after[4][k], before[4][k]) for k in before[4])
    t.epochs = 3
    t.fit(new_round=False)  # still a continuation of the same run
    assert t.epoch == 3 and t.best_epoch >= 1


def test_a_refused_epoch_plan_on_a_continued_run_leaves_it_continuable(tmp_path: Path) -> None:
    # before: a second fit() refused by the epoch-plan check (a OneCycleLR short of steps)
    # marked the Trainer as never returned, so the next fit() after the fix was taken for a
    # new run: "already holds a run" (with an out_dir), new_round refused as "not trained yet"
    t = _trainer(tmp_path, 1)
    t.fit()
    t.epochs = 2
    opt = t.optimizer
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=1)
    t.scheduler_interval = "step"
    with pytest.raises(ValueError, match="OneCycleLR scheduler has"):
        t.fit()
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=2)
    assert t.fit()["epochs_trained"] == 2


# --------------------------------------------------------------------- metrics (#3)


def _extreme_mixtures() -> tuple[Tensor, Tensor]:
    """(S, B, D) = (50, 6, 2) float64 mixtures a quantile solver finds hard: one component of
    tiny variance among wide ones, components 1e6 apart, a large common offset, near-equal
    components (a Gaussian), and ordinary ones."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(50, 6, 2, generator=g, dtype=torch.float64)
    var = torch.rand(50, 6, 2, generator=g, dtype=torch.float64) + 0.05
    var[0, 0] = 1e-20  # a near-point mass
    mu[:25, 1] += 1e6  # two far-apart clusters
    mu[:, 2] += 1e6  # a large offset
    mu[:, 3] = 0.5 + 1e-9 * mu[:, 3]  # all components nearly equal
    var[:, 3] = 2.0
    return mu, var


def test_exact_quantiles_do_not_depend_on_the_other_levels_or_the_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the solver drops solved problems from its work arrays: a level's quantile must still
    # be the same, bit for bit, asked alone, with others, or in chunks of one problem
    import bbb.metrics as M

    mu, var = _extreme_mixtures()
    pred = bbb.RegressionPrediction(mu, var)
    levels = [0.001, 0.3, 0.5, 0.97]
    together = pred.quantiles(levels, method="exact")
    for i, p in enumerate(levels):
        assert torch.equal(pred.quantiles(p, method="exact"), together[i])
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 1)
    assert torch.equal(pred.quantiles(levels, method="exact"), together)
    # the CDF at each quantile is the level where the mixture has density there (the
    # near-point mass has a jump: example 0 is checked only to bracket the level); float64
    # CDF rounding is ~1e-16 relative, the quantile's ~1e-16 |x| times the density
    q = torch.tensor(levels, dtype=torch.float64).view(-1, 1, 1)
    cdf = torch.stack([pred.cdf(together[i]) for i in range(len(levels))])
    # the Gaussian (example 3): the closed form
    normal = torch.distributions.Normal(torch.tensor(0.5, dtype=torch.float64), math.sqrt(2.0))
    torch.testing.assert_close(together[:, 3], normal.icdf(q.view(-1, 1)).expand(-1, 2))
    torch.testing.assert_close(cdf[:, 1:], q.expand(-1, 5, 2), rtol=0, atol=1e-9)


def _plain_trainer(loader: Any, **kw: Any) -> Trainer:
    model = bayes_mlp(1, [4], 1)
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), 20, kl_weighting="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return Trainer(model, elbo, opt, loader, epochs=1, progress=False, log=None, **kw)


def test_short_epochs_over_a_loader_in_a_fixed_order_are_refused() -> None:
    # before: only a DataLoader with a SequentialSampler was refused; a list of minibatches
    # and a DistributedSampler(shuffle=False) trained every epoch on the same first
    # steps_per_epoch minibatches and never on the others, silently
    from torch.utils.data import DistributedSampler

    ds = _toy()
    x, y = ds.tensors
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    fixed = {
        "a list of minibatches": batches,
        "a tuple of minibatches": tuple(batches),
        "a DistributedSampler with shuffle=False": DataLoader(ds, batch_size=5, sampler=sampler),
    }
    for what, loader in fixed.items():
        with pytest.raises(ValueError, match=rf"steps_per_epoch=2 is less .*\({what}\)"):
            _plain_trainer(loader, steps_per_epoch=2)
        _plain_trainer(loader, steps_per_epoch=4)  # whole passes: every minibatch is used
    shuffled = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True)
    _plain_trainer(DataLoader(ds, batch_size=5, sampler=shuffled), steps_per_epoch=2)


def test_a_training_loader_without_a_length_is_refused_saying_why() -> None:
    # before: "TypeError: object of type 'Stream' has no len()", from inside the constructor
    from torch.utils.data import IterableDataset

    x, y = _toy().tensors

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(zip(x, y, strict=True))

    with pytest.raises(TypeError, match=r"training loader \(DataLoader\) has no len\(\).*__len__"):
        _plain_trainer(DataLoader(Stream(), batch_size=5), steps_per_epoch=4)


def test_every_coverage_level_keeps_its_own_report_key() -> None:
    # before: the keys had 6 significant digits, so 0.9 and 0.9000001 (and 0.12345678 and
    # 0.12345679) shared one: as_dict() and regression_calibration_report silently kept one
    # of each pair
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 40, 1, generator=g, dtype=torch.float64)
    v = torch.ones(3, 40, 1, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    levels = [0.9, 0.9000001, 0.12345678, 0.12345679, 0.995]
    cov = bbb.metrics.interval_coverage(m, v, y, levels=levels)
    assert list(cov.as_dict()) == [
        "coverage_90",
        "coverage_90.00001",
        "coverage_12.345678",
        "coverage_12.345679",
        "coverage_99.5",
    ]
    report = bbb.metrics.regression_calibration_report(m, v, y, levels=levels)
    assert [k for k in report if k.startswith("coverage_")] == list(cov.as_dict())
    with pytest.raises(ValueError, match=r"levels 0.9 and 0.9000000000000001 differ by less"):
        bbb.metrics.interval_coverage(m, v, y, levels=[0.9, 0.9 + 1e-16])


def test_a_one_cycle_assigned_between_fits_and_stepped_per_epoch_warns() -> None:
    # before: only the constructor's scheduler was checked; a OneCycleLR laid out in
    # optimizer steps (2 per epoch here) assigned for a second fit() without
    # scheduler_interval="step" stepped once per epoch and stopped mid-cycle, silently
    import warnings

    t = _trainer(None, 1)
    t.fit()
    t.epochs = 3
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(t.optimizer, max_lr=0.05, total_steps=4)
    with pytest.warns(UserWarning, match=r"4 of its total_steps=4 steps left.*once per epoch, 2 "):
        t.fit()
    # one per epoch on purpose (as many steps as epochs left): no warning
    t.epochs = 5
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(t.optimizer, max_lr=0.05, total_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.fit()


def test_a_resume_with_another_kind_of_scheduler_is_refused(tmp_path: Path) -> None:
    # before: the checkpoint's LambdaLR state was loaded into the new OneCycleLR
    # (torch's load_state_dict updates any scheduler's attributes), a silent mix of the two
    from bbb.train import CheckpointError

    def warmup(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    def cycle(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4)

    def run(make_scheduler: Any, epochs: int) -> Trainer:
        t = _trainer(tmp_path, epochs, scheduler_interval="step")
        t.scheduler = make_scheduler(t.optimizer)
        return t

    run(warmup, 1).fit()
    with pytest.raises(CheckpointError, match=r"scheduler: torch\.optim\.lr_scheduler\.LambdaLR "
                       r"-> torch\.optim\.lr_scheduler\.OneCycleLR"):  # fmt: skip
        run(cycle, 2).fit(resume=True)
    assert run(warmup, 2).fit(resume=True)["epochs_trained"] == 2  # the same kind resumes
