#!/usr/bin/env bash
# The multi-GPU figures of docs/benchmarks.md on one host of NGPU GPUs, section after section in one call:
#   engines  lm_1b through launch, compiled: FSDP2, DeepSpeed ZeRO-2, ZeRO-3; at >= 4 GPUs also HSDP
#            (parallel.dp_replicate=2). Tokens/s/GPU, MFU, peak memory, the dry-run estimate.
#   peers    lm_1b against the naive FSDP2 yardstick (eager and compiled) and torchtitan
#            (benchmarks/peers/compare.py: the ratios to ours).
#   sana     SANA-1.6B at 1024 px through launch, model.kernels=torch and triton.
#   coat     Llama-2-7B shape, seq 2048, FSDP2 by block over NGPU: BF16 vs COAT vs torchao float8 (tensorwise,
#            rowwise) at micro-batch 1, 2, 4, 8 (the largest that fits ends each mode's list), per-GPU figures.
#   nvila    NVILA-8B stage 3 (nvila_8b_stage3_llm_pretrain.yaml, synthetic conversations) with FSDP2 and with
#            ZeRO-3, 20 steps: samples/s, visual tokens per sample, peak memory against the dry-run plan.
#   tp       tp=2 against tp=1: losses over 20 steps, lm_1b tokens/s tp=2 vs FSDP2 alone (2 GPUs); with one GPU
#            only the tp=1 exactness test (megatron's layers equal the plain model) runs.
# Usage, from the repository root with the package importable (PYTHONPATH=$PWD or an installed checkout):
#   NGPU=2 bash benchmarks/multi_gpu.sh [SECTION...]                   # default: every section
#   NGPU=1 LAYERS=2 STEPS=8 WARMUP=3 bash benchmarks/multi_gpu.sh      # reduced: every model cut to LAYERS blocks
#   MODE=dry bash benchmarks/multi_gpu.sh     # any machine: every script exists and parses its arguments; the
#                                             # launch-based rows run `launch --dry-run` (config and plan checks)
#   MODE=smoke bash benchmarks/multi_gpu.sh   # CPU: tiny configs, 2 gloo processes, a few steps
# Knobs: NGPU (default: every visible GPU), LAYERS, STEPS, WARMUP, NVILA_MICRO (default 4), PEERS_ROWS (compare.py
# rows, default 1,5,6,7,11; row 0, ours, always runs), OUT (logs,
# default multi_gpu_logs/<section>.log), PYTHON (default python3). Exit status 1 when any command failed.
set -uo pipefail
export PYTHONUNBUFFERED=1
MODE=${MODE:-run}
PY=${PYTHON:-python3}
case $MODE in
  run) N=${NGPU:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')} ;;
  dry|smoke) N=${NGPU:-2} ;;
  *) echo "MODE=$MODE: one of run, dry, smoke" >&2; exit 2 ;;
esac
L=${LAYERS:-}
OUT=${OUT:-multi_gpu_logs}; mkdir -p "$OUT"
status=0

# bench SCRIPT ARGS...: run it (run, smoke); MODE=dry checks it instead: `--dry-run` where the script has one
# (launch --dry-run of each of its rows), else benchmarks/argcheck.py (the script exists, its arguments parse)
bench() {
  local script=$1; shift
  [ -f "$script" ] || { echo "FAILED: $script does not exist"; status=1; return; }
  echo "+ $script $*"
  if [ "$MODE" = dry ]; then
    case $script in
      */lm_train.py|*/sana_train.py|*/tp_llm.py|*/compare.py) "$PY" "$script" "$@" --dry-run ;;
      *) "$PY" benchmarks/argcheck.py "$script" "$@" ;;
    esac
  else
    "$PY" "$script" "$@"
  fi || { echo "FAILED: $script $*"; status=1; }
}

# spmd SCRIPT ARGS...: the script under torchrun, one process per GPU (MODE=dry: as bench)
spmd() {
  if [ "$MODE" = dry ]; then bench "$@"; return; fi
  local script=$1; shift
  echo "+ torchrun --nproc-per-node $N $script $*"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" "$script" "$@" || { echo "FAILED: $script $*"; status=1; }
}

steps() { echo "${STEPS:-$1}"; }
warmup() { echo "${WARMUP:-$1}"; }

section_engines() {
  if [ "$MODE" = smoke ]; then
    bench benchmarks/lm_train.py --config lm_tiny.yaml --nproc "$N" --engine fsdp2 zero2 zero3 --compile off \
      --steps 3 --warmup 1 --micro-batch 2
    bench benchmarks/lm_train.py --config lm_tiny.yaml --nproc 4 --compile off --steps 3 --warmup 1 \
      --micro-batch 2 parallel.dp_replicate=2
    return
  fi
  bench benchmarks/lm_train.py --config lm_1b.yaml --nproc "$N" --engine fsdp2 zero2 zero3 --compile on \
    --steps "$(steps 30)" --warmup "$(warmup 10)" --json "$OUT/engines.json" ${L:+model.n_layers=$L}
  if [ "$N" -ge 4 ] || [ "$MODE" = dry ]; then
    local n=$(( N >= 4 ? N : 4 ))
    bench benchmarks/lm_train.py --config lm_1b.yaml --nproc "$n" --engine fsdp2 --compile on \
      --steps "$(steps 30)" --warmup "$(warmup 10)" --json "$OUT/engines_hsdp.json" parallel.dp_replicate=2 \
      ${L:+model.n_layers=$L}
  fi
}

