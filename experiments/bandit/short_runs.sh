#!/usr/bin/env bash
# Short-run comparison used to choose the BBB agent's defaults (issue 6; docs/RESULTS.md,
# bandit section): 1500 steps, 16 updates per step, seeds 0-2 (the slow test uses seeds 3-5).
# Each line is one `bbb bandit` run (about one minute on 2 cores); read the cumulative regret
# from the printed summary or OUT/<name>/metrics.json. Re-running the script after an
# interruption (or a failed run) skips the runs already finished (their metrics.json) and
# continues with the others; a run with a checkpoint resumes from it.
set -euo pipefail
OUT=${OUT:-runs/bandit-short}
common=(--steps 1500 --seeds 0 1 2 --updates-per-step 16 --checkpoint-every 100000 --quiet)
# run NAME FLAGS...: one `bbb bandit` run with the common flags into $OUT/NAME
run() {
  local name=$1 resume=()
  shift
  if [[ -f $OUT/$name/metrics.json ]]; then
    echo "[done] $OUT/$name"
    return 0
  fi
  if compgen -G "$OUT/$name/checkpoints/checkpoint-*.pt" > /dev/null; then resume=(--resume); fi
  echo "[run] $OUT/$name"
  python -m bbb bandit "${common[@]}" "$@" --out "$OUT/$name" "${resume[@]}"
}
run greedy --agents greedy-0.05 greedy-0
mix=(--agents bbb-thompson --prior scale_mixture --prior-pi 0.5 --prior-sigma1 1 --prior-sigma2 0.0024787521766663585)
run mixture "${mix[@]}" --noise-sigma 1 --rho-init -5
run mixture-s1e-1 "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 0.36787944117144233
run mixture-s1e-2 "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 0.1353352832366127
run mixture-s1e1 "${mix[@]}" --noise-sigma 1 --rho-init -5 --prior-sigma1 2.718281828459045
run mixture-rho-3 "${mix[@]}" --noise-sigma 1 --rho-init -3
for n in 3 5 10; do
  run "mixture-noise$n" "${mix[@]}" --noise-sigma "$n" --rho-init -5
done
g=(--agents bbb-thompson --prior gaussian)
run gauss1 "${g[@]}" --prior-sigma 1 --noise-sigma 1 --rho-init -5
run gauss0.1 "${g[@]}" --prior-sigma 0.1 --noise-sigma 1 --rho-init -5
run gauss1-noise0.5 "${g[@]}" --prior-sigma 1 --noise-sigma 0.5 --rho-init -5
run gauss1-rho-3 "${g[@]}" --prior-sigma 1 --noise-sigma 1 --rho-init -3
run gauss1-rho-3-noise0.5 "${g[@]}" --prior-sigma 1 --noise-sigma 0.5 --rho-init -3
