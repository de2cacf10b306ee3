#!/usr/bin/env bash
# Interleaved A/B of lm_1b training throughput on one machine: each variant is a checkout (a base from
# `git worktree add .base <commit>`, or . for this working tree) plus config overrides, run in the given
# order, ROUNDS times. The 2-GPU machines vary by up to +-25% between runs of the same code, so compare
# only runs of one call. Produces the same-machine tables of docs/benchmarks.md.
#   ROUNDS=1 NPROC=2 bash benchmarks/lm_ab.sh "base:.base" "new:." "new_bf16:.:parallel.reduce_dtype=bf16"
# One JSON per run under ${OUT:-ab_logs}/ (NAME_ROUND.json); STEPS/WARMUP set the run length.
set -u
OUT=${OUT:-ab_logs}; mkdir -p "$OUT"
N=${NPROC:-2}
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || { echo "usage: bash benchmarks/lm_ab.sh NAME:CHECKOUT[:OVERRIDES] ..." >&2; exit 2; }
run() {  # name checkout overrides...
  local name=$1 dir; dir=$(cd "$2" && pwd); shift 2; echo "== $name"
  (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python3 benchmarks/lm_train.py \
      --config lm_1b.yaml --nproc "$N" --compile on --steps "${STEPS:-50}" --warmup "${WARMUP:-12}" \
      --json "$OUT/$name.json" "$@" 2>&1 | grep -v Warning | tail -1)
}
for i in $(seq 1 "${ROUNDS:-1}"); do
  for spec in "$@"; do
    IFS=: read -r name dir overrides <<< "$spec"
    # shellcheck disable=SC2086  # overrides: space-separated key=value words
    run "${name}_$i" "$dir" ${overrides:-}
  done
done
