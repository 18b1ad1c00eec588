"""Ulysses with head-group pipelining (G > 1) equals single-process attention and the G = 1 path (float64, gloo)."""
import pytest
import torch
import torch.distributed as dist

from megatron_sp.attention import build_inner_attention, validate_attention_config
from megatron_sp.attention.ulysses import head_groups_for
from megatron_sp.parallel.sharding import layout_for
from megatron_sp.parallel.state import ParallelState
from tests.distributed import run_ranks
from tests.test_attention_parallel import D, TOL, gather_full, max_diffs, reference, run_sharded

S, HQ = 16, 16


def inputs(seed: int, batch: int, hkv: int):
    """Full-sequence qkv [b, s, hq + 2*hkv, d] (one fused projection output) and dout, same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, S, HQ + 2 * hkv, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, S, HQ, D, generator=gen, dtype=torch.float64)
    for t in (qkv, dout):
        dist.broadcast(t, src=0)
    return qkv, dout


def run_fused(module, layout, rank, qkv, dout, hkv):
    """Like run_sharded, but q, k, v are strided views of this rank's fused qkv shard (as the model
    hands them over) and their gradients land in one qkv gradient. -> (unsharded results, grad_fn name)."""
    local = layout.shard(qkv, rank).clone().requires_grad_()
    out = module(*local.split([HQ, hkv, hkv], dim=2))
    out.backward(layout.shard(dout, rank))
    dq, dk, dv = local.grad.split([HQ, hkv, hkv], dim=2)
    return {name: gather_full(t, layout) for name, t in
            (("out", out.detach()), ("dq", dq), ("dk", dk), ("dv", dv))}, type(out.grad_fn).__name__


def check_pipelined(rank, world, cases):
    """{(batch, hkv, causal, G): (max diffs vs the reference, vs G = 1, backward node name)}."""
    state = ParallelState.build(sp_size=world)
    layout = layout_for("ulysses", world)
    results = {}
    for batch, hkv in cases:
        for causal in (True, False):
            qkv, dout = inputs(100 * world + 10 * hkv + 2 * batch + causal, batch, hkv)
            q, k, v = (t.contiguous() for t in qkv.split([HQ, hkv, hkv], dim=2))
            ref = reference(q, k, v, dout, causal)
            base = run_sharded(build_inner_attention("ulysses", state, causal=causal, backend="torch",
                                                     ulysses_head_groups=1), layout, rank, q, k, v, dout)
            for groups in (2, 4):
                if HQ % (groups * world) or hkv % (groups * world):
                    continue
                module = build_inner_attention("ulysses", state, causal=causal, backend="torch",
                                               ulysses_head_groups=groups)
                got, node = run_fused(module, layout, rank, qkv, dout, hkv)
                results[(batch, hkv, causal, groups)] = (max_diffs(got, ref), max_diffs(got, base), node)
    return results


@pytest.mark.parametrize("world, cases", [
    (2, [(2, HQ), (1, HQ), (2, 4)]),   # MHA (G = 2, 4) at b = 2 and b = 1 (receive buffers are views); GQA 16/4
    (4, [(2, HQ), (1, 8)]),            # MHA (G = 2, 4); GQA 16/8 (G = 2)
])
def test_pipelined_ulysses_matches_reference_and_unpipelined(world, cases):
    results = run_ranks(world, check_pipelined, cases)
    expected = {(b, hkv, c, g) for b, hkv in cases for c in (True, False) for g in (2, 4)
                if HQ % (g * world) == 0 and hkv % (g * world) == 0}
    for per_rank in results:
        assert per_rank.keys() == expected
        for case, (vs_ref, vs_base, node) in per_rank.items():
            assert node.startswith("UlyssesPipelinedFn"), (case, node)
            assert max(vs_ref.values()) <= TOL, (case, vs_ref)
            assert max(vs_base.values()) <= TOL, (case, vs_base)


def test_head_groups_policy():
    assert head_groups_for(16, 16, 2) == 1          # default: no pipelining (measured slower, docs/benchmarks.md)
    assert head_groups_for(16, 4, 2, requested=2) == 2  # kv heads bound G: 4 % (G * 2) == 0
    assert head_groups_for(16, 4, 2, requested=1) == 1
    assert head_groups_for(16, 16, 4, requested=4) == 4
    for requested, heads, kv, degree in ((4, 16, 4, 2), (2, 16, 2, 4), (3, 16, 16, 2), (0, 16, 16, 2)):
        with pytest.raises(ValueError) as err:
            head_groups_for(heads, kv, degree, requested)
        assert "head groups" in str(err.value) and "\n" not in str(err.value)


def test_validate_rejects_unsplittable_head_groups():
    good = dict(strategy="ulysses", num_heads=16, num_kv_heads=4, sp_size=2, ulysses_degree=None,
                seq_length=64, world_size=2)
    validate_attention_config(**good, ulysses_head_groups=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        validate_attention_config(**good, ulysses_head_groups=4)
    validate_attention_config(**{**good, "strategy": "ring"}, ulysses_head_groups=4)  # ignored off Ulysses
