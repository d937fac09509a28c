"""How much of bbb's local (or another estimator's) step (MLP 784-1200-1200-10, batch 128, Gaussian prior, closed-form
KL, native kernels, fused Adam) the native sample/KL kernels take, timed inside the step and
alone on the same inputs, with the page faults (minor) each call caused (issue 8).

    python benchmarks/probes/local_native_share.py [estimator]

Run with the background jobs paused. (Under ``torch.profiler`` the same calls read 4.5 + 6.8
ms per step: the profiler's own cost, not the kernels'.)
"""

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import bbb
from bbb import _native
from bbb.train.optim import adam

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair

bbb.set_kernels("native")
estimator = sys.argv[1] if len(sys.argv) > 1 else "local"
x, y, det, bay, elbo = pair(estimator)
opt = adam(bay.parameters(), lr=1e-4)
calls: list[tuple[str, int, float, int, tuple[Any, ...]]] = []
originals: dict[str, Callable[..., Any]] = {
    "fwd": _native.sample_kl_fwd,
    "bwd": _native.sample_kl_bwd,
}


def timed(tag: str) -> Callable[..., Any]:
    fn = originals[tag]

    def call(*args: Any, **kwargs: Any) -> Any:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        calls.append((tag, args[1].numel(), t1 - t0, f1 - f0, args))
        return out

    return call


_native.sample_kl_fwd, _native.sample_kl_bwd = timed("fwd"), timed("bwd")
steps: list[float] = []
in_step: dict[tuple[str, int], list[tuple[float, int]]] = {}
for it in range(30):
    calls.clear()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    elbo(bay, x, y).loss.backward()
    opt.step()
    steps.append(time.perf_counter() - t0)
    if it >= 10:
        for tag, n, dt, faults, _args in calls:
            if n > 100_000:  # the two large layers' weights
                in_step.setdefault((tag, n), []).append((dt, faults))
print(f"step {1e3 * statistics.median(steps[10:]):.2f} ms (median of 20)")
total = 0.0
for key, v in in_step.items():
    ms = 1e3 * statistics.median(d for d, _ in v)
    total += ms
    print(f"{key}: in the step {ms:.3f} ms, minor faults {statistics.median(f for _, f in v)}")
print(f"native calls of the two large layers in the step: {total:.2f} ms")
last = {(tag, n): args for tag, n, _dt, _faults, args in calls if n > 100_000}
for (tag, n), args in last.items():
    times = []
    for _ in range(25):
        t0 = time.perf_counter()
        originals[tag](*args)
        times.append(time.perf_counter() - t0)
    print(f"{(tag, n)}: alone {1e3 * statistics.median(times[5:]):.3f} ms")
