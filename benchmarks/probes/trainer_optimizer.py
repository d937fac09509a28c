"""Issue 8: the training step of `bbb train` / `bbb uci` with PyTorch's default Adam against
``Adam(fused=True)``.

On CPU, ``torch.optim.Adam`` without arguments runs its single-tensor loop (about ten tensor
operations per parameter tensor); ``fused=True`` is one vectorised pass over all parameters.
Both variants of each configuration are built from the same ``TrainConfig`` by the library's
own builders (``bbb.runs.build_model`` / ``build_likelihood`` / ``build_objective``) and timed
interleaved in one process (median of the rounds, ms per step: zero_grad, ELBO, backward,
optimizer step), on random data of the configuration's shape:

- ``mnist``: the MNIST scale-mixture row (``experiments/mnist/bbb-mixture.toml``: 2 x 1200,
  local reparameterisation, native kernels, batch 128).
- ``uci``: the UCI protocol's defaults (``bbb.uci.uci_config``: one hidden layer of 50, local,
  S = 5, learned noise) on a Boston-housing-sized batch (455 x 13, full batch).

    python benchmarks/probes/trainer_optimizer.py [--repeats 30] [--configs mnist,uci]

Run with nothing else on the machine (pause background jobs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import bbb
from bbb import runs
from bbb.config import TrainConfig, load_config_file
from bbb.kernels import use_kernels
from bbb.uci import uci_config

ROOT = Path(__file__).resolve().parents[2]


def _config(name: str) -> tuple[TrainConfig, runs.RunData, int]:
    g = torch.Generator().manual_seed(0)
    if name == "mnist":
        values = load_config_file(ROOT / "experiments/mnist/bbb-mixture.toml")
        values.update(hidden=[1200, 1200], epochs=100)
        cfg = TrainConfig.from_dict(values, source="bbb-mixture.toml").validate()
        x, y = torch.rand(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
        data = runs.RunData(TensorDataset(x, y), None, None, 784, 10, True)
        return cfg, data, 50000
    if name == "uci":
        cfg = uci_config(hidden=[50])
        x, y = torch.randn(455, 13, generator=g), torch.randn(455, 1, generator=g)
        data = runs.RunData(TensorDataset(x, y), None, None, 13, 1, False)
        return cfg, data, 455
    raise SystemExit(f"unknown config {name!r}; choose from mnist, uci")


def _step(cfg: TrainConfig, data: runs.RunData, n: int, fused: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = runs.build_model(cfg, data)
    likelihood = runs.build_likelihood(cfg, data)
    elbo, _, _ = runs.build_objective(cfg, model, likelihood, n, cfg.epochs)
    params = [*model.parameters(), *likelihood.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True if fused else None)
    x, y = data.train.tensors

    batches = max(1, n // len(x))
    i = [0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if cfg.kl_weighting == "blundell":  # the minibatch's index in the epoch, as the Trainer
            loss = elbo(model, x, y, batch_index=i[0] % batches, num_batches=batches).loss
            i[0] += 1
        else:
            loss = elbo(model, x, y).loss
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--configs", default="mnist,uci")
    args = ap.parse_args()
    bbb.tune_allocator()  # as `bbb train` does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.configs.split(","):
        cfg, data, n = _config(name)
        with use_kernels(cfg.kernels):
            steps = {"default": _step(cfg, data, n, False), "fused": _step(cfg, data, n, True)}
            inner = 5 if name == "mnist" else 50
            times: dict[str, list[float]] = {k: [] for k in steps}
            for s in steps.values():
                for _ in range(3):
                    s()
            for _ in range(args.repeats):
                for k, s in steps.items():
                    t = time.perf_counter()
                    for _ in range(inner):
                        s()
                    times[k].append((time.perf_counter() - t) / inner * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name}: default Adam {med['default']:.3f} ms/step, fused {med['fused']:.3f} ms/step, "
            f"default / fused {med['default'] / med['fused']:.3f}"
        )


if __name__ == "__main__":
    main()
