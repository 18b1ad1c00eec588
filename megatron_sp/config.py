"""Typed run configuration: one dataclass per concern, each field documented and mapped to its flag.

Every field's ``help`` is its documentation and its ``--help`` text; ``megatron_sp/arguments.py``
turns these fields into the Megatron-DeepSpeed command line (``num_layers`` -> ``--num-layers``).
"""
import json
from dataclasses import dataclass, field

from megatron_sp.errors import ConfigError


def int_or_auto(text: str):
    """--sequence-parallel-size value: a positive integer, or 'auto' (the planner picks; see megatron_sp/plan)."""
    return "auto" if text == "auto" else int(text)


def arg(default, help: str, *, flags: tuple[str, ...] = (), choices=None, nargs=None, type=None):
    """A config field plus how it appears on the command line (extra flag spellings, choices)."""
    return field(default=default, metadata=dict(help=help, flags=flags, choices=choices, nargs=nargs, type=type))


@dataclass
class ModelConfig:
    num_layers: int = arg(2, "Number of transformer layers.")
    hidden_size: int = arg(64, "Transformer hidden size h.")
    ffn_hidden_size: int | None = arg(None, "MLP inner size; default 4h (GELU) or 4h*2/3 rounded up to 64 (SwiGLU).")
    num_attention_heads: int = arg(4, "Number of query heads.")
    num_key_value_heads: int | None = arg(None, "Key/value heads for grouped-query attention; default = query heads.",
                                          flags=("--num-query-groups",))
    kv_channels: int | None = arg(None, "Head dimension; default hidden_size / num_attention_heads.")
    seq_length: int = arg(128, "Tokens per training sample (the whole sequence, before sequence-parallel split).")
    max_position_embeddings: int | None = arg(None, "Size of the learned position table; default seq_length.")
    vocab_size: int | None = arg(None, "Vocabulary size for the NullTokenizer and mock data (others take it from the tokenizer).")
    make_vocab_size_divisible_by: int = arg(128, "Pad the embedding table to a multiple of this (fast matmuls).")
    normalization: str = arg("layernorm", "Normalization layer.", choices=("layernorm", "rmsnorm"))
    layernorm_epsilon: float = arg(1e-5, "Epsilon of LayerNorm / RMSNorm.", flags=("--norm-epsilon",))
    swiglu: bool = arg(False, "SwiGLU MLP instead of GELU.")
    use_rotary_position_embeddings: bool = arg(False, "Rotary position embeddings instead of the learned position "
                                               "table (Megatron-DeepSpeed adds both unless --no-position-embedding).")
    position_embedding: bool = arg(True, "Learned position table, unless rotary replaces it; "
                                   "--no-position-embedding drops it as Megatron does (without rotary the model "
                                   "then has no position signal).")
    rotary_percent: float = arg(1.0, "Fraction of each head's dimensions that rotary embeddings rotate.")
    rotary_position_embeddings_theta: float = arg(10000.0, "Rotary base (theta).", flags=("--rotary-base",))
    use_rope_scaling: bool = arg(False, "Llama 3.1's rotary frequency scaling (as Megatron: low/high frequency "
                                 "factors 1 and 4 over an original context of 8192 tokens).")
    rope_scaling_factor: float = arg(8.0, "Llama 3.1's rotary scaling factor, with --use-rope-scaling (3.1: 8, 3.2: 32).")
    disable_bias_linear: bool = arg(False, "No bias in the attention and MLP linear layers.")
    untie_embeddings_and_output_weights: bool = arg(False, "Separate output projection instead of the input embedding.")
    init_method_std: float = arg(0.02, "Std of the normal init; output projections use std/sqrt(2*num_layers).")
    attention_dropout: float = arg(0.0, "Dropout on attention probabilities; only 0 is supported (fused kernels).")
    hidden_dropout: float = arg(0.1, "Dropout after attention and MLP, before the residual add.")
    checkpoint_activations: bool = arg(False, "Recompute each transformer layer in backward (full activation checkpointing).",
                                       flags=("--recompute-activations",))
    fused_elementwise: bool = arg(True, "On GPU, fuse norms, SwiGLU/GELU, rotary, the cross-entropy of each loss "
                                  "chunk and the copies around Ulysses' all-to-alls into one kernel each "
                                  "(torch.compile); --no-fused-elementwise runs them eagerly.")
    compile_layers: bool = arg(False, "torch.compile each transformer layer whole, as torchtitan does, instead of "
                               "the separate fused pieces (the attention slot stays outside the two graphs each layer "
                               "becomes); the first step includes 1-2 minutes of compilation. Measured on one H200: 2.4 %% "
                               "less time per step at 8k tokens, where the host queuing small kernels idles the GPU; "
                               "within noise at 16k and 32k (docs/benchmarks.md). Not with ZeRO-3; dropout then "
                               "draws other masks than eager.")
    recompute_granularity: str | None = arg(None, "full = --checkpoint-activations; selective = recompute only each "
                                            "layer's MLP sublayer (norm, fc1, activation, fc2): most of a layer's "
                                            "activations for ~3-4%% more FLOPs at long sequences; attention is kept.",
                                            choices=("full", "selective"))
    checkpoint_in_cpu: bool = arg(False, "Keep activation checkpoints in host memory: each layer's input (with "
                                  "--checkpoint-activations) or what selective recompute keeps (attention's "
                                  "inputs and outputs) is copied to pinned host memory on a side stream during "
                                  "forward and brought back one layer ahead in backward, hidden behind compute.")
    checkpoint_in_cpu_keep_layers: int | str = arg(0, "With --checkpoint-in-cpu: the last N layers' checkpoints stay "
                                                   "on the GPU (backward needs them first), so host memory holds "
                                                   "fewer; 'auto': as many as fit beside the rest (the planner).",
                                                   type=int_or_auto)
    mlp_tile_tokens: int = arg(0, "Run each layer's MLP sublayer (norm, fc1, activation, fc2) this many tokens at "
                               "a time and recompute each tile in backward, so its [tokens, ffn] intermediates "
                               "never exist whole (long sequences); 0 = off. Dropout masks are drawn per tile.")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def learned_positions(self) -> bool:
        """Whether the model has a learned absolute position table [max_position_embeddings, h]."""
        return self.position_embedding and not self.use_rotary_position_embeddings


