"""Ring self-attention: q stays, k/v blocks travel the ring, partial results merge by log-sum-exp.

Causal attention uses the zigzag layout (layout_for('ring', P)): the sequence is cut in 2P
chunks of c tokens and rank r holds chunks r and 2P-1-r, i.e. local rows [0, c) and [c, 2c).
At ring step t rank r holds the k/v of src = (r - t) mod P, and only unmasked work is done:
  t == 0     local q vs local k/v, causal (both chunks are in order, so a plain causal mask)
  src < r    all local q vs the first k/v chunk only (chunk src precedes both of r's chunks,
             chunk 2P-1-src follows both), no mask
  src > r    the second q chunk only vs all k/v (chunk r precedes src and 2P-1-src, chunk
             2P-1-r follows both), no mask
so every rank does the same 2c x 2c work per step. Without zigzag (contiguous layout) a later
block is skipped whole. Non-causal attention attends every block in full whatever the layout.
"""
import torch

from megatron_sp.attention.backends import accumulation_dtype, attention_backward, attention_forward
from megatron_sp.attention.local import AttentionConfig
from megatron_sp.parallel.comm import Ring

ALL = slice(None)


def _block(step: int, rank: int, world: int, local_len: int, causal: bool, zigzag: bool):
    """(q rows, k/v rows, causal mask) this rank computes at `step`, or None to skip it."""
    if not causal:
        return ALL, ALL, False
    if step == 0:
        return ALL, ALL, True
    src = (rank - step) % world
    half = local_len // 2
    if zigzag:
        return (ALL, slice(0, half), False) if src < rank else (slice(half, None), ALL, False)
    return (ALL, ALL, False) if src < rank else None


def _merge(out, lse, block_out, block_lse) -> None:
    """In place: out [b, n, h, d] and lse [b, h, n] (accumulators) absorb a block's partial result
    by the log-sum-exp rule: out = out * e^(lse - new) + o * e^(l - new), new = logaddexp(lse, l)."""
    block_lse = block_lse.to(lse.dtype)
    new = torch.logaddexp(lse, block_lse)
    weight = lambda x: torch.exp(x - new).transpose(1, 2).unsqueeze(-1)  # [b, n, h, 1]  # noqa: E731
    out.mul_(weight(lse)).add_(block_out.to(out.dtype) * weight(block_lse))
    lse.copy_(new)


def ring_forward(q, k, v, ring: Ring, causal: bool, scale: float, backend: str, zigzag: bool = True):
    """q [b, s/P, hq, d], k/v [b, s/P, hkv, d] -> (out [b, s/P, hq, d], lse [b, hq, s/P] fp32/fp64)."""
    acc = accumulation_dtype(q.dtype)
    kv = torch.stack([k, v])  # [2, b, s/P, hkv, d]: one message per hop
    out = lse = None
    for step in range(ring.size):
        hop = ring.shift(kv) if step < ring.size - 1 else None  # the next block travels meanwhile
        block = _block(step, ring.rank, ring.size, q.shape[1], causal, zigzag)
        if block is not None:
            rows, cols, mask = block
            o, l = attention_forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], mask, scale, backend)
            if out is None:  # step 0 covers every row
                out, lse = o.to(acc), l.to(acc)
            else:
                _merge(out[:, rows], lse[:, :, rows], o, l)
        if hop is not None:
            kv = hop.wait()
    return out.to(q.dtype), lse


def _local_split(local_len: int, causal: bool, world: int):
    """Step 0's block for the backward, cut into (head, tail) lists of (q rows, k/v rows, causal mask).

    The head runs first, while the first k/v hop travels; the tail runs last, while the dk/dv of the
    last remote block travel home, so no transfer waits on an idle GPU. Rows split at h = n/2:
    causal [h:, :h] is full, [:h, :h] and [h:, h:] are causal with equal offsets. One block when
    there is no ring (P = 1) or nothing to split."""
    h = local_len // 2
    if world == 1 or h == 0:
        return [(ALL, ALL, causal)], []
    top, bottom = slice(0, h), slice(h, None)
    if not causal:
        return [(top, ALL, False)], [(bottom, ALL, False)]
    return [(top, top, True), (bottom, bottom, True)], [(bottom, top, False)]


def ring_backward(dout, q, k, v, out, lse, ring: Ring, causal: bool, scale: float, backend: str,
                  zigzag: bool = True):
    """(dq, dk, dv) for ring_forward. Every block is recomputed against the final out and lse, so
    its gradients are exact.

    Schedule: step 0's head, the P-1 remote blocks, step 0's tail (_local_split). The dk/dv of a
    remote k/v block ride the ring one hop behind it and arrive back at its owner after P-1 hops.
    Their first hop carries one block's gradients, sent in the kernel's dtype (exact, half the
    bytes of fp32); later hops carry sums, in fp32/fp64. Local sums are fp32/fp64 too."""
    acc = accumulation_dtype(q.dtype)
    local_kv = torch.stack([k, v])  # [2, b, s/P, hkv, d]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros(local_kv.shape, dtype=acc, device=q.device)

    def add_grads(block, kv, kv_grads):
        rows, cols, mask = block
        bdq, bdk, bdv = attention_backward(dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                                           out[:, rows], lse[:, :, rows], mask, scale, backend)
        dq[:, rows] += bdq
        kv_grads[0][:, cols] += bdk
        kv_grads[1][:, cols] += bdv

    head, tail = _local_split(q.shape[1], causal, ring.size)
    kv_hop = ring.shift(local_kv) if ring.size > 1 else None
    for block in head:
        add_grads(block, local_kv, dkv)
    grads_hop = None  # the travelling dk/dv of the previous step's block
    for step in range(1, ring.size):
        kv = kv_hop.wait()
        kv_hop = ring.shift(kv) if step < ring.size - 1 else None
        kv_grads = torch.zeros_like(kv) if grads_hop is None else grads_hop.wait().to(acc)
        block = _block(step, ring.rank, ring.size, q.shape[1], causal, zigzag)
        if block is not None:
            add_grads(block, kv, kv_grads)
        grads_hop = ring.shift(kv_grads)
    for block in tail:
        add_grads(block, local_kv, dkv)
    if grads_hop is not None:  # our own k/v's gradients from the other ranks, home from rank - 1
        dkv += grads_hop.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttentionFn(torch.autograd.Function):
    """Forward: ring_forward over `group` -> (out, lse; lse not differentiable).
    Backward: ring_backward with the saved final out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float, backend: str, zigzag: bool = True):
        ring = Ring(group)
        out, lse = ring_forward(q, k, v, ring, causal, scale, backend, zigzag)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, causal, scale, backend, zigzag)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv = ring_backward(dout.contiguous(), *ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


class RingAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d]) -> out [b, s/P, hq, d] over the ring `group`.
    No head constraint. Causal inputs must use the zigzag layout (layout_for('ring', P)) unless
    zigzag=False, which expects contiguous shards (and leaves later ranks with more work)."""

    def __init__(self, group, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None,
                 zigzag: bool = True):
        super().__init__(causal, backend, softmax_scale)
        self.group, self.zigzag = group, zigzag

    def forward(self, q, k, v):
        return RingAttentionFn.apply(q, k, v, self.group, *self.kernel_args(q), self.zigzag)[0]

