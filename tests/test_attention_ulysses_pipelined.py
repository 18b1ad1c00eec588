"""UlyssesFn at G = 1, 2, 4 head groups, fed strided q/k/v views of one fused projection as the model does,
equals single-process attention and the module fed contiguous q, k, v at G = 1 (float64, gloo)."""
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
    """{(batch, hkv, causal, G): (max diffs vs the reference, vs G = 1 on contiguous inputs, backward node name)}."""
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
            for groups in (1, 2, 4):
                if groups > 1 and (HQ % (groups * world) or hkv % (groups * world)):
                    continue
                module = build_inner_attention("ulysses", state, causal=causal, backend="torch",
                                               ulysses_head_groups=groups)
                got, node = run_fused(module, layout, rank, qkv, dout, hkv)
                results[(batch, hkv, causal, groups)] = (max_diffs(got, ref), max_diffs(got, base), node)
    return results


@pytest.mark.parametrize("world, cases", [
    (2, [(2, HQ), (1, HQ), (2, 4)]),   # MHA (G = 1, 2, 4) at b = 2 and b = 1 (receive buffers are views); GQA 16/4
    (4, [(2, HQ), (1, 8), (1, 2)]),    # MHA (G = 1, 2, 4); GQA 16/8 (G = 1, 2); 16/2 (kv heads replicated, G = 1)
])
def test_pipelined_ulysses_matches_reference_and_unpipelined(world, cases):
    results = run_ranks(world, check_pipelined, cases)
    expected = {(b, hkv, c, g) for b, hkv in cases for c in (True, False) for g in (1, 2, 4)
                if g == 1 or (HQ % (g * world) == 0 and hkv % (g * world) == 0)}
    for per_rank in results:
        assert per_rank.keys() == expected
        for case, (vs_ref, vs_base, node) in per_rank.items():
            assert node.startswith("UlyssesFn"), (case, node)
            assert max(vs_ref.values()) <= TOL, (case, vs_ref)
            assert max(vs_base.values()) <= TOL, (case, vs_base)


def test_head_groups_policy():
    assert head_groups_for(16, 16, 2) == 1          # default: no pipelining (measured slower, docs/benchmarks_history.md)
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


@pytest.mark.parametrize("groups", [1, 2])
def test_compiled_all_to_all_copies_trace_whole_and_match_eager(groups):
    """What the GPU compiles around UlyssesFn's all-to-alls: pack_heads and unpack_heads trace as one graph
    each (fullgraph, aot_eager runs the traced graph on CPU) and give eager's bytes; unpack inverts pack."""
    from megatron_sp.attention import ulysses
    from megatron_sp.kernels.compiled import Fused
    world, b, s, h, d = 2, 2, 6, 8, 4
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    pack = Fused(ulysses.pack_heads, True, backend="aot_eager", devices=("cpu",))
    unpack = Fused(ulysses.unpack_heads, True, backend="aot_eager", devices=("cpu",))
    got, expected = pack(world, groups, q, k, v), ulysses.pack_heads(world, groups, q, k, v)
    assert pack._compiled is not None and len(got) == groups and all(len(per) == 3 for per in got)
    for g in range(groups):
        for x, got_x, expected_x in zip((q, k, v), got[g], expected[g]):
            assert got_x.shape == (world, b, s, h // (groups * world), d) and got_x.is_contiguous()
            assert torch.equal(got_x, expected_x)
            for j in range(world):  # rank j's chunk: heads g*h/G + j*h/(GP) + [0, h/(GP))
                first = g * h // groups + j * h // (groups * world)
                assert torch.equal(got_x[j], x[:, :, first:first + h // (groups * world)])
    back = unpack(*([per[i] for per in got] for i in range(3)))
    assert all(torch.equal(x, y) for x, y in zip(back, (q, k, v)))
