# Shared second half of the ds_pretrain_gpt_*_seq_parallel.sh recipes (sourced, not run): TINY mode,
# GPU count and DP size, the data and tokenizer, the DeepSpeed JSON from ds_config_gpt_TEMPLATE.json,
# the pretrain_gpt.py flags, and the launch (deepspeed, deepspeed + hostfile, or srun; DRY_RUN=1 plans).
# Expects the recipe's variables (model, seq_len, batch, sp_*, zero_stage, lr_*, data, output dirs), $dir, $root.

if [ "${TINY:-0}" = 1 ]; then
  # 2 layers on 2 CPU ranks (gloo), fp32, 2 iterations: checks the recipe end to end without a GPU.
  model_size=tiny; num_layers=2; hidden_size=64; num_attn_heads=4; seq_len=128
  global_batch_size=${GLOBAL_BATCH_SIZE:-2}; micro_batch_size=${MICRO_BATCH_SIZE:-1}
  sp_size=${SP_SIZE:-2}; train_iters=${TRAIN_ITERS:-2}; precision=fp32
  NUM_GPUS=2; num_gpus_per_node=2; log_interval=1; eval_interval=1000; eval_iters=1; save_interval=1000
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  output_dir=${OUTPUT_DIR:-$root/runs/gpt_tiny_seq_parallel}  # never the real run's checkpoints
  checkpoint_path=${CHECKPOINT_PATH:-$output_dir/checkpoint}
  tensorboard_path=${TENSORBOARD_DIR:-$output_dir/tensorboard}
fi

## The recipe's settings, checked before anything is written or launched: one error line each
bad_setting() { echo "error: $1 must be $2, got '$3'" >&2; exit 2; }
for name in num_layers hidden_size num_attn_heads seq_len global_batch_size micro_batch_size zero_stage \
            train_tokens log_interval eval_interval eval_iters save_interval ${train_iters:+train_iters}; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || bad_setting "${name^^}" "a whole number" "${!name}"
done
[[ "$sp_size" =~ ^([1-9][0-9]*|auto)$ ]] || bad_setting SP_SIZE "a positive whole number or auto" "$sp_size"
[[ "$pp_size" =~ ^[1-9][0-9]*$ ]] || bad_setting PP_SIZE "a positive whole number" "$pp_size"
[[ -z "${NUM_GPUS:-}" || "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || bad_setting NUM_GPUS "a positive whole number" "$NUM_GPUS"
case "$precision" in bf16|fp32) ;; *) bad_setting PRECISION "bf16 or fp32" "$precision" ;; esac
case "$offload_optimizer" in none|cpu) ;; *) bad_setting OFFLOAD_OPTIMIZER "none or cpu" "$offload_optimizer" ;; esac
case "$activation_checkpoint" in true|selective|false) ;;
  *) bad_setting ACTIVATION_CHECKPOINT "true, selective or false" "$activation_checkpoint" ;; esac

## GPUs: NUM_GPUS, else nodes x GPUs per node (hostfile lines, SLURM, or this machine's nvidia-smi)
if [ -z "${num_gpus_per_node:-}" ]; then
  num_gpus_per_node=${GPUS_PER_NODE:-$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true) | wc -l)}
  [ "$num_gpus_per_node" -ge 1 ] 2>/dev/null || num_gpus_per_node=1
fi
if [ -n "${HOSTFILE:-}" ]; then
  num_nodes=${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}
