#!/usr/bin/env bash
# Interleaved A/B of lm_1b training throughput on one machine: a base checkout against this working tree,
# with FSDP-group and reduce-dtype variants, repeated ROUNDS times (the 2-GPU machines vary by up to
# +-25% between runs of the same code, so compare only runs of one call). Produced docs/benchmarks.md's
# "What changed this session" table (base = the previous commit, `git worktree add .base <commit>`).
#   BASE=.base ROUNDS=2 NPROC=2 bash benchmarks/lm_ab.sh        # JSON per run under ${OUT:-ab_logs}/
set -u
OUT=${OUT:-ab_logs}; mkdir -p "$OUT"
BASE=$(cd "${BASE:-.base}" && pwd); NEW=$PWD; N=${NPROC:-2}
export PYTHONUNBUFFERED=1
run() {  # name checkout overrides...
  local name=$1 dir=$2; shift 2; echo "== $name"
  (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python3 benchmarks/lm_train.py \
      --config lm_1b.yaml --nproc "$N" --compile on --steps 50 --warmup 12 --json "$OUT/$name.json" "$@" 2>&1 \
      | grep -v Warning | tail -1)
}
for i in $(seq 1 "${ROUNDS:-2}"); do
  run "base_$i" "$BASE" ${BASE_OVERRIDES:-}  # e.g. BASE_OVERRIDES=parallel.fsdp_group_size=1 for a base that has the key
  run "new_g1_$i" "$NEW" parallel.fsdp_group_size=1
  run "new_g2_$i" "$NEW" parallel.fsdp_group_size=2
  run "new_g4_$i" "$NEW" parallel.fsdp_group_size=4
  run "new_g4_bf16_$i" "$NEW" parallel.fsdp_group_size=4 parallel.reduce_dtype=bf16
done
