"""Pretrain a GPT with sequence parallelism on DeepSpeed; the entry point the recipes launch.

    deepspeed --num_gpus 2 pretrain_gpt.py --sequence-parallel-size 2 --num-layers 24 ... (Megatron flags)

Configuration errors are reported as one line (by the first rank of each node) before any process group or
memory is touched; what is found later (the device's kernels, the checkpoint, the data) is one line too.
"""
import os
import sys

from megatron_sp.configure import configure, dry_run_lines
from megatron_sp.errors import ConfigError, RankError
from megatron_sp.training.allocator import use_expandable_segments


def main(argv: list[str] | None = None) -> int:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
    # the ranks of a node read the same flags, files and devices: its first rank says what is wrong (once
    # per node, so a file or device that one node lacks is still reported)
    says = os.environ.get("LOCAL_RANK", "0") == "0"
    use_expandable_segments()  # before any CUDA tensor exists
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
