"""Flags -> a validated RunConfig and its tokenizer: what pretrain_gpt.py, the planner tool, the benchmarks
and the tests all start from (`--sequence-parallel-size auto` is resolved here, by the planner)."""
import copy

from megatron_sp.arguments import parse_args
from megatron_sp.config import fill_defaults
from megatron_sp.validation import validate


def build_tokenizer_for(cfg):
    """The tokenizer named by the flags; mock data without tokenizer files uses NullTokenizer."""
    from megatron_sp.data.tokenizer import build_tokenizer
    d = cfg.data
    if d.mock_data and d.tokenizer_type == "GPT2BPETokenizer" and not d.vocab_file:
        return build_tokenizer("NullTokenizer", vocab_size=cfg.model.vocab_size or 32000)
    return build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                           merge_file=d.merge_file, vocab_size=cfg.model.vocab_size)


def attach_tokenizer(cfg):
    """Build the tokenizer and set cfg.padded_vocab_size from it (--load-hf: the model's vocab_size)."""
    tokenizer = build_tokenizer_for(cfg)
    divisor = cfg.model.make_vocab_size_divisible_by
    cfg.padded_vocab_size = -(-tokenizer.vocab_size // divisor) * divisor
    if cfg.training.load_hf:
        from megatron_sp.hf.start import check_start
        cfg.padded_vocab_size = check_start(cfg, tokenizer.vocab_size)
    return tokenizer


def default_ulysses_degree(cfg, gpus_per_node: int | None, world: int = 1) -> list[str]:
    """Hybrid without --ulysses-degree: Ulysses inside a node, the ring across nodes, i.e. the largest divisor
    of the SP size that fits in a node (default: this launch's) and divides the attention heads; the line that
    says so."""
    from megatron_sp.parallel.layout import gpus_per_node_from_env
    p, m = cfg.parallel, cfg.model
    sp = p.sequence_parallel_size
    if p.sequence_parallel_strategy != "hybrid" or p.ulysses_degree is not None or sp < 1:
        return []
    gpus_per_node = gpus_per_node or gpus_per_node_from_env(world)
    p.ulysses_degree = max(u for u in range(1, min(sp, gpus_per_node) + 1)
                           if sp % u == 0 and (m.num_attention_heads or u) % u == 0)
    return [f"hybrid: --ulysses-degree {p.ulysses_degree} (Ulysses inside a node of {gpus_per_node} GPUs, the ring "
            f"over {sp // p.ulysses_degree} such groups)"]


def configure(argv: list[str] | None, world: int, gpus_per_node: int | None = None):
    """Flags -> validated RunConfig and its tokenizer; raises ConfigError/ValueError/OSError.
    --sequence-parallel-size auto is resolved by the planner before validation, then
    --checkpoint-in-cpu-keep-layers auto for the SP size chosen."""
    from megatron_sp.parallel.layout import gpus_per_node_from_env
    cfg = parse_args(argv)
    if cfg.parallel.sequence_parallel_size != "auto":
        cfg.sp_choice = default_ulysses_degree(cfg, gpus_per_node, world)
        validate(cfg, world)
        tokenizer = attach_tokenizer(cfg)
    else:
        probe = copy.deepcopy(cfg)
        probe.parallel.sequence_parallel_size, probe.training.global_batch_size = 1, None
        validate(probe, max(1, probe.parallel.pipeline_model_parallel_size))  # every check that does not
        # depend on the SP size, as one line (on one rank per pipeline stage)
        fill_defaults(cfg)
        tokenizer = attach_tokenizer(cfg)
        from megatron_sp.plan import resolve_auto
        cfg.sp_choice = resolve_auto(cfg, world, gpus_per_node or gpus_per_node_from_env(world))
        validate(cfg, world)
    if cfg.model.checkpoint_in_cpu_keep_layers == "auto":  # after the SP size: how much each GPU holds
        from megatron_sp.plan import resolve_keep_layers
        cfg.sp_choice += resolve_keep_layers(cfg, world, gpus_per_node or gpus_per_node_from_env(world))
    return cfg, tokenizer


def dry_run_lines(cfg, world: int, gpus_per_node: int | None = None) -> list[str]:
    """The planner's report (layout, memory, FLOPs; nothing allocated) and the batch geometry."""
    from megatron_sp.parallel.layout import gpus_per_node_from_env
    from megatron_sp.plan import plan_report
    lines = plan_report(cfg, world, gpus_per_node or gpus_per_node_from_env(world))
    t = cfg.training
    return [*cfg.sp_choice, *lines,
            f"configuration is valid; {t.train_iters} iterations of global batch "
            f"{t.global_batch_size} x {cfg.model.seq_length} tokens"]
