#!/usr/bin/env bash
# Short-run comparison used to choose the BBB agent's defaults (issue 6; docs/RESULTS.md,
# bandit section): 1500 steps, 16 updates per step, seeds 0-2 (the slow test uses seeds 3-5).
# Each line is one `bbb bandit` run (about one minute on 2 cores); read the cumulative regret
# from the printed summary or OUT/<name>/metrics.json.
set -euo pipefail
OUT=${OUT:-runs/bandit-short}
common=(--steps 1500 --seeds 0 1 2 --updates-per-step 16 --checkpoint-every 100000 --quiet)
bbb() { python -m bbb "$@"; }
bbb bandit "${common[@]}" --agents greedy-0.05 greedy-0 --out "$OUT/greedy"
mix=(--agents bbb-thompson --prior scale_mixture --prior-pi 0.5 --prior-sigma1 1 --prior-sigma2 0.0024787521766663585)
bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma 1 --rho-init -5 --out "$OUT/mixture"
bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 0.36787944117144233 --out "$OUT/mixture-s1e-1"
bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 0.1353352832366127 --out "$OUT/mixture-s1e-2"
bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 2.718281828459045 --out "$OUT/mixture-s1e1"
bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma 1 --rho-init -3 --out "$OUT/mixture-rho-3"
for n in 3 5 10; do
  bbb bandit "${common[@]}" "${mix[@]}" --noise-sigma $n --rho-init -5 --out "$OUT/mixture-noise$n"
done
g=(--agents bbb-thompson --prior gaussian)
bbb bandit "${common[@]}" "${g[@]}" --prior-sigma 1 --noise-sigma 1 --rho-init -5 --out "$OUT/gauss1"
bbb bandit "${common[@]}" "${g[@]}" --prior-sigma 0.1 --noise-sigma 1 --rho-init -5 --out "$OUT/gauss0.1"
bbb bandit "${common[@]}" "${g[@]}" --prior-sigma 1 --noise-sigma 0.5 --rho-init -5 --out "$OUT/gauss1-noise0.5"
bbb bandit "${common[@]}" "${g[@]}" --prior-sigma 1 --noise-sigma 1 --rho-init -3 --out "$OUT/gauss1-rho-3"
bbb bandit "${common[@]}" "${g[@]}" --prior-sigma 1 --noise-sigma 0.5 --rho-init -3 --out "$OUT/gauss1-rho-3-noise0.5"
