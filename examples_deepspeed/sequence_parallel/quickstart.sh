#!/usr/bin/env bash
# The README's main job: install, prepare the shipped sample corpus, and pretrain a small GPT with
# sequence parallelism (SP=2) through the deepspeed launcher — 2 CPU ranks on gloo without GPUs,
# the first 2 GPUs otherwise. Overridable: ITERS (default 40; rerun with more and it resumes),
# SP_STRATEGY (ulysses | ring | hybrid), ULYSSES_DEGREE (hybrid's Ulysses group size, default 1: two
# one-rank groups around a ring of 2; 2 makes one Ulysses pair and a ring of one), OUT_DIR (default
# runs/quickstart, runs/quickstart_<strategy> for ring and hybrid), PYTHON, MASTER_PORT (default: a free
# port, so that two jobs on one machine do not meet).
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$dir/../.." && pwd)
cd "$root"
source "$dir/launch_env.sh"
python=$(bash tools/install.sh | tail -n 1)
PYTHON=$python bash data/prepare_sample.sh

iters=${ITERS:-40}
strategy=${SP_STRATEGY:-ulysses}
out=${OUT_DIR:-runs/quickstart$([ "$strategy" = ulysses ] || echo "_$strategy")}
strategy_options=(--sequence-parallel-strategy "$strategy")
[ "$strategy" = hybrid ] && strategy_options+=(--ulysses-degree "${ULYSSES_DEGREE:-1}")
mkdir -p "$out"
if [ "$(visible_gpus "$python")" -ge 2 ]; then
  precision="--bf16"; echo "quickstart: 2 GPUs, NCCL"
else
  precision=""; export DS_ACCELERATOR=cpu; echo "quickstart: fewer than 2 GPUs; 2 CPU ranks on gloo"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$python" -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(rendezvous_port "$python")" pretrain_gpt.py \
  --sequence-parallel-size 2 "${strategy_options[@]}" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 256 \
  --normalization rmsnorm --swiglu --use-rotary-position-embeddings --disable-bias-linear \
  --micro-batch-size 4 --global-batch-size 4 --train-iters "$iters" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 4 --weight-decay 0.1 --clip-grad 1.0 \
  --attention-dropout 0 --hidden-dropout 0 \
  --data-path data/processed/sample_text_document --split 98,2,0 --data-cache-path "$out/index-cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model data/processed/sample.model \
  --zero-stage 1 $precision \
  --log-interval 5 --eval-interval 20 --eval-iters 2 \
  --save "$out/checkpoints" --load "$out/checkpoints" --save-interval 20 \
  --tensorboard-dir "$out/tensorboard"
abs_out=$(cd "$out" && pwd)
echo "quickstart: checkpoints in $abs_out/checkpoints, TensorBoard logs in $abs_out/tensorboard"
echo "            (view them: $(dirname "$python")/tensorboard --logdir $abs_out/tensorboard)"
