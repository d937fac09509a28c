"""The pair the probes compare: the deterministic MLP 784-1200-1200-10 and bbb's (Gaussian
prior, closed-form KL, S=1) on one synthetic MNIST-shaped batch of 128, allocator tuned."""

from torch import Tensor, nn

import bbb
from bbb.bench import DATASET_SIZE, make_bbb_model, make_data


def pair(estimator: str) -> tuple[Tensor, Tensor, nn.Module, nn.Module, bbb.ELBO]:
    """(x, y, deterministic network, Bayesian network, the Bayesian network's ELBO)."""
    bbb.tune_allocator()
    x, y = make_data("mlp")
    det = nn.Sequential(
        nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10)
    )
    bay = make_bbb_model("mlp", 1200, estimator, "gaussian")
    return x, y, det, bay, bbb.ELBO(bbb.Categorical(), DATASET_SIZE)


def time_phases(nets: dict, opts: dict, rounds: int = 40, warmup: int = 8) -> dict[str, float]:
    """Interleave one Adam step of each ``nets[k] = (model, loss_fn)`` per round; print the
    median forward / backward / Adam / whole-step ms and the ratio to ``nets["det"]``;
    return each net's median whole step (seconds)."""
    import statistics
    import time

    times: dict[str, dict[str, list[float]]] = {
        k: {"f": [], "b": [], "a": [], "all": []} for k in nets
    }
    for it in range(rounds):
        for k, (_m, fn) in nets.items():
            o = opts[k]
            t0 = time.perf_counter()
            o.zero_grad(set_to_none=True)
            loss = fn()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            o.step()
            t3 = time.perf_counter()
            if it >= warmup:
                for p, dt in (("f", t1 - t0), ("b", t2 - t1), ("a", t3 - t2), ("all", t3 - t0)):
                    times[k][p].append(dt)
    d = statistics.median(times["det"]["all"])
    for k, v in times.items():
        print(
            f"{k:15s}",
            " ".join(f"{p} {1e3 * statistics.median(s):.1f}" for p, s in v.items()),
            f"ratio {statistics.median(v['all']) / d:.2f}",
        )
    return {k: statistics.median(v["all"]) for k, v in times.items()}
