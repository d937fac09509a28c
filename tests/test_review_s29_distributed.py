"""Training-loop and multi-process review, session 29 (issue 4).

1. ``fully_shard(ELBOStep(model, elbo))`` returned a view: the ELBO's ``output`` (S, B, ...),
   reshaped from the network's (S * B, ...) output, so torch warned at every step that an
   in-place op on it would drop FSDP's pre-backward hook. ``ELBOStep`` now returns a tensor
   of its own there (a copy, in training only); the step raises no such warning, and its
   gradients, with or without an in-place op on the result, are the unwrapped step's. The
   FSDP checks run in one spawned process (a one-rank gloo group), so that no process group
   is left in the test process.
2. ``Trainer(distributed=..., find_unused_parameters=...)`` took any value by its truth
   (``distributed="no"`` asked for DDP); a value that is not a bool (or None, for
   ``distributed``) is refused by name, as ``progress`` is.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.train import Trainer
from bbb.train import distributed as D

SPAWN_TIMEOUT_S = 300  # a hung collective fails the test instead of the whole suite
FSDP_VIEW_WARNING = "FSDP2-wrapped module"  # the start of torch's warning


def _build() -> tuple[nn.Module, bbb.ELBO, Tensor, Tensor]:
    """A two-layer Bayesian classifier (seeded), its ELBO with 2 weight samples (the output
    is reshaped from (S * B, 3) to (S, B, 3)), and a minibatch x (8, 4), y (8,)."""
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, 3))
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=100, num_samples=2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return model, elbo, x, y


def _gradients(named: Any) -> dict[str, Tensor]:
    """Each parameter's whole gradient (a DTensor's gathered), keyed by name."""
    out = {}
    for name, p in named:
        full = getattr(p.grad, "full_tensor", None)
        out[name] = (full() if full is not None else p.grad).detach().clone()
    return out


def _backward(result: bbb.ELBOResult, in_place: bool) -> None:
    """``loss.backward()``; with ``in_place``, of ``loss + sum(2 * output)`` with the doubling
    done in place on the returned output (what the warning said would go wrong)."""
    if not in_place:
        result.loss.backward()
        return
    out = result.output
    out *= 2
    (result.loss + out.sum()).backward()


def reference_gradients(in_place: bool) -> dict[str, Tensor]:
    """The gradients of the unwrapped step, ``elbo(model, x, y)``, named as ELBOStep's."""
    model, elbo, x, y = _build()
    torch.manual_seed(1)  # the weight noise, drawn alike by the sharded step
    result = elbo(model, x, y)
    if in_place:  # out of place here: the unwrapped output is a view, whatever we do
        (result.loss + (2 * result.output).sum()).backward()
    else:
        result.loss.backward()
    return _gradients((f"model.{k}", p) for k, p in model.named_parameters())


def _fsdp_step(in_place: bool) -> dict[str, Any]:
    """One step of ``fully_shard(ELBOStep(model, elbo))`` with the view warning an error."""
    from torch.distributed.fsdp import fully_shard

    model, elbo, x, y = _build()
    step = D.ELBOStep(model, elbo)
    fully_shard(step)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FSDP_VIEW_WARNING)
        try:
            result = step(x, y)
        except UserWarning as e:
            return {"warning": str(e)}
    output_is_view = result.output._base is not None
    _backward(result, in_place)
    return {
        "warning": None,
        "output_is_view": output_is_view,
        "sharded": type(model[0].weight_mu).__name__,
        "grads": _gradients(step.named_parameters()),
    }


