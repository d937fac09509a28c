"""torch.optim.Adam(fused=True) vs the default, deterministic and bbb MLP at H=1200: python benchmarks/probes/fused_adam.py reparam (issue 8).

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbb
import bbb.bench as B

if len(sys.argv) != 2 or sys.argv[1] not in bbb.ESTIMATORS:
    sys.exit(f"usage: python {sys.argv[0]} ESTIMATOR (one of {', '.join(bbb.ESTIMATORS)})")
x, y = B.make_data("mlp")
est = sys.argv[1]


def mk(kind: str, fused: bool) -> Callable[[], None]:
    m: nn.Module
    if kind == "det":
        m = B.mlp(784, [1200, 1200], 10)

        def lf() -> Tensor:
            return F.cross_entropy(m(x), y)
    else:
        m = B.make_bbb_model("mlp", 1200, est, "gaussian")
        e = B.ELBO(B.Categorical(), B.DATASET_SIZE)

        def lf() -> Tensor:
            return e(m, x, y).loss

    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=fused, foreach=None if fused else False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        l = lf()
        l.backward()
        opt.step()

    return step


steps = {f"{k}-{'fused' if f else 'loop'}": mk(k, f) for k in ("det", "bbb") for f in (False, True)}
for s in steps.values():
    for _ in range(5):
        s()
for _r in range(2):
    ts: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(10):
        for k, s in steps.items():
            t = time.perf_counter()
            s()
            ts[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
    print(
        {k: round(v, 2) for k, v in med.items()},
        "ratio loop",
        round(med["bbb-loop"] / med["det-loop"], 2),
        "fused",
        round(med["bbb-fused"] / med["det-fused"], 2),
        flush=True,
    )
