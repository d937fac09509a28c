"""Does libgomp's spin-waiting slow the Bayesian step? (issue 8). One process per setting of
the OpenMP environment (read by libgomp when torch is loaded, so each run is its own process):
the median step time of the deterministic MLP 784-1200-1200-10 and bbb's, interleaved.

    python benchmarks/probes/omp_spin.py            # runs every setting, alternated, 2 rounds
    python benchmarks/probes/omp_spin.py --child ESTIMATOR   # one measurement (internal)

The measurement script behind numbers in docs/RESULTS.md; run with the background jobs paused.
"""

import os
import subprocess
import sys

SETTINGS = {
    "default": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
}


def child(estimator: str) -> None:
    import statistics
    import time

    import bbb
    from bbb.bench import build_step, make_data

    bbb.tune_allocator()
    x, y = make_data("mlp")
    steps = {
        "det": build_step("deterministic", "mlp", 1200, "-", "gaussian", 1, x, y),
        "bbb": build_step("bbb", "mlp", 1200, estimator, "gaussian", 1, x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for it in range(25):
        for k, s in steps.items():
            assert s is not None
            t0 = time.perf_counter()
            s()
            if it >= 5:
                times[k].append(time.perf_counter() - t0)
    det, bay = (statistics.median(times[k]) for k in ("det", "bbb"))
    print(f"det {1e3 * det:.1f} ms, bbb {1e3 * bay:.1f} ms, ratio {bay / det:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
        sys.exit(0)
    estimators = sys.argv[1:] or ["reparam", "local", "flipout"]
    for rnd in range(2):
        for est in estimators:
            for name, env in SETTINGS.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--child", est],
                    env={**os.environ, **env},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                print(f"round {rnd + 1} {est:8s} {name:24s} {out}", flush=True)
