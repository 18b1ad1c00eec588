"""Hybrid (2D) sequence parallelism: Ulysses all-to-all inside `ulysses_group`, the ring across `ring_group`."""
from functools import partial

import torch.distributed as dist

from megatron_sp.attention.local import AttentionConfig
from megatron_sp.attention.ring import ring_backward, ring_forward
from megatron_sp.attention.ulysses import UlyssesFn, replicate_kv
from megatron_sp.parallel.comm import Ring


class HybridAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d], documents=None) -> out [b, s/P, hq, d], P = u x r.

    Inputs use layout_for('hybrid', P, u): zigzag over the r ring groups, contiguous over the u
    adjacent Ulysses ranks. The all-to-all in `ulysses_group` (u ranks) gives each rank its ring
    group's whole part, [b, s/r, hq/u, d], in zigzag order; the ring over `ring_group` (r ranks
    with the same Ulysses position) attends it; the inverse all-to-all restores [b, s/P, hq, d].
    Needs hq % u == 0 and hkv % u == 0 or u % hkv == 0 (the ring itself has no head constraint).
    fused: as for UlyssesAttention (compiled pack/unpack around the all-to-alls on GPU).
    documents: the samples' Documents (attention/documents.py). The gathered part of ring group i is
    what the ring strategy over r ranks would hold at rank i, so the ring cuts the ids as it always does.
    """

    def __init__(self, ulysses_group, ring_group, causal: bool = True, backend: str = "auto",
                 softmax_scale: float | None = None, fused: bool = True):
        super().__init__(causal, backend, softmax_scale)
        self.ulysses_group, self.ring_group, self.fused = ulysses_group, ring_group, fused

    def forward(self, q, k, v, documents=None):
        u = dist.get_world_size(self.ulysses_group)
        causal, scale, backend = self.kernel_args(q, documents, gathered=u)  # the ring's blocks: u shards
        kw = dict(ring=Ring(self.ring_group), causal=causal, scale=scale, backend=backend, documents=documents)
        k, v = replicate_kv(k, v, q.shape[2], u)
        return UlyssesFn.apply(q, k, v, self.ulysses_group, 1, self.fused,
                               (partial(ring_forward, **kw), partial(ring_backward, **kw)))
