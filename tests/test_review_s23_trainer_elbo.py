"""Review (session 23) of the Trainer and the ELBO from a user's tour (issues #3, #4).

Each test says what happened before its fix. Runs are tiny (32 toy points, an 8-unit hidden
layer, a few epochs of 4 steps); nothing here is statistical: every check is exact.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bbb
from bbb.models import bayes_mlp
from bbb.train import Trainer, evaluate, load_checkpoint
from bbb.train import distributed as D

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

N, BATCH = 32, 8  # 4 steps per epoch


def toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, N).unsqueeze(1)
    return TensorDataset(x, torch.sin(3 * x) + 0.1 * torch.randn(N, 1, generator=g))


def make(
    out_dir: Path | None,
    epochs: int,
    *,
    val: bool = False,
    model: nn.Module | None = None,
    elbo: bbb.ELBO | None = None,
    **kw: Any,
) -> Trainer:
    torch.manual_seed(0)
    ds = toy_data()
    model = bayes_mlp(1, [8], 1, mu_init="fan_in") if model is None else model
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N) if elbo is None else elbo
    gen = torch.Generator().manual_seed(0)
    return Trainer(
        model,
        elbo,
        torch.optim.SGD(model.parameters(), lr=1e-2),
        DataLoader(ds, batch_size=BATCH, shuffle=True, generator=gen),
        val_loader=DataLoader(ds, batch_size=16) if val else None,
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=gen,
        val_samples=2,
        **kw,
    )


def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------- 1. a second fit()


def test_a_second_fit_with_nothing_left_to_train_is_an_error_saying_what_to_do() -> None:
    # before: the loop ran while epoch < epochs, so a second fit() (an active-learning round
    # with a new loader) trained nothing and returned the old summary, silently
    t = make(None, 2)
    t.fit()
    before = params(t.model)
    with pytest.raises(
        RuntimeError, match=r"already trained 2 epochs \(epochs=2\).*trainer\.epochs"
    ):
        t.fit()
    assert_same(params(t.model), before)


def test_raising_epochs_and_fitting_again_equals_one_longer_run(tmp_path: Path) -> None:
    # before: the second fit() refused the run directory ("already holds a run"), and
    # without one trained on; now it continues the run exactly, appending to its files
    straight = make(tmp_path / "straight", 4)
    straight.fit()
    t = make(tmp_path / "twice", 2)
    t.fit()
    t.epochs = 4
    summary = t.fit()
    assert summary["epochs_trained"] == 4
    assert_same(params(t.model), params(straight.model))
    assert [r["loss"] for r in t.history] == [r["loss"] for r in straight.history]
    rows = (tmp_path / "twice" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4
    state, path = load_checkpoint(tmp_path / "twice" / "checkpoints")
    assert path.name == "checkpoint-00004.pt" and state["epoch"] == 4
    # the resume of a finished run keeps working, on the same Trainer and on a new one
    assert t.fit(resume=True)["epochs_trained"] == 4
    assert make(tmp_path / "twice", 4).fit(resume=True)["epochs_trained"] == 4


def test_fit_overwrite_on_a_trained_trainer_is_refused_and_keeps_the_files(
    tmp_path: Path,
) -> None:
    # before: overwrite=True deleted the checkpoints, best.pt and metrics, then trained
    # nothing (the model still held the deleted run's training)
    t = make(tmp_path, 2)
    t.fit()
    with pytest.raises(RuntimeError, match=r"overwrite=True\) on a Trainer that has already"):
        t.fit(overwrite=True)
    assert (tmp_path / "metrics.jsonl").is_file()
    assert load_checkpoint(tmp_path / "checkpoints")[0]["epoch"] == 2


def test_a_second_fit_after_early_stopping_names_patience() -> None:
    t = make(None, 40, val=True, patience=1)
    first = t.fit()
    assert first["stopped_early"] and first["epochs_trained"] < 40
    with pytest.raises(RuntimeError, match=r"stopped early.*trainer\.patience"):
        t.fit()
    t.patience = 1000  # as on resume, a larger patience lets the run train on
    assert t.fit()["epochs_trained"] == 40


@pytest.mark.parametrize("bad", [5.5, "10", 0, True])
def test_epochs_set_on_a_trainer_is_validated(bad: object) -> None:
    # before: a plain attribute: 5.5 trained 6 epochs, "10" failed in fit() with a bare
    # TypeError ('<' not supported between 'int' and 'str')
    t = make(None, 2)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        t.epochs = bad  # type: ignore[assignment]
    assert t.epochs == 2


def test_patience_set_on_a_trainer_is_validated() -> None:
    t = make(None, 2)  # no val_loader: early stopping has nothing to watch
    with pytest.raises(ValueError, match="patience needs a val_loader"):
        t.patience = 3
    with pytest.raises(ValueError, match="patience must be a positive integer or None"):
        make(None, 2, val=True).patience = 2.5  # type: ignore[assignment]


# --------------------------------------------------------------------- 2. dataset_size


@pytest.mark.parametrize("bad", [0, -3, 20.5, True, None, "100", np.float64(10.0)])
def test_setting_a_bad_dataset_size_is_refused_at_once(bad: object) -> None:
    # before: a plain attribute, checked nowhere: 0 failed at the next step with "minibatch
    # of 2 examples is larger than dataset_size=0", None with a bare TypeError ('>' not
    # supported), and 20.5 was used as is
    elbo = bbb.ELBO(bbb.Categorical(), 100)
    with pytest.raises(ValueError, match="dataset_size must be a positive integer"):
        elbo.dataset_size = bad  # type: ignore[assignment]
    assert elbo.dataset_size == 100


def test_dataset_size_set_between_rounds_is_used() -> None:
    elbo = bbb.ELBO(bbb.Categorical(), 100, kl_scale=0.5)
    elbo.dataset_size = np.int64(250)  # type: ignore[assignment]
    assert type(elbo.dataset_size) is int and elbo.dataset_size == 250
    assert elbo.kl_weight(10, None, None) == 0.5 / 250
    elbo.dataset_size = torch.tensor(40)  # type: ignore[assignment]
    assert type(elbo.dataset_size) is int and elbo.kl_weight(10, None, None) == 0.5 / 40


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("kl_scale", -0.5, "kl_scale must be a finite number >= 0"),
        ("kl_scale", "0.5", "kl_scale must be a finite number >= 0"),
        ("kl_weighting", "Uniform", "unknown kl_weighting 'Uniform'"),
        ("num_samples", 0, "num_samples must be a positive integer"),
    ],
)
def test_the_other_elbo_settings_are_validated_when_set_later(
    name: str, bad: object, message: str
) -> None:
    # before: checked in __init__ only; set later, a negative kl_scale rewarded a large KL
    # and "Uniform" (any kl_weighting but "uniform") was used as "blundell", silently
    elbo = bbb.ELBO(bbb.Categorical(), 100, kl_scale=0.5)
    with pytest.raises(ValueError, match=message):
        setattr(elbo, name, bad)
    assert elbo.kl_weight(10, 0, 4) == 0.5 / 100


def test_a_kl_scale_set_later_is_used_and_a_module_schedule_stays_a_submodule() -> None:
    elbo = bbb.ELBO(bbb.Categorical(), 100)
    elbo.kl_scale = np.float32(0.25)  # type: ignore[assignment]
    assert elbo.kl_scale == 0.25 and type(elbo.kl_scale) is float
    elbo.kl_scale = lambda step: 0.5
    assert elbo.kl_weight(10, None, None) == 0.5 / 100

    class Schedule(nn.Module):
        def forward(self, step: int) -> float:
            return 0.1

    with_module = bbb.ELBO(bbb.Categorical(), 100, kl_scale=Schedule())
    assert isinstance(with_module.kl_scale, Schedule)
    assert with_module.kl_weight(10, None, None) == 0.1 / 100


# --------------------------------------------------------------------- 3. torch.compile


@pytest.mark.slow  # the first torch.compile (dynamo's import and tracing): ~4 s on a CPU
def test_checkpoints_of_a_compiled_model_load_into_the_plain_model(tmp_path: Path) -> None:
    # before: the checkpoint and best.pt keys began with "_orig_mod." (torch.compile's
    # wrapper): the plain model could not load them (strict load_state_dict), nor resume
    torch.manual_seed(0)
    plain = bayes_mlp(1, [8], 1, mu_init="fan_in")
    compiled = torch.compile(plain, backend="eager")  # a backend without a C++ compiler
    run = tmp_path / "compiled"
    make(run, 1, val=True, model=compiled).fit()
    trained = params(plain)
    state, _ = load_checkpoint(run / "checkpoints")
    assert_same(state["model"], trained)  # the plain keys
    best = torch.load(run / "best.pt", weights_only=True)
    assert_same(best["model"], trained)
    # the finished run resumed with the plain model: its parameters are the trained ones
    resumed = make(run, 1, val=True, model=bayes_mlp(1, [8], 1, mu_init="fan_in"))
    resumed.fit(resume=True)
    assert_same(params(resumed.model), trained)
    resumed.load_best()
    assert_same(params(resumed.model), trained)
    # and trained on (epoch 2) by the plain model, then by the compiled one
    make(run, 2, val=True, model=bayes_mlp(1, [8], 1, mu_init="fan_in")).fit(resume=True)
    torch.manual_seed(1)
    other = bayes_mlp(1, [8], 1, mu_init="fan_in")
    t = make(run, 3, val=True, model=torch.compile(other, backend="eager"))
    t.fit(resume=True)
    assert t.epoch == 3
    # a checkpoint written before the fix (prefixed keys) resumes into either form
    ckpt = run / "checkpoints" / "checkpoint-00003.pt"
    old = torch.load(ckpt, weights_only=False)
    expected = old["model"]
    old["model"] = {f"_orig_mod.{k}": v for k, v in expected.items()}
    torch.save(old, ckpt)
    again = make(run, 3, model=bayes_mlp(1, [8], 1, mu_init="fan_in"))
    again.fit(resume=True)
    assert_same(params(again.model), expected)
    torch.manual_seed(2)
    other = bayes_mlp(1, [8], 1, mu_init="fan_in")
    make(run, 3, model=torch.compile(other, backend="eager")).fit(resume=True)
    assert_same(params(other), expected)


# --------------------------------------------------------------------- 4. exact NLL


class Confident(nn.Module):
    """Logits with a gap of 200 nats in favour of class 1."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([torch.zeros(x.shape[0]), torch.full((x.shape[0],), 200.0)], 1)


