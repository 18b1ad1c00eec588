"""How the ranks of a launch are laid out: the printout of the DP x SP grid (and hybrid's Ulysses and ring
groups) that a run prints at start and --dry-run / tools/plan.py print without starting one."""
import os

from megatron_sp.config import RunConfig
from megatron_sp.parallel.sharding import effective_strategy, ulysses_degree_of
from megatron_sp.parallel.state import rank_grid


def gpus_per_node_from_env(world: int) -> int:
    """GPUs per node of this launch: LOCAL_WORLD_SIZE (deepspeed launcher, torchrun), else the visible
    GPUs, else 8 (capped at the world size)."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    try:
        import torch
        visible = torch.cuda.device_count()
    except ImportError:
        visible = 0
    return min(world, visible or 8)


COMPACT_FROM = 32  # worlds this large print groups as patterns, not every rank


def _group(ranks: list[int]) -> str:
    """[0, 1, 2, 3] -> '[0..3]'; a long strided group -> '[1, 9, ..., 249]'."""
    if len(ranks) <= 4:
        return str(ranks)
    step = ranks[1] - ranks[0]
    if all(b - a == step for a, b in zip(ranks, ranks[1:])):
        return f"[{ranks[0]}..{ranks[-1]}]" if step == 1 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}]"
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}]"


def _groups(groups: list[list[int]], compact: bool) -> str:
    if not compact:
        return str(groups)
    shown = groups if len(groups) <= 4 else groups[:2] + [None] + groups[-1:]
    return f"{len(groups)} x {len(groups[0])} ranks: " + " ".join("..." if g is None else _group(g) for g in shown)


def layout_lines(cfg: RunConfig, world: int, gpus_per_node: int) -> list[str]:
    """Which ranks form each SP and DP group (and hybrid's Ulysses and ring groups)."""
    p = cfg.parallel
    sp = p.sequence_parallel_size
    strategy = effective_strategy(p.sequence_parallel_strategy, sp)
    u = ulysses_degree_of(strategy, sp, p.ulysses_degree)
    grid = rank_grid(world, sp, u)
    compact = world >= COMPACT_FROM
    nodes, span = -(-world // gpus_per_node), -(-sp // gpus_per_node)
    lines = [f"layout: world {world} = DP {world // sp} x SP {sp} ({strategy}, attention backend "
             f"{p.attention_backend}); {nodes} node(s) of {min(world, gpus_per_node)} GPUs, each SP group "
             + ("inside one node" if span == 1 else f"spans {span} nodes (its communication crosses nodes)"),
             f"  sequence-parallel groups: {_groups(grid['sp'], compact)}",
             f"  data-parallel groups:     {_groups(grid['dp'], compact)}"]
    if strategy == "hybrid":
        lines += [f"  ulysses groups (all-to-all): {_groups(grid['ulysses'], compact)}",
                  f"  ring groups (p2p):           {_groups(grid['ring'], compact)}"]
    return lines
