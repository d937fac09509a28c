"""Counts denormals in parameters, gradients and Adam state after 10 steps, and times sqrt on each (issue 8).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import time
from collections.abc import Callable

import torch
from torch import Tensor

import bbb.bench as B

x, y = B.make_data("mlp")
m = B.make_bbb_model("mlp", 1200, "reparam", "gaussian")
e = B.ELBO(B.Categorical(), B.DATASET_SIZE)
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
for _ in range(10):
    opt.zero_grad()
    e(m, x, y).loss.backward()
    opt.step()
tiny = torch.finfo(torch.float32).tiny


def tm(f: Callable[[Tensor], Tensor], t: Tensor, n: int = 5) -> float:
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        f(t)
        ts.append(time.perf_counter() - a)
    return sorted(ts)[n // 2] * 1e3


for name, p in m.named_parameters():
    st = opt.state[p]
    for k in ("exp_avg_sq", "exp_avg"):
        v = st[k]
        a = v.abs()
        dn = int(((a > 0) & (a < tiny)).sum())
        print(
            f"{name:25s} {k:11s} numel {v.numel():8d} denorm {dn:8d} zero {int((a == 0).sum()):8d} sqrt {tm(torch.sqrt, v):.2f} ms  ref {tm(torch.sqrt, torch.rand_like(v)):.2f} ms"
        )
    assert p.grad is not None  # every parameter takes part in the loss
    g = p.grad.abs()
    print(f"{name:25s} grad denorm {int(((g > 0) & (g < tiny)).sum())} zero {int((g == 0).sum())}")
