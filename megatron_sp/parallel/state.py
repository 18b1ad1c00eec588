"""ParallelState: the data- and sequence-parallel process groups, built once and passed around.

Ranks are laid out on a grid ``arange(world).view(dp, sp)``: a row is one sequence-parallel group
(adjacent ranks, so it sits inside one node and its all-to-all rides NVLink), a column is one
data-parallel group. Hybrid attention splits each SP row further into ring groups of
``ulysses_degree`` adjacent ranks (Ulysses inside) and ring groups across them.

Nothing here is global: whoever needs a group receives this object (or the group itself).
"""
from dataclasses import dataclass

import torch.distributed as dist

from megatron_sp.parallel.sharding import SequenceLayout


def rank_grid(world: int, sp_size: int, ulysses_degree: int = 1) -> dict[str, list[list[int]]]:
    """All group memberships for a world, as plain rank lists (no process groups needed).

    Returns {"sp": rows, "dp": columns, "ulysses": u-sized runs inside each row,
    "ring": ranks of a row with the same position inside their Ulysses run}.
    """
    if world % sp_size:
        raise ValueError(f"world size {world} is not divisible by sequence-parallel size {sp_size}")
    if sp_size % ulysses_degree:
        raise ValueError(f"sequence-parallel size {sp_size} is not divisible by Ulysses degree {ulysses_degree}")
    dp = world // sp_size
    sp_rows = [list(range(d * sp_size, (d + 1) * sp_size)) for d in range(dp)]
    dp_cols = [list(range(s, world, sp_size)) for s in range(sp_size)]
    ring_degree = sp_size // ulysses_degree
    ulysses = [row[i * ulysses_degree:(i + 1) * ulysses_degree] for row in sp_rows for i in range(ring_degree)]
    ring = [row[j::ulysses_degree] for row in sp_rows for j in range(ulysses_degree)]
    return {"sp": sp_rows, "dp": dp_cols, "ulysses": ulysses, "ring": ring}


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
    dp_size: int
    dp_rank: int
    sp_size: int
    sp_rank: int
    ulysses_degree: int
    dp_group: object = None
    """Ranks holding the same sequence shard of different samples."""
    sp_group: object = None
    """Ranks holding the shards of the same samples (adjacent ranks)."""
    ulysses_group: object = None
    """Adjacent ranks inside sp_group that exchange heads by all-to-all (hybrid/ulysses)."""
    ring_group: object = None
    """Ranks inside sp_group that pass k/v around a ring (hybrid/ring)."""

    @classmethod
    def build(cls, sp_size: int = 1, ulysses_degree: int | None = None, backend: str | None = None):
        """Make the groups. ``ulysses_degree`` defaults to sp_size (pure Ulysses); 1 is a pure ring."""
        world, rank = dist.get_world_size(), dist.get_rank()
        ulysses_degree = sp_size if ulysses_degree is None else ulysses_degree
        grid = rank_grid(world, sp_size, ulysses_degree)
        return cls(
            world_size=world, rank=rank,
            dp_size=world // sp_size, dp_rank=rank // sp_size,
            sp_size=sp_size, sp_rank=rank % sp_size, ulysses_degree=ulysses_degree,
            dp_group=_my_group(grid["dp"], rank, backend),
            sp_group=_my_group(grid["sp"], rank, backend),
            ulysses_group=_my_group(grid["ulysses"], rank, backend),
            ring_group=_my_group(grid["ring"], rank, backend),
        )

    @property
    def ring_degree(self) -> int:
        return self.sp_size // self.ulysses_degree

    def sequence_layout(self, zigzag: bool = True) -> SequenceLayout:
        return SequenceLayout(self.sp_size, self.ulysses_degree, zigzag)
