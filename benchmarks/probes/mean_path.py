"""Issue 8: flipout's and local's mean path through the native node, on and off.

With it on (the library's default), a flipout or local layer takes mu for its mean path from
the native node (:func:`bbb.kernels.native_sample_kl_and_mean`), and the node's C backward
adds the mean path's gradient of mu to the KL's in its own pass; off, the layer uses mu
directly and autograd sums mu's two gradients in a separate pass. Both variants and the
deterministic MLP 784-1200-1200-10 (Adam steps, batch 128, Gaussian prior, closed-form KL,
S = 1) timed interleaved in one process, median of the rounds.

    python benchmarks/probes/mean_path.py [--repeats 30]

Run with nothing else on the machine (pause background jobs).
"""

import argparse
import statistics
from collections.abc import Callable

import bbb
from bbb import bench
from bbb import kernels as K

_routed = K.native_sample_kl_and_mean


def _unrouted(kind, mu, rho, prior, mode="closed_form", used=None, samples=1):  # type: ignore[no-untyped-def]
    t, kl, eps = K.native_sample_and_kl(kind, mu, rho, prior, mode, used, samples)
    return t, kl, eps, mu


def _with(route: bool, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        K.native_sample_kl_and_mean = _routed if route else _unrouted  # type: ignore[assignment]
        try:
            step()
        finally:
            K.native_sample_kl_and_mean = _routed  # type: ignore[assignment]

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--estimators", default="flipout,local")
    args = ap.parse_args()
    bbb.tune_allocator()
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
