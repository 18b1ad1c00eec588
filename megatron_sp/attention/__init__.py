"""Attention for sequence parallelism: pick a strategy's module for the model's `inner_attention` slot.

Every module is called as module(q, k, v) or, for packed samples, module(q, k, v, documents=Documents(ids))."""
from torch import nn

from megatron_sp.attention.backends import (attention_backward, attention_forward, documents_unsupported,
                                            resolve_backend)
from megatron_sp.attention.documents import Documents
from megatron_sp.attention.hybrid import HybridAttention
from megatron_sp.attention.local import LocalAttention
from megatron_sp.attention.ring import RingAttention
from megatron_sp.attention.ulysses import UlyssesAttention, head_groups_for, kv_replication
from megatron_sp.parallel.sharding import layout_for, ulysses_degree_of

STRATEGIES = ("local", "ulysses", "ring", "hybrid")


def validate_attention_config(*, strategy: str, num_heads: int, num_kv_heads: int, sp_size: int,
                              ulysses_degree: int | None, seq_length: int, world_size: int,
                              ulysses_head_groups: int | None = None, documents: bool = False,
                              backend: str = "auto") -> None:
    """Raise a one-line ValueError for an attention setup that cannot run; needs no process group.
    `ulysses_degree` matters for hybrid only (ulysses uses sp_size, ring 1); `ulysses_head_groups`
    for ulysses only (None = auto). `documents`: document masks (--reset-attention-mask), which
    every strategy supports and the kernel `backend` must too (auto picks one that does)."""
    if documents and backend != "auto" and (reason := documents_unsupported(backend)):
        raise ValueError(reason)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if sp_size < 1 or sp_size > world_size:
        raise ValueError(f"sequence-parallel size {sp_size} must be between 1 and the world size {world_size}")
    if world_size % sp_size:
        raise ValueError(f"world size {world_size} is not divisible by sequence-parallel size {sp_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"attention heads {num_heads} are not a multiple of key/value heads {num_kv_heads}")
    if sp_size == 1 or strategy == "local":
        if sp_size > 1:
            raise ValueError(f"strategy 'local' cannot split a sequence over {sp_size} ranks; "
                             "choose ulysses, ring or hybrid")
        return
    degree = ulysses_degree_of(strategy, sp_size, ulysses_degree)
    if degree < 1 or sp_size % degree:
        raise ValueError(f"Ulysses degree {degree} must be a positive divisor of sequence-parallel size {sp_size}")
    kv_replication(num_heads, num_kv_heads, degree)
    if strategy == "ulysses":
        head_groups_for(num_heads, num_kv_heads, degree, ulysses_head_groups)
    layout_for(strategy, sp_size, degree).check_seq_len(seq_length)


def build_inner_attention(strategy: str, parallel_state=None, *, causal: bool = True, backend: str = "auto",
                          softmax_scale: float | None = None, ulysses_head_groups: int | None = None,
                          fused: bool = True) -> nn.Module:
    """The attention module for `strategy` (local|ulysses|ring|hybrid) over parallel_state's groups;
    LocalAttention when there is no state or sp_size == 1. `ulysses_head_groups`: Ulysses' head-group
    pipelining (None = the default, 1 = off; see ulysses.head_groups_for); the other strategies ignore it.
    `fused`: compiled copies around the all-to-alls of ulysses and hybrid on GPU (--no-fused-elementwise
    turns them off)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    kw = dict(causal=causal, backend=backend, softmax_scale=softmax_scale)
    if strategy == "local" or parallel_state is None or parallel_state.sp_size == 1:
        return LocalAttention(**kw)
    if strategy == "ulysses":
        return UlyssesAttention(parallel_state.sp_group, **kw, head_groups=ulysses_head_groups, fused=fused)
    if strategy == "ring":
        return RingAttention(parallel_state.sp_group, **kw)
    return HybridAttention(parallel_state.ulysses_group, parallel_state.ring_group, **kw, fused=fused)


__all__ = ["attention_forward", "attention_backward", "resolve_backend", "build_inner_attention",
           "validate_attention_config", "LocalAttention", "UlyssesAttention", "RingAttention",
           "HybridAttention", "Documents", "STRATEGIES"]
