#!/usr/bin/env bash
# Reproduces the GPU figures of docs/benchmarks.md on a 2-GPU node (run from the repo root with the
# package importable, e.g. PYTHONPATH=$PWD). Logs go to ${OUT:-gpu_logs}/. Sections: kernels lm lm-variants lm-profile host-overhead sana nvila
# vs-liger peers sana-1gpu coat coat-loss coat-sana sparse-sweep sana-depthwise (the last eight on one GPU).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
for section in "$@"; do
  case $section in
    kernels) python3 benchmarks/kernels/run_all.py --check 2>&1 | tee "$OUT/kernels_check.log" ;;
    lm) python3 benchmarks/lm_train.py --config lm_1b.yaml --nproc 1 2 --compile off on --steps 40 --warmup 15 \
          --json "$OUT/lm_1b.json" 2>&1 | tee "$OUT/lm_1b.log" ;;
    lm-variants)  # FSDP2 knobs on 2 GPUs, compiled: keep the blocks' bf16 parameters between forward and backward
      python3 benchmarks/lm_train.py --config lm_1b.yaml --nproc 2 --compile on --steps 40 --warmup 15 \
          parallel.reshard_after_forward=false 2>&1 | tee "$OUT/lm_1b_variants.log" ;;
    lm-profile)  # torch.profiler over steps 20-22, compiled, on ${NPROC:-2} GPUs: top operators and the timeline summary
      n=${NPROC:-2}; rm -rf /tmp/sf_profile
      python3 -m scaleforge.launch.cli --config lm_1b.yaml --nproc $n --resume none trainer.max_steps=23 \
          trainer.global_batch_size=$((4 * n)) parallel.compile=true metrics.profile_start_step=20 metrics.profile_steps=3 \
          metrics.wandb.mode=disabled metrics.progress_bar=false run.output_dir=/tmp/sf_profile run.name=lm_1b \
          ${LM_OVERRIDES:-} > "$OUT/lm_profile_${n}gpu.log" 2>&1
      for t in top_ops top_ops_host top_ops_by_shape; do cp "/tmp/sf_profile/lm_1b/profile/$t.txt" "$OUT/lm_profile_${n}gpu_$t.txt"; done
      python3 benchmarks/trace_summary.py /tmp/sf_profile/lm_1b/profile/trace_rank0_steps20-22.json --steps 3 \
          --callers 'aten::(fill_|copy_|_foreach_copy_|zero_)' \
          | tee "$OUT/lm_profile_${n}gpu_timeline.md" ;;
    host-overhead) python3 benchmarks/kernels/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log" ;;
    sana)
      for n in 1 2; do
        echo "== SANA 1.6B, 1024px (32x32 latents), $n GPU(s), through launch"
        python3 benchmarks/sana_train.py --nproc $n --micro-batch 8 --steps 12 --warmup 4 --kernels torch triton --ac none --compile off on
      done 2>&1 | tee "$OUT/sana.log" ;;
    sparse-sweep)  # every block-sparse launch configuration (the key index table among them), k-means, the budget's
      # threshold search and Twilight decode stages (issue: SVG2 + Twilight), ~4 min on one H100
      timeout 300 python3 benchmarks/kernels/sparse_attention_sweep.py 2>&1 | tee "$OUT/sparse_sweep.log" ;;
    sana-depthwise) python3 benchmarks/kernels/sana_depthwise.py 2>&1 | tee "$OUT/sana_depthwise.log" ;;
    vs-liger) python3 benchmarks/kernels/vs_liger.py --only ${LIGER_FAMILIES:-rms_norm,layer_norm,swiglu,flce} 2>&1 \
          | tee "$OUT/vs_liger.log" ;;
    peers)  # ours against the naive FSDP2 script and torchtitan (row 11: its wheels from benchmarks/peers/torchtitan_wheels.sh)
      # on one GPU: PEER_ROWS of compare.py (row 0 always runs; 1,2,3,4,6,8,11 for the full picture, ~9 min)
      python3 benchmarks/peers/compare.py --nproc 1 --steps ${STEPS:-20} --warmup ${WARMUP:-8} --timeout 170 \
          --only ${PEER_ROWS:-1,4,6} --json "$OUT/peers.json" 2>&1 | tee "$OUT/peers.log" ;;
    torchtitan)  # compare.py's row 11 alone (torchtitan 0.2.2; its RESULT line: tokens/s/GPU, MFU, peak memory)
      timeout 200 torchrun --standalone --nproc-per-node 1 benchmarks/peers/torchtitan022_lm_1b.py --steps ${STEPS:-20} \
          --warmup ${WARMUP:-8} 2>&1 | tail -40 | tee "$OUT/torchtitan.log" ;;
    sana-1gpu)  # SANA-1.6B at 1024 px through launch, compiled, no AC: as configured (CAME-8bit with its update compiled,
      # EMA; two more steps profiled: timeline summary and operator tables) and with CAME eager (optim.fused=false); SANA_ALL=1
      # adds AdamW without EMA (the optimizer's share of the step) and eager (compile's share)
      rm -rf /tmp/sana_prof
      variants=("--profile-to /tmp/sana_prof" "optim.fused=false")
      [ "${SANA_ALL:-0}" = 1 ] && variants+=("optim.name=adamw optim.betas=[0.9,0.999] optim.ema_decay=0" "--compile off")
      for extra in "${variants[@]}"; do
        echo "== $extra"
        # shellcheck disable=SC2086  # extra: space-separated words
        timeout 240 python3 benchmarks/sana_train.py $extra --nproc 1 --micro-batch 8 --steps ${STEPS:-10} --warmup 4 \
            --kernels triton --ac none
      done 2>&1 | tee "$OUT/sana_1gpu.log"
      p=/tmp/sana_prof/triton_none_on
      python3 benchmarks/trace_summary.py $p/trace_rank0_*.json --steps 2 2>&1 | tee "$OUT/sana_timeline.md"
      cp $p/top_ops.txt "$OUT/sana_top_ops.txt"; cp $p/top_ops_host.txt "$OUT/sana_top_ops_host.txt" ;;
    coat)  # COAT FP8 (issue 16), one GPU, ~6 min: the fused FP8 AdamW kernel against the unfused ops and the
      # reference, saved bytes and kernels per Llama-2-7B block, then BF16 / COAT / torchao float8 memory and speed
      { python3 -m pytest -q tests/kernels/test_fp8.py -k adamw
        python3 benchmarks/coat_saved_bytes.py --seq 2048 --kernels triton --summary
        python3 benchmarks/coat_saved_bytes.py --seq 2048 --kernels triton --count-launches
        timeout 480 python3 benchmarks/coat_memory.py --model llama2-7b-cut --layers 2 --seq 2048 --micro 1,4,8,16 \
            --modes bf16,coat,coat_unfused,ao_tensor,ao_row --steps 3; } 2>&1 | tee "$OUT/coat.log" ;;
    coat-loss)  # lm_1b BF16 vs COAT over 300 steps (~4 min): the loss line and the curves' CSV
      timeout 540 python3 benchmarks/coat_memory.py --model lm_1b --micro 2 --modes bf16,coat --steps 3 --loss-steps 300 \
          --loss-csv "$OUT/coat_loss.csv" 2>&1 | tee "$OUT/coat_loss.log" ;;
    coat-sana) timeout 540 python3 benchmarks/coat_memory.py --model sana-1.6b --seq 1024 --micro 1,4,8 --steps 3 2>&1 \
          | tee "$OUT/coat_sana.log" ;;
    nvila) torchrun --nproc-per-node 2 benchmarks/nvila_step.py --steps 4 --warmup 2 2>&1 | tee "$OUT/nvila.log" ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
