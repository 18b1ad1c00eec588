# Shared second half of the ds_pretrain_gpt_*_seq_parallel.sh recipes (sourced, not run): TINY mode,
# GPU count and DP size, the data and tokenizer, the DeepSpeed JSON from ds_config_gpt_TEMPLATE.json,
# the pretrain_gpt.py flags, and the launch (deepspeed, deepspeed + hostfile, or srun; DRY_RUN=1 plans).
# Expects the recipe's variables (model, seq_len, batch, sp_*, zero_stage, lr_*, data, output dirs), $dir, $root.
source "$dir/launch_env.sh"
PYTHON=$(project_python "$root")
bad_setting() { echo "error: $1 must be $2, got '$3'" >&2; exit 2; }

if [ "${TINY:-0}" = 1 ]; then
  # 2 layers on 2 CPU ranks (gloo), fp32, 20 iterations: checks the recipe end to end without a GPU. The
  # schedule is the tiny run's own (warm-up over its first 2 iterations, cosine decay over the whole run), so
  # the loss falls visibly; the recipe's token-based warm-up would keep the lr near 0 for all of it.
  model_size=tiny; num_layers=2; hidden_size=64; num_attn_heads=4; seq_len=128
  global_batch_size=${GLOBAL_BATCH_SIZE:-2}; micro_batch_size=${MICRO_BATCH_SIZE:-1}
  sp_size=${SP_SIZE:-2}; train_iters=${TRAIN_ITERS:-20}; precision=fp32
  lr=${LR:-3.0e-3}; min_lr=${MIN_LR:-3.0e-4}
  NUM_GPUS=2; num_gpus_per_node=2; log_interval=${LOG_INTERVAL:-2}; eval_interval=1000; eval_iters=1; save_interval=1000
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  output_dir=${OUTPUT_DIR:-$root/runs/gpt_tiny_seq_parallel}  # never the real run's checkpoints
  checkpoint_path=${CHECKPOINT_PATH:-$output_dir/checkpoint}
  tensorboard_path=${TENSORBOARD_DIR:-$output_dir/tensorboard}
fi

## The recipe's settings, checked before anything is written or launched: one error line each
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
if [ "${TINY:-0}" = 1 ]; then  # the tiny run's own schedule: warm-up over 2 iterations, decay over the run
  tokens_per_iteration=$(( global_batch_size * seq_len ))
  lr_warmup_tokens=${LR_WARMUP_TOKENS:-$(( 2 * tokens_per_iteration ))}
  lr_decay_tokens=${LR_DECAY_TOKENS:-$(( train_iters * tokens_per_iteration ))}
fi

