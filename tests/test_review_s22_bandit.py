"""Review of the Mushroom bandit (issue 6) and the distributed helpers (issue 9), session 22:
regressions for the bugs it found, and the stacked networks checked against unstacked ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bbb.bandit import BanditConfig, _Population
from bbb.nn.module import sampling, vectorized_samples
from bbb.train import distributed as D
from bbb.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def _interim_main(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "bandit_interim", ROOT / "experiments" / "bandit" / "interim.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0


def test_interim_report_over_one_seed_has_no_standard_deviation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """experiments/bandit/interim.py printed '+- 0' over one seed (a spread it cannot know,
    as metrics.json's std was before session 21); it says the sd is undefined, and prints the
    sd again over two seeds."""
    regret = torch.zeros(4, 3)
    regret[:, 0] = torch.tensor([5.0, 0.0, 15.0, 0.0])  # bbb, one seed: 20
    regret[:, 1:] = torch.tensor([[5.0, 0.0]] * 4)  # greedy-0, two seeds: 20 and 0
    cols = ["bbb-thompson/seed0", "greedy-0/seed0", "greedy-0/seed1"]
    ckpts = tmp_path / "run" / "checkpoints"
    save_checkpoint(ckpts, 4, {"step": 4, "columns": cols, "regret": regret})
    _interim_main([str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "bbb-thompson   cumulative regret at 4: 20 (one seed: sd n/a) (per seed 20)" in out
    assert "+- 0" not in out
    # two seeds: 20 and 0, sample sd sqrt(200) = 14.1
    assert "greedy-0       cumulative regret at 4: 10 +- 14 (per seed 20, 0)" in out


def test_all_reduce_mean_refuses_an_integer_tensor_before_reducing() -> None:
    """An integer tensor was summed over the ranks in place, then the division raised
    torch's 'result type Float can't be cast to the desired output type Long', leaving the
    tensor holding the sum; it is a TypeError before any communication, on any process count
    (without a group it was returned unchanged: code that ran in one process failed under
    torchrun)."""
    t = torch.tensor([3, 4])
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch.int64"):
        D.all_reduce_mean(t)
    assert t.tolist() == [3, 4]
    f = torch.tensor([1.5, 2.0])
    assert D.all_reduce_mean(f) is f and f.tolist() == [1.5, 2.0]


@pytest.mark.parametrize("samples", [1, 2])
def test_thompson_decision_of_each_member_is_that_of_its_own_network(samples: int) -> None:
    """The stacked Bayesian population (all members in ensemble layers) acts like K separate
    networks: member k's eat/pass values are those of an unstacked MLP built from its own mu,
    rho and its slice of the frozen noise, one weight sample per decision shared by both
    actions, ``samples`` of them averaged (float32 sums in another order: 1e-5)."""
    torch.manual_seed(0)
    cfg = BanditConfig(hidden=6, thompson_samples=samples, rho_init=-1.0).validate()
    k, dim = 3, 5
    pop = _Population(cfg, ["bbb-thompson"] * k, list(range(k)), True, dim)
    x = torch.randn(k, dim)
    actions = pop.act(x, torch.Generator().manual_seed(1))
    both = torch.stack(
        [
            torch.cat([x, torch.tensor([[1.0, 0.0]] * k)], 1),
            torch.cat([x, torch.tensor([[0.0, 1.0]] * k)], 1),
        ],
        1,
    )  # (K, 2 actions, D + 2): pass, eat
    # the stacked values of that decision (the frozen noise is kept until the next resample)
    with torch.no_grad(), sampling(pop.model, "frozen"), vectorized_samples(pop.model, samples):
        stacked = pop.model(both.repeat(samples, 1, 1)).reshape(samples, k, 2).mean(0)
    for member in range(k):
        values = torch.zeros(2)
        for s in range(samples):
            h = both[member]
            for j, layer in enumerate(pop.layers):
                noise = layer._frozen
                assert noise is not None and noise.eps_w is not None and noise.eps_b is not None
                assert noise.eps_w.shape[0] == samples  # one weight sample per decision
                w = (
                    layer.weight_mu[member]
                    + F.softplus(layer.weight_rho[member]) * noise.eps_w[s, member]
                )
                b = (
                    layer.bias_mu[member]
                    + F.softplus(layer.bias_rho[member]) * noise.eps_b[s, member]
                )
                h = F.linear(h, w, b)
                if j < len(pop.layers) - 1:
                    h = torch.relu(h)
            values += h[:, 0].detach() / samples
        torch.testing.assert_close(stacked[member], values, rtol=1e-5, atol=1e-5)
        assert int(actions[member]) == int(values.argmax()), member
