"""Data-parallel training (issue 9): 2 CPU processes with the gloo backend.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every distributed check of the math, and
one ``torchrun -m bbb train`` run checks the command line; both are kept to a few seconds of
work (most of the time is the interpreters importing torch).

What is shown:

- one DDP step on a global batch of 8 split 4 + 4 over 2 ranks, with the same noise, gives the
  parameters of one single-process step on the 8 rows (float64; tolerance rtol=1e-10,
  atol=1e-12: only the order of floating-point sums differs). Same noise: either the mean
  network with the closed-form KL (no noise at all), or ``frozen`` weight samples drawn from the
  same seed on every rank with a Monte Carlo KL (the weight sample is then identical);
- the KL is counted once: for a network whose output is multiplied by 0 (zero data gradient)
  the averaged gradient of ``mu`` and ``rho`` is exactly that of ``KL / N``, not twice it;
- the "blundell" KL weight uses the global batch (the ELBO's ``replicas``);
- a learned likelihood noise (a parameter of the ELBO, not of the network) is averaged too;
- the :class:`bbb.train.Trainer` under DDP (one epoch, mean network) ends with the parameters and
  the per-epoch loss of a single process on the same global batches, and writes each file once;
- ``torchrun --nproc_per_node=2 -m bbb train`` writes a run directory from rank 0 only, whose
  checkpoint holds the unwrapped model and resumes in a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

import bbb
from bbb.models import bayes_mlp
from bbb.train import Trainer
from bbb.train import distributed as D

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available",
    ),
    # the mean and frozen cases train without fresh noise, on purpose (exact comparisons)
    pytest.mark.filterwarnings("ignore:ELBO. a training step:RuntimeWarning"),
]

WORLD = 2
N = 40  # the global data-set size the ELBO is told
GLOBAL_BATCH = 8
RTOL, ATOL = 1e-10, 1e-12  # float64: the sums over ranks are only reordered
LR = 0.1
SPAWN_TIMEOUT_S = 300  # a hung collective fails the test instead of the whole suite

# name -> (sampling mode, prior, kl mode, kl weighting)
SCENARIOS: dict[str, tuple[str, str, str, str]] = {
    "mean-closed-form": ("mean", "gaussian", "closed_form", "uniform"),
    "frozen-mc-mixture": ("frozen", "scale_mixture", "mc", "uniform"),
    "mean-blundell": ("mean", "gaussian", "closed_form", "blundell"),
}


def global_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)
    return x, y


def build(scenario: str) -> tuple[nn.Module, bbb.ELBO, torch.optim.Optimizer]:
    """The same network, ELBO (learned noise) and SGD optimizer on every process."""
    mode, prior_name, kl, weighting = SCENARIOS[scenario]
    torch.manual_seed(0)
    prior = bbb.make_prior(prior_name)
    model = bayes_mlp(3, [5], 2, prior=prior, estimator="reparam", kl=kl, mu_init="fan_in")
    model = model.double()
    model[0].weight_rho.data.fill_(-2.0)  # noise large enough to matter
    bbb.set_sampling(model, mode)
    likelihood = bbb.Gaussian("learned", sigma=0.7, output_dim=2).double()
    elbo = bbb.ELBO(likelihood, N, kl_weighting=weighting)
    opt = torch.optim.SGD([*model.parameters(), *likelihood.parameters()], lr=LR)
    return model, elbo, opt


def one_step(
    model: nn.Module, elbo: bbb.ELBO, opt: torch.optim.Optimizer, step: Any, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """One optimizer step with ``step(x, y)`` giving the ELBO result; returns grads + params."""
    torch.manual_seed(99)  # frozen mode: the same weight sample on every process
    bbb.resample(model)
    result = step(x, y, batch_index=0, num_batches=3)
    opt.zero_grad()
    result.loss.backward()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters()}
    grads["grad.log_sigma"] = elbo.likelihood.log_sigma.grad.detach().clone()
    opt.step()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params["log_sigma"] = elbo.likelihood.log_sigma.detach().clone()
    return {**grads, **params}


class ZeroOutput(nn.Module):
    """Multiplies by 0: the data term then has no gradient with respect to the network."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.0


def kl_once_model() -> nn.Module:
    torch.manual_seed(1)
    layer = bbb.BayesLinear(3, 2, kl="closed_form", mu_init="fan_in", rho_init=-1.0).double()
    model = nn.Sequential(layer, ZeroOutput())
    bbb.set_sampling(model, "mean")
    return model


