#!/usr/bin/env bash
# The step benchmark on a lent GPU (issue 8), as one short command for the `device` tool's
# `run` (its machine has python3 with a CUDA torch, not this repo's .venv):
#
#   run(command="bash benchmarks/gpu.sh", timeout_s=540)       # JSON + log come back in $OUT
#
# Peers are optional: where a folder .whl holds their wheels (bayesian-torch, blitz-bayesian-
# pytorch, torchbnn, pyro-ppl, pyro-api; see the device README on carrying wheels), carry it
# and they are installed first. Sizes as the CPU table; fewer repeats fit the device budget.
set -uo pipefail
OUT=${OUT:-runs/bench-gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout "${BENCH_SECONDS:-480}" python3 -m bbb bench --device cuda --repeats "${REPEATS:-10}" \
  --json "$OUT/step_time_gpu.json" "$@" 2>&1 | tee "$OUT/step_time_gpu.log"