elif [ "${LAUNCHER:-deepspeed}" = srun ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  num_nodes=${NUM_NODES:-${SLURM_JOB_NUM_NODES:-1}}
else
  num_nodes=${NUM_NODES:-1}
fi
num_gpus=${NUM_GPUS:-$(( num_nodes * num_gpus_per_node ))}
if (( num_gpus % pp_size )) || { [ "$sp_size" != auto ] && (( num_gpus % (pp_size * sp_size) )); }; then
  echo "error: $num_gpus GPUs are not divisible by PP_SIZE=$pp_size x SP_SIZE=$sp_size" >&2; exit 2
fi
dp_size=$([ "$sp_size" = auto ] && echo auto || echo $(( num_gpus / (pp_size * sp_size) )))

## Data and tokenizer: the shipped sample with its SentencePiece model, or DATA_PATH with the tokenizer that
## made it. One without the other would train on ids that mean other tokens, with no error anywhere.
own_tokenizer=${VOCAB_FILE:-}${TOKENIZER_MODEL:-}${HF_TOKENIZER:-}
if [ -n "${DATA_PATH:-}" ] && [ -z "$own_tokenizer" ]; then
  echo "error: DATA_PATH needs the tokenizer that made it: VOCAB_FILE and MERGE_FILE (GPT-2 BPE)," \
       "TOKENIZER_MODEL (SentencePiece) or HF_TOKENIZER (a Hugging Face tokenizer directory)" >&2; exit 2
elif [ -z "${DATA_PATH:-}" ] && [ -n "$own_tokenizer" ]; then
  echo "error: VOCAB_FILE, TOKENIZER_MODEL and HF_TOKENIZER need DATA_PATH, a corpus they tokenized" \
       "(the shipped sample is tokenized with its own SentencePiece model)" >&2; exit 2
fi
if [ -n "${HF_TOKENIZER:-}" ]; then
  tokenizer_options=(--tokenizer-type HFTokenizer --tokenizer-model "$HF_TOKENIZER")
elif [ -n "$vocab_file" ]; then
  [ -n "$merge_file" ] || { echo "error: VOCAB_FILE needs MERGE_FILE (GPT-2 BPE)" >&2; exit 2; }
  tokenizer_options=(--tokenizer-type GPT2BPETokenizer --vocab-file "$vocab_file" --merge-file "$merge_file")
else  # TOKENIZER_TYPE=GPTSentencePieceTokenizer for a model used as is (eod = its eos), e.g. Llama 2's
  tokenizer_options=(--tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}" --tokenizer-model "$tokenizer_model")
  if [ -z "${DATA_PATH:-}" ] && [ ! -f "$data_path.idx" ]; then
    (cd "$root" && PYTHON="$PYTHON" bash data/prepare_sample.sh)  # builds the sample corpus once
  fi
fi

jobname=gpt_${model_size}B_seq${seq_len}_gbs${global_batch_size}_mbs${micro_batch_size}_g${num_gpus}_pp${pp_size}_sp${sp_size}_${sp_strategy}_z${zero_stage}
log_path=$output_dir/log
mkdir -p "$checkpoint_path" "$tensorboard_path" "$log_path"

## DeepSpeed JSON from the template (as Megatron-DeepSpeed does: sed the placeholders)
prescale_grad=true; [ "$zero_stage" -gt 0 ] && prescale_grad=false
bf16_enabled=false; [ "$precision" = bf16 ] && bf16_enabled=true
config_json=$output_dir/ds_config_gbs${global_batch_size}_mbs${micro_batch_size}_log${log_interval}_zero${zero_stage}.json
sed -e "s/GBSIZE/${global_batch_size}/" -e "s/MBSIZE/${micro_batch_size}/" -e "s/LOG_INTERVAL/${log_interval}/" \
    -e "s/ZERO_STAGE/${zero_stage}/" -e "s/PRESCALE_GRAD/${prescale_grad}/" \
    -e "s/OFFLOAD_DEVICE/${offload_optimizer}/" -e "s/BF16_ENABLED/${bf16_enabled}/" \
    "$dir/ds_config_gpt_TEMPLATE.json" > "$config_json"

## Checkpoints: rerunning resumes from $checkpoint_path; FINETUNE_FROM=<another run's checkpoint directory>
## starts the first run from those weights alone (--finetune: iteration 0, fresh optimizer), e.g. a longer SEQ_LEN
load_options=(--load "$checkpoint_path")
if [ -n "${FINETUNE_FROM:-}" ] && [ ! -f "$checkpoint_path/latest" ]; then
  load_options=(--finetune --load "$FINETUNE_FROM")
fi

## pretrain_gpt.py flags
if [ -n "${train_iters:-}" ]; then
  duration=(--train-iters "$train_iters")
else
  duration=(--train-tokens "$train_tokens" --train-samples $(( train_tokens / seq_len )))
fi
args=(
  --sequence-parallel-size "$sp_size" --sequence-parallel-strategy "$sp_strategy"
  --attention-backend "$attention_backend"
  --num-layers "$num_layers" --hidden-size "$hidden_size" --num-attention-heads "$num_attn_heads"
  --seq-length "$seq_len" --max-position-embeddings "$seq_len"
  --micro-batch-size "$micro_batch_size" --global-batch-size "$global_batch_size" "${duration[@]}"
  --lr "$lr" --min-lr "$min_lr" --lr-decay-style "$lr_decay_style"
  --lr-warmup-tokens "$lr_warmup_tokens" --lr-decay-tokens "$lr_decay_tokens"
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --init-method-std "$init_std"
  --attention-dropout 0.0 --hidden-dropout 0.0 --seed "${SEED:-1234}"
  --data-path "$data_path" --split 949,50,1 "${tokenizer_options[@]}"
  --log-interval "$log_interval" --eval-interval "$eval_interval" --eval-iters "$eval_iters"
  --save "$checkpoint_path" "${load_options[@]}" --save-interval "$save_interval"
  --tensorboard-dir "$tensorboard_path"
  --deepspeed --deepspeed_config "$config_json" --zero-stage "$zero_stage"
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size "$pp_size"
)
[ -n "${ulysses_degree:-}" ] && args+=(--ulysses-degree "$ulysses_degree")
[ "$precision" = bf16 ] && args+=(--bf16)
case "$activation_checkpoint" in
  true) args+=(--checkpoint-activations) ;;
  selective) args+=(--recompute-granularity selective) ;;  # recompute only the MLPs (docs/benchmarks.md)
