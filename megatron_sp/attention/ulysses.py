"""DeepSpeed-Ulysses attention: all-to-all [s/P, heads] -> [s, heads/P], a local kernel, all-to-all back.

UlyssesFn moves q, k, v with one all-to-all each, straight into receive buffers the kernel reads as
they are, and pipelines head groups on request. The kernel is a (forward, backward) pair over the
gathered sequence: the local kernels for the Ulysses strategy (local_kernels), the ring for hybrid.
"""
from functools import partial

import torch
import torch.distributed as dist

from megatron_sp.attention.backends import attention_backward, attention_forward
from megatron_sp.attention.local import AttentionConfig, LocalAttentionFn
from megatron_sp.kernels.compiled import Fused
from megatron_sp.parallel.comm import AsyncAllToAll, send_layout

DEFAULT_HEAD_GROUPS = 1
"""No head-group pipelining unless asked: on 2 x H200 (docs/benchmarks_history.md) G = 2 lost 11-20 % at 16k and
0-1 % at 64k, G = 4 lost 40 % at 16k, and end to end at 32k G = 2 gained nothing: the per-group
collectives and smaller kernels cost more than the overlap saves while NCCL and the kernel share the GPU."""


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


def head_groups_for(num_heads: int, num_kv_heads: int, degree: int, requested: int | None = None) -> int:
    """G, the head groups Ulysses pipelines over `degree` ranks (1: no pipelining).

    Group g holds query heads [g*hq/G, (g+1)*hq/G) and kv heads [g*hkv/G, (g+1)*hkv/G), so it needs
    hq % (G*P) == 0 and hkv % (G*P) == 0: then the q heads each rank gets of a group are exactly those
    of the kv heads it gets of that group. Replicated kv heads (hkv < P) keep G = 1. requested None
    means DEFAULT_HEAD_GROUPS; an explicit G that cannot split is a one-line ValueError."""
    copies = kv_replication(num_heads, num_kv_heads, degree)
    if requested is None:
        return DEFAULT_HEAD_GROUPS
    if requested < 1:
        raise ValueError(f"Ulysses head groups must be positive, got {requested}")
    if requested > 1 and (copies > 1 or num_heads % (requested * degree) or num_kv_heads % (requested * degree)):
        raise ValueError(f"Ulysses head groups {requested} over degree {degree} need query heads {num_heads} "
                         f"and key/value heads {num_kv_heads} divisible by {requested * degree}; use 1")
    return requested


def replicate_kv(k, v, num_heads: int, degree: int):
    """k, v [b, s/P, hkv, d] with hkv < P repeated to [b, s/P, P, d] (kv_replication), else as they are.
    kv head j -> heads j*c .. j*c+c-1, so rank i receives kv head i // c, the head its query heads
    i*hq/P .. belong to; autograd sums the copies' gradients back."""
    copies = kv_replication(num_heads, k.shape[2], degree)
    if copies == 1:
        return k, v
    return k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)


def pack_heads(world: int, groups: int, *xs) -> list[list[torch.Tensor]]:
    """Send buffers, per head group g, per tensor: [b, s/P, h, d] -> [P, b, s/P, h/(GP), d] contiguous,
    rank j's chunk holding heads g*h/G + j*h/(GP) + [0, h/(GP)). One fused copy on GPU (PACK)."""
    chunks = [x.chunk(groups, 2) for x in xs]
    return [[send_layout(c[g], world, 2).contiguous() for c in chunks] for g in range(groups)]


