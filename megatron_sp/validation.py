"""validate(cfg, world): every impossible configuration as one ConfigError line, before any process group,
file write or GPU memory. Each check_* function only reads; derive_schedule is the one that sets values
(the global batch and the iteration count, which follow from the checked flags)."""
import os

from megatron_sp.config import RunConfig, fill_defaults, zero_stage_of
from megatron_sp.errors import ConfigError


def flag(name: str) -> str:
    """A config field's command-line spelling: num_layers -> --num-layers."""
    return "--" + name.replace("_", "-")


def validate(cfg: RunConfig, world_size: int) -> None:
    """Fill in the defaults that follow from other flags, then check everything that can be checked now."""
    fill_defaults(cfg)
    if cfg.parallel.sequence_parallel_size == "auto":
        raise ConfigError("--sequence-parallel-size auto is resolved by the planner before validation "
                          "(megatron_sp.configure.configure does it)")
    check_ranges(cfg)
    check_model(cfg)
    check_parallel(cfg, world_size)
    derive_schedule(cfg, world_size)
    check_data(cfg)
    check_paths(cfg)


def check_ranges(cfg: RunConfig) -> None:
    """Numbers that must be positive, not negative, or inside an interval."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    positive = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, seq_length=m.seq_length,
                    num_attention_heads=m.num_attention_heads, micro_batch_size=t.micro_batch_size,
                    sequence_parallel_size=p.sequence_parallel_size,
                    pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                    make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
                    max_nonfinite_iterations=t.max_nonfinite_iterations)
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag(name)} must be positive, got {value}")
    optional = dict(ffn_hidden_size=m.ffn_hidden_size, kv_channels=m.kv_channels, gpu_memory_gb=t.gpu_memory_gb,
                    host_memory_gb=t.host_memory_gb,
                    exit_duration_in_mins=t.exit_duration_in_mins,
                    distributed_timeout_minutes=p.distributed_timeout_minutes,
                    num_key_value_heads=m.num_key_value_heads, vocab_size=m.vocab_size,
                    global_batch_size=t.global_batch_size, train_iters=t.train_iters, train_samples=t.train_samples,
                    train_tokens=t.train_tokens, keep_checkpoints=t.keep_checkpoints, ulysses_degree=p.ulysses_degree,
                    ulysses_head_groups=p.ulysses_head_groups)
    for name, value in optional.items():
        if value is not None and value <= 0:  # 0 would silently mean "the default", an empty MLP, or no time
            raise ConfigError(f"{flag(name)} must be positive, got {value}")
    for name, value in dict(lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                            eval_iters=t.eval_iters, eval_interval=t.eval_interval,
                            log_interval=cfg.logging.log_interval,
                            lr_warmup_iters=t.lr_warmup_iters, adam_eps=t.adam_eps, save_interval=t.save_interval or 0,
                            exit_interval=t.exit_interval or 0).items():  # an interval of 0 means never
        if value < 0:
            raise ConfigError(f"{flag(name)} must not be negative, got {value}")
    for name, value in dict(hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2).items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag(name)} must be between 0 and 1, got {value}")
    if not 0 <= t.seed < 2 ** 32:  # numpy's seed range
        raise ConfigError(f"--seed must be between 0 and 2**32 - 1, got {t.seed}")


def check_model(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--num-key-value-heads {m.num_key_value_heads}")
    if p.attention_backend == "triton":
        from megatron_sp.kernels.flash_attn import HEAD_DIMS
        if cfg.head_dim not in HEAD_DIMS:
            dims = ", ".join(map(str, HEAD_DIMS[:-1])) + f" and {HEAD_DIMS[-1]}"
            raise ConfigError(f"--attention-backend triton supports head dimensions {dims}; "
                              f"this model's is {cfg.head_dim} (--hidden-size / --num-attention-heads, or --kv-channels)")
    if cfg.head_dim % 2 and m.use_rotary_position_embeddings:
        raise ConfigError(f"rotary embeddings need an even head dimension, got {cfg.head_dim}")
    if m.learned_positions and m.max_position_embeddings < m.seq_length:
        raise ConfigError(f"--max-position-embeddings {m.max_position_embeddings} is smaller than --seq-length {m.seq_length}")
    if m.attention_dropout:
        raise ConfigError(f"--attention-dropout {m.attention_dropout} is not supported (attention runs in fused "
                          "kernels without dropout); pass --attention-dropout 0")
    if m.recompute_granularity == "selective" and m.checkpoint_activations:
        raise ConfigError("--recompute-granularity selective and --checkpoint-activations (full recompute) "
                          "exclude each other; pick one")
    if m.compile_layers and zero_stage_of(cfg) == 3:
        raise ConfigError("--compile-layers does not work with ZeRO stage 3 (torch.compile cannot trace the layers "
                          "DeepSpeed builds under zero.Init, nor its parameter-gathering hooks); use --zero-stage 1 or 2")
    check_recompute(m)


def check_recompute(m) -> None:
    """Host-memory checkpoints need something checkpointed; the tile size and kept layers are counts."""
    keep = m.checkpoint_in_cpu_keep_layers
    if m.checkpoint_in_cpu and not (m.checkpoint_activations or m.recompute_granularity == "selective"):
        raise ConfigError("--checkpoint-in-cpu moves activation checkpoints to host memory and needs some: add "
                          "--checkpoint-activations or --recompute-granularity selective")
    if keep != 0 and not m.checkpoint_in_cpu:
        raise ConfigError("--checkpoint-in-cpu-keep-layers only applies with --checkpoint-in-cpu")
    if keep != "auto" and not 0 <= keep <= m.num_layers:
        raise ConfigError(f"--checkpoint-in-cpu-keep-layers must be between 0 and --num-layers {m.num_layers}, "
                          f"got {keep}")
    if m.mlp_tile_tokens < 0:
        raise ConfigError(f"--mlp-tile-tokens must not be negative, got {m.mlp_tile_tokens}")


def check_parallel(cfg: RunConfig, world_size: int) -> None:
    from megatron_sp.attention import validate_attention_config
    m, p, t = cfg.model, cfg.parallel, cfg.training
    if p.tensor_model_parallel_size != 1:
        raise ConfigError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size} is not supported: "
                          "megatron_sp splits the sequence instead (--sequence-parallel-size); use 1")
    check_pipeline(cfg, world_size)
    if p.ulysses_degree is not None and p.sequence_parallel_strategy != "hybrid":
        raise ConfigError("--ulysses-degree only applies to --sequence-parallel-strategy hybrid")
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    try:
        validate_attention_config(
            strategy=p.sequence_parallel_strategy, num_heads=m.num_attention_heads,
            num_kv_heads=m.num_key_value_heads, sp_size=p.sequence_parallel_size,
            ulysses_degree=p.ulysses_degree, seq_length=m.seq_length,
            world_size=world_size // p.pipeline_model_parallel_size,  # the ranks of one stage
            ulysses_head_groups=p.ulysses_head_groups, documents=cfg.data.reset_attention_mask,
            backend=p.attention_backend)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_pipeline(cfg: RunConfig, world_size: int) -> None:
    """Stages hold equal shares of the layers and of the ranks."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    pp, sp = p.pipeline_model_parallel_size, p.sequence_parallel_size
    if pp > m.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} is more than --num-layers {m.num_layers}: "
                          "every stage needs at least one layer")
    if m.num_layers % pp:
        raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}: "
                          "the stages hold equal shares of the layers")
    if world_size % (pp * sp):
        raise ConfigError(f"world size {world_size} is not divisible by --pipeline-model-parallel-size {pp} x "
                          f"--sequence-parallel-size {sp}")
    if pp > 1 and zero_stage_of(cfg) == 3:
        raise ConfigError("ZeRO stage 3 does not combine with --pipeline-model-parallel-size above 1 (DeepSpeed "
                          "checks its parameter-gathering order against every rank, and the stages hold other "
                          "layers); use --zero-stage 1 or 2")
    if pp > 1 and t.fp16:
        raise ConfigError("--fp16 does not combine with --pipeline-model-parallel-size above 1 (every stage would "
                          "keep its own loss scale); use --bf16")
    if pp > 1 and t.universal_checkpoint:
        raise ConfigError("--universal-checkpoint does not combine with --pipeline-model-parallel-size above 1 "
                          "(DeepSpeed's conversion reads the stages as tensor-parallel slices); resume on the "
                          "saved number of ranks per stage")


