"""ParallelState: the pipeline-, data- and sequence-parallel process groups, built once and passed around.

Ranks are laid out on a grid ``arange(world).view(pp, dp, sp)`` (Megatron's order: SP innermost, PP
outermost). A row of SP adjacent ranks is one sequence-parallel group (inside one node, so its all-to-all
rides NVLink); the DP x SP ranks of one pipeline stage are adjacent too and are what DeepSpeed reduces
gradients over; a pipeline group takes one rank of each stage with the same (dp, sp) coordinate, so only
the stage-to-stage activations (one [b, s/SP, h] tensor per micro batch) cross the slower links between
nodes. Hybrid attention splits each SP row further into ring groups of ``ulysses_degree`` adjacent ranks
(Ulysses inside) and ring groups across them.

Nothing here is global: whoever needs a group receives this object (or the group itself).
"""
from dataclasses import dataclass

import torch.distributed as dist

from megatron_sp.parallel.sharding import SequenceLayout


def rank_grid(world: int, sp_size: int, ulysses_degree: int = 1, pp_size: int = 1) -> dict[str, list[list[int]]]:
    """All group memberships for a world, as plain rank lists (no process groups needed).

    Returns {"sp": SP rows, "dp": ranks of a stage with the same SP position, "stage": the DP x SP ranks
    of each pipeline stage, "pipeline": one rank per stage with the same (dp, sp) coordinate, in stage
    order, "embedding": the first and last rank of each pipeline group (they hold the tied word
    embedding; empty lists when pp_size is 1), "ulysses": u-sized runs inside each SP row, "ring": ranks
    of an SP row with the same position inside their Ulysses run}.
    """
    if world % (pp_size * sp_size):
        raise ValueError(f"world size {world} is not divisible by pipeline-parallel size {pp_size} x "
                         f"sequence-parallel size {sp_size}")
    if sp_size % ulysses_degree:
        raise ValueError(f"sequence-parallel size {sp_size} is not divisible by Ulysses degree {ulysses_degree}")
    stage_size = world // pp_size
    stages = [list(range(p * stage_size, (p + 1) * stage_size)) for p in range(pp_size)]
    sp_rows = [stage[i:i + sp_size] for stage in stages for i in range(0, stage_size, sp_size)]
    dp_cols = [stage[s::sp_size] for stage in stages for s in range(sp_size)]
    pipelines = [list(range(i, world, stage_size)) for i in range(stage_size)]
    ring_degree = sp_size // ulysses_degree
    ulysses = [row[i * ulysses_degree:(i + 1) * ulysses_degree] for row in sp_rows for i in range(ring_degree)]
    ring = [row[j::ulysses_degree] for row in sp_rows for j in range(ulysses_degree)]
    return {"sp": sp_rows, "dp": dp_cols, "stage": stages, "pipeline": pipelines,
            "embedding": [[p[0], p[-1]] for p in pipelines] if pp_size > 1 else [],
            "ulysses": ulysses, "ring": ring}


def _my_group(lists: list[list[int]], rank: int, backend: str | None):
    """Create every group of a family (new_group is collective) and keep the one holding rank."""
    mine = None
    for ranks in lists:
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine = group
    return mine


@dataclass
class ParallelState:
    """Process groups of one run. Build it with ``ParallelState.build`` after init_process_group."""

    world_size: int
    rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    sp_size: int
    sp_rank: int
    ulysses_degree: int
    dp_group: object = None
    """Ranks of this stage holding the same sequence shard of different samples."""
    stage_group: object = None
    """The DP x SP ranks of this pipeline stage: DeepSpeed's data-parallel group (it reduces gradients and
    splits ZeRO state over them). All ranks when there is no pipeline."""
    pipeline_group: object = None
    """One rank per stage, with this rank's (dp, sp) coordinate: stage-to-stage activations and gradients."""
    embedding_group: object = None
    """First and last rank of pipeline_group, which both hold the tied word embedding (None without a pipeline)."""
    pipeline_ranks: tuple[int, ...] = (0,)
    """Global ranks of pipeline_group in stage order."""
    sp_group: object = None
    """Ranks holding the shards of the same samples (adjacent ranks)."""
    ulysses_group: object = None
    """Adjacent ranks inside sp_group that exchange heads by all-to-all (hybrid/ulysses)."""
    ring_group: object = None
    """Ranks inside sp_group that pass k/v around a ring (hybrid/ring)."""

    @classmethod
    def build(cls, sp_size: int = 1, ulysses_degree: int | None = None, backend: str | None = None,
              pp_size: int = 1):
        """Make the groups. ``ulysses_degree`` defaults to sp_size (pure Ulysses); 1 is a pure ring."""
        world, rank = dist.get_world_size(), dist.get_rank()
        ulysses_degree = sp_size if ulysses_degree is None else ulysses_degree
        grid = rank_grid(world, sp_size, ulysses_degree, pp_size)
        stage_size = world // pp_size
        return cls(
            world_size=world, rank=rank, pp_size=pp_size, pp_rank=rank // stage_size,
            dp_size=stage_size // sp_size, dp_rank=rank % stage_size // sp_size,
            sp_size=sp_size, sp_rank=rank % sp_size, ulysses_degree=ulysses_degree,
            dp_group=_my_group(grid["dp"], rank, backend),
            sp_group=_my_group(grid["sp"], rank, backend),
            ulysses_group=_my_group(grid["ulysses"], rank, backend),
            ring_group=_my_group(grid["ring"], rank, backend),
            stage_group=dist.group.WORLD if pp_size == 1 else _my_group(grid["stage"], rank, backend),
            pipeline_group=_my_group(grid["pipeline"], rank, backend),
            embedding_group=_my_group(grid["embedding"], rank, backend),
            pipeline_ranks=tuple(next(p for p in grid["pipeline"] if rank in p)),
        )

    @property
    def ring_degree(self) -> int:
        return self.sp_size // self.ulysses_degree

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (DP x SP): what DeepSpeed averages gradients over."""
        return self.dp_size * self.sp_size

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def sequence_layout(self, zigzag: bool = True) -> SequenceLayout:
        return SequenceLayout(self.sp_size, self.ulysses_degree, zigzag)
