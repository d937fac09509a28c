"""Issue 8: bbb's Adam (the fused kernel called directly) against ``torch.optim.Adam(fused=True)``.

Interleaved in this process, one thread: (1) the optimizer step alone on three parameter
sets: the bandit's flat parameter (5 Bayesian networks, 222010 values), the UCI network
13-50-1 (mean and rho tensors) and the MNIST 784-400-400-10 network (mean and rho tensors);
(2) a whole training step of the UCI protocol's configuration (``trainer_optimizer.py``'s
``uci``) with each optimizer. Median microseconds (ms) per call over rounds.

    python benchmarks/probes/lean_adam.py [--rounds 15]

Run with nothing else on the machine (pause background jobs).
"""

import argparse
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import bbb
from bbb import runs
from bbb.bench import _interleaved
from bbb.train.optim import Adam

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes.trainer_optimizer import _config
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from trainer_optimizer import _config

SETS: dict[str, list[tuple[int, ...]]] = {
    "bandit flat parameter (222010)": [(222010,)],
    "UCI 13-50-1 (mu and rho)": [(50, 13), (50,), (1, 50), (1,)] * 2,
    "MNIST 784-400-400-10 (mu and rho)": [(400, 784), (400,), (400, 400), (400,), (10, 400), (10,)]
    * 2,
}


def _opt_step(cls: type[torch.optim.Adam], shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = cls(ps, lr=1e-3, fused=True)
    return lambda: opt.step()


def _train_step(cls: type[torch.optim.Adam]) -> Callable[[], None]:
    cfg, data, n = _config("uci")
    torch.manual_seed(0)
    model = runs.build_model(cfg, data)
    likelihood = runs.build_likelihood(cfg, data)
    elbo, _, _ = runs.build_objective(cfg, model, likelihood, n, cfg.epochs)
    opt = cls([*model.parameters(), *likelihood.parameters()], lr=cfg.lr, fused=True)
    x, y = data.train.tensors

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        elbo(model, x, y).loss.backward()
        opt.step()

    return step


ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=15)
args = ap.parse_args()
torch.set_num_threads(1)
bbb.tune_allocator()
for name, shapes in SETS.items():
    steps = {"torch": _opt_step(torch.optim.Adam, shapes), "bbb": _opt_step(Adam, shapes)}
    t = {
        k: statistics.median(v) * 1e3 for k, v in _interleaved(steps, 20, args.rounds, 200).items()
    }
    print(f"optimizer step, {name}: torch fused {t['torch']:.1f} us, bbb {t['bbb']:.1f} us")
steps = {"torch": _train_step(torch.optim.Adam), "bbb": _train_step(Adam)}
t = {k: statistics.median(v) for k, v in _interleaved(steps, 30, args.rounds * 2, 20).items()}
print(f"UCI training step: torch fused {t['torch']:.3f} ms, bbb {t['bbb']:.3f} ms")
