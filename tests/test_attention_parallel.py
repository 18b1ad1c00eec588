"""Ulysses, ring and hybrid attention on forked gloo ranks equal single-process attention (float64)."""
import pytest
import torch
import torch.distributed as dist

from megatron_sp.attention import build_inner_attention
from megatron_sp.attention.backends import attention_forward
from megatron_sp.attention.local import LocalAttention
from megatron_sp.attention.ring import RingAttentionFn
from megatron_sp.parallel.sharding import layout_for
from megatron_sp.parallel.state import ParallelState
from tests.distributed import run_ranks

B, S, HQ, D = 2, 16, 4, 8
TOL = 1e-10


def full_inputs(seed: int, hkv: int):
    """q, k, v, dout on the full sequence: made on rank 0, broadcast so every rank has the same."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, S, HQ, D), (B, S, hkv, D), (B, S, hkv, D), (B, S, HQ, D)]
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    for t in tensors:
        dist.broadcast(t, src=0)
    return tensors


def reference(q, k, v, dout, causal):
    """Single-process out, lse and grads: the torch backend on the full sequence + autograd."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_forward(q, k, v, causal, D ** -0.5, "torch")
    out.backward(dout)
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def gather_full(local, layout, dim=1):
    """Every rank's shard -> the full-sequence tensor (on every rank)."""
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, local.contiguous())
    return layout.unshard(shards, dim=dim)


def run_sharded(module, layout, rank, q, k, v, dout, with_lse=None):
    """Shard the inputs, run module (or with_lse(q, k, v) -> (out, lse)) and backward, unshard all."""
    ql, kl, vl = (layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
    if with_lse is None:
        out, lse = module(ql, kl, vl), None
    else:
        out, lse = with_lse(ql, kl, vl)
    out.backward(layout.shard(dout, rank))
    res = {name: gather_full(t, layout) for name, t in
           (("out", out.detach()), ("dq", ql.grad), ("dk", kl.grad), ("dv", vl.grad))}
    if lse is not None:
        res["lse"] = gather_full(lse, layout, dim=2)
    return res


def max_diffs(got, ref):
    return {name: (got[name] - ref[name]).abs().max().item() for name in got}


def check_strategies(rank, world, configs, kv_heads=(4, 2, 1)):
    """For each (strategy, ulysses_degree, zigzag), causal or not, MHA/GQA/MQA: {case: max diffs}."""
    results = {}
    for strategy, u, zigzag in configs:
        state = ParallelState.build(sp_size=world, ulysses_degree=u)
        layout = layout_for(strategy, world, u)
        if not zigzag:
            layout = type(layout)(world, 1, zigzag=False)
        for causal in (True, False):
            for hkv in kv_heads:
                q, k, v, dout = full_inputs(1000 * world + 10 * hkv + causal, hkv)
                ref = reference(q, k, v, dout, causal)
                module = build_inner_attention(strategy, state, causal=causal, backend="torch")
                with_lse = None
                if strategy == "ring":  # the ring also exposes its merged lse
                    group = state.sp_group
                    with_lse = lambda a, b_, c: RingAttentionFn.apply(  # noqa: E731
                        a, b_, c, group, causal, D ** -0.5, "torch", zigzag)
                got = run_sharded(module, layout, rank, q, k, v, dout, with_lse)
                results[(strategy, u, zigzag, causal, hkv)] = max_diffs(got, ref)
    return results


def assert_exact(results):
    for case, diffs in results.items():
        assert max(diffs.values()) <= TOL, f"{case}: {diffs}"


@pytest.mark.parametrize("world, configs", [
    (1, [("ulysses", 1, True), ("ring", 1, True)]),
    (2, [("ulysses", 2, True), ("ring", 1, True), ("hybrid", 2, True), ("hybrid", 1, True)]),
    (4, [("ulysses", 4, True), ("ring", 1, True), ("ring", 1, False), ("hybrid", 2, True)]),
])
def test_strategies_match_single_process(world, configs):
    results = run_ranks(world, check_strategies, configs)
    assert results[0].keys() == results[-1].keys()
    for per_rank in results:
        assert_exact(per_rank)
    lse_cases = [diffs for case, diffs in results[0].items() if case[0] == "ring"]
    assert lse_cases and all("lse" in diffs for diffs in lse_cases)


def check_broken(rank, world):
    """Attention over the local shard only: what SP without communication would compute."""
    layout = layout_for("ring", world)
    q, k, v, dout = full_inputs(7, HQ)
    ref = reference(q, k, v, dout, causal=True)
    got = run_sharded(LocalAttention(causal=True, backend="torch"), layout, rank, q, k, v, dout)
    return max_diffs(got, ref)


def test_local_only_attention_fails_the_check():
    diffs = run_ranks(2, check_broken)[0]
    assert diffs["out"] > 1e-3 and diffs["dk"] > 1e-3, diffs


def check_against_deepspeed(rank, world, kv_heads):
    """Our Ulysses vs DeepSpeed's DistributedAttention around the same local attention."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35 s C++ build
    deepspeed.init_distributed(dist_backend="gloo")
    state = ParallelState.build(sp_size=world)
    layout = layout_for("ulysses", world)
    inner = LocalAttention(causal=True, backend="torch")
    theirs = DistributedAttention(inner, state.sp_group, scatter_idx=2, gather_idx=1)
    ours = build_inner_attention("ulysses", state, causal=True, backend="torch")
    diffs = {}
    for hkv in kv_heads:
        q, k, v, dout = full_inputs(99 + hkv, hkv)
        got = run_sharded(ours, layout, rank, q, k, v, dout)
        peer = run_sharded(lambda a, b_, c: theirs(a, b_, c, 0), layout, rank, q, k, v, dout)
        diffs[hkv] = max_diffs(got, peer)
    return diffs


def test_ulysses_equals_deepspeed_distributed_attention():
    pytest.importorskip("deepspeed")
    for per_rank in run_ranks(2, check_against_deepspeed, (4, 2)):
        for hkv, diffs in per_rank.items():
            assert max(diffs.values()) <= TOL, (hkv, diffs)


def check_ring_over_triton(rank, world):
    """The ring (zigzag, causal, GQA) over the project's Triton kernel, interpreted on CPU in fp32."""
    state = ParallelState.build(sp_size=world, ulysses_degree=1)
    layout = layout_for("ring", world)
    q, k, v, dout = (torch.nn.functional.pad(t, (0, 64 - D)).float() for t in full_inputs(5, 2))
    ref = reference(q.double(), k.double(), v.double(), dout.double(), causal=True)
    ring = lambda a, b_, c: RingAttentionFn.apply(a, b_, c, state.sp_group, True, D ** -0.5, "triton")  # noqa: E731
    return max_diffs(run_sharded(None, layout, rank, q, k, v, dout, ring), ref)


def test_ring_over_triton_kernel():
    from megatron_sp.attention.backends import resolve_backend
    try:
        resolve_backend("triton", "cpu", torch.float32)
    except ValueError as exc:
        pytest.skip(str(exc))
    for diffs in run_ranks(2, check_ring_over_triton, env={"TRITON_INTERPRET": "1"}):
        assert max(diffs.values()) <= 1e-5, diffs
