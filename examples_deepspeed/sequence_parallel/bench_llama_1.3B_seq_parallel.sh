#!/usr/bin/env bash
# Benchmark the 1.3B Llama-style benchmark model (docs/reference_numbers.md: 24 layers, hidden 2048, 16 heads,
# SwiGLU FFN 5504, RMSNorm, rotary, vocab 32000) trained with SP=2 on 2 GPUs through tools/bench_e2e.py:
# ms/step, tokens/s, model TFLOP/s per GPU and peak memory, one JSON list (docs/benchmarks.md).
# Overridable: CONFIGS (space-separated seq:zero:recompute, recompute off|on|selective; the default is the
# current SP=2 table's rows), STRATEGY (ulysses|ring|hybrid), BACKEND (cudnn|triton|sdpa_flash), STEPS, WARMUP,
# PROFILE (configs to profile one extra step of), OUT_DIR,
# EXTRA_ARGS (more bench_e2e.py flags, e.g. --model tiny --device cpu), BUDGET_S (skip a config that would not finish within this many seconds of the start; for timed leases).
set -uo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$dir/../.." && pwd)
cd "$root"
source "$dir/launch_env.sh"
python=$(project_python "$root") || exit 2
out=${OUT_DIR:-runs/bench_e2e}
mkdir -p "$out"
configs=${CONFIGS:-"32768:1:off 65536:1:off 131072:1:selective"}
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
  case "$ckpt" in
    on) extra+=(--checkpoint-activations) ;;
    off) ;;
    selective) extra+=(-- --recompute-granularity selective) ;;
    *) echo "bench_llama: error: $config: recompute must be off, on or selective" >&2; exit 2 ;;
  esac
  [[ " ${PROFILE:-} " == *" $config "* ]] && extra=(--profile "${extra[@]}")
  echo "bench_llama: $config (${left}s left)" | tee -a "$out/bench_e2e.log"
  timeout --kill-after 10 "$left" "$python" -m torch.distributed.run --nproc_per_node 2 \
    --master_port "$(rendezvous_port "$python")" tools/bench_e2e.py --seq-length "$seq" \
    --zero-stage "$zero" --strategy "${STRATEGY:-ulysses}" --backend "${BACKEND:-cudnn}" \
    --warmup "$warmup" --steps "$steps" --out "$out/bench_e2e.json" ${EXTRA_ARGS:-} "${extra[@]}" >>"$out/bench_e2e.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then echo "bench_llama: $config failed (rc=$rc): not measured" | tee -a "$out/bench_e2e.log"
  else grep "^bench_e2e:" "$out/bench_e2e.log" | tail -n 1; fi
done
