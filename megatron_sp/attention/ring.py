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
    kv = torch.stack([k, v])  # [2, b, s/P, hkv, d]: one message per step
    spare = torch.empty_like(kv)
    out = lse = None
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:  # the next block travels while this one is computed
            nxt, handles = ring.send_recv(kv, spare)
        block = _block(step, ring.rank, ring.size, q.shape[1], causal, zigzag)
        if block is not None:
            rows, cols, mask = block
            o, l = attention_forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], mask, scale, backend)
            if out is None:  # step 0 covers every row
                out, lse = o.to(acc), l.to(acc)
            else:
                _merge(out[:, rows], lse[:, :, rows], o, l)
        if not last:
            ring.wait(handles)
            kv, spare = nxt, kv
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, ring: Ring, causal: bool, scale: float, backend: str,
                  zigzag: bool = True):
    """(dq, dk, dv) for ring_forward. Every block is recomputed against the final out and lse, so
    its gradients are exact. dk/dv of a k/v block ride the ring one step behind it, in fp32/fp64,
    and arrive back at the owner after P-1 hops (the owner keeps its own step-0 share)."""
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    spare = torch.empty_like(kv)
    dkv_home = torch.zeros(kv.shape, dtype=acc, device=q.device)  # [2, b, s/P, hkv, d]
    dkv = dkv_spare = dkv_received = dkv_handles = None
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            nxt, kv_handles = ring.send_recv(kv, spare)
        block = _block(step, ring.rank, ring.size, q.shape[1], causal, zigzag)
        if block is not None:
            rows, cols, mask = block
            bdq, bdk, bdv = attention_backward(dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                                               out[:, rows], lse[:, :, rows], mask, scale, backend)
            dq[:, rows] += bdq
        if step == 0:
            target = dkv_home
        elif step == 1:  # the travelling accumulator of the block that just arrived starts here
            target = dkv = torch.zeros_like(dkv_home)
            dkv_spare = torch.empty_like(dkv_home)
        else:
            ring.wait(dkv_handles)
            dkv, dkv_spare = dkv_received, dkv
            target = dkv
        if block is not None:
            target[0][:, cols] += bdk
            target[1][:, cols] += bdv
        if step > 0:
            dkv_received, dkv_handles = ring.send_recv(dkv, dkv_spare)
        if not last:
            ring.wait(kv_handles)
            kv, spare = nxt, kv
    if dkv_handles is not None:  # our own block's accumulator, back from rank - 1
        ring.wait(dkv_handles)
        dkv_home += dkv_received
    return dq.to(q.dtype), dkv_home[0].to(k.dtype), dkv_home[1].to(v.dtype)


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