def trainer_run(out_dir: Path | None, distributed: bool) -> Trainer:
    """One epoch of the Trainer on 32 toy points, mean network, global batches of 8."""
    torch.manual_seed(0)
    ds = TensorDataset(
        torch.linspace(-1, 1, 32, dtype=torch.float64).unsqueeze(1),
        torch.sin(3 * torch.linspace(-1, 1, 32, dtype=torch.float64)).unsqueeze(1),
    )
    model = bayes_mlp(1, [8], 1, kl="closed_form", mu_init="fan_in").double()
    bbb.set_sampling(model, "mean")
    likelihood = bbb.Gaussian("learned", sigma=0.5).double()
    elbo = bbb.ELBO(likelihood, len(ds))
    opt = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=1e-2)
    if distributed:  # rank r gets rows r, r + 2, ...: global batch k = rows 8k .. 8k + 7
        sampler = DistributedSampler(ds, num_replicas=WORLD, rank=dist.get_rank(), shuffle=False)
        loader = DataLoader(ds, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler)
    else:
        loader = DataLoader(ds, batch_size=GLOBAL_BATCH, sampler=SequentialSampler(ds))
    trainer = Trainer(
        model,
        elbo,
        opt,
        loader,
        epochs=2,
        out_dir=out_dir,
        progress=False,
        log=None,
        distributed=distributed,
    )
    trainer.fit()
    return trainer


CLI_TRAIN = [
    "train", "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--epochs", "2", "--val-samples", "2", "--estimator", "local", "--quiet",
]  # fmt: skip


def _worker(r: int, ports: tuple[int, int], out: str) -> None:
    """Rank ``r``: the CLI as torchrun starts it, then every distributed scenario of the math.

    Rank 0 saves the results to ``out``.
    """
    import bbb.plots
    from bbb.cli import main

    torch.set_num_threads(1)
    # 1. `bbb train` exactly as under torchrun: the process group comes from the environment
    os.environ.update(
        RANK=str(r),
        LOCAL_RANK=str(r),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
    )
    bbb.plots.learning_curves = lambda *a, **k: None  # type: ignore[assignment]
    bbb.plots.regression_band = lambda *a, **k: {}  # type: ignore[assignment]
    code = main([*CLI_TRAIN, "--out", str(Path(out).parent / "cli-run")])
    assert not dist.is_initialized(), "train_run must leave the group it created"
    # 2. the math, in float64, in a group made here
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=r, world_size=WORLD
    )
    try:
        results = _math_scenarios(r, out)
        results["cli-run"] = str(Path(out).parent / "cli-run")
        results["cli-codes"] = [None] * WORLD
        dist.all_gather_object(results["cli-codes"], code)
        if r == 0:
            torch.save(results, out)
    finally:
        D.cleanup()  # after the DDP objects of _math_scenarios are gone (see D.cleanup)


def _math_scenarios(r: int, out: str) -> dict[str, Any]:
    """The DDP steps of every scenario, the KL-once gradient and a Trainer run (rank r)."""
    results: dict[str, Any] = {}
    x, y = global_batch()
    lo, hi = r * GLOBAL_BATCH // WORLD, (r + 1) * GLOBAL_BATCH // WORLD
    for scenario in SCENARIOS:
        model, elbo, opt = build(scenario)
        elbo.replicas = WORLD  # what the Trainer sets
        ddp = D.wrap_elbo(model, elbo)
        results[scenario] = one_step(model, elbo, opt, ddp, x[lo:hi], y[lo:hi])
    # the KL is counted once: zero data gradient, so grad = grad(KL) / N
    model = kl_once_model()
    elbo = bbb.ELBO(bbb.Gaussian("fixed", output_dim=2).double(), N)
    ddp = D.wrap_elbo(model, elbo)
    ddp(x[lo:hi], y[lo:hi]).loss.backward()
    results["kl-once"] = {k: p.grad.clone() for k, p in model.named_parameters()}
    # the Trainer: reduced metrics, files from rank 0 only
    run = Path(out).parent / "trainer-run"
    trainer = trainer_run(run, distributed=True)
    results["trainer-run"] = str(run)
    results["trainer"] = {
        "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "history": trainer.history,
        "is_writer": trainer.is_writer,
    }
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, results["trainer"]["is_writer"])
    results["writers"] = gathered
    return results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run :func:`_worker` on 2 spawned CPU processes once for all the tests below."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    return spawn_ranks(_worker, ((free_port(), free_port()), str(out)), WORLD, out, SPAWN_TIMEOUT_S)  # type: ignore[return-value]


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_ddp_step_equals_one_step_on_the_global_batch(
    ddp_results: dict[str, Any], scenario: str
) -> None:
    model, elbo, opt = build(scenario)
    x, y = global_batch()
    expected = one_step(model, elbo, opt, lambda *a, **k: elbo(model, *a, **k), x, y)
    got = ddp_results[scenario]
    assert set(got) == set(expected)
    for key, value in expected.items():
        # tolerance: float64 with reordered sums (see the module docstring)
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=key)
    # the step did something, and the learned noise was updated identically
    assert not torch.equal(expected["0.weight_mu"], build(scenario)[0][0].weight_mu)
    assert got["grad.log_sigma"].abs().sum() > 0


