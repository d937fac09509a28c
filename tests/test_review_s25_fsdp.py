"""Sharded and multi-process training beyond plain DDP (session 25, issue 4): 2 CPU ranks, gloo.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every check that needs a process group
(most of the time is the interpreters importing torch); the tests compare what rank 0 saved
with one process. Exact checks (float64, reordered sums: the bounds of test_distributed).

What is shown:

- FSDP2 (``fully_shard``) of the whole objective, ``ELBOStep(model, elbo)``, on uneven shards
  (5 hidden units over 2 ranks): one step gives the parameters and the KL of one process on
  the global batch (the KL of the whole network, counted once), for the mean network with the
  closed-form KL and for frozen samples with the Monte Carlo KL; the same with the Bayesian
  layers sharded one by one with ``reshard_after_forward=False``;
- a full state dict saved after one step and loaded into a freshly sharded model resumes
  exactly (and holds the unwrapped model's keys, for a single process to load);
- a layer sharded by default (``reshard_after_forward=True``; FSDP1 ``FULL_SHARD``) is refused
  by the ELBO in words that say what works (before: DTensor errors, a shape error, or a
  segmentation fault reading a freed FSDP1 flat parameter), and the Trainer and ``wrap_elbo``
  refuse an FSDP model (before: an error from DDP's broadcast, in DTensor's words);
- DDP with ``static_graph=True`` keeps the ranks in step (before: the first step's gradients
  were never averaged, silently: each rank's parameters went their own way);
- DDP gradient accumulation with ``no_sync`` and the ELBO's ``accumulation_steps`` (annealed
  KL) equals one process accumulating the same minibatches.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from test_distributed import (
    ATOL,
    GLOBAL_BATCH,
    LR,
    RTOL,
    SPAWN_TIMEOUT_S,
    WORLD,
    build,
    global_batch,
    pytestmark,  # noqa: F401 - skipped where gloo is unavailable
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.train import Trainer
from bbb.train import distributed as D

FSDP_SCENARIOS = ("mean-closed-form", "frozen-mc-mixture")


def _full(t: Tensor) -> Tensor:
    """A DTensor's whole value (a plain tensor as is), detached."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


def reference_step(scenario: str) -> dict[str, Any]:
    """One SGD step of one process on the global batch: parameters after it, and the KL."""
    model, elbo, opt = build(scenario)
    x, y = global_batch()
    torch.manual_seed(99)  # frozen mode: the weight sample every rank draws too
    bbb.resample(model)
    result = elbo(model, x, y)
    opt.zero_grad()
    result.loss.backward()
    opt.step()
    params = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    params["elbo.likelihood.log_sigma"] = elbo.likelihood.log_sigma.detach().clone()
    with bbb.sampling(model, "mean"):
        mean = bbb.predict(model, x, likelihood=elbo.likelihood, num_samples=2).mean
    return {"params": params, "kl": float(result.kl), "nll": float(result.nll), "predicted": mean}


def _fsdp_step(r: int, scenario: str, per_layer: bool) -> dict[str, Any]:
    """One step of ``fully_shard(ELBOStep(model, elbo))`` on rank r's half of the batch."""
    from torch.distributed.fsdp import fully_shard

    model, elbo, _ = build(scenario)
    if per_layer:
        for layer in bbb.bayes_modules(model):
            fully_shard(layer, reshard_after_forward=False)
    step = D.ELBOStep(model, elbo)
    fully_shard(step)
    opt = torch.optim.SGD(step.parameters(), lr=LR)
    x, y = global_batch()
    lo, hi = r * GLOBAL_BATCH // WORLD, (r + 1) * GLOBAL_BATCH // WORLD
    torch.manual_seed(99)
    bbb.resample(model)
    result = step(x[lo:hi], y[lo:hi])
    opt.zero_grad()
    result.loss.backward()
    opt.step()
    sharded = type(model[0].weight_mu).__name__
    # predictions of the inner model between unshard and reshard (the README's recipe); the
    # mean network, so that they equal one process's without sharing its weight noise
    step.unshard()
    with bbb.sampling(model, "mean"):
        mean = bbb.predict(model, x, likelihood=elbo.likelihood, num_samples=2).mean
    step.reshard()
    return {
        "params": {k: _full(p) for k, p in step.named_parameters()},
        "kl": float(result.kl),
        "sharded": sharded,
        "predicted": mean.detach().clone(),
    }