def test_evaluate_counts_the_full_nll_of_a_confidently_wrong_example() -> None:
    # before: metrics.nll floored the averaged probability at 1e-12: 27.6 nats per example
    x = torch.zeros(4, 1)
    y = torch.tensor([0, 0, 1, 1])  # two confidently wrong, two confidently right
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # two batches: 3 + 1
    report = evaluate(Confident(), loader, bbb.Categorical(), num_samples=2)
    # -log p(0) = 200 + log(1 + e^-200) = 200 in float32; -log p(1) = log(1 + e^-200) = 0
    assert report["nll"] == pytest.approx(200.0 / 2, rel=1e-6)
    assert report["error"] == 0.5


def test_the_trainer_validates_with_the_same_nll_as_evaluate() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    y = (x[:, 0] > 0).long()
    ds = TensorDataset(x, y)
    model = bayes_mlp(2, [4], 2)
    t = Trainer(
        model,
        bbb.ELBO(bbb.Categorical(), 16),
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(ds, batch_size=8),
        val_loader=DataLoader(ds, batch_size=8),
        val_metric="nll",
        val_samples=3,
        progress=False,
        log=None,
    )
    torch.manual_seed(5)
    got = t.validate()["nll"]
    torch.manual_seed(5)
    expected = evaluate(model, DataLoader(ds, batch_size=8), bbb.Categorical(), num_samples=3)
    assert got == expected["nll"]


