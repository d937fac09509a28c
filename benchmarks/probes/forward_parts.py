"""Where the Bayesian forward's time goes, in situ (issue 8): the forward + loss of bbb's MLP
784-1200-1200-10 (Gaussian prior, closed-form KL, S=1) timed whole, without the KL, and with
the weight noise replaced by a tensor drawn once (so the draw's cost drops out) or by fresh
zeros (the allocation and write stay, the generation drops out), interleaved
with the deterministic network's forward, 25 rounds after 5 warm-up rounds.

    python benchmarks/probes/forward_parts.py [estimator]

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

import bbb.nn.module as module

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair

estimator = sys.argv[1] if len(sys.argv) > 1 else "reparam"
x, y, det, bay, elbo = pair(estimator)
real_randn = module._rand.randn
cache: dict[tuple[int, ...], torch.Tensor] = {}


def cached_randn(shape, **kw):  # type: ignore[no-untyped-def]
    key = tuple(shape)
    if key not in cache:
        cache[key] = real_randn(shape, **kw)
    return cache[key]


def zeros_randn(shape, **kw):  # type: ignore[no-untyped-def]
    return torch.zeros(shape, **kw)


def variant(name: str) -> float:
    module._rand.randn = {"noise drawn once": cached_randn, "noise zero-filled": zeros_randn}.get(
        name, real_randn
    )
    t0 = time.perf_counter()
    if name == "deterministic":
        loss = F.cross_entropy(det(x), y)
    elif name == "no KL":
        loss = F.cross_entropy(bay(x), y)
    else:
        loss = elbo(bay, x, y).loss
    t = time.perf_counter() - t0
    loss.backward()  # keep each round a full step's memory traffic
    for p in (*det.parameters(), *bay.parameters()):
        p.grad = None
    return t


names = ["deterministic", "full ELBO forward", "no KL", "noise drawn once", "noise zero-filled"]
times: dict[str, list[float]] = {n: [] for n in names}
for it in range(30):
    for n in names:
        t = variant(n)
        if it >= 5:
            times[n].append(t)
module._rand.randn = real_randn
print(
    f"bbb {estimator} forward, ms (median of 25): "
    + ", ".join(f"{n} {1e3 * statistics.median(v):.1f}" for n, v in times.items())
)