def unpack_heads(*per_tensor: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each tensor its groups' receive buffers [P, b, s/P, h/(GP), d] (chunk j from rank j) ->
    [b, s/P, h, d], the inverse of pack_heads' head order. One fused copy on GPU (UNPACK)."""
    return [torch.cat([r.movedim(0, 2).flatten(2, 3) for r in recvs], dim=2) for recvs in per_tensor]


def seq_view(recv: torch.Tensor) -> torch.Tensor:
    """Receive buffer [P, b, s/P, h', d] of a seq->head all-to-all -> [b, s, h', d]: a view when b == 1."""
    return recv.movedim(0, 1).flatten(1, 2)


def send_seq(x: torch.Tensor, world: int) -> torch.Tensor:
    """[b, s, h', d] -> send buffer [P, b, s/P, h', d] of a head->seq all-to-all (no copy when b == 1)."""
    return send_layout(x, world, 1).contiguous()


PACK, UNPACK = Fused(pack_heads, True), Fused(unpack_heads, True)


def local_kernels(causal: bool, scale: float, backend: str, docs=None):
    """(forward(q, k, v) -> (out, lse), backward(dout, q, k, v, out, lse) -> (dq, dk, dv)) of the
    single-device kernel: what UlyssesFn runs over the gathered sequence for the Ulysses strategy.
    docs: document ids int32 [b, s] of the gathered sequence, or None."""
    kw = dict(causal=causal, scale=scale, backend=backend, q_docs=docs, k_docs=docs)
    return partial(attention_forward, **kw), partial(attention_backward, **kw)


def copy_fns(fused: bool):
    """(pack, unpack): compiled on GPU when fused (--fused-elementwise), else the eager definitions."""
    return (PACK, UNPACK) if fused else (pack_heads, unpack_heads)


class UlyssesFn(torch.autograd.Function):
    """Ulysses around an attention kernel pair, over G head groups (G = 1: no pipelining).

    kernels = (forward(q, k, v) -> (out, lse), backward(dout, q, k, v, out, lse) -> (dq, dk, dv)) on
    [b, s, h', d] tensors: local_kernels for the Ulysses strategy; hybrid passes the ring over its
    ring group (the forward saves q, k, v, out, lse per group for the backward either way).

    Copies: each of q, k, v is packed once into its send layout [P, b, s/P, hg/P, d] and lands in a
    receive buffer that for b == 1 *is* the [b, s, hg/P, d] tensor the kernel reads, so the kernel
    gets q, k, v with no further copy and writes out and dq, dk, dv in that same layout, which is
    already the send layout of the way back; only the result is copied into [b, s/P, h, d]. (The
    stacked all-to-all of q, k, v this replaced copied about twice as many bytes.)

    G > 1 overlaps transfers with compute. Forward: start the seq->head all-to-alls of q, k, v for
    every group; then per group wait for its inputs, attend, and start sending its output back while
    the next group computes. Transfers queue in issue order on the group's stream, so group g+1's
    inputs arrive during group g's attention. Backward: the same with dout in and dq, dk, dv out, the
    per-group kernel backward using the head-scattered q, k, v, out, lse saved by forward.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, groups: int, fused: bool, kernels):
        world, (pack, unpack) = dist.get_world_size(group), copy_fns(fused)
        starts = [[AsyncAllToAll(x, group) for x in per_group] for per_group in pack(world, groups, q, k, v)]
        sends_back, saved = [], []
        for transfers in starts:
            qg, kg, vg = (seq_view(t.wait()) for t in transfers)  # [b, s, hq/(GP) or hkv/(GP), d]
            out, lse = kernels[0](qg, kg, vg)  # lse [b, hq/(GP), s]
            sends_back.append(AsyncAllToAll(send_seq(out, world), group))
            saved += [qg, kg, vg, out, lse]
        ctx.save_for_backward(*saved)
        ctx.args = (group, groups, fused, kernels)
        return unpack([t.wait() for t in sends_back])[0]  # [b, s/P, hq, d]

    @staticmethod
    def backward(ctx, dout):
        group, groups, fused, kernels = ctx.args
        world, saved, (pack, unpack) = dist.get_world_size(group), ctx.saved_tensors, copy_fns(fused)
        starts = [AsyncAllToAll(per_group[0], group) for per_group in pack(world, groups, dout)]
        sends_back = []
        for g, transfer in enumerate(starts):
            grads = kernels[1](seq_view(transfer.wait()), *saved[5 * g:5 * g + 5])
            sends_back.append([AsyncAllToAll(send_seq(x, world), group) for x in grads])  # dq, dk, dv
        dq, dk, dv = unpack(*([t[i].wait() for t in sends_back] for i in range(3)))  # [b, s/P, h, d]
        return dq, dk, dv, None, None, None, None


class UlyssesAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d], documents=None) -> out [b, s/P, hq, d] over `group`.
    Needs hq % P == 0 and hkv % P == 0 or P % hkv == 0; inputs use layout_for('ulysses', P).
    head_groups: G for head-group pipelining (UlyssesFn), None = DEFAULT_HEAD_GROUPS (head_groups_for),
    1 = all-to-alls each way around one kernel call (DeepSpeed's schedule). fused: pack and unpack
    the all-to-all buffers with compiled copies on GPU (copy_fns). documents: the samples' Documents
    (attention/documents.py); layout_for('ulysses', P) is contiguous, so the sequence the all-to-all
    gathers is the whole sample in order and the kernel masks it with the whole sample's ids."""

    def __init__(self, group, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None,
                 head_groups: int | None = None, fused: bool = True):
        super().__init__(causal, backend, softmax_scale)
        self.group, self.head_groups, self.fused = group, head_groups, fused

    def forward(self, q, k, v, documents=None):
        world = dist.get_world_size(self.group)
        docs = None
        if documents is not None:
            documents.check_local_length(q.shape[1], world)
            docs = documents.ids
        if world == 1:
            return LocalAttentionFn.apply(q, k, v, *self.kernel_args(q, documents), docs)[0]
        groups = head_groups_for(q.shape[2], k.shape[2], world, self.head_groups)
        k, v = replicate_kv(k, v, q.shape[2], world)
        kernels = local_kernels(*self.kernel_args(q, documents, gathered=world), docs)
        return UlyssesFn.apply(q, k, v, self.group, groups, self.fused, kernels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_groups={self.head_groups or DEFAULT_HEAD_GROUPS}"
