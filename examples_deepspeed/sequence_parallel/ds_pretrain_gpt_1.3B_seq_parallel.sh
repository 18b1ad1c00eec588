#!/usr/bin/env bash
# Pretrain a GPT-3 XL shape (1.3B: 24 layers, hidden 2048, 16 heads) on long sequences with sequence
# parallelism on DeepSpeed. Every setting is overridable from the environment, e.g.
#   SEQ_LEN=131072 SP_SIZE=8 bash ds_pretrain_gpt_1.3B_seq_parallel.sh
#   HOSTFILE=hosts bash ...          multi-node through the deepspeed launcher (ssh)
#   LAUNCHER=srun bash ...           inside a SLURM allocation (sbatch/salloc), one task per GPU
#   DRY_RUN=1 NUM_GPUS=32 bash ...   print layout, memory per GPU and FLOPs (tools/plan.py); writes nothing
#   TINY=1 bash ...                  2-layer model, 20 iterations on 2 CPU ranks (gloo); what the tests run
#   FINETUNE_FROM=dir SEQ_LEN=... bash ...   start from another run's weights (--finetune), e.g. a longer context
# Rerunning resumes from the latest checkpoint in $CHECKPOINT_PATH (--load = --save). Python: $PYTHON, else the
# project's .venv (tools/install.sh), else python3. One node: the deepspeed launcher on a free port (MASTER_PORT).
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$dir/../.." && pwd)

### Model (GPT-3 XL)
model_size=1.3
num_layers=${NUM_LAYERS:-24}
hidden_size=${HIDDEN_SIZE:-2048}
num_attn_heads=${NUM_ATTN_HEADS:-16}
init_std=${INIT_STD:-0.013}

### Sequence and batch: global batch in samples of seq_len tokens; micro batch per SP group
seq_len=${SEQ_LEN:-65536}
global_batch_size=${GLOBAL_BATCH_SIZE:-8}
micro_batch_size=${MICRO_BATCH_SIZE:-1}

### Duration and learning rate (token-based, as Megatron-DeepSpeed's GPT-3 recipes)
train_tokens=${TRAIN_TOKENS:-300000000000}
train_iters=${TRAIN_ITERS:-}                 # set to stop after this many steps instead
lr=${LR:-2.0e-4}
min_lr=${MIN_LR:-1.0e-6}
lr_decay_style=${LR_DECAY_STYLE:-cosine}
lr_warmup_tokens=${LR_WARMUP_TOKENS:-3000000000}
lr_decay_tokens=${LR_DECAY_TOKENS:-$train_tokens}

### Parallelism: SP ranks split each sample; PP stages hold consecutive layers; DP = GPUs / (PP x SP).
### No tensor parallelism.
sp_size=${SP_SIZE:-8}                        # or auto: the planner picks size and strategy
pp_size=${PP_SIZE:-1}                        # pipeline stages (docs/pipeline.md); each splits the sequence over SP
sp_strategy=${SP_STRATEGY:-ulysses}          # ulysses | ring | hybrid (see README.md)
ulysses_degree=${ULYSSES_DEGREE:-}           # hybrid only: Ulysses ranks per ring step (default: GPUs per node)
zero_stage=${ZERO_STAGE:-1}
offload_optimizer=${OFFLOAD_OPTIMIZER:-none}  # none | cpu
attention_backend=${ATTENTION_BACKEND:-auto}
activation_checkpoint=${ACTIVATION_CHECKPOINT:-true}  # true (every layer) | selective (MLPs) | false
precision=${PRECISION:-bf16}                 # bf16 | fp32

### Logging and checkpoints
log_interval=${LOG_INTERVAL:-10}
eval_interval=${EVAL_INTERVAL:-100}
eval_iters=${EVAL_ITERS:-10}
save_interval=${SAVE_INTERVAL:-100}

### Data: the shipped sample (built by data/prepare_sample.sh on first use), or DATA_PATH with its tokenizer:
### VOCAB_FILE + MERGE_FILE (GPT-2 BPE), TOKENIZER_MODEL (SentencePiece; TOKENIZER_TYPE) or HF_TOKENIZER (a dir)
data_path=${DATA_PATH:-$root/data/processed/sample_text_document}
tokenizer_model=${TOKENIZER_MODEL:-$root/data/processed/sample.model}  # SentencePiece (the sample's)
vocab_file=${VOCAB_FILE:-}
merge_file=${MERGE_FILE:-}

### Output: --load = --save, so rerunning resumes from $checkpoint_path/latest
output_dir=${OUTPUT_DIR:-$root/runs/gpt_${model_size}B_seq${seq_len}_gbs${global_batch_size}_sp${sp_size}$([ "$pp_size" = 1 ] || echo "_pp$pp_size")_${sp_strategy}_z${zero_stage}}
checkpoint_path=${CHECKPOINT_PATH:-$output_dir/checkpoint}
tensorboard_path=${TENSORBOARD_DIR:-$output_dir/tensorboard}

source "$dir/launch_common.sh"
