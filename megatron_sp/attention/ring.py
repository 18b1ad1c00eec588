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

With document ids (packed samples) a block is further cut to the rows and keys that share a document,
or skipped, and a block travels only as far, and with only the rows, that later ranks still need
(ring_plan.py). The zigzag layout stays: with long documents the work is still causal-shaped.
"""
import torch

from megatron_sp.attention.backends import accumulation_dtype, attention_backward, attention_forward
from megatron_sp.attention.documents import ring_layout
from megatron_sp.attention.local import AttentionConfig
from megatron_sp.attention.ring_plan import ALL, document_plan, plain_plan
from megatron_sp.parallel.comm import Ring


def _merge(out, lse, block_out, block_lse) -> None:
    """In place: out [b, n, h, d] and lse [b, h, n] (accumulators) absorb a block's partial result
    by the log-sum-exp rule: out = out * e^(lse - new) + o * e^(l - new), new = logaddexp(lse, l).
    A block row that saw no key (l = -inf) leaves the row as it is; the accumulator itself is finite
    from step 0 on, where every row sees at least itself."""
    block_lse = block_lse.to(lse.dtype)
    new = torch.logaddexp(lse, block_lse)
    weight = lambda x: torch.exp(x - new).transpose(1, 2).unsqueeze(-1)  # [b, n, h, 1]  # noqa: E731
    out.mul_(weight(lse)).add_(block_out.to(out.dtype) * weight(block_lse))
    lse.copy_(new)


class _Schedule:
    """The plan (ring_plan.RingPlan) of one call, with the device document ids its masked pieces need."""

    def __init__(self, ring: Ring, n: int, causal: bool, zigzag: bool, documents=None):
        self.ring = ring
        if documents is None:
            self.plan, self.docs = plain_plan(ring.size, ring.rank, n, causal, zigzag), None
            return
        documents.check_local_length(n, ring.size)
        layout = ring_layout(ring.size, zigzag)
        blocks = [documents.rows_of(layout, i) for i in range(ring.size)]  # (host, device) [b, n]
        key = ("ring plan", ring.size, ring.rank, n, causal, zigzag)
        self.plan = documents.cached(key, lambda: document_plan(ring.size, ring.rank, n, causal, zigzag,
                                                                [host for host, _ in blocks]))
        self.docs = [dev for _, dev in blocks]

    def doc_args(self, piece, src: int) -> dict:
        """q_docs / k_docs for a piece that needs the document mask, else nothing."""
        if not piece.masked:
            return {}
        q_docs = self.docs[self.ring.rank][piece.batch, piece.rows]
        diagonal = src == self.ring.rank and piece.rows == piece.cols  # one tensor: varlen reads it once
        return {"q_docs": q_docs, "k_docs": q_docs if diagonal else self.docs[src][piece.batch, piece.cols]}

    def kv_hop(self, step: int, kv: torch.Tensor):
        """Send on the rows of the held block [2, b, held, hkv, d] still needed down the ring (maybe none),
        receive the next block's: both sizes are in the plan."""
        plan = self.plan
        held, onward = plan.held(step), plan.carried(plan.source(step), step + 1)
        send = kv if onward == held else kv[:, :, _within(onward, held)].contiguous()
        incoming = plan.held(step + 1)
        recv = kv.new_empty((2, kv.shape[1], incoming.stop - incoming.start, *kv.shape[3:]))
        return self.ring.shift(send, recv)

    def grads_hop(self, step: int, grads, like: torch.Tensor, acc: torch.dtype):
        """Send on the dk/dv of the block held at `step` ([2, b, grad rows, hkv, d], or None: empty) and
        receive those of the block held next. A block's first hop goes in the kernel's dtype (one block's
        gradients: exact), later hops in `acc`."""
        plan, b, tail = self.plan, like.shape[1], like.shape[3:]
        dtype_of = lambda src: like.dtype if plan.first_use(src) == step else acc  # noqa: E731 - both ends agree
        if grads is None:  # an empty message, in the dtype the next rank expects
            grads = like.new_empty((2, b, 0, *tail), dtype=dtype_of(plan.source(step)))
        nxt = plan.source(step + 1)
        rows = plan.grad_rows(nxt) if plan.grads_after(nxt, step) else slice(0, 0)
        return self.ring.shift(grads, like.new_empty((2, b, rows.stop - rows.start, *tail), dtype=dtype_of(nxt)))


def _within(rows: slice, outer: slice) -> slice:
    """Rows given in a block's own numbering, as indices into a buffer holding its rows `outer`."""
    return slice(rows.start - outer.start, rows.stop - outer.start)


