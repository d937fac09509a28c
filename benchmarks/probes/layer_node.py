"""Issue 8: one native autograd node per layer (weights and bias together) against one node
per parameter pair (the library before session 18).

The library's layers call ``bbb.kernels.native_layer_sample_and_kl`` once per forward pass;
the "two nodes" variant replaces it, inside this process only, by two calls (weights, then
bias: the same C calls and noise keys in the same order, so the same numbers) and an autograd
addition of their KLs, which is what the layers did before. Adam steps of MLPs with native
kernels, Gaussian prior, closed-form KL, S = 1, both variants timed interleaved in one
process (median of the rounds, ms per step):

- ``mnist400``: 784-400-400-10, batch 128 (the benchmark's H = 400 row);
- ``mnist1200``: 784-1200-1200-10, batch 128 (the target row of issue 8);
- ``uci``: 13-50-1 regression, batch 455 (Boston-housing sized), local estimator.

    python benchmarks/probes/layer_node.py [--repeats 30] [--configs mnist400,uci]

Run with nothing else on the machine (pause background jobs).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

import bbb
from bbb import kernels as K
from bbb.bench import _interleaved
from bbb.likelihoods import Likelihood
from bbb.priors import Prior

_one = K.native_layer_sample_and_kl


def _two(
    kind: str,
    mu: Tensor,
    rho: Tensor,
    mu_b: Tensor | None,
    rho_b: Tensor | None,
    prior: Prior,
    kl_mode: str = "closed_form",
    used: list[bool] | None = None,
    samples: int = 1,
    mean_path: bool = False,
) -> K.NativeLayerOutputs:
    w = _one(kind, mu, rho, None, None, prior, kl_mode, used, samples, mean_path)
    if mu_b is None and rho_b is None:
        return w
    assert mu_b is not None and rho_b is not None, "give both mu_b and rho_b, or neither"
    b = _one(kind, mu_b, rho_b, None, None, prior, kl_mode, used, samples, mean_path)
    return K.NativeLayerOutputs(w.t, b.t, w.kl + b.kl, w.eps, b.eps, w.mu, b.mu)


def _with(one: bool, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        K.native_layer_sample_and_kl = _one if one else _two
        try:
            step()
        finally:
            K.native_layer_sample_and_kl = _one

    return run


def _step(config: str, estimator: str) -> Callable[[], None]:
    torch.manual_seed(0)
    likelihood: Likelihood
    if config == "uci":
        sizes, n, likelihood = [13, 50, 1], 455, bbb.Gaussian("learned")
        x, y = torch.randn(n, 13), torch.randn(n, 1)
    else:
        h = 400 if config == "mnist400" else 1200
        sizes, n, likelihood = [784, h, h, 10], 128, bbb.Categorical()
        x, y = torch.rand(n, 784), torch.randint(0, 10, (n,))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(bbb.BayesLinear(a, b, estimator=estimator))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    elbo = bbb.ELBO(likelihood, 60000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        elbo(model, x, y).loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--configs", default="mnist400,uci")
    ap.add_argument("--estimators", default="reparam,local,flipout")
    args = ap.parse_args()
    bbb.tune_allocator()
    bbb.set_kernels("native")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for config in args.configs.split(","):
        inner = 20 if config == "uci" else (5 if config == "mnist400" else 1)
        for estimator in args.estimators.split(","):
            steps = {
                "one node": _with(True, _step(config, estimator)),
                "two nodes": _with(False, _step(config, estimator)),
            }
            times = _interleaved(steps, warmup=5, repeats=args.repeats, inner=inner)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{config:9s} {estimator:8s} one node {med['one node']:8.3f} ms, two nodes "
                f"{med['two nodes']:8.3f} ms, two / one {med['two nodes'] / med['one node']:.3f}"
            )


if __name__ == "__main__":
    main()
