"""DeepSpeed-Ulysses attention: all-to-all [s/P, heads] -> [s, heads/P], any inner attention, all-to-all back."""
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_sp.attention.local import AttentionConfig, LocalAttentionFn
from megatron_sp.parallel.comm import head_to_seq, qkv_seq_to_head


def kv_replication(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """How many copies of each kv head Ulysses over `degree` ranks needs (1: heads split evenly),
    or a one-line ValueError when the head counts cannot be split over `degree` ranks."""
    if num_heads % degree:
        raise ValueError(f"attention heads {num_heads} are not divisible by the Ulysses degree {degree}")
    if num_kv_heads % degree == 0:
        return 1
    if degree % num_kv_heads:
        raise ValueError(f"key/value heads {num_kv_heads} must divide, or be a multiple of, "
                         f"the Ulysses degree {degree}")
    return degree // num_kv_heads


def ulysses_attention(q, k, v, group, inner: Callable) -> torch.Tensor:
    """q [b, s/P, hq, d], k/v [b, s/P, hkv, d] (this rank's contiguous slice of the sequence) ->
    out [b, s/P, hq, d]. `inner(q, k, v)` sees the whole sequence and a slice of heads,
    [b, s, hq/P, d] and [b, s, max(hkv/P, 1), d]. Backward runs the same all-to-alls in reverse."""
    world = dist.get_world_size(group)
    copies = kv_replication(q.shape[2], k.shape[2], world)
    if copies > 1:
        # kv head j -> heads j*copies .. j*copies+copies-1, so rank i receives kv head i // copies,
        # the head its query heads i*hq/P .. belong to; autograd sums the copies' gradients back
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    q, k, v = qkv_seq_to_head(q, k, v, group)
    return head_to_seq(inner(q, k, v), group)


class UlyssesAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d]) -> out [b, s/P, hq, d] over `group`.
    Needs hq % P == 0 and hkv % P == 0 or P % hkv == 0; inputs use layout_for('ulysses', P)."""

    def __init__(self, group, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None):
        super().__init__(causal, backend, softmax_scale)
        self.group = group

    def forward(self, q, k, v):
        args = self.kernel_args(q)
        return ulysses_attention(q, k, v, self.group, lambda q, k, v: LocalAttentionFn.apply(q, k, v, *args)[0])