def _checkpoint_resume(r: int, path: str) -> dict[str, Any]:
    """Two steps in one go, and one step + full state dict + a fresh sharded model + one step."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    x, y = global_batch()
    lo, hi = r * GLOBAL_BATCH // WORLD, (r + 1) * GLOBAL_BATCH // WORLD

    def sharded() -> tuple[nn.Module, torch.optim.Optimizer]:
        model, elbo, _ = build("mean-closed-form")
        step = D.ELBOStep(model, elbo)
        fully_shard(step)
        return step, torch.optim.Adam(step.parameters(), lr=1e-2)

    def train(step: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        step(x[lo:hi], y[lo:hi]).loss.backward()
        opt.step()

    step, opt = sharded()
    train(step, opt)
    train(step, opt)
    straight = {k: _full(p) for k, p in step.named_parameters()}
    step, opt = sharded()
    train(step, opt)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(step, options=full)
    opt_state = get_optimizer_state_dict(step, opt, options=full)
    if r == 0:
        torch.save({"model": model_state, "optimizer": opt_state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    step, opt = sharded()
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(step, saved["model"], options=load)
    set_optimizer_state_dict(step, opt, saved["optimizer"], options=load)
    train(step, opt)
    resumed = {k: _full(p) for k, p in step.named_parameters()}
    return {"straight": straight, "resumed": resumed, "keys": sorted(saved["model"])}


def _ddp_static_graph(r: int, wrap: bool = False) -> dict[str, Any]:
    """Two steps of DDP(ELBOStep, static_graph=True) (``wrap``: built by ``wrap_elbo(...,
    static_graph=True)``, session 26): the first step's parameters and the largest difference
    of the parameters between the ranks after the second."""
    model, elbo, _ = build("mean-closed-form")
    if wrap:
        ddp = D.wrap_elbo(model, elbo, static_graph=True)
        assert ddp.static_graph  # the option reached DDP
    else:
        elbo.replicas = WORLD
        ddp = nn.parallel.DistributedDataParallel(D.ELBOStep(model, elbo), static_graph=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    x, y = global_batch()
    lo, hi = r * GLOBAL_BATCH // WORLD, (r + 1) * GLOBAL_BATCH // WORLD
    first: dict[str, Tensor] = {}
    for i in range(2):
        result = ddp(x[lo:hi], y[lo:hi])
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        if i == 0:
            first = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    every = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(every, flat)
    return {"first": first, "spread": float((every[0] - every[1]).abs().max())}


ACCUMULATION = 2  # minibatches per optimizer step


def accumulation_setup() -> tuple[nn.Module, bbb.ELBO, torch.optim.Optimizer]:
    model, elbo, opt = build("mean-closed-form")
    elbo.accumulation_steps = ACCUMULATION
    elbo.kl_scale = bbb.linear_annealing(3)  # the schedule sees optimizer steps
    return model, elbo, opt


def _ddp_accumulation(r: int) -> dict[str, Tensor]:
    """Two optimizer steps of 2 accumulated minibatches each (no_sync on the first): each
    minibatch is half of the global batch, split over the ranks."""
    model, elbo, _ = accumulation_setup()
    ddp = D.wrap_elbo(model, elbo)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    x, y = global_batch()
    half = GLOBAL_BATCH // ACCUMULATION
    for _ in range(2):
        opt.zero_grad()
        for j in range(ACCUMULATION):
            lo = j * half + r * half // WORLD
            rows = slice(lo, lo + half // WORLD)
            sync = j == ACCUMULATION - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                (ddp(x[rows], y[rows]).loss / ACCUMULATION).backward()
        opt.step()
    out = {k: v.detach().clone() for k, v in model.named_parameters()}
    out["step"] = elbo.step.clone()
    return out


def _refusals(r: int) -> dict[str, str]:
    """The errors of the configurations that cannot give the KL of the whole network."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    x, y = global_batch()
    x, y = x[: GLOBAL_BATCH // WORLD], y[: GLOBAL_BATCH // WORLD]
    errors: dict[str, str] = {}

    def record(key: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what the test reads
            errors[key] = f"{type(e).__name__}: {e}"
        else:
            errors[key] = "no error"

    # FSDP2, each Bayesian layer resharded after its forward (the default)
    model, elbo, _ = build("mean-closed-form")
    for layer in bbb.bayes_modules(model):
        fully_shard(layer)
    step = D.ELBOStep(model, elbo)
    fully_shard(step)
    record("fsdp2-per-layer", lambda: step(x, y))
    # the Trainer and wrap_elbo given a sharded model
    model, elbo, opt = build("mean-closed-form")
    fully_shard(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    record("trainer", lambda: Trainer(model, elbo, opt, loader, distributed=True, log=None))
    record("wrap_elbo", lambda: D.wrap_elbo(model, elbo))
    # FSDP1, FULL_SHARD units around the Bayesian layers (with flat parameters,
    # use_orig_params=False, the KL read their freed memory: a segmentation fault)
    model, elbo, _ = build("mean-closed-form")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation notice
        wrapped = FullyShardedDataParallel(
            D.ELBOStep(model, elbo),
            device_id=torch.device("cpu"),
            use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy({bbb.BayesLinear}),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )
    record("fsdp1-full-shard", lambda: wrapped(x, y))
    return errors


def _worker(r: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", message="ELBO. a training step")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for scenario in FSDP_SCENARIOS:
            results[f"root/{scenario}"] = _fsdp_step(r, scenario, per_layer=False)
            results[f"layers/{scenario}"] = _fsdp_step(r, scenario, per_layer=True)
        results["checkpoint"] = _checkpoint_resume(r, str(Path(out).parent / "full.pt"))
        results["static"] = _ddp_static_graph(r)
        results["static-wrap"] = _ddp_static_graph(r, wrap=True)
        results["accumulation"] = _ddp_accumulation(r)
        errors = _refusals(r)
        every: list[Any] = [None] * WORLD
        dist.all_gather_object(every, errors)
        results["errors"] = every
        if r == 0:
            torch.save(results, out)
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    return spawn_ranks(_worker, (free_port(), str(out)), WORLD, out, SPAWN_TIMEOUT_S)  # type: ignore[return-value]


def _assert_params(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        # float64, the sums over ranks reordered (test_distributed's bounds)
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
@pytest.mark.parametrize("wrapping", ["root", "layers"])
def test_one_fsdp_step_equals_one_step_on_the_global_batch(
    results: dict[str, Any], scenario: str, wrapping: str
) -> None:
    got = results[f"{wrapping}/{scenario}"]
    expected = reference_step(scenario)
    assert got["sharded"] == "DTensor"  # the parameters were sharded between the steps
    # the KL of the whole network (not of a rank's shard), counted once in the gradient
    assert got["kl"] == pytest.approx(expected["kl"], rel=1e-12)
    _assert_params(got["params"], expected["params"])
    # bbb.predict on the inner model between step.unshard() and step.reshard() (session 26)
    torch.testing.assert_close(got["predicted"], expected["predicted"], rtol=RTOL, atol=ATOL)


def test_fsdp_full_state_dict_resumes_exactly(results: dict[str, Any]) -> None:
    got = results["checkpoint"]
    for key, value in got["straight"].items():
        # float64, the same sums in the same order: Adam's state round-trips exactly
        torch.testing.assert_close(got["resumed"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    # the keys of ELBOStep(model, elbo): the unwrapped network under "model."
    model_keys = {f"model.{k}" for k in build("mean-closed-form")[0].state_dict()}
    assert model_keys <= set(got["keys"])


def test_a_kl_on_fsdp_shards_is_refused_in_words_that_say_what_works(
    results: dict[str, Any],
) -> None:
    for errors in results["errors"]:  # every rank
        for key in ("fsdp2-per-layer", "fsdp1-full-shard"):
            msg = errors[key]
            assert msg.startswith("DistributedError: ELBO: the Bayesian layer"), (key, msg)
            assert "reshard_after_forward=False" in msg and "SHARD_GRAD_OP" in msg
            assert "fully_shard(bbb.train.distributed.ELBOStep(model, elbo))" in msg


def test_the_trainer_and_wrap_elbo_refuse_an_fsdp_model(results: dict[str, Any]) -> None:
    for errors in results["errors"]:
        for key, who in (("trainer", "the Trainer"), ("wrap_elbo", "wrap_elbo")):
            msg = errors[key]
            assert msg.startswith(f"DistributedError: {who} trains"), msg
            assert "'<root>' is sharded by FSDP" in msg and "before sharding" in msg


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("how", ["static", "static-wrap"])
def test_ddp_static_graph_keeps_the_ranks_in_step(results: dict[str, Any], how: str) -> None:
    got = results[how]
    expected = reference_step("mean-closed-form")["params"]
    del expected["elbo.likelihood.log_sigma"]
    _assert_params(got["first"], expected)
    assert got["spread"] == 0.0  # identical averaged gradients, identical updates


@pytest.mark.usefixtures("float64_default")
def test_ddp_no_sync_accumulation_equals_one_process(results: dict[str, Any]) -> None:
    model, elbo, opt = accumulation_setup()
    x, y = global_batch()
    half = GLOBAL_BATCH // ACCUMULATION
    for _ in range(2):
        opt.zero_grad()
        for j in range(ACCUMULATION):
            rows = slice(j * half, (j + 1) * half)
            (elbo(model, x[rows], y[rows]).loss / ACCUMULATION).backward()
        opt.step()
    got = results["accumulation"]
    assert int(got.pop("step")) == int(elbo.step) == 2 * ACCUMULATION
    _assert_params(got, {k: v.detach() for k, v in model.named_parameters()})


# --------------------------------------------------------------------------- no process group


def test_the_checks_cost_nothing_and_pass_a_plain_model() -> None:
    model = bbb.models.bayes_mlp(2, [3], 1)
    assert D.fsdp_sharded(model) is None
    elbo = bbb.ELBO(bbb.Gaussian(), 4)
    result = elbo(model, torch.zeros(2, 2), torch.zeros(2, 1))
    assert torch.isfinite(result.loss)


def test_elbo_result_is_a_pytree_of_its_fields() -> None:
    # what DDP(static_graph=True) and find_unused_parameters walk to find the output tensors
    from torch.utils import _pytree

    r = bbb.ELBOResult(
        loss=torch.tensor(1.0), nll=torch.tensor(2.0), kl=torch.tensor(3.0), kl_weight=0.5,
        output=torch.zeros(1, 2, 1),
    )  # fmt: skip
    leaves, spec = _pytree.tree_flatten(r)
    assert sum(isinstance(t, Tensor) for t in leaves) == 4
    back = _pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, bbb.ELBOResult) and back.kl_weight == 0.5
