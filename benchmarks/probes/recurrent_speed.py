"""BayesLSTM / BayesGRU against torch's nn.LSTM / nn.GRU on the same rows: forward + backward
(with the KL for the Bayesian layers), interleaved in one process, median of R repeats.

    OMP_NUM_THREADS=1 python benchmarks/probes/recurrent_speed.py [--repeats R]

One layer, input 32, hidden 64, batch B = 32 (batch_first), T = 100 steps. With S weight samples
(``bbb.vectorized_samples``) the Bayesian layer sees S x B rows and is compared with torch's layer
on S x B rows. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import bbb

B, T, IN, HIDDEN = 32, 100, 32, 64


def median_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each function once as warm-up, then ``repeats`` rounds calling them in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def torch_step(layer: nn.Module, x: Tensor) -> Callable[[], None]:
    def f() -> None:
        y, _ = layer(x)
        y.sum().backward()

    return f


def bayes_step(layer: nn.Module, x: Tensor, samples: int) -> Callable[[], None]:
    rows = bbb.repeat_samples(x, samples)

    def f() -> None:
        with bbb.vectorized_samples(layer, samples):
            y, _ = layer(rows)
        (y.sum() + bbb.kl_divergence(layer)).backward()

    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(B, T, IN)
    pairs: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
        (bbb.BayesLSTM, nn.LSTM),
        (bbb.BayesGRU, nn.GRU),
    )
    for bayes_cls, torch_cls in pairs:
        plain = torch_cls(IN, HIDDEN, batch_first=True)
        fns = {"torch S=1": torch_step(plain, x), "torch S=4": torch_step(plain, x.repeat(4, 1, 1))}
        for est in ("reparam", "flipout"):
            for s in (1, 4):
                layer = bayes_cls(IN, HIDDEN, batch_first=True, estimator=est)
                fns[f"{est} S={s}"] = bayes_step(layer, x, s)
        ms = median_ms(fns, args.repeats)
        print(
            f"{torch_cls.__name__}: torch {ms['torch S=1']:.1f} ms (B rows), {ms['torch S=4']:.1f} ms (4B rows)"
        )
        for key, value in ms.items():
            if key.startswith("torch"):
                continue
            ref = ms["torch S=4"] if key.endswith("S=4") else ms["torch S=1"]
            print(f"  {bayes_cls.__name__} {key}: {value:.1f} ms = {value / ref:.2f}x torch")


if __name__ == "__main__":
    main()
