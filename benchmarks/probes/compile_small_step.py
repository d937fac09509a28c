"""Issue 8: does torch.compile pay for a small network's step on CPU? A minimal hand-written Bayes by
Backprop step (the UCI protocol's shape: 13-50-1, local reparameterisation, S = 5, batch 455,
Gaussian prior N(0, 1), closed-form KL, learned noise, fused Adam) in plain PyTorch operations,
no bbb code (so no graph breaks), eager against torch.compile of the loss, alternated in two
blocks each, median ms per step of 30 rounds of 20 steps per block.

    python benchmarks/probes/compile_small_step.py

Run with nothing else on the machine (pause background jobs).
"""

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

torch.manual_seed(0)
B, S, D, H = 455, 5, 13, 50
x = torch.randn(B, D)
y = torch.randn(B, 1)


def param(*s: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*s) * 0.1)


params = [
    param(H, D),
    param(H),
    param(H, D),
    param(H),
    param(1, H),
    param(1),
    param(1, H),
    param(1),
]
for p in params[2::4] + params[3::4]:
    p.data.fill_(-5.0)
logs = torch.nn.Parameter(torch.tensor(0.0))
allp = params + [logs]


def loss_fn(x: Tensor, y: Tensor) -> Tensor:
    h = x.repeat(S, 1)
    kl: Tensor | float = 0.0
    for i in range(2):
        wm, bm, wr, br = params[4 * i : 4 * i + 4]
        ws, bs = F.softplus(wr), F.softplus(br)
        mean = F.linear(h, wm, bm)
        var = F.linear(h * h, ws * ws, bs * bs)
        h = mean + var.clamp_min(1e-30).sqrt() * torch.randn_like(mean)
        if i == 0:
            h = torch.relu(h)
        for m, s in ((wm, ws), (bm, bs)):
            kl = kl + (0.5 * (s * s + m * m) - torch.log(s) - 0.5).sum()
    sig = F.softplus(logs)
    nll = (
        0.5 * ((h - y.repeat(S, 1)) / sig) ** 2 + torch.log(sig) + 0.5 * math.log(2 * math.pi)
    ).mean()
    return nll + kl / 455


opt = torch.optim.Adam(allp, 1e-3, fused=True)


def step(f: Callable[[Tensor, Tensor], Tensor]) -> None:
    opt.zero_grad(set_to_none=True)
    f(x, y).backward()
    opt.step()


cf = torch.compile(loss_fn)
t0 = time.time()
step(cf)
step(cf)
print("compile s", time.time() - t0)
for name, f in [("eager", loss_fn), ("compiled", cf)] * 2:
    for _ in range(20):
        step(f)
    ts = []
    for _ in range(30):
        t0 = time.perf_counter()
        for _ in range(20):
            step(f)
        ts.append((time.perf_counter() - t0) / 20 * 1e3)
    print(name, f"{statistics.median(ts):.3f} ms")
