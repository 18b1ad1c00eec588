#!/usr/bin/env bash
# Benchmark issue 7's Llama-style 1.3B (24 layers, hidden 2048, SwiGLU 5504, vocab 32000) trained with SP=2 on
# 2 GPUs through tools/bench_e2e.py: ms/step, tokens/s, model TFLOP/s per GPU and peak memory, one JSON list.
# Overridable: CONFIGS (space-separated seq:zero:ckpt, ckpt on|off), STRATEGY (ulysses|ring|hybrid), BACKEND
# (cudnn|triton|sdpa_flash), STEPS, WARMUP, PROFILE (configs to profile one extra step of), OUT_DIR,
# EXTRA_ARGS (more bench_e2e.py flags, e.g. --model tiny --device cpu), BUDGET_S (skip a config that would not finish within this many seconds of the start; for timed leases).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=${OUT_DIR:-runs/bench_e2e}
mkdir -p "$out"
configs=${CONFIGS:-"32768:1:off 32768:3:off 65536:3:off 65536:3:on 131072:3:on 16384:3:off"}
budget=${BUDGET_S:-100000}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's op builder rejects 9.0a
start=$SECONDS
for config in $configs; do
  IFS=: read -r seq zero ckpt <<<"$config"
  warmup=${WARMUP:-2} steps=${STEPS:-4}
  # rough cost of one config, start-up (imports, 1.3B init, ZeRO partitioning) included; 128k steps take ~10 s
  need=75
  if [ "$seq" -ge 131072 ]; then warmup=1 steps=${STEPS:-3} need=120; fi
  left=$((budget - (SECONDS - start)))
  if [ "$left" -lt "$need" ]; then
    echo "bench_llama: skipped $config (${left}s left, needs ~${need}s): not measured" | tee -a "$out/bench_e2e.log"
    continue
  fi
  extra=()
  [ "$ckpt" = on ] && extra+=(--checkpoint-activations)
  [[ " ${PROFILE:-65536:3:off} " == *" $config "* ]] && extra+=(--profile)
  echo "bench_llama: $config (${left}s left)" | tee -a "$out/bench_e2e.log"
  timeout --kill-after 10 "$left" torchrun --nproc_per_node 2 tools/bench_e2e.py --seq-length "$seq" \
    --zero-stage "$zero" --strategy "${STRATEGY:-ulysses}" --backend "${BACKEND:-cudnn}" \
    --warmup "$warmup" --steps "$steps" --out "$out/bench_e2e.json" "${extra[@]}" ${EXTRA_ARGS:-} >>"$out/bench_e2e.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then echo "bench_llama: $config failed (rc=$rc): not measured" | tee -a "$out/bench_e2e.log"
  else grep "^bench_e2e:" "$out/bench_e2e.log" | tail -n 1; fi
done
