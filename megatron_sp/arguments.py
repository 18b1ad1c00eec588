"""The Megatron-DeepSpeed command line: flags -> RunConfig, plus every check that can fail early.

Flags come from the config dataclasses (``num_layers`` -> ``--num-layers``). Megatron flags that
mean nothing here are accepted and listed in ``RunConfig.ignored`` so recipes run unchanged.
``validate`` runs before any process group or GPU memory exists and raises ConfigError with one line.
"""
import argparse
import dataclasses
import json
import os
import typing

from megatron_sp.config import SECTIONS, RunConfig


class ConfigError(ValueError):
    """An impossible configuration; its message is one line for the user. The ranks of a node find the
    same one, so the node's first rank says it."""


class RankError(ConfigError):
    """A problem one rank may find and others not (e.g. in the samples it reads): that rank says it, unless
    `echoed` (the same sample read by another rank of its sequence-parallel group, which says it)."""

    def __init__(self, message: str, echoed: bool = False):
        super().__init__(message)
        self.echoed = echoed


# Megatron-DeepSpeed switches that change nothing here: (flag, takes a value, why).
IGNORED_FLAGS = [
    ("--no-async-tensor-model-parallel-allreduce", False, "no tensor parallelism"),
    ("--no-gradient-accumulation-fusion", False, "no tensor parallelism"),
    ("--sequence-parallel", False, "Megatron's tensor-parallel sequence split; use --sequence-parallel-size"),
    ("--no-masked-softmax-fusion", False, "attention runs in fused kernels"),
    ("--no-bias-gelu-fusion", False, "no separate fusion switch"),
    ("--no-bias-dropout-fusion", False, "no separate fusion switch"),
    ("--apply-query-key-layer-scaling", False, "softmax runs in fp32 inside the kernel"),
    ("--no-query-key-layer-scaling", False, "softmax runs in fp32 inside the kernel"),
    ("--fp16-lm-cross-entropy", False, "cross-entropy always accumulates in fp32"),
    ("--use-cpu-initialization", False, "parameters are initialised on the host already"),
    ("--use-distributed-optimizer", False, "optimizer state sharding is ZeRO (--zero-stage)"),
    ("--override-opt_param-scheduler", False, "the schedule always comes from the flags"),
    ("--checkpoint-in-cpu", False, "activation checkpoints stay on the GPU"),
    ("--partition-activations", False, "no tensor parallelism"),
    ("--contigious-checkpointing", False, "torch.utils.checkpoint needs no buffer"),
    ("--synchronize-each-layer", False, "not needed"),
    ("--log-timers-to-tensorboard", False, "timings are always logged"),
    ("--log-batch-size-to-tensorboard", False, "batch size is always logged"),
    ("--log-validation-ppl-to-tensorboard", False, "validation perplexity is always logged"),
    ("--log-optimizer-states-to-tensorboard", False, "not logged"),
    ("--ds-sequence-parallel-fpdt", False, "FPDT is not implemented; plain sequence parallelism is used"),
    ("--ds-sequence-parallel-fpdt-offloading", False, "FPDT is not implemented"),
    ("--ds-sequence-parallel-fpdt-chunk-size", True, "FPDT is not implemented"),
    ("--checkpoint-num-layers", True, "every layer is checkpointed"),
    ("--data-impl", True, "data is always memory-mapped"),
    ("--tensorboard-queue-size", True, "not needed"),
    ("--tensorboard-log-interval", True, "TensorBoard scalars are written at every --log-interval"),
    ("--DDP-impl", True, "DeepSpeed reduces gradients"),
    ("--empty-unused-memory-level", True, "not needed"),
    ("--timing-log-level", True, "not needed"),
    ("--recompute-method", True, "every layer is checkpointed"),
    ("--recompute-num-layers", True, "every layer is checkpointed"),
    ("--log-params-norm", False, "not logged"),
    ("--log-num-zeros-in-grad", False, "not logged"),
    ("--log-memory-to-tensorboard", False, "peak memory is always logged"),
    ("--log-world-size-to-tensorboard", False, "the layout is printed at start"),
    ("--group-query-attention", False, "implied by --num-query-groups / --num-key-value-heads"),
]

