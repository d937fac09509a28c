"""Minor page faults per step in a process built like bbb bench's: python benchmarks/probes/page_faults_bench_process.py plain|tune (issue 8).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import resource
import sys
import time

import bbb.bench as B
from bbb.allocator import tune_allocator

if len(sys.argv) != 2 or sys.argv[1] not in ("plain", "tune"):
    sys.exit(f"usage: python {sys.argv[0]} plain|tune")
if sys.argv[1] == "tune":
    print("tuned", tune_allocator())
x, y = B.make_data("mlp")
steps: dict[tuple[str, str, int, str, str, int], B.Step] = {}
for k in [
    ("deterministic", "mlp", 1200, "-", "-", 1),
    ("bbb", "mlp", 1200, "reparam", "gaussian", 10),
    ("bayesian-torch", "mlp", 1200, "reparam", "gaussian", 10),
]:
    step = B.build_step(*k, x, y)
    assert step is not None, f"{k}: not offered"
    steps[k] = step
for s in steps.values():
    for _ in range(2):
        s()
for _r in range(2):
    for k, s in steps.items():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        s()
        print(
            sys.argv[1],
            k[0],
            k[4] if len(k) > 4 else "",
            "faults",
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
            f"{(time.perf_counter() - t) * 1e3:.0f} ms",
        )
