"""Issue 8: the training step of a small network, where fixed per-step costs dominate.

The UCI protocol's defaults (the ``uci`` configuration of ``trainer_optimizer.py``: one hidden
layer of 50, local, S = 5, learned noise, a Boston-housing-sized batch of 455 x 13), with
``Adam(fused=True)`` and the kernels backend given (default eager): median ms per step over
rounds of 20 steps, after 30 warm-up steps.

``--compare-prior-read`` times, interleaved in this process, the closed-form Gaussian KL
taking the prior's values as Python floats (``Prior._value``, the library since session 18)
against the route before it (``prior.distribution()`` and ``float()`` of its buffers), by
hiding ``GaussianPrior`` from ``bbb.kl`` in the second variant. Otherwise one configuration
is timed; compare commits by running it with ``PYTHONPATH`` at each one's ``src``.

    python benchmarks/probes/small_step.py [--kernels eager|native] [--compare-prior-read]

Run with nothing else on the machine (pause background jobs).
"""

import argparse
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import bbb
from bbb import kl as kl_module
from bbb.bench import _interleaved
from bbb.kernels import use_kernels

if TYPE_CHECKING:  # mypy runs from the repository root
    from benchmarks.probes.trainer_optimizer import _config, _step
else:  # `python benchmarks/probes/THIS.py` finds the file beside this one
    from trainer_optimizer import _config, _step


class _Hidden:  # a class no prior is an instance of: bbb.kl takes its generic route
    pass


def _variant(step: Callable[[], None], floats: bool) -> Callable[[], None]:
    def run() -> None:
        # a monkeypatch: the type checker rightly refuses a class assigned to another's name
        kl_module.GaussianPrior = bbb.GaussianPrior if floats else _Hidden  # type: ignore[misc, assignment]
        try:
            step()
        finally:
            kl_module.GaussianPrior = bbb.GaussianPrior  # type: ignore[misc]

    return run


ap = argparse.ArgumentParser()
ap.add_argument("--kernels", default="eager")
ap.add_argument("--compare-prior-read", action="store_true")
ap.add_argument("--rounds", type=int, default=40)
args = ap.parse_args()
bbb.tune_allocator()
cfg, data, n = _config("uci")
with use_kernels(args.kernels):
    if args.compare_prior_read:
        steps = {
            "prior values as floats": _variant(_step(cfg, data, n, True), True),
            "distribution + float()": _variant(_step(cfg, data, n, True), False),
        }
    else:
        steps = {"step": _step(cfg, data, n, True)}
    times = _interleaved(steps, warmup=30, repeats=args.rounds, inner=20)
for k, v in times.items():
    print(f"uci step ({args.kernels} kernels), {k}: {statistics.median(v):.3f} ms")