# Megatron switches with a counterpart here: flag -> (section, field, value, note).
MAPPED_FLAGS = {
    "--use-flash-attn-triton": ("parallel", "attention_backend", "triton", "our Triton FlashAttention"),
    "--use-flash-attn": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--use-flash-attn-v1": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--use-flash-attn-v2": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--deepspeed-activation-checkpointing": ("model", "checkpoint_activations", True, "layer recompute"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """int | None -> int;  list[str] | None -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    inner = args[0]
    return typing.get_args(inner)[0] if typing.get_origin(inner) is list else inner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py", allow_abbrev=False,
        description="Pretrain a GPT with sequence parallelism on DeepSpeed (Megatron-DeepSpeed flags).")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta, kind = f.metadata, _base_type(hints[f.name])
            names = [_flag(f.name), *meta["flags"]]
            common = dict(dest=f"{section}.{f.name}", help=meta["help"], default=f.default)
            if kind is bool and f.default:  # an on-by-default switch is turned off Megatron's way: --no-X
                group.add_argument("--no-" + names[0][2:], *meta["flags"], action="store_false", **common)
            elif kind is bool:
                group.add_argument(*names, action="store_true", **common)
            else:
                group.add_argument(*names, type=meta["type"] or kind, choices=meta["choices"],
                                   nargs=meta["nargs"], metavar=None if meta["choices"] else f.name.upper(), **common)
    group = parser.add_argument_group("compatibility (accepted, reported once at start)")
    group.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"), default=None,
                       help="Megatron-core spelling: rope = --use-rotary-position-embeddings, "
                            "none = --no-position-embedding.")
    for flag, (_, _, _, note) in MAPPED_FLAGS.items():
        group.add_argument(flag, action="store_true", dest=f"mapped.{flag}", help=f"Mapped: {note}.")
    for flag, takes_value, why in IGNORED_FLAGS:
        kwargs = dict(metavar="X") if takes_value else dict(action="store_true")
        group.add_argument(flag, dest=f"ignored.{flag}", default=None, help=f"Ignored: {why}.", **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Command line -> RunConfig (not yet validated against the world size: see validate)."""
    ns = vars(build_parser().parse_args(argv))
    values = {section: {} for section in SECTIONS}
    ignored = []
    for dest, value in ns.items():
        kind, _, name = dest.partition(".")
        if kind in values:
            values[kind][name] = value
        elif kind == "ignored" and value not in (None, False):
            why = next(w for f, _, w in IGNORED_FLAGS if f == name)
            ignored.append(f"{name} ({why})")
    for flag, (section, name, value, note) in MAPPED_FLAGS.items():
        if ns[f"mapped.{flag}"]:
            values[section][name] = value
            ignored.append(f"{flag} -> {_flag(name)} {value} ({note})")
    if ns["position_embedding_type"] == "rope":
        values["model"]["use_rotary_position_embeddings"] = True
    elif ns["position_embedding_type"] == "none":
        values["model"]["position_embedding"] = False
    sections = {s: cls(**values[s]) for s, cls in SECTIONS.items()}
    return RunConfig(**sections, ignored=ignored)


def fill_defaults(cfg: RunConfig) -> None:
    """Derived values that depend on other flags (kept explicit so --dry-run shows them)."""
    m = cfg.model
    if m.recompute_granularity == "full":
        m.checkpoint_activations = True
    if m.num_key_value_heads is None:
        m.num_key_value_heads = m.num_attention_heads
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = (-(-(8 * m.hidden_size // 3) // 64) * 64) if m.swiglu else 4 * m.hidden_size
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length


def validate(cfg: RunConfig, world_size: int) -> None:
    """Every impossible configuration as one ConfigError line, before anything is allocated."""
    from megatron_sp.attention import validate_attention_config

    fill_defaults(cfg)
    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.training
    if p.sequence_parallel_size == "auto":
        raise ConfigError("--sequence-parallel-size auto is resolved by the planner before validation "
                          "(megatron_sp.plan.resolve_auto, as pretrain_gpt.py does)")
    positive = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, seq_length=m.seq_length,
                    num_attention_heads=m.num_attention_heads, micro_batch_size=t.micro_batch_size,
                    sequence_parallel_size=p.sequence_parallel_size)
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{_flag(name)} must be positive, got {value}")
    optional = dict(ffn_hidden_size=m.ffn_hidden_size, kv_channels=m.kv_channels, gpu_memory_gb=t.gpu_memory_gb,
                    exit_duration_in_mins=t.exit_duration_in_mins,
                    distributed_timeout_minutes=p.distributed_timeout_minutes)
    for name, value in optional.items():
        if value is not None and value <= 0:  # 0 would silently mean "the default", an empty MLP, or no time
            raise ConfigError(f"{_flag(name)} must be positive, got {value}")
    for name, value in dict(lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                            eval_iters=t.eval_iters).items():
        if value < 0:
            raise ConfigError(f"{_flag(name)} must not be negative, got {value}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--num-key-value-heads {m.num_key_value_heads}")
    if p.attention_backend == "triton":
        from megatron_sp.kernels.flash_attn import HEAD_DIMS
        if cfg.head_dim not in HEAD_DIMS:
            raise ConfigError(f"--attention-backend triton supports head dimensions {' and '.join(map(str, HEAD_DIMS))}; "
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
    if p.tensor_model_parallel_size != 1:
        raise ConfigError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size} is not supported: "
                          "megatron_sp splits the sequence instead (--sequence-parallel-size); use 1")
    if p.pipeline_model_parallel_size != 1:
        raise ConfigError(f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size} is not supported; use 1")
    if p.ulysses_degree is not None and p.sequence_parallel_strategy != "hybrid":
        raise ConfigError("--ulysses-degree only applies to --sequence-parallel-strategy hybrid")
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if d.reset_attention_mask:
        raise ConfigError("--reset-attention-mask is not supported (attention is causal over the whole sample); "
                          "drop it, or use --reset-position-ids")
    try:
        validate_attention_config(
            strategy=p.sequence_parallel_strategy, num_heads=m.num_attention_heads,
            num_kv_heads=m.num_key_value_heads, sp_size=p.sequence_parallel_size,
            ulysses_degree=p.ulysses_degree, seq_length=m.seq_length, world_size=world_size,
            ulysses_head_groups=p.ulysses_head_groups)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    dp = world_size // p.sequence_parallel_size
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / "
                          f"sequence-parallel {p.sequence_parallel_size})")
    if t.train_iters is None and t.train_samples is None:
        raise ConfigError("give --train-iters or --train-samples")
    if t.train_iters is not None and t.train_samples is not None and t.train_iters * t.global_batch_size != t.train_samples:
        t.train_iters = min(t.train_iters, t.train_samples // t.global_batch_size)
    if t.train_iters is None:
        t.train_iters = t.train_samples // t.global_batch_size
    if t.train_tokens is not None:
        t.train_iters = min(t.train_iters, -(-t.train_tokens // (t.global_batch_size * m.seq_length)))
    if not d.mock_data and not (d.data_path or d.train_data_path):
        raise ConfigError("no data: give --data-path (or --train-data-path), or --mock-data")
    if d.data_path and not d.mock_data:
        from megatron_sp.data.blended import split_ranges
        try:
            split_ranges(d.split, 1)  # parsed as the dataset will parse it
        except ValueError as err:
            raise ConfigError(str(err)) from None
    from megatron_sp.data.indexed import IndexedDataError, IndexedDataset, data_file_path, index_file_path
    for prefix in _data_prefixes(d):
        for path in (data_file_path(prefix), index_file_path(prefix)):
            if not os.path.isfile(path):
                raise ConfigError(f"data file not found: {path}")
        try:
            IndexedDataset(prefix)  # reads the index header and checks both sizes; no token is read
        except IndexedDataError as err:
            raise ConfigError(str(err)) from None
    for flag, path in (("--tensorboard-dir", cfg.logging.tensorboard_dir), ("--data-cache-path", d.data_cache_path)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a file, not a directory")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        raise ConfigError(f"DeepSpeed config not found: {t.deepspeed_config}")
    if t.fp16 and not _has_cuda():
        raise ConfigError("--fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use --bf16 or fp32")


def read_deepspeed_json(path: str) -> dict:
    """The user's DeepSpeed JSON, or a one-line ConfigError (the engine and the planner both read it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {err}") from None


def _data_prefixes(d) -> list[str]:
    """Every file prefix named in the data flags (blends parsed as the dataset will parse them)."""
    from megatron_sp.data.blended import parse_blend
    if d.mock_data:
        return []
    prefixes = []
    for flag, paths in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                        ("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        if paths:
            try:
                prefixes += parse_blend(paths, flag)[0]
            except ValueError as err:
                raise ConfigError(str(err)) from None
    return prefixes


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()
