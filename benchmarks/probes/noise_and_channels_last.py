"""Noise for all layers in one call vs per layer, and channels-last for the conv net (issue 8, RESULTS session 5).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import bbb.bench as B
from bbb.nn import noise


def med(f: Callable[[], object], n: int = 30, warm: int = 5) -> float:
    for _ in range(warm):
        f()
    ts: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


sizes = [784 * 1200, 1200 * 1200, 1200 * 10]
for _r in range(2):
    per = med(lambda: [noise.randn((n,)) for n in sizes])
    one = med(lambda: noise.randn((sum(sizes),)).split(sizes))
    tper = med(lambda: [torch.randn(n) for n in sizes])
    tone = med(lambda: torch.randn(sum(sizes)).split(sizes))
    print(
        f"noise per layer (bbb.nn.noise.randn) {per:.2f} ms, one call {one:.2f} ms; torch.randn per layer {tper:.2f}, one call {tone:.2f}",
        flush=True,
    )
# channels_last for the conv net
x, y = B.make_data("conv")
for est in ("reparam", "local", "flipout"):
    for S in (1, 10):
        steps: dict[str, B.Step] = {}
        for fmt in ("contiguous", "channels_last"):
            m: nn.Module = B.make_bbb_model("conv", 0, est, "gaussian")
            xx = x
            if fmt == "channels_last":
                # Module.to takes memory_format (documented); torch's type hints leave it out
                m = m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
                xx = x.contiguous(memory_format=torch.channels_last)
            e = B.ELBO(B.Categorical(), B.DATASET_SIZE, num_samples=S)

            def loss(m: nn.Module = m, xx: Tensor = xx, e: B.ELBO = e) -> Tensor:
                return e(m, xx, y).loss

            steps[fmt] = B._adam_step(m, loss, x.device)
        for s in steps.values():
            for _ in range(3):
                s()
        ts: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(12 if S == 1 else 5):
            for k, s in steps.items():
                t = time.perf_counter()
                s()
                ts[k].append((time.perf_counter() - t) * 1e3)
        print(est, S, {k: round(statistics.median(v), 2) for k, v in ts.items()}, flush=True)
