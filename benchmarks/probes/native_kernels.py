"""The native kernels against their eager counterparts on the weights of the 784-1200-1200-10
MLP (2.4M), on one and on two threads, interleaved, median of 25 (issue 8):

- standard normals: ``torch.randn``, ``bbb.nn.noise.randn`` (eager backend: one Mersenne
  Twister per thread) and the native Threefry + Box-Muller generator;
- the forward of the weight sample + closed-form KL (reparam): eager ``softplus``, ``randn``,
  ``addcmul`` and the KL's terms, against the one native pass (which draws its noise too);
- its backward: the eager closed-form gradients against the one native pass.

    python benchmarks/probes/native_kernels.py

The measurement script behind numbers in docs/RESULTS.md (session 10); run it on a quiet
machine.
"""

import statistics
import time

import torch
import torch.nn.functional as F

import bbb
from bbb import _native
from bbb.nn import noise

N = 784 * 1200 + 1200 * 1200 + 1200 * 10
G = ("gaussian", 0.0, 1.0)  # the prior N(0, 1), closed-form KL


def eager_forward(mu: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = F.softplus(rho)
    w = torch.addcmul(mu, sigma, noise.randn(mu.shape))
    kl = ((sigma * sigma + mu * mu) * 0.5 - torch.log(sigma)).sum()
    return w, kl


def eager_backward(mu, rho, sigma, eps, g):  # type: ignore[no-untyped-def]
    sig = torch.sigmoid(rho)
    grad_mu = g + 0.5 * mu
    grad_rho = (g * eps + 0.5 * (sigma - 1 / sigma)) * sig
    return grad_mu, grad_rho


def main() -> None:
    bbb.tune_allocator()  # as the benchmark and the bbb command (fresh pages cost page faults)
    assert _native.available(), _native.error()
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(N, generator=g) * 0.05
    rho = torch.rand(N, generator=g) * 2 - 6
    up = torch.randn(N, generator=g)
    _, _, sigma, eps = _native.sample_kl_fwd("reparam", mu, rho, G)
    assert eps is not None
    cases = {
        "normals: torch.randn": lambda: torch.randn(N),
        "normals: bbb.nn.noise.randn (eager)": lambda: noise.randn((N,)),
        "normals: native": lambda: _native.normal((N,)),
        "sample + KL forward: eager": lambda: eager_forward(mu, rho),
        "sample + KL forward: native (noise included)": lambda: _native.sample_kl_fwd(
            "reparam", mu, rho, G
        ),
        "sample + KL backward: eager": lambda: eager_backward(mu, rho, sigma, eps, up),
        "sample + KL backward: native": lambda: _native.sample_kl_bwd(
            "reparam", mu, rho, sigma, eps, up, 0.5, G
        ),
    }
    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for it in range(30):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                if it >= 5:
                    times[k].append(time.perf_counter() - t0)
        print(f"{t} thread(s), {N} elements: median ms of 25")
        for k, v in times.items():
            print(f"  {k:46s} {1e3 * statistics.median(v):7.2f}")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
