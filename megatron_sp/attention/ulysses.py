"""DeepSpeed-Ulysses attention: all-to-all [s/P, heads] -> [s, heads/P], any inner attention, all-to-all back."""
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_sp.attention.backends import attention_backward, attention_forward
from megatron_sp.attention.local import AttentionConfig, LocalAttentionFn
from megatron_sp.parallel.comm import AsyncAllToAll, head_to_seq, qkv_seq_to_head

DEFAULT_HEAD_GROUPS = 1
"""No pipelining unless asked: on 2 x H200 (docs/benchmarks.md) G = 2 lost 11 % at 16k and gained 1 %
at 64k, G = 4 lost 40 % at 16k: the per-group collectives and smaller kernels cost more than the
overlap saves while NCCL and the kernel share the GPU."""


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


class UlyssesPipelinedFn(torch.autograd.Function):
    """Ulysses over G head groups, each group's all-to-alls overlapping another group's attention.

    Forward: start the seq->head all-to-alls of q, k, v for every group (one each, so the kernel gets
    q, k, v contiguous straight from the receive buffers: [P, b, s/P, hg/P, d] is [b, s, hg/P, d] for
    b == 1); then per group wait for its inputs, attend, and start sending its output back while the
    next group computes. Transfers queue in issue order on the group's stream, so group g+1's inputs
    arrive during group g's attention. The outputs are copied into [b, s/P, hq, d] at the end.
    Backward: the same with dout in and dq, dk, dv out, the per-group kernel backward using the
    head-scattered q, k, v, out, lse saved by forward (what the unpipelined path keeps too).
    """

    @staticmethod
    def forward(ctx, q, k, v, group, groups: int, causal: bool, scale: float, backend: str):
        # group g's heads of each input: views [b, s/P, hq/G or hkv/G, d], copied once into the send layout
        starts = [[AsyncAllToAll(x, group, 2, 1) for x in xs]
                  for xs in zip(q.chunk(groups, 2), k.chunk(groups, 2), v.chunk(groups, 2))]
        sends_back, saved = [], []
        for qkv in starts:
            qg, kg, vg = (pending.wait() for pending in qkv)  # [b, s, hq/(GP) or hkv/(GP), d]
            out, lse = attention_forward(qg, kg, vg, causal, scale, backend)  # lse [b, hq/(GP), s]
            sends_back.append(AsyncAllToAll(out, group, 1, 2))  # -> [b, s/P, hq/G, d]
            saved += [qg, kg, vg, out, lse]
        out = q.new_empty(q.shape)
        for pending, dst in zip(sends_back, out.chunk(groups, 2)):
            pending.wait_into(dst)
        ctx.save_for_backward(*saved)
        ctx.args = (group, groups, causal, scale, backend)
        ctx.shapes = (q.shape, k.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        group, groups, causal, scale, backend = ctx.args
        saved = ctx.saved_tensors
        starts = [AsyncAllToAll(d, group, 2, 1) for d in dout.chunk(groups, 2)]
        sends_back = []
        for g, pending in enumerate(starts):
            grads = attention_backward(pending.wait(), *saved[5 * g:5 * g + 5], causal, scale, backend)
            sends_back.append([AsyncAllToAll(x, group, 1, 2) for x in grads])  # dq, dk, dv [b, s, h/(GP), d]
        q_shape, kv_shape = ctx.shapes
        grads = [dout.new_empty(shape) for shape in (q_shape, kv_shape, kv_shape)]  # dq, dk, dv [b, s/P, h, d]
        for g, pending in enumerate(sends_back):
            for x, grad in zip(pending, grads):
                x.wait_into(grad.chunk(groups, 2)[g])
        return *grads, None, None, None, None, None


class UlyssesAttention(AttentionConfig):
    """forward(q [b, s/P, hq, d], k, v [b, s/P, hkv, d]) -> out [b, s/P, hq, d] over `group`.
    Needs hq % P == 0 and hkv % P == 0 or P % hkv == 0; inputs use layout_for('ulysses', P).
    head_groups: G for head-group pipelining (UlyssesPipelinedFn), None = DEFAULT_HEAD_GROUPS (head_groups_for),
    1 = one all-to-all each way around one kernel call (DeepSpeed's schedule)."""

    def __init__(self, group, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None,
                 head_groups: int | None = None):
        super().__init__(causal, backend, softmax_scale)
        self.group, self.head_groups = group, head_groups

    def forward(self, q, k, v):
        args = self.kernel_args(q)
        groups = head_groups_for(q.shape[2], k.shape[2], dist.get_world_size(self.group), self.head_groups)
        if groups > 1:
            return UlyssesPipelinedFn.apply(q, k, v, self.group, groups, *args)
        return ulysses_attention(q, k, v, self.group, lambda q, k, v: LocalAttentionFn.apply(q, k, v, *args)[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_groups={self.head_groups or DEFAULT_HEAD_GROUPS}"
