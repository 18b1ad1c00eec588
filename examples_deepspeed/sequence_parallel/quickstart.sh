#!/usr/bin/env bash
# The README's main job: install, prepare the shipped sample corpus, and pretrain a small GPT with
# sequence parallelism (SP=2) through the deepspeed launcher — 2 CPU ranks on gloo without GPUs,
# the first 2 GPUs otherwise. Overridable: ITERS, SP_STRATEGY (ulysses|ring|hybrid), OUT_DIR, PYTHON.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
python=$(bash tools/install.sh | tail -n 1)
PYTHON=$python bash data/prepare_sample.sh

out=${OUT_DIR:-runs/quickstart}
iters=${ITERS:-40}
mkdir -p "$out"
if command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  precision="--bf16"; echo "quickstart: 2 GPUs, NCCL"
else
  precision=""; export DS_ACCELERATOR=cpu; echo "quickstart: no GPUs; 2 CPU ranks on gloo"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$(dirname "$python")/deepspeed" --num_gpus 2 pretrain_gpt.py \
  --sequence-parallel-size 2 --sequence-parallel-strategy "${SP_STRATEGY:-ulysses}" \
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
echo "quickstart: checkpoints in $out/checkpoints, TensorBoard logs in $out/tensorboard"
echo "            (tensorboard --logdir $out/tensorboard)"
