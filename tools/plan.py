"""Plan a run without running it: parallel layout, per-GPU memory, FLOPs, and --sequence-parallel-size auto.

    python tools/plan.py --world-size 32 [--gpus-per-node 8] <the pretrain_gpt.py flags of the run>

Takes every pretrain_gpt.py flag (the same parser, the same checks) plus the machine it would run on.
Allocates nothing: no torch.distributed, no GPU memory. Without --train-iters/--train-samples the plan
assumes 1 iteration; without data flags it assumes --mock-data (neither changes the plan).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sp.configure import configure, dry_run_lines  # noqa: E402
from megatron_sp.errors import ConfigError  # noqa: E402


def parse_machine(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="tools/plan.py", allow_abbrev=False, add_help=False,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", "--num-gpus", dest="world_size", type=int, default=None,
                        help="GPUs the run would use (default: WORLD_SIZE, else 1).")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: 8, at most the world size); SP groups larger than a node "
                             "communicate at the inter-node rate.")
    parser.add_argument("--help", "-h", action="store_true", help="Show this help and pretrain_gpt.py's flags.")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    machine, rest = parse_machine(argv)
    if machine.help:
        print(__doc__)
        from megatron_sp.arguments import build_parser
        build_parser().print_help()
        return 0
    world = machine.world_size if machine.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or (machine.gpus_per_node is not None and machine.gpus_per_node < 1):
        print("error: --world-size and --gpus-per-node must be positive", file=sys.stderr)
        return 2
    gpus_per_node = min(world, machine.gpus_per_node or 8)
    if not any(f in rest for f in ("--train-iters", "--train-samples")):
        rest += ["--train-iters", "1"]
    if not any(f in rest for f in ("--data-path", "--train-data-path", "--mock-data")):
        rest.append("--mock-data")
    try:
        cfg, _ = configure(rest, world, gpus_per_node)
        lines = dry_run_lines(cfg, world, gpus_per_node)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
