"""Time the phases of one training step (forward + loss, backward, Adam step) for the
deterministic MLP 784-1200-1200-10 and bbb's (reparam, Gaussian prior), interleaved in one
process, plus Adam's step on the same parameters with no forward/backward in between (issue 8).

    python benchmarks/probes/step_phases.py [estimator] [kernels backend]

(the backend, e.g. ``native``, applies to the Bayesian network; default ``eager``)

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair

estimator = sys.argv[1] if len(sys.argv) > 1 else "reparam"
if len(sys.argv) > 2:
    import bbb

    bbb.set_kernels(sys.argv[2])
x, y, det, bay, elbo = pair(estimator)
nets = {
    "deterministic": (det, lambda: F.cross_entropy(det(x), y)),
    f"bbb {estimator}": (bay, lambda: elbo(bay, x, y).loss),
}
opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, (m, _) in nets.items()}
times: dict[str, dict[str, list[float]]] = {k: {} for k in nets}


def rec(k: str, phase: str, t: float) -> None:
    times[k].setdefault(phase, []).append(t)


for it in range(30):
    for k, (_m, loss_fn) in nets.items():
        opt = opts[k]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for _ in range(2):  # Adam again, right after itself (its tensors are hot)
            opt.step()
        t4 = time.perf_counter()
        if it >= 5:
            rec(k, "forward", t1 - t0)
            rec(k, "backward", t2 - t1)
            rec(k, "adam", t3 - t2)
            rec(k, "adam again", (t4 - t3) / 2)
for k, ph in times.items():
    parts = ", ".join(f"{p} {1e3 * statistics.median(v):.1f}" for p, v in ph.items())
    print(f"{k:16s} ms (median of 25): {parts}")
