#!/usr/bin/env bash
# Builds the sample corpus for the quickstart: a sentencepiece tokenizer and the Megatron-format
# indexed dataset data/processed/sample_text_document.{bin,idx}. Run from the repo root; each step
# is skipped when its outputs already exist (delete data/processed/ to start over).
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=data/processed
VOCAB_SIZE=${VOCAB_SIZE:-8000}
WORKERS=${WORKERS:-2}
CORPUS=data/sample/austen.jsonl

if [[ ! -f "$CORPUS" ]]; then
    echo "error: $CORPUS not found; run this script from the repository root" >&2
    exit 2
fi
mkdir -p "$OUT"

if [[ -f "$OUT/sample.model" ]]; then
    echo "tokenizer: $OUT/sample.model exists, skipping"
else
    "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --json-keys text \
        --vocab-size "$VOCAB_SIZE" --model-prefix "$OUT/sample"
fi

if [[ -f "$OUT/sample_text_document.bin" && -f "$OUT/sample_text_document.idx" \
      && ! "$OUT/sample.model" -nt "$OUT/sample_text_document.idx" ]]; then
    echo "dataset: $OUT/sample_text_document.{bin,idx} exist, skipping"
else
    "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --json-keys text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/sample.model" \
        --append-eod --workers "$WORKERS" --output-prefix "$OUT/sample"
fi

echo "ready: --data-path $OUT/sample_text_document --tokenizer-type SentencePieceTokenizer" \
     "--tokenizer-model $OUT/sample.model"
