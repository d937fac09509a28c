"""Weight-space reparameterisation's floor (issue 8): a network doing the work of a reparam
step that no implementation computing it each step can skip (per layer one fresh normal per
weight from bbb's native generator, w = mu + v * eps, the product with w, and Adam on mu and
v) with plain parameters (no softplus, no KL), beside the deterministic MLP 784-1200-1200-10,
bbb's reparam step (native kernels) and, when it is importable, bayesian-torch's
``LinearReparameterization`` network as ``bbb bench`` builds it; interleaved in one process,
the same Adam for all (torch's default, as ``bbb bench``; ``--fused``: ``fused=True``);
forward, backward and Adam timed separately (median of 32 rounds after 8).

    python benchmarks/probes/reparam_floor.py [--fused]

The target "2x faster than bayesian-torch" asks for a step at half bayesian-torch's: the last
line compares that with the floor. Run with the background jobs paused.
"""

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

import bbb
from bbb import bench_peers
from bbb.bench import DATASET_SIZE
from bbb.nn.noise import randn

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes._pair import pair, time_phases
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from _pair import pair, time_phases

bbb.set_kernels("native")
x, y, det, bay, elbo = pair("reparam")


class Sampled(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) * i**-0.5)
        self.b = nn.Parameter(torch.zeros(o))
        self.v = nn.Parameter(torch.rand(o, i) * 1e-2 + 1e-3)
        self.c = nn.Parameter(torch.rand(o) * 1e-2 + 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.addcmul(self.w, self.v, randn(self.v.shape, dtype=x.dtype, device=x.device))
        b = torch.addcmul(self.b, self.c, randn(self.c.shape, dtype=x.dtype, device=x.device))
        return F.linear(x, w, b)


floor = nn.Sequential(
    Sampled(784, 1200), nn.ReLU(), Sampled(1200, 1200), nn.ReLU(), Sampled(1200, 10)
)
nets = {
    "det": (det, lambda: F.cross_entropy(det(x), y)),
    "floor": (floor, lambda: F.cross_entropy(floor(x), y)),
    "bbb reparam": (bay, lambda: elbo(bay, x, y).loss),
}
if "bayesian-torch" in bench_peers.available_peers():
    built = bench_peers._bayesian_torch("mlp", 1200, "reparam", "gaussian", 1)
    assert built is not None
    bt: nn.Module = built

    def loss_bt() -> torch.Tensor:
        out, kl = bt(x)
        return F.cross_entropy(out, y) + kl / DATASET_SIZE

    nets["bayesian-torch"] = (bt, loss_bt)
fused = "--fused" in sys.argv[1:]
opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, fused=fused) for k, (m, _) in nets.items()}
medians = time_phases(nets, opts, rounds=40)
if "bayesian-torch" in medians:
    half = medians["bayesian-torch"] / 2
    print(
        f"half of bayesian-torch's step: {1e3 * half:.1f} ms = "
        f"{half / medians['det']:.2f}x det; floor {medians['floor'] / medians['det']:.2f}x, "
        f"bbb {medians['bbb reparam'] / medians['det']:.2f}x"
    )