# --------------------------------------------------------------------- 5. accumulation


def _calls(elbo: bbb.ELBO, n: int) -> None:
    model = nn.Linear(1, 1)
    x, y = torch.zeros(2, 1), torch.zeros(2, 1)
    for _ in range(n):
        elbo(model, x, y)


def test_accumulation_steps_makes_the_kl_schedule_count_optimizer_steps() -> None:
    # before: the schedule counted ELBO calls, so with k minibatches per optimizer step a
    # warm-up ran k times faster, and there was no way to say so
    k, warmup = 3, 4
    acc = bbb.ELBO(bbb.Gaussian(), 100, kl_scale=bbb.linear_annealing(warmup), accumulation_steps=k)
    plain = bbb.ELBO(bbb.Gaussian(), 100, kl_scale=bbb.linear_annealing(warmup))
    _calls(acc, 2 * k)  # two optimizer steps
    _calls(plain, 2 * k)
    assert acc.kl_weight(2, None, None) == (2 / warmup) / 100
    assert plain.kl_weight(2, None, None) == min(2 * k / warmup, 1.0) / 100  # the default
    assert int(acc.step) == 2 * k  # the saved counter still counts calls


@pytest.mark.parametrize("bad", [0, True, 1.5])
def test_a_bad_accumulation_steps_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="accumulation_steps must be a positive integer"):
        bbb.ELBO(bbb.Gaussian(), 10, accumulation_steps=bad)  # type: ignore[arg-type]


