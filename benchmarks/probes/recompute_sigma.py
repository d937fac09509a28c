"""Issue 8: the native layer node recomputing sigma in its backward against keeping it.

Since session 19 ``bbb.kernels.native_layer_sample_and_kl`` asks ``bbb._native.sample_kl_fwd``
not to write sigma (``keep_sigma=False``) and its backward recomputes it from rho with the
forward's formula (the same bits): one weight-sized tensor fewer to write, hold and read. The
"keep" variant forces ``keep_sigma=True`` inside this process (what the node did before).
Adam steps of the MLPs of ``layer_node.py`` (native kernels, Gaussian prior, closed-form KL,
S = 1), both variants timed interleaved in one process (median of the rounds, ms per step).

    python benchmarks/probes/recompute_sigma.py [--repeats 40] [--configs mnist1200,mnist400,uci]

Run with nothing else on the machine (pause background jobs).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from layer_node import _step

import bbb
from bbb import _native
from bbb.bench import _interleaved

_fwd = _native.sample_kl_fwd


def _keep(*args, keep_sigma: bool = True, **kw):  # type: ignore[no-untyped-def]
    return _fwd(*args, keep_sigma=True, **kw)


def _with(keep: bool, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        _native.sample_kl_fwd = _keep if keep else _fwd  # type: ignore[assignment]
        try:
            step()
        finally:
            _native.sample_kl_fwd = _fwd  # type: ignore[assignment]

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--configs", default="mnist1200,mnist400,uci")
    ap.add_argument("--estimators", default="reparam,local,flipout")
    args = ap.parse_args()
    bbb.tune_allocator()
    bbb.set_kernels("native")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for config in args.configs.split(","):
        inner = 20 if config == "uci" else (5 if config == "mnist400" else 1)
        for estimator in args.estimators.split(","):
            steps = {
                "recompute": _with(False, _step(config, estimator)),
                "keep": _with(True, _step(config, estimator)),
            }
            times = _interleaved(steps, warmup=5, repeats=args.repeats, inner=inner)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{config:9s} {estimator:8s} recompute {med['recompute']:8.3f} ms, keep "
                f"{med['keep']:8.3f} ms, recompute / keep {med['recompute'] / med['keep']:.3f}"
            )


if __name__ == "__main__":
    main()