section_peers() {
  if [ "$MODE" = smoke ]; then
    bench benchmarks/peers/compare.py --smoke --nproc "$N"
    return
  fi
  # rows (compare.py's numbering): 0 ours, 1 ours with model.kernels=triton, 5 / 6 the naive GPT script eager /
  # compiled, 7 the naive script on lm_1b's Llama dims, 11 torchtitan 0.2.2 (its wheels: benchmarks/peers/torchtitan_wheels.sh)
  bench benchmarks/peers/compare.py --nproc "$N" --steps "$(steps 30)" --warmup "$(warmup 10)" \
    --only "${PEERS_ROWS:-1,5,6,7,11}" --json "$OUT/peers.json" ${L:+--layers $L}
}

section_sana() {
  if [ "$MODE" = smoke ]; then
    bench benchmarks/sana_train.py --config sana_tiny.yaml --nproc "$N" --micro-batch 2 --steps 3 --warmup 1 \
      --kernels torch triton --ac none --compile off
    return
  fi
  bench benchmarks/sana_train.py --nproc "$N" --micro-batch 8 --steps "$(steps 20)" --warmup "$(warmup 8)" \
    --kernels torch triton --ac none --compile on ${L:+model.depth=$L}
}

section_coat() {
  if [ "$MODE" = smoke ]; then
    spmd benchmarks/coat_memory.py --smoke
    return
  fi
  local model=(--model llama2-7b)
  [ -n "$L" ] && model=(--model llama2-7b-cut --layers "$L")
  spmd benchmarks/coat_memory.py "${model[@]}" --seq 2048 --micro 1,2,4,8 --modes bf16,coat,ao_tensor,ao_row \
    --steps "$(steps 5)"
}

section_nvila() {
  local synthetic=(data.kind=synthetic "data.sources=[]" data.num_workers=0 model.tokenizer=byte model.init_from=null
                   model.init_from_run=null model.vision_init_from=null model.llm.init_from=null cluster.kind=local)
  if [ "$MODE" = smoke ]; then
    bench benchmarks/lm_train.py --config nvila_tiny.yaml --nproc "$N" --engine fsdp2 zero3 --compile off \
      --steps 3 --warmup 1 --micro-batch 2
    return
  fi
  bench benchmarks/lm_train.py --config nvila_8b_stage3_llm_pretrain.yaml --nproc "$N" --engine fsdp2 zero3 \
    --compile off --steps "$(steps 20)" --warmup "$(warmup 5)" --micro-batch "${NVILA_MICRO:-4}" \
    --json "$OUT/nvila_stage3.json" "${synthetic[@]}" ${L:+model.llm.n_layers=$L}
}

section_tp() {
  if [ "$MODE" = smoke ]; then
    bench benchmarks/tp_llm.py --check --smoke
    return
  fi
  if [ "$N" -ge 2 ] || [ "$MODE" = dry ]; then
    bench benchmarks/tp_llm.py --check --steps "$(steps 20)"
    bench benchmarks/tp_llm.py --bench --bench-steps "$(steps 30)" --warmup "$(warmup 10)" ${L:+--layers $L}
  fi
  if [ "$N" -lt 2 ] || [ "$MODE" = dry ]; then
    echo "tp: tp=2 needs 2 GPUs; on one GPU the tp=1 exactness test (megatron-core's layers = the plain model)"
    if [ "$MODE" = dry ]; then
      [ -f tests/platform/test_tensor_parallel.py ] || { echo "FAILED: tests/platform/test_tensor_parallel.py"; status=1; }
    else
      "$PY" -m pytest -x -q -p no:cacheprovider -m gpu tests/platform/test_tensor_parallel.py -k tp1 \
        || { echo "FAILED: the tp=1 exactness test"; status=1; }
    fi
  fi
}

SECTIONS=(engines peers sana coat nvila tp)
[ $# -gt 0 ] && SECTIONS=("$@")
for s in "${SECTIONS[@]}"; do
  declare -F "section_$s" > /dev/null || { echo "unknown section $s (engines peers sana coat nvila tp)" >&2; exit 2; }
done
for s in "${SECTIONS[@]}"; do
  echo "== $s: MODE=$MODE, $N GPU(s)${L:+, models cut to $L layers}, $(date -u +%FT%TZ)"
  section_"$s" > >(tee "$OUT/$s.log") 2>&1  # not a pipe: the section runs in this shell and sets status
done
wait
exit $status