def ring_forward(q, k, v, ring: Ring, causal: bool, scale: float, backend: str, zigzag: bool = True,
                 documents=None):
    """q [b, s/P, hq, d], k/v [b, s/P, hkv, d] -> (out [b, s/P, hq, d], lse [b, hq, s/P] fp32/fp64).
    documents: the samples' Documents (attention/documents.py) for a document mask, or None."""
    acc = accumulation_dtype(q.dtype)
    sched = _Schedule(ring, q.shape[1], causal, zigzag, documents)
    kv = torch.stack([k, v])  # [2, b, s/P, hkv, d]: one message per hop
    out = lse = None
    for step in range(ring.size):
        hop = sched.kv_hop(step, kv) if step < ring.size - 1 else None  # the next block travels meanwhile
        src, held = sched.plan.source(step), sched.plan.held(step)
        for piece in sched.plan.pieces(step):
            cols = _within(piece.cols, held)
            o, l = attention_forward(q[piece.batch, piece.rows], kv[0][piece.batch, cols], kv[1][piece.batch, cols],
                                     piece.causal, scale, backend, **sched.doc_args(piece, src))
            if out is None and piece.batch == ALL and piece.rows == slice(0, q.shape[1]):
                out, lse = o.to(acc), l.to(acc)  # step 0 covers every row
                continue
            if out is None:
                out = q.new_zeros(q.shape, dtype=acc)
                lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
            _merge(out[piece.batch, piece.rows], lse[piece.batch, :, piece.rows], o, l)
        if hop is not None:
            kv = hop.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, ring: Ring, causal: bool, scale: float, backend: str,
                  zigzag: bool = True, documents=None):
    """(dq, dk, dv) for ring_forward. Every block is recomputed against the final out and lse, so
    its gradients are exact.

    Schedule: step 0's head, the P-1 remote blocks, step 0's tail (RingPlan.local_split). The dk/dv of
    a remote k/v block ride the ring one hop behind it, from its first use on, and arrive back at its
    owner after P-1 hops. Their first hop carries one block's gradients, sent in the kernel's dtype
    (exact, half the bytes of fp32); later hops carry sums, in fp32/fp64. Local sums are fp32/fp64 too."""
    acc = accumulation_dtype(q.dtype)
    sched = _Schedule(ring, q.shape[1], causal, zigzag, documents)
    plan = sched.plan
    local_kv = torch.stack([k, v])  # [2, b, s/P, hkv, d]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros(local_kv.shape, dtype=acc, device=q.device)

    def add_grads(piece, src, kv, held, kv_grads, grad_rows):
        cols = _within(piece.cols, held)
        bdq, bdk, bdv = attention_backward(
            dout[piece.batch, piece.rows], q[piece.batch, piece.rows], kv[0][piece.batch, cols],
            kv[1][piece.batch, cols], out[piece.batch, piece.rows], lse[piece.batch, :, piece.rows],
            piece.causal, scale, backend, **sched.doc_args(piece, src))
        dq[piece.batch, piece.rows] += bdq
        grad_cols = _within(piece.cols, grad_rows)
        kv_grads[0][piece.batch, grad_cols] += bdk
        kv_grads[1][piece.batch, grad_cols] += bdv

    everything = slice(0, q.shape[1])
    head, tail = plan.local_split()
    kv_hop = sched.kv_hop(0, local_kv) if ring.size > 1 else None
    for piece in head:
        add_grads(piece, ring.rank, local_kv, everything, dkv, everything)
    grads_hop = None  # the travelling dk/dv of the previous step's block
    for step in range(1, ring.size):
        kv = kv_hop.wait()
        kv_hop = sched.kv_hop(step, kv) if step < ring.size - 1 else None
        src, rows = plan.source(step), plan.grad_rows(plan.source(step))
        arrived = grads_hop.wait() if grads_hop is not None else None
        kv_grads = None
        if plan.grads_after(src, step - 1):
            kv_grads = arrived.to(acc)
        elif plan.grads_after(src, step):  # first used here: one block's gradients, in the kernel's dtype
            kv_grads = kv.new_zeros((2, kv.shape[1], rows.stop - rows.start, *kv.shape[3:]))
        for piece in plan.pieces(step):
            add_grads(piece, src, kv, plan.held(step), kv_grads, rows)
        grads_hop = sched.grads_hop(step, kv_grads, local_kv, acc)
    for piece in tail:
        add_grads(piece, ring.rank, local_kv, everything, dkv, everything)
    if grads_hop is not None:  # our own k/v's gradients from the other ranks, home from rank - 1
        own = plan.grad_rows(ring.rank)
        dkv[:, :, own] += grads_hop.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttentionFn(torch.autograd.Function):
    """Forward: ring_forward over `group` -> (out, lse; lse not differentiable).
    Backward: ring_backward with the saved final out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float, backend: str, zigzag: bool = True,
                documents=None):
        # saved dense: a view of the fused qkv projection would keep all of it alive until backward
        q, k, v = (x.contiguous() for x in (q, k, v))
        ring = Ring(group)
        out, lse = ring_forward(q, k, v, ring, causal, scale, backend, zigzag, documents)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, causal, scale, backend, zigzag, documents)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv = ring_backward(dout.contiguous(), *ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


class RingAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d], documents=None) -> out [b, s/P, hq, d] over the
    ring `group`. No head constraint. Causal inputs must use the zigzag layout (layout_for('ring', P))
    unless zigzag=False, which expects contiguous shards (and leaves later ranks with more work).
    documents: the samples' Documents (attention/documents.py); each rank's ids are cut by that layout."""

    def __init__(self, group, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None,
                 zigzag: bool = True):
        super().__init__(causal, backend, softmax_scale)
        self.group, self.zigzag = group, zigzag

    def forward(self, q, k, v, documents=None):
        return RingAttentionFn.apply(q, k, v, self.group, *self.kernel_args(q, documents), self.zigzag,
                                     documents)[0]

