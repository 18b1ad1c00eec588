"""Past the head count: 12 heads over 8 ranks (12 % 8 != 0), where Ulysses alone cannot go."""
import torch
import torch.distributed as dist

from megatron_sp.attention import build_inner_attention, validate_attention_config
from megatron_sp.attention.backends import attention_forward
from megatron_sp.parallel.sharding import layout_for
from megatron_sp.parallel.state import ParallelState
from tests.distributed import run_ranks
from tests.test_attention_parallel import TOL, max_diffs, run_sharded

B, S, HQ, D, P = 1, 32, 12, 8, 8


def check_wide(rank, world, configs):
    results = {}
    for strategy, u, hkv in configs:
        gen = torch.Generator().manual_seed(hkv * 10 + u)
        q, dout = (torch.randn(B, S, HQ, D, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(B, S, hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
        for t in (q, k, v, dout):
            dist.broadcast(t, src=0)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        out, _ = attention_forward(qr, kr, vr, True, D ** -0.5, "torch")
        out.backward(dout)
        ref = {"out": out.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
        state = ParallelState.build(sp_size=world, ulysses_degree=u)
        module = build_inner_attention(strategy, state, causal=True, backend="torch")
        got = run_sharded(module, layout_for(strategy, world, u), rank, q, k, v, dout)
        results[(strategy, u, hkv)] = max_diffs(got, ref)
    return results


def test_twelve_heads_over_eight_ranks():
    configs = [("ring", 1, 12), ("ring", 1, 4), ("hybrid", 4, 12), ("hybrid", 4, 4), ("hybrid", 2, 2)]
    for strategy, u, hkv in configs:  # each layout is one the config check accepts
        validate_attention_config(strategy=strategy, num_heads=HQ, num_kv_heads=hkv, sp_size=P,
                                  ulysses_degree=u, seq_length=S, world_size=P)
    for per_rank in run_ranks(P, check_wide, configs):
        for case, diffs in per_rank.items():
            assert max(diffs.values()) <= TOL, (case, diffs)