esac
[ -n "${GPU_MEMORY_GB:-}" ] && args+=(--gpu-memory-gb "$GPU_MEMORY_GB")
args+=(${EXTRA_ARGS:-})  # anything else, word-split on purpose: EXTRA_ARGS="--use-rotary-position-embeddings"

echo "$jobname: $num_gpus GPUs = PP $pp_size x DP $dp_size x SP $sp_size ($sp_strategy), ZeRO $zero_stage, $precision; $output_dir"
cd "$root"
if [ "${DRY_RUN:-0}" = 1 ]; then  # the plan only: layout, memory per GPU, FLOPs; nothing is allocated
  exec "$PYTHON" tools/plan.py --world-size "$num_gpus" --gpus-per-node "$num_gpus_per_node" "${args[@]}"
fi
export PYTHONUNBUFFERED=1
log_file=$log_path/${jobname}_$(hostname)_$(date "+%Y.%m.%d_%H.%M.%S").log
deepspeed_bin=${DEEPSPEED:-$(command -v deepspeed || echo "$(dirname "$(command -v "$PYTHON")")/deepspeed")}
if [ "${LAUNCHER:-deepspeed}" = srun ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  # one task per GPU; torch.distributed's variables from SLURM's
  # sed reads to the end: `head -n 1` may close the pipe early, SIGPIPE scontrol, and pipefail would then
  # end the script without a word
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  launch=(srun --nodes "$num_nodes" --ntasks-per-node "$num_gpus_per_node" bash -c
          'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"'
          _ env MASTER_ADDR="$master" MASTER_PORT="${MASTER_PORT:-29500}" "$PYTHON" pretrain_gpt.py)
elif [ -n "${HOSTFILE:-}" ]; then
  launch=("$deepspeed_bin" --hostfile "$HOSTFILE" --num_nodes "$num_nodes" --num_gpus "$num_gpus_per_node"
          ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} pretrain_gpt.py)
else
  launch=("$deepspeed_bin" --num_gpus "$num_gpus_per_node" pretrain_gpt.py)
fi
"${launch[@]}" "${args[@]}" 2>&1 | tee "$log_file"
exit "${PIPESTATUS[0]}"
