"""torch.profiler of 8 bbb steps at H=1200 grouped by input shape: python benchmarks/probes/profile_shapes.py reparam (issue 8).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import sys

from torch.profiler import ProfilerActivity, profile

from bbb import ESTIMATORS
from bbb.bench import build_step, make_data

if len(sys.argv) != 2 or sys.argv[1] not in ESTIMATORS:
    sys.exit(f"usage: python {sys.argv[0]} ESTIMATOR (one of {', '.join(ESTIMATORS)})")
x, y = make_data("mlp")
s = build_step("bbb", "mlp", 1200, sys.argv[1], "gaussian", 1, x, y)
assert s is not None  # the library's own configurations are always offered
for _ in range(5):
    s()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    for _ in range(8):
        s()
print(
    p.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=25,
        max_name_column_width=25,
        max_shapes_column_width=60,
    )
)
