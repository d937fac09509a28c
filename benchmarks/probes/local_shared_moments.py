"""Issue 8: local reparameterisation (or flipout) with S weight samples, the first layer's
pre-activation mean and variance (flipout: its mean path) computed once per example
(``bbb.nn.stacking``) against S times.

Inside a multi-sample pass (``bbb.ELBO(num_samples=S)``, ``bbb.predict``) the model's input
is S stacked copies of the batch; a local layer that receives them directly now computes
its mean and variance on one copy and draws S noises. Timed on, and off (the marker ignored:
the previous code path), interleaved in one process, median of the rounds, for the MNIST MLP
784-1200-1200-10 (``--estimator``, default local; Gaussian prior, closed-form KL, batch 128):

- ``predict``: ``bbb.predict(model, x, num_samples=S)``, S = 10 (the trainer's validation)
  on 2000 inputs and S = 100 (``bbb evaluate``) on 1000 inputs, seconds per call;
- ``elbo``: an Adam step of the ELBO with ``num_samples = 10``, ms per step.

    python benchmarks/probes/local_shared_moments.py [--repeats 5] [--kernels eager|native]
        [--estimator local|flipout]

Run with nothing else on the machine (pause background jobs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import bbb
from bbb.nn import estimators

_on = estimators.identical_blocks


def _off(x: torch.Tensor) -> int:
    return 1


def _timed(fn: Callable[[], object], inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", default="eager", choices=["eager", "native"])
    ap.add_argument("--estimator", default="local", choices=["local", "flipout"])
    args = ap.parse_args()
    bbb.tune_allocator()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels {args.kernels}, "
        f"estimator {args.estimator}"
    )
    model = bbb.models.bayes_mlp(784, [1200, 1200], 10, estimator=args.estimator)
    x_eval = torch.rand(2000, 784)
    x, y = torch.rand(128, 784), torch.randint(0, 10, (128,))
    elbo = bbb.ELBO(bbb.Categorical(), 50000, num_samples=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        elbo(model, x, y).loss.backward()
        opt.step()

    cases: dict[str, tuple[Callable[[], object], int, float]] = {
        "predict S=10, 2000 inputs (s)": (
            lambda: bbb.predict(model, x_eval, num_samples=10),
            1,
            1.0,
        ),
        "predict S=100, 1000 inputs (s)": (
            lambda: bbb.predict(model, x_eval[:1000], num_samples=100),
            1,
            1.0,
        ),
        "ELBO step S=10 (ms)": (step, 3, 1e3),
    }
    with bbb.use_kernels(args.kernels):
        for name, (fn, inner, unit) in cases.items():
            times: dict[str, list[float]] = {"off": [], "on": []}
            for variant in times:  # warm-up
                estimators.identical_blocks = _on if variant == "on" else _off
                fn()
            for _ in range(args.repeats):
                for variant in times:
                    estimators.identical_blocks = _on if variant == "on" else _off
                    times[variant].append(_timed(fn, inner) * unit)
            estimators.identical_blocks = _on
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            print(
                f"{name}: before {off:.3f}, shared moments {on:.3f}, before / after {off / on:.2f}"
            )


if __name__ == "__main__":
    main()
