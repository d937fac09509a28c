"""Minor page faults and step time per step with glibc as is or tuned: python benchmarks/probes/page_faults_mallopt.py none|both|thresh|nommap (issue 8).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import ctypes
import resource
import sys
import time

from bbb.bench import Step, build_step, make_data

mode = sys.argv[1]
if mode != "none":
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
    if mode in ("nommap", "both"):
        print("mmap_max", libc.mallopt(M_MMAP_MAX, 0))
    if mode in ("thresh", "both"):
        print("mmap_thr", libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
    print(
        "trim", libc.mallopt(M_TRIM_THRESHOLD, 1 << 30), "toppad", libc.mallopt(M_TOP_PAD, 64 << 20)
    )
x, y = make_data("mlp")
steps: dict[str, Step] = {}
for name, library, samples in (
    ("det", "deterministic", 1),
    ("bbb", "bbb", 1),
    ("bbb10", "bbb", 10),
):
    step = build_step(library, "mlp", 1200, "reparam", "gaussian", samples, x, y)
    assert step is not None  # the library's own configurations are always offered
    steps[name] = step
for s in steps.values():
    for _ in range(3):
        s()
for _r in range(2):
    out = []
    for k, s in steps.items():
        ts = []
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n = 3 if k == "bbb10" else 6
        for _ in range(n):
            t = time.perf_counter()
            s()
            ts.append(time.perf_counter() - t)
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out.append(f"{k} {sorted(ts)[n // 2] * 1e3:.1f}ms flt {(f1 - f0) // n}")
    print(
        mode,
        " | ".join(out),
        "maxrss MB",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        flush=True,
    )
