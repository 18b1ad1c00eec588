"""Document ids of packed samples, as every attention strategy takes them (Megatron's --reset-attention-mask).

A packed sample holds several documents back to back. `Documents` carries the document index of every
token of a micro batch's whole samples, int32 [b, s], non-decreasing along s (documents are contiguous
runs), on the host and on the device. Key j is visible to query i iff both are in the same document (and,
when causal, j <= i). The model passes the object to its inner attention untouched; each strategy takes
the rows it needs from the layout it already knows (`rows_of`), so the model stays free of parallel code.

Every SequenceLayout keeps a rank's tokens in sequence order: the zigzag rank holds chunks r < 2P-1-r in
that order, and its Ulysses ranks split that part contiguously. So the ids of any rank's tokens, of a ring
block and of the Ulysses-gathered part are non-decreasing too, which is what kernels and plans rely on.

Derived tensors and plans are cached on the object, which lives for one micro batch: computed once,
shared by every layer, the forward, the recompute and the backward. Plans are made from the host copy,
so deciding what to compute and send never waits for the device.
"""
import torch

from megatron_sp.parallel.sharding import SequenceLayout


class Documents:
    """Document ids of one micro batch. ids: int32 [b, s] (any integer dtype, any device), the whole samples."""

    def __init__(self, ids: torch.Tensor, device: torch.device | str | None = None):
        if ids.dim() != 2:
            raise ValueError(f"document ids must be [batch, seq], got shape {tuple(ids.shape)}")
        self.host = ids.to("cpu", torch.int32).contiguous()
        self.device = torch.device(device) if device is not None else ids.device
        self.ids = ids.to(self.device, torch.int32, non_blocking=True).contiguous()
        if self.host.shape[1] > 1 and bool((self.host[:, 1:] < self.host[:, :-1]).any()):
            raise ValueError("document ids must not decrease along the sequence (documents are contiguous runs)")
        self._cache: dict = {}

    @property
    def seq_length(self) -> int:
        return self.host.shape[1]

    def cached(self, key, make):
        """make() once per key for the life of this micro batch."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def rows_of(self, layout: SequenceLayout, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(host, device) int32 [b, s/P]: the ids of the tokens `rank` holds under `layout`, in order."""
        def make():
            host = layout.shard(self.host, rank, dim=1).contiguous()
            return host, host.to(self.device, non_blocking=True)
        return self.cached(("rows", layout, rank), make)

    def check_local_length(self, local_len: int, parts: int) -> None:
        """One clear error when these ids do not describe the sequence being attended."""
        if local_len * parts != self.seq_length:
            raise ValueError(f"document ids cover {self.seq_length} tokens, but attention holds "
                             f"{local_len} x {parts} = {local_len * parts}")


def ring_layout(ring_size: int, zigzag: bool) -> SequenceLayout:
    """How the ring's sequence (the whole sample for the ring strategy, a ring group's gathered part for
    hybrid, which is the same cut) is split over its ranks."""
    return SequenceLayout(ring_size, 1, zigzag)