@dataclass
class ParallelConfig:
    sequence_parallel_size: int | str = arg(1, "Ranks one sample's sequence is split over (P); 'auto': the "
                                            "planner picks P and the strategy that fit in memory and are fastest.",
                                            flags=("--ds-sequence-parallel-size",), type=int_or_auto)
    sequence_parallel_strategy: str = arg("ulysses", "How attention sees the whole sequence: all-to-all over heads "
                                          "(ulysses), k/v blocks passed around a ring (ring), or both (hybrid).",
                                          choices=("ulysses", "ring", "hybrid"))
    ulysses_degree: int | None = arg(None, "Hybrid only: ranks in each Ulysses group (P = ulysses x ring); default: "
                                       "the largest divisor of the SP size that fits in a node and divides the heads.")
    ulysses_head_groups: int | None = arg(None, "Ulysses only: pipeline the all-to-alls over this many head groups, "
                                          "each group's transfers overlapping another group's attention; default 1 = off "
                                          "(measured slower on 2 x H200 at 16k; see docs/benchmarks_history.md).")
    attention_backend: str = arg("auto", "Local attention kernel: cudnn or sdpa_flash (PyTorch's cuDNN and "
                                 "FlashAttention-2 SDPA kernels, GPU, bf16/fp16), flash_attn (the flash-attn "
                                 "package), triton (ours; head dims 32, 64, 80, 96, 128, 192, 256), torch (reference, "
                                 "any device); auto = on a GPU the faster of cudnn and triton for the head dim and "
                                 "length (a measured table; triton where cuDNN cannot run, e.g. fp32), else torch.",
                                 choices=("auto", "cudnn", "sdpa_flash", "flash_attn", "triton", "torch"))
    tensor_model_parallel_size: int = arg(1, "Tensor parallelism: accepted for compatibility, only 1 is supported.")
    pipeline_model_parallel_size: int = arg(1, "Pipeline stages (PP): each holds an equal share of the layers (the first "
                                            "the embedding, the last the output layer and loss) on world / PP ranks, "
                                            "which split the sequence and the batch as without a pipeline; micro "
                                            "batches run 1F1B.")
    distributed_backend: str = arg("auto", "torch.distributed backend: auto = nccl with GPUs, gloo on CPU.",
                                   choices=("auto", "nccl", "gloo"))
    distributed_timeout_minutes: float | None = arg(None, "How long a collective waits for the other ranks "
                                                    "before failing; default DeepSpeed's ($DEEPSPEED_TIMEOUT, "
                                                    "else 10). Raise it when a rank may wait long, e.g. while "
                                                    "another saves a checkpoint to slow storage.")


