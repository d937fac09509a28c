"""Issue 8: the fixed (size-independent) cost of a Bayesian layer, where Python, autograd and
the native kernels' call overhead dominate: one BayesLinear(16, 16) on a batch of 2, forward
alone and forward + KL + backward, per kernels backend and estimator, beside nn.Linear; then
the pieces of one native node (weights of 256 elements). Best of 3 repeats of N calls, in
microseconds per call.

    python benchmarks/probes/layer_overhead.py

At H = 1200 this cost is ~1-2% of a step; for small networks (UCI-sized) it is the step.
Run with nothing else on the machine (pause background jobs).
"""

import timeit
from collections.abc import Callable

import torch
from torch import nn

import bbb
from bbb import _native as N
from bbb import kernels as K


def us(f: Callable[[], object], n: int = 2000) -> float:
    for _ in range(200):
        f()
    return min(timeit.repeat(f, number=n, repeat=3)) / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    lin = nn.Linear(16, 16)
    print(f"nn.Linear: forward {us(lambda: lin(x)):7.1f}  forward + backward "
          f"{us(lambda: lin(x).sum().backward()):7.1f}")  # fmt: skip
    prior = bbb.GaussianPrior(1.0)
    for backend in ("eager", "native"):
        bbb.set_kernels(backend)
        for est in ("reparam", "local", "flipout"):
            layer = bbb.BayesLinear(16, 16, estimator=est, prior=prior)

            def step(layer: bbb.BayesLinear = layer) -> None:
                (layer(x).sum() + layer.kl()).backward()

            def forward(layer: bbb.BayesLinear = layer) -> torch.Tensor:
                return layer(x)

            fwd = us(forward)
            print(f"BayesLinear {backend:6s} {est:8s}: forward {fwd:7.1f}  "
                  f"forward + KL + backward {us(step):7.1f}")  # fmt: skip
    bbb.set_kernels("native")
    layer = bbb.BayesLinear(16, 16, estimator="reparam", prior=prior)
    mu, rho = layer.weight_mu, layer.weight_rho
    spec = ("gaussian", 0.0, 1.0)
    pieces: dict[str, Callable[[], object]] = {
        "native node (autograd Function + C)": lambda: K.native_sample_and_kl(
            "reparam", mu, rho, prior, "closed_form", [False], 1, False
        ),
        "_native.sample_kl_fwd (the C call + wrapper)": lambda: N.sample_kl_fwd(
            "reparam", mu.detach().reshape(-1), rho.detach().reshape(-1), spec, 1
        ),
        "_native._key (one torch.randint + item)": N._key,
        "BayesLinear._forward_native (its node + linear)": lambda: layer._forward_native(x, 1),
    }
    for name, f in pieces.items():
        print(f"{name:50s} {us(f):7.1f}")


if __name__ == "__main__":
    main()
