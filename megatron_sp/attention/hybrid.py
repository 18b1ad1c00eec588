"""Hybrid (2D) sequence parallelism: Ulysses all-to-all inside `ulysses_group`, the ring across `ring_group`."""
from megatron_sp.attention.local import AttentionConfig
from megatron_sp.attention.ring import RingAttentionFn
from megatron_sp.attention.ulysses import ulysses_attention


class HybridAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d]) -> out [b, s/P, hq, d], P = u x r.

    Inputs use layout_for('hybrid', P, u): zigzag over the r ring groups, contiguous over the u
    adjacent Ulysses ranks. The all-to-all in `ulysses_group` (u ranks) gives each rank its ring
    group's whole part, [b, s/r, hq/u, d], in zigzag order; the ring over `ring_group` (r ranks
    with the same Ulysses position) attends it; the inverse all-to-all restores [b, s/P, hq, d].
    Needs hq % u == 0 and hkv % u == 0 or u % hkv == 0 (the ring itself has no head constraint).
    """

    def __init__(self, ulysses_group, ring_group, causal: bool = True, backend: str = "auto",
                 softmax_scale: float | None = None):
        super().__init__(causal, backend, softmax_scale)
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    def forward(self, q, k, v):
        args = self.kernel_args(q)
        ring = lambda q, k, v: RingAttentionFn.apply(q, k, v, self.ring_group, *args)[0]  # noqa: E731
        return ulysses_attention(q, k, v, self.ulysses_group, ring)