## Where it runs: this node (the deepspeed launcher), HOSTFILE's nodes (deepspeed over ssh), or a SLURM
## allocation (LAUNCHER=srun). GPUs per node: GPUS_PER_NODE, else this node's; a DRY_RUN plan assumes 8.
launcher=${LAUNCHER:-deepspeed}
case "$launcher" in deepspeed|srun) ;; *) bad_setting LAUNCHER "deepspeed or srun" "$launcher" ;; esac
[[ -z "${GPUS_PER_NODE:-}" || "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || bad_setting GPUS_PER_NODE "a positive whole number" "$GPUS_PER_NODE"
dry_run=${DRY_RUN:-0}
if [ "$launcher" = srun ] && [ -z "${SLURM_JOB_ID:-}" ] && [ "$dry_run" != 1 ]; then
  echo "error: LAUNCHER=srun runs inside a SLURM allocation (salloc or sbatch); SLURM_JOB_ID is not set" >&2; exit 2
fi
if [ -n "${HOSTFILE:-}" ] && [ ! -f "$HOSTFILE" ]; then
  echo "error: HOSTFILE $HOSTFILE not found (lines like 'worker-0 slots=8')" >&2; exit 2
fi
if [ -n "${HOSTFILE:-}" ] && [ "$dry_run" != 1 ] && [ -z "${DEEPSPEED:-}" ]; then
  first_host=$(awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$HOSTFILE")
  if ! ssh -o PasswordAuthentication=no -o BatchMode=yes -o ConnectTimeout=10 "$first_host" true \
       </dev/null >/dev/null 2>&1; then  # the deepspeed launcher checks the same later, with a traceback
    echo "error: HOSTFILE's $first_host is not reachable by passwordless ssh, which the deepspeed launcher" \
         "uses to start each node's ranks" >&2; exit 2
  fi
fi
if [ -z "${num_gpus_per_node:-}" ]; then
  if [ -n "${GPUS_PER_NODE:-}" ]; then
    num_gpus_per_node=$GPUS_PER_NODE
  elif [ "$dry_run" = 1 ]; then
    num_gpus_per_node=8  # the nodes these recipes are written for
  else
    num_gpus_per_node=$(visible_gpus "$PYTHON")
    if [ "$num_gpus_per_node" = 0 ]; then
      echo "error: no GPU on this machine: TINY=1 runs the recipe on 2 CPU ranks, DRY_RUN=1 prints its plan" \
           "(GPUS_PER_NODE=N launches other nodes from here)" >&2; exit 2
    fi
  fi
fi
if [ -n "${HOSTFILE:-}" ]; then
  num_nodes=${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}
elif [ "$launcher" = srun ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  num_nodes=${NUM_NODES:-${SLURM_JOB_NUM_NODES:-1}}
else
  num_nodes=${NUM_NODES:-1}
fi
num_gpus=${NUM_GPUS:-$(( num_nodes * num_gpus_per_node ))}
if [ "$dry_run" != 1 ] && [ "$num_nodes" = 1 ] && (( num_gpus > num_gpus_per_node )); then
  echo "error: NUM_GPUS=$num_gpus is more than this node's $num_gpus_per_node GPUs: give HOSTFILE or" \
       "LAUNCHER=srun for several nodes, or DRY_RUN=1 for a plan" >&2; exit 2
fi
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
fi
data_options=(--data-path "$data_path" --split 949,50,1)
if [ -z "${DATA_PATH:-}" ] && [ ! -f "$data_path.idx" ]; then
  if [ "$dry_run" = 1 ]; then  # a plan writes nothing: the sample's vocabulary (prepare_sample.sh's 8000) on mock data
    data_options=(--mock-data)
    tokenizer_options=(--tokenizer-type NullTokenizer --vocab-size 8000)
  else
    (cd "$root" && PYTHON="$PYTHON" bash data/prepare_sample.sh)  # builds the sample corpus once
  fi
fi

jobname=gpt_${model_size}B_seq${seq_len}_gbs${global_batch_size}_mbs${micro_batch_size}_g${num_gpus}_pp${pp_size}_sp${sp_size}_${sp_strategy}_z${zero_stage}
log_path=$output_dir/log
if [ "$dry_run" = 1 ]; then  # nothing written: the JSON the plan reads lives until the script exits
  config_json=$(mktemp "${TMPDIR:-/tmp}/ds_config.XXXXXX")
  trap 'rm -f "$config_json"' EXIT
else
  mkdir -p "$checkpoint_path" "$tensorboard_path" "$log_path"
  config_json=$output_dir/ds_config_gbs${global_batch_size}_mbs${micro_batch_size}_log${log_interval}_zero${zero_stage}.json
fi

## DeepSpeed JSON from the template (as Megatron-DeepSpeed does: sed the placeholders)
prescale_grad=true; [ "$zero_stage" -gt 0 ] && prescale_grad=false
bf16_enabled=false; [ "$precision" = bf16 ] && bf16_enabled=true
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
  "${data_options[@]}" "${tokenizer_options[@]}"
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
if [ "$dry_run" = 1 ]; then  # the plan only: layout, memory per GPU, FLOPs; nothing is allocated or written
  "$PYTHON" tools/plan.py --world-size "$num_gpus" --gpus-per-node "$num_gpus_per_node" "${args[@]}"
  exit 0
fi
export PYTHONUNBUFFERED=1
log_file=$log_path/${jobname}_$(hostname)_$(date "+%Y.%m.%d_%H.%M.%S").log
deepspeed_launcher=("$PYTHON" -m deepspeed.launcher.runner)  # the `deepspeed` command of this interpreter
[ -n "${DEEPSPEED:-}" ] && deepspeed_launcher=($DEEPSPEED)     # or another launcher command
if [ "$launcher" = srun ]; then
  # one task per GPU; torch.distributed's variables from SLURM's
  # sed reads to the end: `head -n 1` may close the pipe early, SIGPIPE scontrol, and pipefail would then
  # end the script without a word
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  launch=(srun --nodes "$num_nodes" --ntasks-per-node "$num_gpus_per_node" bash -c
          'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"'
          _ env MASTER_ADDR="$master" MASTER_PORT="${MASTER_PORT:-29500}" "$PYTHON" pretrain_gpt.py)
elif [ -n "${HOSTFILE:-}" ]; then
  launch=("${deepspeed_launcher[@]}" --hostfile "$HOSTFILE" --num_nodes "$num_nodes" --num_gpus "$num_gpus_per_node"
          ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} pretrain_gpt.py)
else
  launch=("${deepspeed_launcher[@]}" --num_gpus "$num_gpus" --master_port "$(rendezvous_port "$PYTHON")" pretrain_gpt.py)
fi
"${launch[@]}" "${args[@]}" 2>&1 | tee "$log_file"
exit "${PIPESTATUS[0]}"
