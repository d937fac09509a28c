"""Memory bandwidth seen by PyTorch's elementwise ops here: hot (one tensor, in cache) against
cold (round-robin over tensors totalling far more than the 32 MiB L3), issue 8.

    python benchmarks/probes/bandwidth.py

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import statistics
import time

import torch

import bbb

bbb.tune_allocator()
n = 1200 * 1200
for threads in (1, 2):
    torch.set_num_threads(threads)
    pool = [torch.rand(n) + 0.5 for _ in range(24)]  # 24 x 5.76 MB = 138 MB
    outs = [torch.empty(n) for _ in range(24)]
    for label, idx in (("hot", [0] * 48), ("cold", list(range(24)) * 2)):
        for op in ("sqrt", "add"):
            ts = []
            for i in idx:
                t0 = time.perf_counter()
                if op == "sqrt":
                    torch.sqrt(pool[i], out=outs[i])
                else:
                    torch.add(pool[i], pool[(i + 1) % 24], out=outs[i])
                ts.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(ts[4:])
            moved = n * 4 * (2 if op == "sqrt" else 3)
            print(f"threads {threads} {label:4s} {op:4s}: {ms:.2f} ms, {moved / ms / 1e6:.1f} GB/s")