def derive_schedule(cfg: RunConfig, world_size: int) -> None:
    """The global batch (default micro x DP) and the iteration count from --train-iters/-samples/-tokens."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dp = world_size // (p.pipeline_model_parallel_size * p.sequence_parallel_size)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        pipeline = f"pipeline-parallel {p.pipeline_model_parallel_size} x " if p.pipeline_model_parallel_size > 1 else ""
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / "
                          f"{pipeline}sequence-parallel {p.sequence_parallel_size})")
    if t.train_iters is None and t.train_samples is None:
        raise ConfigError("give --train-iters or --train-samples")
    if t.train_iters is not None and t.train_samples is not None and t.train_iters * t.global_batch_size != t.train_samples:
        t.train_iters = min(t.train_iters, t.train_samples // t.global_batch_size)
    if t.train_iters is None:
        t.train_iters = t.train_samples // t.global_batch_size
    if t.train_tokens is not None:
        t.train_iters = min(t.train_iters, -(-t.train_tokens // (t.global_batch_size * m.seq_length)))
    if t.train_iters < 1:
        raise ConfigError(f"--train-samples {t.train_samples} is less than one global batch ({t.global_batch_size} "
                          "samples): nothing to train")


def check_data(cfg: RunConfig) -> None:
    """Data flags name files that exist and parse (only index headers are read)."""
    from megatron_sp.data.indexed import IndexedDataError, IndexedDataset, data_file_path, index_file_path
    d = cfg.data
    if not d.mock_data and not (d.data_path or d.train_data_path):
        raise ConfigError("no data: give --data-path (or --train-data-path), or --mock-data")
    if d.data_path and not d.mock_data:
        from megatron_sp.data.blended import split_ranges
        try:
            split_ranges(d.split, 1)  # parsed as the dataset will parse it
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for prefix in _data_prefixes(d):
        for path in (data_file_path(prefix), index_file_path(prefix)):
            if not os.path.isfile(path):
                raise ConfigError(f"data file not found: {path}")
        try:
            IndexedDataset(prefix)  # reads the index header and checks both sizes; no token is read
        except IndexedDataError as err:
            raise ConfigError(str(err)) from None


def check_paths(cfg: RunConfig) -> None:
    """Directories that are files, a missing DeepSpeed JSON, and fp16 without a GPU."""
    t = cfg.training
    for name, path in (("--tensorboard-dir", cfg.logging.tensorboard_dir), ("--data-cache-path", cfg.data.data_cache_path)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{name} {path} is a file, not a directory")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        raise ConfigError(f"DeepSpeed config not found: {t.deepspeed_config}")
    if t.fp16 and not _has_cuda():
        raise ConfigError("--fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use --bf16 or fp32")


def _data_prefixes(d) -> list[str]:
    """Every file prefix named in the data flags (blends parsed as the dataset will parse them)."""
    from megatron_sp.data.blended import parse_blend
    if d.mock_data:
        return []
    prefixes = []
    for name, paths in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                        ("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        if paths:
            try:
                prefixes += parse_blend(paths, name)[0]
            except ValueError as err:
                raise ConfigError(str(err)) from None
    return prefixes


def _has_cuda() -> bool:
    """Whether the run gets GPUs: torch sees one and DeepSpeed's accelerator is not set to the CPU."""
    import torch
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
