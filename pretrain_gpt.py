"""Pretrain a GPT with sequence parallelism on DeepSpeed; the entry point the recipes launch.

    deepspeed --num_gpus 2 pretrain_gpt.py --sequence-parallel-size 2 --num-layers 24 ... (Megatron flags)

Configuration errors are reported as one line before any process group or memory is touched.
"""
import os
import sys

from megatron_sp.arguments import ConfigError, parse_args, validate


def build_tokenizer_for(cfg):
    """The tokenizer named by the flags; mock data without tokenizer files uses NullTokenizer."""
    from megatron_sp.data.tokenizer import build_tokenizer
    d = cfg.data
    if d.mock_data and d.tokenizer_type == "GPT2BPETokenizer" and not d.vocab_file:
        return build_tokenizer("NullTokenizer", vocab_size=cfg.model.vocab_size or 32000)
    return build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                           merge_file=d.merge_file, vocab_size=cfg.model.vocab_size)


def configure(argv: list[str] | None, world: int):
    """Flags -> validated RunConfig and its tokenizer; raises ConfigError/ValueError/OSError."""
    cfg = parse_args(argv)
    validate(cfg, world)
    tokenizer = build_tokenizer_for(cfg)
    divisor = cfg.model.make_vocab_size_divisible_by
    cfg.padded_vocab_size = -(-tokenizer.vocab_size // divisor) * divisor
    return cfg, tokenizer


def main(argv: list[str] | None = None) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, tokenizer = configure(argv, world)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.training.dry_run:
        from megatron_sp.training.trainer import describe_layout
        print("\n".join(describe_layout(cfg, world)))
        print(f"configuration is valid; {cfg.training.train_iters} iterations of global batch "
              f"{cfg.training.global_batch_size} x {cfg.model.seq_length} tokens")
        return 0
    from megatron_sp.training.trainer import run
    run(cfg, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
