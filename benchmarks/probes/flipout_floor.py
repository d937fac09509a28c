"""Flipout's floor (issue 8): a network doing exactly the work of bbb's flipout step that no
implementation can skip (per layer the mean product, the perturbation product of the
sign-flipped input with dW = v * eps, one fresh normal per weight from bbb's native generator,
the signs) with plain parameters (no softplus, no KL), beside the deterministic MLP
784-1200-1200-10 and bbb's flipout step (native kernels), interleaved in one process, fused
Adam for all three; forward, backward and Adam timed separately (median of 32).

    python benchmarks/probes/flipout_floor.py

Run with the background jobs paused.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

import bbb
from bbb.nn.noise import rademacher, randn

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair, time_phases
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair, time_phases

bbb.set_kernels("native")
x, y, det, bay, elbo = pair("flipout")


class Two(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) * i**-0.5)
        self.b = nn.Parameter(torch.zeros(o))
        self.v = nn.Parameter(torch.rand(o, i) * 1e-2 + 1e-3)
        self.c = nn.Parameter(torch.rand(o) * 1e-2 + 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.w, self.b)
        dw = self.v * randn(self.v.shape, dtype=x.dtype, device=x.device)
        db = self.c * randn(self.c.shape, dtype=x.dtype, device=x.device)
        pert = F.linear(x * rademacher((x.shape[0], x.shape[1]), x), dw, db)
        return torch.addcmul(mean, pert, rademacher(tuple(pert.shape), pert))


floor = nn.Sequential(Two(784, 1200), nn.ReLU(), Two(1200, 1200), nn.ReLU(), Two(1200, 10))
nets = {
    "det": (det, lambda: F.cross_entropy(det(x), y)),
    "floor(2 paths)": (floor, lambda: F.cross_entropy(floor(x), y)),
    "bbb flipout": (bay, lambda: elbo(bay, x, y).loss),
}
opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True) for k, (m, _) in nets.items()}
time_phases(nets, opts)
