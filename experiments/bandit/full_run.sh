#!/usr/bin/env bash
# The full Mushroom bandit of issue 6 (50000 steps, seeds 0-4, 64 updates per step) as three
# resumable one-thread processes, so that both CPU cores work and the run can span sessions:
#
#   experiments/bandit/full_run.sh start     # start (or resume) the three parts in the background
#   experiments/bandit/full_run.sh status    # steps done per part (from the newest checkpoint)
#   experiments/bandit/full_run.sh merge     # when all three are done: one run directory
#
# Parts: the BBB agent (5 networks, ~5.4 steps/s alone on one core), greedy 0% + 1% (10
# networks) and greedy 5% (5 networks). Logs in $OUT/<part>.log. `bbb bandit --merge` checks
# that the parts share seeds and settings and have the same number of steps done.
#
# Variants (environment): SEEDS (default "0 1 2 3 4"; other seeds check a choice made on
# these), PARTS picks parts (default "bbb greedy-a greedy-b"), EXTRA adds
# `bbb bandit` flags to every part started (give the same EXTRA when resuming: a resumed run
# refuses other settings), MERGE_WITH adds finished run directories to `merge`. E.g. a Bayesian
# variant compared with the greedy parts of the full run:
#
#   OUT=runs/bandit-noise003 PARTS=bbb EXTRA="--noise-sigma 0.03" experiments/bandit/full_run.sh start
#   OUT=runs/bandit-noise003 PARTS=bbb \
#     MERGE_WITH="runs/bandit-full/greedy-a runs/bandit-full/greedy-b" experiments/bandit/full_run.sh merge
set -euo pipefail
OUT=${OUT:-runs/bandit-full}
STEPS=${STEPS:-50000}
read -r -a parts <<< "${PARTS:-bbb greedy-a greedy-b}"
read -r -a extra <<< "${EXTRA:-}"
read -r -a seeds <<< "${SEEDS:-0 1 2 3 4}"
read -r -a merge_with <<< "${MERGE_WITH:-}"
for part in "${parts[@]}"; do
  case $part in
    bbb | greedy-a | greedy-b) ;;
    *)
      echo "unknown part '$part' in PARTS; accepted values: bbb greedy-a greedy-b" >&2
      exit 2
      ;;
  esac
done
agents_bbb=(bbb-thompson)
agents_greedy_a=(greedy-0 greedy-0.01)
agents_greedy_b=(greedy-0.05)

agents_of() {
  case $1 in
    bbb) echo "${agents_bbb[@]}" ;;
    greedy-a) echo "${agents_greedy_a[@]}" ;;
    greedy-b) echo "${agents_greedy_b[@]}" ;;
  esac
}

case ${1:-} in
  start)
    mkdir -p "$OUT"
    for part in "${parts[@]}"; do
      dir=$OUT/$part
      # the run directory as a literal inside the pattern (its dots and brackets escaped)
      dir_re=$(printf '%s' "$dir" | sed 's/[][\.*^$()+?{}|]/\\&/g')
      if pgrep -f -- "--out $dir_re/?( |\$)" > /dev/null; then
        echo "$part is already running (not started twice)"
        continue
      fi
      resume=()
      if compgen -G "$dir/checkpoints/checkpoint-*.pt" > /dev/null; then resume=(--resume); fi
      # shellcheck disable=SC2046
      OMP_NUM_THREADS=1 nohup python -m bbb bandit --agents $(agents_of "$part") \
        --steps "$STEPS" --seeds "${seeds[@]}" --checkpoint-every 1000 --quiet \
        --out "$dir" "${resume[@]}" "${extra[@]}" >> "$OUT/$part.log" 2>&1 &
      echo "started $part (pid $!)"
    done
    ;;
  status)
    for part in "${parts[@]}"; do
      last=$( (ls "$OUT/$part/checkpoints" 2>/dev/null || true) | sort | tail -1)
      echo "$part: ${last:-no checkpoint yet}"
    done
    ;;
  merge)
    dirs=()
    for part in "${parts[@]}"; do dirs+=("$OUT/$part"); done
    python -m bbb bandit --merge "${dirs[@]}" "${merge_with[@]}" --out "$OUT/merged"
    ;;
  *)
    echo "usage: $0 start|status|merge" >&2
    exit 2
    ;;
esac