@dataclass
class DataConfig:
    data_path: list[str] | None = arg(None, "Prefix of a .bin/.idx pair, or a blend: 'w1 prefix1 w2 prefix2 ...'.", nargs="*")
    split: str = arg("969,30,1", "Train/valid/test proportions of the documents of --data-path.")
    train_data_path: list[str] | None = arg(None, "Separate training data (prefix or blend).", nargs="*")
    valid_data_path: list[str] | None = arg(None, "Separate validation data (prefix or blend).", nargs="*")
    test_data_path: list[str] | None = arg(None, "Separate test data (prefix or blend).", nargs="*")
    data_cache_path: str | None = arg(None, "Where the sample index arrays are cached (default: beside the data).")
    mock_data: bool = arg(False, "Random tokens instead of a dataset (for smoke tests and benchmarks).")
    tokenizer_type: str = arg("GPT2BPETokenizer", "Tokenizer.", choices=(
        "GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HFTokenizer", "NullTokenizer"))
    tokenizer_model: str | None = arg(None, "SentencePiece model file, or for HFTokenizer a local Hugging Face "
                                      "tokenizer directory (tokenizer.json and tokenizer_config.json).")
    vocab_file: str | None = arg(None, "GPT-2 BPE vocab.json.")
    merge_file: str | None = arg(None, "GPT-2 BPE merges.txt.")
    reset_position_ids: bool = arg(False, "Restart position ids after every end-of-document token.")
    reset_attention_mask: bool = arg(False, "Keep attention inside each document: a token after an end-of-document "
                                     "token sees only its own document (every strategy; backends torch, sdpa_flash, "
                                     "flash_attn, triton; not cudnn).")
    eod_mask_loss: bool = arg(False, "No loss on end-of-document tokens.")


