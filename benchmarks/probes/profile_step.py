"""Per-op profile of one training step at H=1200, allocator tuned or not (issue 8).

    python benchmarks/probes/profile_step.py LIBRARY ESTIMATOR tuned|untuned

LIBRARY is ``deterministic`` or ``bbb`` (or a peer name, see ``bbb.bench``). Prints the median
wall time per step (20 steps after 5 warm-up steps), the minor page faults per step, and the
profiler's table grouped by input shape. The measurement script behind numbers in
docs/RESULTS.md; run with the background jobs paused.
"""

import resource
import statistics
import sys
import time

from torch.profiler import ProfilerActivity, profile

import bbb
from bbb.bench import build_step, make_data

library, estimator, mode = sys.argv[1:4]
if mode == "tuned":
    assert bbb.tune_allocator()
x, y = make_data("mlp")
s = build_step(library, "mlp", 1200, estimator, "gaussian", 1, x, y)
assert s is not None
for _ in range(5):
    s()
times, faults = [], []
for _ in range(20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    s()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(
    f"{library} {estimator} {mode}: median {1e3 * statistics.median(times):.1f} ms per step, "
    f"minor faults per step median {statistics.median(faults):.0f} max {max(faults)}"
)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    for _ in range(8):
        s()
print(
    p.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=int(sys.argv[4]) if len(sys.argv) > 4 else 20,
        max_name_column_width=28,
        max_shapes_column_width=50,
    )
)