def test_the_trainer_refuses_an_elbo_with_accumulation_steps() -> None:
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N, accumulation_steps=2)
    with pytest.raises(ValueError, match="steps the optimizer at every minibatch"):
        make(None, 1, elbo=elbo)


# --------------------------------------------------------------------- 6. replicas


def blundell_elbo() -> bbb.ELBO:
    return bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), N, kl_weighting="blundell")


def test_a_non_distributed_trainer_ignores_replicas_left_by_a_ddp_run() -> None:
    # before: elbo.replicas = 2 (left by wrap_elbo) halved this run's blundell KL weight
    reference = make(None, 2, elbo=blundell_elbo())
    reference.fit()
    elbo = blundell_elbo()
    elbo.replicas = 2
    t = make(None, 2, elbo=elbo)
    seen: list[int] = []
    t.model.register_forward_pre_hook(lambda *_: seen.append(elbo.replicas))
    t.fit()
    assert set(seen) == {1}
    assert_same(params(t.model), params(reference.model))
    assert elbo.replicas == 2  # the caller's value, restored


WORLD = 2
SPAWN_TIMEOUT_S = 120  # a hung collective fails the test instead of the suite


def _replicas_worker(r: int, port: int, out: str) -> None:
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
        elbo = blundell_elbo()
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=r, seed=3)
        t = Trainer(
            model,
            elbo,
            torch.optim.SGD(model.parameters(), lr=1e-2),
            DataLoader(ds, batch_size=BATCH // WORLD, sampler=sampler),
            epochs=1,
            progress=False,
            log=None,
            distributed=True,
        )
        res: dict[str, Any] = {"after_init": elbo.replicas}
        seen: list[int] = []
        model.register_forward_pre_hook(lambda *_: seen.append(elbo.replicas))
        t.fit()
        res["during"] = sorted(set(seen))
        res["after_fit"] = elbo.replicas
        if r == 0:
            torch.save(res, out)
    finally:
        D.cleanup()


def test_a_distributed_trainer_sets_replicas_for_its_epochs_only(tmp_path: Path) -> None:
    # before: wrap_elbo's elbo.replicas = 2 outlived the run (a later non-distributed use of
    # the ELBO divided its blundell weight by 2)
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "replicas.pt"
    res: Any = spawn_ranks(_replicas_worker, (free_port(), str(out)), WORLD, out, SPAWN_TIMEOUT_S)
    assert res == {"after_init": 1, "during": [WORLD], "after_fit": 1}
