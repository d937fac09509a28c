"""The local estimator's floor (issue 8): a network doing exactly the matrix work of bbb's
local step (a mean and a variance product per layer, sqrt, noise) with plain parameters and no
KL, beside the deterministic MLP 784-1200-1200-10 and bbb's local step (native kernels),
interleaved in one process; forward, backward and Adam timed separately (median of 32).

    python benchmarks/probes/local_floor.py [--fused]

(``--fused``: all three networks with ``torch.optim.Adam(fused=True)``, as bbb's own training
uses since session 17; without it the session-11 setting, the default Adam.)

Caveat: the floor network's variance parameters are tiny (1e-5), and its Adam step ran ~2x
slower than bbb's on as many parameters; compare forward + backward, not Adam.
Run with the background jobs paused.
"""

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

import bbb

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair, time_phases
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair, time_phases

bbb.set_kernels("native")
x, y, det, bay, elbo = pair("local")


class Two(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) * i**-0.5)
        self.b = nn.Parameter(torch.zeros(o))
        self.v = nn.Parameter(torch.rand(o, i) * 1e-4 + 1e-5)
        self.c = nn.Parameter(torch.rand(o) * 1e-4 + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = F.linear(x, self.w, self.b)
        v = F.linear(x * x, self.v, self.c)
        return torch.addcmul(m, v.sqrt(), torch.randn_like(m))


floor = nn.Sequential(Two(784, 1200), nn.ReLU(), Two(1200, 1200), nn.ReLU(), Two(1200, 10))
nets = {
    "det": (det, lambda: F.cross_entropy(det(x), y)),
    "floor(2 paths)": (floor, lambda: F.cross_entropy(floor(x), y)),
    "bbb local": (bay, lambda: elbo(bay, x, y).loss),
}
fused = "--fused" in sys.argv[1:]
opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, fused=fused) for k, (m, _) in nets.items()}
time_phases(nets, opts)