@pytest.mark.usefixtures("float64_default")
def test_kl_is_counted_once(ddp_results: dict[str, Any]) -> None:
    grads = ddp_results["kl-once"]
    layer = kl_once_model()[0]
    mu, rho = layer.weight_mu.detach(), layer.weight_rho.detach()
    sigma = torch.nn.functional.softplus(rho)
    # Gaussian prior N(0, 1): d KL / d mu = mu, d KL / d rho = (sigma - 1 / sigma) sigmoid(rho)
    expected_mu = mu / N
    expected_rho = (sigma - 1 / sigma) * torch.sigmoid(rho) / N
    torch.testing.assert_close(grads["0.weight_mu"], expected_mu, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads["0.weight_rho"], expected_rho, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(grads["0.weight_mu"], WORLD * expected_mu)


@pytest.mark.usefixtures("float64_default")
def test_trainer_under_ddp_matches_one_process(ddp_results: dict[str, Any], tmp_path: Path) -> None:
    got = ddp_results["trainer"]
    ref = trainer_run(tmp_path / "single", distributed=False)
    for k, v in ref.model.state_dict().items():
        # tolerance: float64, reordered sums, 8 Adam steps
        torch.testing.assert_close(got["params"][k], v, rtol=1e-9, atol=1e-11, msg=k)
    assert [r["epoch"] for r in got["history"]] == [1, 2]
    for a, b in zip(got["history"], ref.history, strict=True):
        for key in ("loss", "nll", "kl"):  # reduced over ranks: the global-batch means
            assert a[key] == pytest.approx(b[key], rel=1e-10), key
    assert ddp_results["writers"] == [True, False]
    # each file written once, by rank 0: one metrics line per epoch, not one per rank
    run = Path(ddp_results["trainer-run"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-00001.pt",
        "checkpoint-00002.pt",
    ]
    state = torch.load(run / "checkpoints" / "checkpoint-00002.pt", weights_only=True)
    for k, v in got["params"].items():
        assert torch.equal(state["model"][k], v), k


# --------------------------------------------------------------------------- helpers, no group


def test_helpers_without_a_process_group() -> None:
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(t) is t and D.all_reduce_mean(t).tolist() == [1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.on_main(lambda: 5, "x") == 5
    D.barrier()
    D.cleanup()
    with D.collective_errors("x"), pytest.raises(KeyError):
        raise KeyError("k")
    seeds = {D.rank_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_init_from_env_single_process_and_bad_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_from_env("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(D.DistributedError, match="WORLD_SIZE='two' is not an integer"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(D.DistributedError, match=r"RANK='5' must lie in \[0, WORLD_SIZE=2\)"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(D.DistributedError, match="MASTER_ADDR is not set: launch with torchrun"):
        D.init_from_env()


def test_distributed_trainer_without_a_group_is_a_clear_error() -> None:
    model = bayes_mlp(1, [4], 1)
    ds = TensorDataset(torch.zeros(8, 1), torch.zeros(8, 1))
    elbo = bbb.ELBO(bbb.Gaussian(), 8)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        Trainer(
            model,
            elbo,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(ds, batch_size=4),
            distributed=True,
        )
    with pytest.raises(D.DistributedError, match="wrap_elbo needs an initialised"):
        D.wrap_elbo(model, elbo)


# --------------------------------------------------------------------------- the CLI


def check_two_rank_run_and_resume_on_one(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-rank `bbb train` run directory: written once, unwrapped model, resumable alone."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # rank 0 alone wrote: one metrics line per epoch (not one per rank), two checkpoints
    assert [r["epoch"] for r in rows] == [1, 2]
    first_two = (run / "metrics.jsonl").read_text().splitlines()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-00001.pt", "checkpoint-00002.pt"]
    state = torch.load(run / "checkpoints" / names[-1], weights_only=True)
    # the unwrapped model: the keys of a single-process model, no "module." prefixes
    assert sorted(state["model"]) == sorted(bayes_mlp(1, [8], 1).state_dict())
    assert (run / "metrics.json").is_file() and (run / "best.pt").is_file()
    # resume in one process (any number of ranks works) and train one more epoch
    import bbb.plots
    from bbb.cli import main

    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == [json.loads(x) for x in first_two]


def test_cli_under_a_torchrun_environment_trains_and_resumes_on_one_rank(
    ddp_results: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ddp_results["cli-codes"] == [0, 0]
    check_two_rank_run_and_resume_on_one(Path(ddp_results["cli-run"]), monkeypatch)


@pytest.mark.slow
def test_real_torchrun_trains_on_two_ranks_and_resumes_on_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("BBB_DATA_DIR", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "bbb", *CLI_TRAIN, "--out", str(run),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_two_rank_run_and_resume_on_one(run, monkeypatch)
