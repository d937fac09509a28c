"""A Bayesian head on a frozen deterministic body: the ELBO step and ``bbb.predict`` with the
S copies made at the input (the default) or by the first Bayesian layer
(``shared_prefix=True``), interleaved in one process, median of R repeats.

    python benchmarks/probes/shared_prefix.py [--samples S] [--repeats R]

Body: MLP 784-1200-1200 (ReLU, frozen, eval mode); head: ``BayesLinear(1200, 10)`` (local);
batch 128 for the ELBO step (forward, KL, backward; the head's Adam step is the same either
way and left out), 1000 inputs for ``bbb.predict`` with S samples. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bbb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU())
    body.requires_grad_(False)
    body.eval()
    model = nn.Sequential(body, bbb.BayesLinear(1200, 10, estimator="local"))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    x_pred = torch.randn(1000, 784)
    s = args.samples
    elbos = {
        shared: bbb.ELBO(bbb.Categorical(), 50000, num_samples=s, shared_prefix=shared)
        for shared in (False, True)
    }

    def step(shared: bool) -> None:
        model.zero_grad(set_to_none=True)
        elbos[shared](model, x, y).loss.backward()

    def pred(shared: bool) -> None:
        bbb.predict(model, x_pred, num_samples=s, shared_prefix=shared)

    times: dict[str, list[float]] = {}
    for name, fn in (("ELBO step", step), ("predict", pred)):
        for shared in (False, True, False, True):  # warm-up, both
            fn(shared)
        for _ in range(args.repeats):  # interleaved
            for shared in (False, True):
                t0 = time.perf_counter()
                fn(shared)
                times.setdefault(f"{name} shared_prefix={shared}", []).append(
                    time.perf_counter() - t0
                )
    print(f"S = {s}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for key, ts in times.items():
        print(f"{key:32s} {1e3 * statistics.median(ts):9.2f} ms")
    for name in ("ELBO step", "predict"):
        a = statistics.median(times[f"{name} shared_prefix=False"])
        b = statistics.median(times[f"{name} shared_prefix=True"])
        print(f"{name}: {a / b:.2f}x faster with shared_prefix")


if __name__ == "__main__":
    main()
