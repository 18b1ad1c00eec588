"""How the ranks of a launch are laid out: the printout of the PP x DP x SP grid (and hybrid's Ulysses and ring
groups, each rank's coordinates) that a run prints at start and --dry-run / tools/plan.py print without
starting one."""
import os

from megatron_sp.config import RunConfig
from megatron_sp.parallel.pipeline import stage_layers
from megatron_sp.parallel.sharding import effective_strategy, ulysses_degree_of
from megatron_sp.parallel.state import rank_grid


def gpus_per_node_from_env(world: int) -> int:
    """Ranks (GPUs) per node of this launch: LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (the deepspeed
    launcher), else the visible GPUs, else 8 (capped at the world size)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
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


def layout_lines(cfg: RunConfig, world: int, gpus_per_node: int, unit: str = "GPUs") -> list[str]:
    """Which ranks form each SP and DP group (and hybrid's Ulysses and ring groups); with a pipeline also
    the stages, the pipeline groups and each rank's (stage, DP, SP) coordinates. unit: what a rank runs on."""
    p = cfg.parallel
    sp, pp = p.sequence_parallel_size, p.pipeline_model_parallel_size
    strategy = effective_strategy(p.sequence_parallel_strategy, sp)
    u = ulysses_degree_of(strategy, sp, p.ulysses_degree)
    grid = rank_grid(world, sp, u, pp)
    compact = world >= COMPACT_FROM
    nodes, span = -(-world // gpus_per_node), -(-sp // gpus_per_node)
    lines = [f"layout: world {world} = {f'PP {pp} x ' if pp > 1 else ''}DP {world // (pp * sp)} x SP {sp} "
             f"({strategy}, attention backend {p.attention_backend}); {nodes} node(s) of "
             f"{min(world, gpus_per_node)} {unit}, each SP group "
             + ("inside one node" if span == 1 else f"spans {span} nodes (its communication crosses nodes)")]
    if pp > 1:
        lines += pipeline_lines(cfg, grid, compact)
    lines += [f"  sequence-parallel groups: {_groups(grid['sp'], compact)}",
              f"  data-parallel groups:     {_groups(grid['dp'], compact)}"]
    if strategy == "hybrid":
        lines += [f"  ulysses groups (all-to-all): {_groups(grid['ulysses'], compact)}",
                  f"  ring groups (p2p):           {_groups(grid['ring'], compact)}"]
    if pp > 1:
        lines += coordinate_lines(world, pp, sp, compact)
    return lines


def pipeline_lines(cfg: RunConfig, grid: dict, compact: bool) -> list[str]:
    """The stages (their ranks and layers) and the pipeline groups that pass activations between them."""
    pp, layers = len(grid["stage"]), cfg.model.num_layers
    ends = {0: " + embedding", pp - 1: " + output layer and loss"}
    stages = [f"stage {i} {_group(ranks)}: layers {stage_layers(layers, pp, i).start}-"
              f"{stage_layers(layers, pp, i).stop - 1}{ends.get(i, '')}" for i, ranks in enumerate(grid["stage"])]
    shown = stages if len(stages) <= 4 else stages[:2] + ["..."] + stages[-1:]
    return [f"  pipeline stages: {'; '.join(shown)}",
            f"  pipeline groups (p2p):    {_groups(grid['pipeline'], compact)}"]


def coordinate_lines(world: int, pp: int, sp: int, compact: bool) -> list[str]:
    """Each rank's (stage, DP, SP) coordinates: listed for small worlds, as the formula for large ones."""
    stage_size = world // pp
    if compact:
        return [f"  rank r: stage r // {stage_size}, DP (r % {stage_size}) // {sp}, SP r % {sp}"]
    cells = [f"{r}: stage {r // stage_size} DP {r % stage_size // sp} SP {r % sp}" for r in range(world)]
    return ["  rank coordinates: " + " | ".join(cells[i:i + 4]) if i == 0 else "                     "
            + " | ".join(cells[i:i + 4]) for i in range(0, world, 4)]
