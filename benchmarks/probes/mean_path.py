"""Issue 8: flipout's and local's mean path through the native node, on and off.

With it on (the library's default), a flipout or local layer takes mu for its mean path from
the native node (``bbb.kernels.native_layer_sample_and_kl(..., mean_path=True)``), and the node's C backward
adds the mean path's gradient of mu to the KL's in its own pass; off, the layer uses mu
directly and autograd sums mu's two gradients in a separate pass. Both variants and the
deterministic MLP 784-1200-1200-10 (Adam steps, batch 128, Gaussian prior, closed-form KL,
S = 1) timed interleaved in one process, median of the rounds.

    python benchmarks/probes/mean_path.py [--repeats 30]          # training steps
    python benchmarks/probes/mean_path.py --kernel [--repeats 60] # the backward kernel alone

``--kernel`` times the native backward of the local kind on one 1200 x 1200 layer with the
mean path's gradient added in the kernel, without it, and without it plus the in-place and
the out-of-place addition autograd would do instead.

Run with nothing else on the machine (pause background jobs).
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import bbb
from bbb import _native as N
from bbb import bench
from bbb import kernels as K
from bbb.priors import Prior

# a layer's one native node (weights and bias); patching native_sample_and_kl, which the layers
# no longer call, timed the routed path twice
_routed = K.native_layer_sample_and_kl


def _unrouted(
    kind: str,
    mu: torch.Tensor,
    rho: torch.Tensor,
    mu_b: torch.Tensor | None,
    rho_b: torch.Tensor | None,
    prior: Prior,
    kl_mode: str = "closed_form",
    used: list[bool] | None = None,
    samples: int = 1,
    mean_path: bool = False,
) -> K.NativeLayerOutputs:
    """The node without the mean path: the layer's mean path takes the parameters themselves,
    and autograd sums mu's two gradients."""
    out = _routed(kind, mu, rho, mu_b, rho_b, prior, kl_mode, used, samples, False)
    return out._replace(mu=mu, mu_b=mu_b) if mean_path else out


def _with(route: bool, step: bench.Step) -> bench.Step:
    def run() -> float:
        K.native_layer_sample_and_kl = _routed if route else _unrouted
        try:
            return step()
        finally:
            K.native_layer_sample_and_kl = _routed

    return run


def kernel(repeats: int) -> None:
    n = 1200 * 1200
    g = torch.Generator().manual_seed(0)
    mu, rho = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) - 5.0
    prior = ("gaussian", 0.0, 1.0)
    _, _, sigma, eps = N.sample_kl_fwd("local", mu, rho, prior)
    g_t, g_mu = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def bwd(**kw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return N.sample_kl_bwd("local", mu, rho, sigma, eps, g_t, 0.5, prior, **kw)

    variants: dict[str, Callable[[], object]] = {
        "bwd, g_mu added in the kernel": lambda: bwd(g_mu=g_mu),
        "bwd alone": bwd,
        "bwd, then grad_mu.add_(g_mu)": lambda: bwd()[0].add_(g_mu),
        "bwd, then grad_mu + g_mu": lambda: bwd()[0] + g_mu,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 10):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            if r >= 10:  # warm-up rounds left out
                times[k].append((time.perf_counter() - t0) * 1e3)
    for k, v in times.items():
        print(f"{k:32s} {statistics.median(v):7.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--estimators", default="flipout,local")
    ap.add_argument("--kernel", action="store_true", help="time the backward kernel alone")
    args = ap.parse_args()
    bbb.tune_allocator()
    if args.kernel:
        kernel(args.repeats)
        return
    x, y = bench.make_data("mlp")
    det = bench.build_step("deterministic", "mlp", 1200, "reparam", "gaussian", 1, x, y)
    assert det is not None
    steps = {"deterministic": det}
    for est in args.estimators.split(","):
        for route in (True, False):
            s = bench.build_step("bbb-native", "mlp", 1200, est, "gaussian", 1, x, y)
            assert s is not None
            steps[f"{est} mean path {'routed' if route else 'unrouted'}"] = _with(route, s)
    times = bench._interleaved(steps, warmup=3, repeats=args.repeats)
    base = statistics.median(times["deterministic"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:32s} {m:8.2f} ms  {m / base:5.2f}x")


if __name__ == "__main__":
    main()