@dataclass
class TrainingConfig:
    micro_batch_size: int = arg(1, "Samples per rank per forward/backward.")
    global_batch_size: int | None = arg(None, "Samples per optimizer step over all DP ranks; default micro x DP.")
    train_iters: int | None = arg(None, "Optimizer steps to run.")
    train_samples: int | None = arg(None, "Samples to train on (alternative to --train-iters).")
    train_tokens: int | None = arg(None, "Stop after this many tokens (checked with --train-iters/--train-samples).")
    lr: float = arg(1e-4, "Peak learning rate.")
    min_lr: float = arg(0.0, "Learning rate at the end of decay.")
    lr_decay_style: str = arg("linear", "Decay after warmup.", choices=("constant", "linear", "cosine"))
    lr_warmup_iters: int = arg(0, "Linear warmup steps.")
    lr_warmup_fraction: float | None = arg(None, "Warmup as a fraction of the decay steps.")
    lr_warmup_tokens: int | None = arg(None, "Warmup measured in tokens (overrides iteration-based warmup).")
    lr_warmup_samples: int = arg(0, "Warmup measured in samples.")
    lr_decay_iters: int | None = arg(None, "Steps over which lr decays; default --train-iters.")
    lr_decay_samples: int | None = arg(None, "Samples over which lr decays.")
    lr_decay_tokens: int | None = arg(None, "Tokens over which lr decays (overrides iteration-based decay).")
    optimizer: str = arg("adam", "Optimizer. Megatron's adam is AdamW (decoupled weight decay); sgd is not "
                         "offered.", choices=("adam",))
    weight_decay: float = arg(0.01, "AdamW weight decay (not applied to biases and norms).")
    clip_grad: float = arg(1.0, "Clip the global gradient norm to this (0 = off).")
    fused_grad_norm: bool = arg(True, "ZeRO 1/2 without optimizer offload: take the gradient norm in one fp32 "
                                "multi-tensor pass instead of DeepSpeed's per-parameter fp64 norms and skip its "
                                "per-parameter inf/NaN scan (an inf/NaN gradient still skips the step, through the "
                                "norm); the clipping factor moves by fp32 rounding (~1e-7). With --bf16 on a GPU the step "
                                "is also one pass over memory without a host sync: one AdamW kernel reads the bf16 "
                                "gradients and applies the clipping factor and the skip. Measured on one H200: 12 %% "
                                "less time per step at 8k tokens, 2 %% at 32k for the norm, then another 4.6 %% at 8k "
                                "and 2.8 %% at 16k for the one-pass step (docs/benchmarks.md). On one data-parallel rank "
                                "with ZeRO-1 the gradients also skip DeepSpeed's reduction (one copy each, not three). "
                                "Elsewhere DeepSpeed's own norm runs. --no-fused-grad-norm keeps DeepSpeed's step.",
                                flags=("--fused-grad-norm",))
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_eps: float = arg(1e-8, "AdamW epsilon.")
    seed: int = arg(1234, "Seed for init, data order and dropout.")
    bf16: bool = arg(False, "bfloat16 mixed precision.")
    fp16: bool = arg(False, "float16 mixed precision with dynamic loss scaling (GPU only).")
    loss_scale: float | None = arg(None, "Static fp16 loss scale; default dynamic.")
    initial_loss_scale: float = arg(2.0 ** 32, "Initial dynamic fp16 loss scale.")
    min_loss_scale: float = arg(1.0, "Smallest dynamic fp16 loss scale.")
    loss_scale_window: int = arg(1000, "Steps without overflow before the fp16 loss scale grows.")
    hysteresis: int = arg(2, "Overflows tolerated before the fp16 loss scale shrinks.")
    zero_stage: int | None = arg(None, "ZeRO stage 0-3; overrides the DeepSpeed JSON.", choices=(0, 1, 2, 3))
    deepspeed_config: str | None = arg(None, "DeepSpeed JSON; batch sizes and ZeRO stage are filled in or checked.",
                                      flags=("--deepspeed_config",))
    save: str | None = arg(None, "Checkpoint directory to save to; created at start. One that already holds "
                                 "checkpoints is refused unless --load names it too (resume there); so is one "
                                 "another run is using (its lock file, run.lock).")
    load: str | None = arg(None, "Checkpoint directory to resume from (latest tag); missing = start fresh.")
    save_interval: int | None = arg(None, "Save every this many steps (and at the end).")
    keep_checkpoints: int | None = arg(None, "Keep only the newest this many complete checkpoints in --save "
                                       "(an older one is deleted once a newer one is complete); default: all.")
    no_load_optim: bool = arg(False, "Resume weights only, not optimizer state.")
    no_load_rng: bool = arg(False, "Do not restore RNG states on resume.")
    universal_checkpoint: bool = arg(False, "Resume from --load's DeepSpeed universal checkpoint (made by "
                                     "tools/universal_checkpoint.py), which loads on any number of ranks with its "
                                     "optimizer state: how a ZeRO-1/2 run changes its GPU count.")
    load_hf: str | None = arg(None, "Start from a local Hugging Face model directory (LlamaForCausalLM or "
                              "GPT2LMHeadModel: config.json + safetensors): its config.json sets the model flags "
                              "(a flag that contradicts it is an error; --seq-length, --rotary-base and the rope "
                              "scaling flags may change), its weights replace the init, its tokenizer is the default; "
                              "iteration 0, fresh optimizer. A checkpoint in --load is resumed instead.")
    finetune: bool = arg(False, "Start a new run from --load's weights alone: iteration 0, fresh optimizer, "
                         "schedule and data order (as Megatron), e.g. to extend a trained model's context "
                         "(--seq-length, --rotary-base). --save must be another directory.")
    check_for_nan_in_loss_and_grad: bool = arg(True, "Report each iteration whose loss or gradient norm is not "
                                               "finite, count them in the log line, never save such a state and stop "
                                               "after --max-nonfinite-iterations of them in a row (on by default; "
                                               "--no-check-for-nan-in-loss-and-grad turns it off).",
                                               flags=("--check-for-nan-in-loss-and-grad",))
    max_nonfinite_iterations: int = arg(5, "Stop the run (exit 2, no checkpoint of the broken state) after this many "
                                        "iterations in a row whose loss or gradient norm is nan/inf (under --fp16 "
                                        "the loss only: the loss scaler skips overflowing steps by design).")
    eval_interval: int = arg(1000, "Evaluate every this many steps.")
    eval_iters: int = arg(10, "Global batches per evaluation (of validation data, and of test data at the end).")
    exit_interval: int | None = arg(None, "Stop at the next iteration that is a multiple of this, saving first "
                                          "if --save is set (as Megatron: a resumed run stops there too).")
    exit_duration_in_mins: float | None = arg(None, "Stop once the run has lasted this many minutes, setup "
                                              "included: finish the step, save if --save is set, exit 0 "
                                              "(for jobs with a wall-clock limit; rerun to resume).")
    exit_signal_handler: bool = arg(False, "On SIGTERM (sent by SLURM, torchrun and the deepspeed launcher "
                                    "before they kill), finish the step, save if --save is set, exit 0.")
    dry_run: bool = arg(False, "Check the configuration, print the parallel layout, a per-GPU memory estimate "
                        "and FLOPs per iteration, and exit (nothing is allocated).")
    gpu_memory_gb: float | None = arg(None, "GPU memory per device in GiB for the planner (--dry-run, "
                                      "--sequence-parallel-size auto); default: detected, else 80.")
    host_memory_gb: float | None = arg(None, "Host memory per node in GiB for the planner (--checkpoint-in-cpu, "
                                       "optimizer offload), shared by the node's GPUs; default: this machine's.")

    def micro_batches_per_step(self, dp_size: int) -> int:
        """Micro batches each rank runs per optimizer step: global batch / (micro batch x DP); an unset
        global batch is one micro batch per rank."""
        per_round = self.micro_batch_size * dp_size
        return (self.global_batch_size or per_round) // per_round


