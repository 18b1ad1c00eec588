"""How one sample's sequence is cut over the P ranks of a sequence-parallel group.

One rule serves every strategy, so data, attention and tests always agree on who holds what.
The P ranks form r ring groups of u adjacent ranks (P = r * u; Ulysses is u = P, the ring is u = 1):
1. the sequence is split over the r ring groups: contiguously, or "zigzag" — cut into 2r equal
   chunks, ring group i takes chunks i and 2r-1-i. With a causal mask early chunks attend to
   little and late ones to much; pairing chunk i with its mirror gives every rank equal work;
2. a ring group's part is split contiguously over its u Ulysses ranks. Ulysses' all-to-all
   gathers those u slices back in order, so after it each rank sees its ring group's whole part.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    sp_size: int = 1
    """P: ranks one sample's sequence is split over."""
    ulysses_degree: int = 1
    """u: adjacent ranks that exchange heads by all-to-all; P // u ring groups pass k/v around."""
    zigzag: bool = True
    """Split over ring groups zigzag (causal load balance) rather than contiguously."""

    def __post_init__(self):
        if self.sp_size < 1 or self.ulysses_degree < 1 or self.sp_size % self.ulysses_degree:
            raise ValueError(f"sequence-parallel size {self.sp_size} must be a positive multiple "
                             f"of the Ulysses degree {self.ulysses_degree}")

    @property
    def ring_degree(self) -> int:
        return self.sp_size // self.ulysses_degree

    @property
    def uses_zigzag(self) -> bool:
        return self.zigzag and self.ring_degree > 1

    def check_seq_len(self, seq_len: int) -> None:
        """One readable error when seq_len cannot be split evenly by this layout."""
        ring_chunks = 2 * self.ring_degree if self.uses_zigzag else self.ring_degree
        if seq_len % ring_chunks or (seq_len // self.ring_degree) % self.ulysses_degree:
            need = ring_chunks * self.ulysses_degree
            raise ValueError(
                f"sequence length {seq_len} must be divisible by {need} for sequence-parallel size "
                f"{self.sp_size} ({self.ring_degree} ring x {self.ulysses_degree} Ulysses"
                f"{', zigzag' if self.uses_zigzag else ''})")

    def shard(self, x: torch.Tensor, sp_rank: int, dim: int = 1) -> torch.Tensor:
        """The part of full-sequence ``x`` that ``sp_rank`` holds: [.., s, ..] -> [.., s/P, ..]."""
        if self.sp_size == 1:
            return x
        self.check_seq_len(x.shape[dim])
        ring_idx, ulysses_idx = divmod(sp_rank, self.ulysses_degree)
        if self.uses_zigzag:
            chunks = x.chunk(2 * self.ring_degree, dim=dim)
            part = torch.cat([chunks[ring_idx], chunks[2 * self.ring_degree - 1 - ring_idx]], dim=dim)
        else:
            part = x.chunk(self.ring_degree, dim=dim)[ring_idx]
        return part.chunk(self.ulysses_degree, dim=dim)[ulysses_idx]

    def positions(self, seq_len: int, sp_rank: int) -> torch.Tensor:
        """Indices in the full sample of the tokens sp_rank holds, int64 [s/P]."""
        return self.shard(torch.arange(seq_len), sp_rank, dim=0)

    def unshard(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of shard: the P shards, in rank order, -> the full sequence."""
        if len(shards) != self.sp_size:
            raise ValueError(f"expected {self.sp_size} shards, got {len(shards)}")
        local = shards[0].shape[dim]
        seq_len = local * self.sp_size
        full = shards[0].new_empty(shards[0].shape[:dim] + (seq_len,) + shards[0].shape[dim + 1:])
        for rank, shard in enumerate(shards):
            full.index_copy_(dim, self.positions(seq_len, rank).to(shard.device), shard)
        return full


def effective_strategy(strategy: str, sp_size: int) -> str:
    """The strategy that runs: 'local' when nothing is split (sp_size 1), else the configured one."""
    return strategy if sp_size > 1 else "local"


def configured_sp(parallel) -> tuple[int, str, int | None]:
    """(SP size, the strategy that runs, --ulysses-degree) of the parallel flags (a ParallelConfig)."""
    sp = parallel.sequence_parallel_size
    return sp, effective_strategy(parallel.sequence_parallel_strategy, sp), parallel.ulysses_degree


def ulysses_degree_of(strategy: str, sp_size: int, ulysses_degree: int | None = None) -> int:
    """Ranks that exchange heads by all-to-all: all P for 'ulysses' (and 'local'), none (1) for
    'ring', the given --ulysses-degree for 'hybrid'."""
    if strategy in ("ulysses", "local"):
        return sp_size
    if strategy == "ring":
        return 1
    if strategy == "hybrid":
        if not ulysses_degree:
            raise ValueError("--sequence-parallel-strategy hybrid needs --ulysses-degree")
        return ulysses_degree
    raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; expected ulysses, ring, hybrid or local")


def layout_for(strategy: str, sp_size: int, ulysses_degree: int | None = None) -> SequenceLayout:
    """The layout a sequence-parallel strategy ('ulysses', 'ring', 'hybrid') expects."""
    return SequenceLayout(sp_size, ulysses_degree=ulysses_degree_of(strategy, sp_size, ulysses_degree))