def _worker(r: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=1)
    try:
        results = {f"in_place={flag}": _fsdp_step(flag) for flag in (False, True)}
        torch.save(results, out)
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("fsdp_view") / "results.pt"
    return spawn_ranks(_worker, (free_port(), str(out)), 1, out, SPAWN_TIMEOUT_S)  # type: ignore[return-value]


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("in_place", [False, True])
def test_a_sharded_elbo_step_returns_no_view_and_the_unwrapped_gradients(
    fsdp_results: dict[str, Any], in_place: bool
) -> None:
    got = fsdp_results[f"in_place={in_place}"]
    # before: "FSDP2-wrapped module (FSDPELBOStep) returned a view tensor. ..."
    assert got["warning"] is None, got["warning"]
    assert got["output_is_view"] is False
    assert got["sharded"] == "DTensor"  # fully_shard did shard the layers
    expected = reference_gradients(in_place)
    assert set(got["grads"]) == set(expected)
    for name, grad in expected.items():
        # float64, one rank: the same operations in the same order, so equal to rounding
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_an_elbo_step_copies_its_output_only_where_it_needs_a_gradient() -> None:
    model, elbo, x, y = _build()
    step = D.ELBOStep(model, elbo)
    torch.manual_seed(1)
    trained = step(x, y)
    torch.manual_seed(1)
    direct = elbo(model, x, y)
    assert direct.output._base is not None  # the ELBO's own output is a reshaped view
    assert trained.output._base is None and trained.output.requires_grad
    assert trained.output.shape == (2, 8, 3)  # (S, B, classes)
    torch.testing.assert_close(trained.output, direct.output, rtol=0, atol=0)
    assert trained.loss._base is None  # the scalars needed nothing
    with torch.no_grad():  # evaluation: nothing needs a gradient, nothing is copied
        assert step(x, y).output._base is not None


# ------------------------------------------------------------------ 2. Trainer's flags


def _trainer(**flags: object) -> Trainer:
    """A Trainer of one Bayesian layer on four toy points, with the given flags."""
    torch.manual_seed(0)
    model = bbb.BayesLinear(1, 1)
    data = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.5), len(data))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(data, batch_size=2)
    settings: dict[str, Any] = {"progress": False, **flags}
    return Trainer(model, elbo, optimizer, loader, epochs=1, log=None, **settings)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, np.bool_(False)])
def test_a_distributed_that_is_not_a_bool_or_none_is_refused_by_name(value: object) -> None:
    # Before: taken for its truth; distributed="no" asked for DDP ("needs an initialised
    # process group"), distributed=0 trained alone.
    match = (
        r"distributed must be True \(train with DistributedDataParallel\), False \(this "
        r"process alone\) or None \(DDP when a process group of more than one process is "
        r"initialised\), got " + re.escape(repr(value))
    )
    with pytest.raises(ValueError, match=match):
        _trainer(distributed=value)


@pytest.mark.parametrize("value", ["yes", "False", None, 0, 1, np.bool_(True)])
def test_a_find_unused_parameters_that_is_not_a_bool_is_refused_by_name(value: object) -> None:
    # Before: passed on to DDP, which took it for its truth (and alone, it was never read)
    match = (
        r"find_unused_parameters must be True \(DDP looks for the parameters the loss did "
        r"not reach, at every step\) or False, got " + re.escape(repr(value))
    )
    with pytest.raises(ValueError, match=match):
        _trainer(find_unused_parameters=value)


@pytest.mark.parametrize("value", [None, False])
def test_distributed_none_or_false_and_a_bool_find_unused_parameters_are_kept(
    value: bool | None,
) -> None:
    # None (the default: DDP when a group of several processes is initialised) trains alone here
    for unused in (False, True):
        trainer = _trainer(distributed=value, find_unused_parameters=unused)
        assert trainer.distributed is False


def test_progress_keeps_its_refusal() -> None:
    # the shared check keeps progress's message (test_review_s29_followups checks it fully)
    with pytest.raises(ValueError, match=r"progress must be True \(a progress bar per epoch\)"):
        _trainer(progress="no")


def test_wrap_elbo_refuses_a_find_unused_parameters_that_is_not_a_bool() -> None:
    # it went to DistributedDataParallel as it was, which takes it for its truth ("no" is
    # true); refused before the process group is looked at, naming the argument
    from bbb.train.distributed import wrap_elbo

    model = bbb.BayesLinear(2, 1)
    with pytest.raises(ValueError, match=r"find_unused_parameters must be True \(DDP looks"):
        wrap_elbo(model, bbb.ELBO(bbb.Gaussian(), 4), find_unused_parameters="no")  # type: ignore[arg-type]