@dataclass
class LoggingConfig:
    log_interval: int = arg(100, "Print (and log to TensorBoard) every this many steps.")
    tensorboard_dir: str | None = arg(None, "TensorBoard event directory (rank 0 writes).")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    training: TrainingConfig
    logging: LoggingConfig
    padded_vocab_size: int | None = None
    """Tokenizer vocabulary rounded up to --make-vocab-size-divisible-by (set once the tokenizer is built)."""
    ignored: list[str] = field(default_factory=list)
    """Megatron flags accepted for compatibility that change nothing here (reported once at start)."""
    sp_choice: list[str] = field(default_factory=list)
    """How the planner resolved --sequence-parallel-size auto (its candidates and reason) and
    --checkpoint-in-cpu-keep-layers auto; empty when neither was asked for."""

    @property
    def head_dim(self) -> int:
        return self.model.head_dim

    @property
    def precision(self) -> str:
        return "bf16" if self.training.bf16 else "fp16" if self.training.fp16 else "fp32"

    @property
    def elem_bytes(self) -> int:
        """Bytes per activation / parameter element in the training precision."""
        return 4 if self.precision == "fp32" else 2


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
            "training": TrainingConfig, "logging": LoggingConfig}


def fill_defaults(cfg: RunConfig) -> None:
    """Model values that default from other flags, filled in place (kept explicit so --dry-run shows them)."""
    m = cfg.model
    if m.recompute_granularity == "full":
        m.checkpoint_activations = True
    if m.num_key_value_heads is None:
        m.num_key_value_heads = m.num_attention_heads
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = (-(-(8 * m.hidden_size // 3) // 64) * 64) if m.swiglu else 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length


def read_deepspeed_json(path: str) -> dict:
    """The user's DeepSpeed JSON, or a one-line ConfigError (the engine and the planner both read it)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); is it a JSON file?") from None
    except OSError as err:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {err}") from None
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(config), "a number")
        raise ConfigError(f"{path} holds {kind}, not a JSON object: a DeepSpeed config is {{\"key\": value, ...}}")
    return config


def zero_stage_of(cfg: "RunConfig", ds_json: dict | None = None) -> int:
    """The ZeRO stage a run uses: --zero-stage, else the DeepSpeed JSON's (read from --deepspeed-config unless
    given), else 0. A zero_optimization section that is not an object, or a stage DeepSpeed would refuse with a
    traceback, is a one-line ConfigError."""
    t = cfg.training
    if ds_json is None:
        ds_json = read_deepspeed_json(t.deepspeed_config) if t.deepspeed_config else {}
    source = t.deepspeed_config or "the DeepSpeed config"
    zero = ds_json.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be a JSON object, got {zero!r}")
    if t.zero_stage is not None:
        return t.zero_stage
    stage = zero.get("stage", 0)
    if type(stage) is not int or not 0 <= stage <= 3:
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage
