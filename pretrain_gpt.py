"""Pretrain a GPT with sequence parallelism on DeepSpeed; the entry point the recipes launch.

    deepspeed --num_gpus 2 pretrain_gpt.py --sequence-parallel-size 2 --num-layers 24 ... (Megatron flags)

Configuration errors are reported as one line (by the first rank of each node) before any process group or
memory is touched; what is found later (the device's kernels, the checkpoint, the data) is one line too.
"""
import copy
import os
import sys

from megatron_sp.arguments import ConfigError, RankError, fill_defaults, parse_args, validate


def build_tokenizer_for(cfg):
    """The tokenizer named by the flags; mock data without tokenizer files uses NullTokenizer."""
    from megatron_sp.data.tokenizer import build_tokenizer
    d = cfg.data
    if d.mock_data and d.tokenizer_type == "GPT2BPETokenizer" and not d.vocab_file:
        return build_tokenizer("NullTokenizer", vocab_size=cfg.model.vocab_size or 32000)
    return build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                           merge_file=d.merge_file, vocab_size=cfg.model.vocab_size)


def attach_tokenizer(cfg):
    """Build the tokenizer and set cfg.padded_vocab_size from it."""
    tokenizer = build_tokenizer_for(cfg)
    divisor = cfg.model.make_vocab_size_divisible_by
    cfg.padded_vocab_size = -(-tokenizer.vocab_size // divisor) * divisor
    return tokenizer


def configure(argv: list[str] | None, world: int, gpus_per_node: int | None = None):
    """Flags -> validated RunConfig and its tokenizer; raises ConfigError/ValueError/OSError.
    --sequence-parallel-size auto is resolved by the planner before validation."""
    cfg = parse_args(argv)
    if cfg.parallel.sequence_parallel_size != "auto":
        validate(cfg, world)
        return cfg, attach_tokenizer(cfg)
    probe = copy.deepcopy(cfg)
    probe.parallel.sequence_parallel_size, probe.training.global_batch_size = 1, None
    validate(probe, 1)  # every check that does not depend on the SP size, as one line
    fill_defaults(cfg)
    tokenizer = attach_tokenizer(cfg)
    from megatron_sp.plan import gpus_per_node_from_env, resolve_auto
    cfg.sp_choice = resolve_auto(cfg, world, gpus_per_node or gpus_per_node_from_env(world))
    validate(cfg, world)
    return cfg, tokenizer


def dry_run_lines(cfg, world: int, gpus_per_node: int | None = None) -> list[str]:
    """The planner's report (layout, memory, FLOPs; nothing allocated) and the batch geometry."""
    from megatron_sp.plan import gpus_per_node_from_env, plan_report
    lines = plan_report(cfg, world, gpus_per_node or gpus_per_node_from_env(world))
    t = cfg.training
    return [*cfg.sp_choice, *lines,
            f"configuration is valid; {t.train_iters} iterations of global batch "
            f"{t.global_batch_size} x {cfg.model.seq_length} tokens"]


def main(argv: list[str] | None = None) -> int:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
    # the ranks of a node read the same flags, files and devices: its first rank says what is wrong (once
    # per node, so a file or device that one node lacks is still reported)
    says = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        cfg, tokenizer = configure(argv, world)
    except (ConfigError, ValueError, OSError) as err:
        if says:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.training.dry_run:
        print("\n".join(dry_run_lines(cfg, world)))
        return 0
    if cfg.sp_choice and rank == "0":
        print("\n".join(cfg.sp_choice), flush=True)
    from megatron_sp.training.trainer import run
    try:
        run(cfg, tokenizer)
    except ConfigError as err:  # found once the device, files, checkpoint or data are known
        alone = isinstance(err, RankError) and world > 1  # in this rank's samples: others may not see it
        if alone and not err.echoed:  # said by the first rank of the sequence-parallel group that read it
            print(f"error: rank {rank}: {err}", file=sys.stderr)
        elif not alone and says:
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
