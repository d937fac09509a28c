"""Why are Adam's elementwise ops 4x slower inside the Bayesian step than the deterministic
one's? (issue 8). Times ``torch.sqrt`` on each parameter's Adam ``exp_avg_sq`` after warm-up
steps, against a fresh N(0,1)^2 tensor of the same shape, and counts subnormal values.

    python benchmarks/probes/slow_elementwise.py [deterministic|bbb] [steps]

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair

library = sys.argv[1] if len(sys.argv) > 1 else "bbb"
if library not in ("deterministic", "bbb"):
    sys.exit(f"usage: python {sys.argv[0]} [deterministic|bbb] [steps]")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
x, y, det, bay, elbo = pair("reparam")
model: nn.Module = bay if library == "bbb" else det


def loss_fn() -> torch.Tensor:
    if library == "bbb":
        return elbo(model, x, y).loss
    return F.cross_entropy(model(x), y)


opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(steps):
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()

tiny = torch.finfo(torch.float32).tiny


def timed(t: torch.Tensor) -> float:
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        torch.sqrt(t)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


print(f"{library}, {steps} steps; sqrt in ms (median of 15); subnormal counts")
for name, p in model.named_parameters():
    if p.numel() < 100_000:
        continue
    st = opt.state[p]
    for key in ("exp_avg", "exp_avg_sq"):
        v = st[key]
        sub = int(((v != 0) & (v.abs() < tiny)).sum())
        zero = int((v == 0).sum())
        print(
            f"  {name:22s} {key:10s} {tuple(v.shape)}: sqrt {timed(v.abs()):.2f} ms vs fresh "
            f"{timed(torch.randn_like(v) ** 2):.2f} ms; subnormal {sub} zero {zero} "
            f"min|v|>0 {float(v.abs()[v != 0].min()) if zero < v.numel() else 0:.3g}"
        )
    sub = int(((p != 0) & (p.abs() < tiny)).sum())
    assert p.grad is not None  # every parameter takes part in the loss
    print(
        f"  {name:22s} param: subnormal {sub}; grad subnormal "
        f"{int(((p.grad != 0) & (p.grad.abs() < tiny)).sum())}"
    )
