"""Document-masked attention (packed samples): the torch reference, the varlen glue, and every strategy at
SP 1, 2, 4 (hybrid 2 x 2) equal to single-device masked attention in float64, and the ring's skipping."""
import pytest
import torch

from megatron_sp.attention import (Documents, LocalAttention, RingAttention, build_inner_attention,
                                   validate_attention_config)
from megatron_sp.attention.backends import attention_backward, attention_forward, resolve_backend
from megatron_sp.attention.varlen import segments, varlen_backward, varlen_forward
from megatron_sp.data.loader import document_ids
from megatron_sp.parallel.sharding import SequenceLayout, layout_for
from megatron_sp.parallel.state import ParallelState
from tests.distributed import run_ranks
from tests.test_attention_parallel import gather_full, max_diffs

EOD, S, HQ, D = 99, 32, 4, 8
TOL = 1e-10


def tokens_with_documents(lengths: list[int], last_eod: bool = True) -> torch.Tensor:
    """One sample of S tokens: documents of the given lengths, each ended by an EOD (the last one only
    when last_eod); an empty list is one document without any EOD."""
    tokens = torch.arange(S) % 7
    for end in torch.tensor(lengths).cumsum(0)[:None if last_eod else -1].tolist():
        tokens[end - 1] = EOD
    return tokens


SAMPLES = {  # S = 32; at SP 4 the zigzag chunks are 4 tokens and rank r holds chunks r and 7 - r
    "short documents, 1-token ones, EOD last": tokens_with_documents([1, 5, 1, 3, 9, 1, 2, 10]),
    "a document over every rank": tokens_with_documents([2, 22, 8], last_eod=False),
    "no EOD": tokens_with_documents([]),
}
BATCHES = [["short documents, 1-token ones, EOD last", "a document over every rank"],
           ["short documents, 1-token ones, EOD last"], ["no EOD"]]


def ids_of(names) -> torch.Tensor:
    return document_ids(torch.stack([SAMPLES[n] for n in names]), EOD)


def test_samples_are_what_they_say():
    short, spanning, none = (ids_of([n])[0] for n in SAMPLES)
    assert (torch.bincount(short) == 1).sum() == 3 and SAMPLES["short documents, 1-token ones, EOD last"][-1] == EOD
    layout = layout_for("ring", 4)
    assert all(1 in layout.shard(spanning, r, dim=0) for r in range(4))
    assert (none == 0).all()


def inputs(b, hkv, seed=0, s=S):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, D, generator=gen, dtype=torch.float64) for h in (HQ, hkv, hkv, HQ)]


def masked_reference(q, k, v, dout, ids, causal):
    """Single-device attention with the document mask (torch backend) and its autograd gradients."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_forward(*leaves, causal, D ** -0.5, "torch", q_docs=ids, k_docs=ids)
    out.backward(dout)
    return {"out": out.detach(), "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2])
def test_document_mask_equals_documents_one_by_one(causal, hkv):
    """The reference itself: each document attended alone, then concatenated."""
    ids = ids_of(BATCHES[0])
    q, k, v, dout = inputs(2, hkv)
    ref = masked_reference(q, k, v, dout, ids, causal)
    for b in range(2):
        for doc in ids[b].unique().tolist():
            at = (ids[b] == doc).nonzero().flatten()
            part = slice(int(at[0]), int(at[-1]) + 1)
            leaves = [t[b:b + 1, part].clone().requires_grad_() for t in (q, k, v)]
            out, lse = attention_forward(*leaves, causal, D ** -0.5, "torch")
            out.backward(dout[b:b + 1, part])
            for got, want in ((ref["out"], out), (ref["lse"], lse), (ref["dq"], leaves[0].grad),
                              (ref["dk"], leaves[1].grad), (ref["dv"], leaves[2].grad)):
                got = got[b:b + 1, :, part] if got.dim() == 3 else got[b:b + 1, part]
                torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)


def test_a_row_that_sees_no_key_is_zero_without_nan():
    q, k, v, dout = inputs(1, 2, s=6)
    q_docs, k_docs = torch.tensor([[0, 0, 1, 1, 3, 3]]), torch.tensor([[0, 0, 0, 2, 3, 3]])
    out, lse = attention_forward(q, k, v, False, 0.3, "torch", q_docs=q_docs, k_docs=k_docs)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, False, 0.3, "torch", q_docs=q_docs, k_docs=k_docs)
    assert (out[:, 2:4] == 0).all() and (lse[:, :, 2:4] == float("-inf")).all()
    assert (dq[:, 2:4] == 0).all() and (dk[:, 3] == 0).all() and (dv[:, 3] == 0).all()
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


def reference_varlen_forward(q, k, v, cu, max_len, causal, scale):
    """A varlen kernel by its contract (packed q [T, hq, d], lse [hq, T]), one segment at a time."""
    outs, lses = [], []
    for a, z in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert z - a <= max_len
        o, l = attention_forward(q[None, a:z], k[None, a:z], v[None, a:z], causal, scale, "torch")
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def reference_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale):
    grads = []
    for a, z in zip(cu[:-1].tolist(), cu[1:].tolist()):
        grads.append(attention_backward(dout[None, a:z], q[None, a:z], k[None, a:z], v[None, a:z], out[None, a:z],
                                        lse[None, :, a:z], causal, scale, "torch"))
    return tuple(torch.cat([g[i][0] for g in grads]) for i in range(3))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_packing_equals_the_reference(causal):
    """What sdpa_flash and flash_attn run on GPU, through a reference kernel: batch flattening, the cut at
    every document and sample start, GQA, the lse layout, and a backward against a foreign lse."""
    ids = ids_of(BATCHES[0])
    q, k, v, dout = inputs(2, 2)
    cu, longest = segments(ids, ids)
    assert cu.dtype == torch.int32 and cu[-1] == 2 * S and longest == 22
    assert len(cu) - 1 == len(ids[0].unique()) + len(ids[1].unique())  # a new run at the second sample
    ref = masked_reference(q, k, v, dout, ids, causal)
    out, lse = varlen_forward(reference_varlen_forward, q, k, v, causal, D ** -0.5, ids, ids)
    torch.testing.assert_close(out, ref["out"], rtol=0, atol=TOL)
    torch.testing.assert_close(lse, ref["lse"], rtol=0, atol=TOL)
    shifted = ref["lse"] + 0.25  # the ring hands the backward a merged lse the kernel never produced
    want = attention_backward(dout, q, k, v, ref["out"], shifted, causal, D ** -0.5, "torch", q_docs=ids, k_docs=ids)
    got = varlen_backward(reference_varlen_backward, dout, q, k, v, ref["out"], shifted, causal,
                          D ** -0.5, ids, ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="same documents"):
        segments(ids, ids.flip(1))
    one_each = torch.zeros(2, S, dtype=torch.int32)  # two samples of one document each: two runs, not one
    assert segments(one_each, one_each)[0].tolist() == [0, S, 2 * S]


def test_sdpa_flash_varlen_calls_fit_this_torch():
    """aten's FlashAttention-2 varlen ops called by argument name, on meta tensors (shapes only: CPU has no
    kernel): the schema takes our arguments, lse comes back [heads, tokens], dk/dv keep the kv heads."""
    from megatron_sp.attention.backends import _VARLEN_KERNELS
    forward, backward = _VARLEN_KERNELS["sdpa_flash"]
    ids = ids_of(BATCHES[0])
    q, k = (torch.empty(2, S, h, 64, dtype=torch.bfloat16, device="meta") for h in (HQ, 2))
    out, lse = varlen_forward(forward, q, k, k, True, 0.125, ids, ids)
    assert out.shape == q.shape and lse.shape == (2, HQ, S) and lse.dtype == torch.float32
    grads = varlen_backward(backward, q, q, k, k, out, lse, True, 0.125, ids, ids)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]


def test_backends_without_a_document_mask_are_one_line():
    with pytest.raises(ValueError, match="'cudnn' has no document mask.*sdpa_flash"):
        validate_attention_config(strategy="ring", num_heads=4, num_kv_heads=2, sp_size=2, ulysses_degree=None,
                                  seq_length=64, world_size=2, documents=True, backend="cudnn")
    validate_attention_config(strategy="ring", num_heads=4, num_kv_heads=2, sp_size=2, ulysses_degree=None,
                              seq_length=64, world_size=2, documents=True, backend="sdpa_flash")
    assert resolve_backend("auto", "cpu", torch.float64, documents=True) == "torch"
    q, k, v, _ = inputs(1, 2)
    ids = ids_of(BATCHES[1])
    with pytest.raises(ValueError, match="no document mask"):
        attention_forward(q, k, v, True, 0.3, "cudnn", q_docs=ids, k_docs=ids)


def test_triton_kernel_with_documents():
    """The Triton kernel's document mask (interpreted on CPU, fp32) behind the backend pair."""
    try:
        resolve_backend("triton", "cpu", torch.float32, documents=True)
    except ValueError as exc:
        pytest.skip(str(exc))
    ids = ids_of(BATCHES[0])
    q, k, v, dout = (torch.nn.functional.pad(t, (0, 64 - D)).float() for t in inputs(2, 2))
    out, lse = attention_forward(q, k, v, True, D ** -0.5, "triton", q_docs=ids, k_docs=ids)
    ref_out, ref_lse = attention_forward(q, k, v, True, D ** -0.5, "torch", q_docs=ids, k_docs=ids)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    got = attention_backward(dout, q, k, v, out, lse, True, D ** -0.5, "triton", q_docs=ids, k_docs=ids)
    want = attention_backward(dout, q, k, v, ref_out, ref_lse, True, D ** -0.5, "torch", q_docs=ids, k_docs=ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa_flash", "triton"])
@pytest.mark.parametrize("causal, hkv", [(True, 4), (True, 1), (False, 2)])
def test_gpu_document_backends_match_torch(backend, causal, hkv):
    """The varlen FlashAttention-2 path and the Triton kernel in bf16 on a GPU,
    forward and a backward against an lse the kernel did not produce, as the ring hands it."""
    from megatron_sp.attention.backends import documents_unsupported
    if documents_unsupported(backend):
        pytest.skip(documents_unsupported(backend))
    lengths = [1, 100, 1, 27, 120, 10, 250, 3]  # two samples of 256 tokens; the 10-token document crosses them
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(2, 256).cuda()
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 256, h, 64, generator=gen).cuda().bfloat16() for h in (4, hkv, hkv, 4))
    out, lse = attention_forward(q, k, v, causal, 0.125, backend, q_docs=ids, k_docs=ids)
    ref_out, ref_lse = attention_forward(q, k, v, causal, 0.125, "torch", q_docs=ids, k_docs=ids)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)
    merged = ref_lse + 0.5  # as if another block had been merged in
    got = attention_backward(dout, q, k, v, ref_out, merged, causal, 0.125, backend, q_docs=ids, k_docs=ids)
    want = attention_backward(dout, q, k, v, ref_out, merged, causal, 0.125, "torch", q_docs=ids, k_docs=ids)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2)
    local = LocalAttention(causal=causal, backend="auto")  # auto with documents: a kernel that has them
    torch.testing.assert_close(local(q, k, v, documents=Documents(ids)).float(), ref_out.float(), rtol=0, atol=2e-2)


# --- every strategy on forked ranks -----------------------------------------------------------------

def strategy_module(strategy, state, causal):
    """(module, layout) of a strategy; 'ring contiguous' is the ring over contiguous shards (zigzag=False)."""
    if strategy == "ring contiguous":
        return (RingAttention(state.sp_group, causal=causal, backend="torch", zigzag=False),
                SequenceLayout(state.sp_size, 1, zigzag=False))
    return (build_inner_attention(strategy, state, causal=causal, backend="torch"),
            layout_for(strategy, state.sp_size, state.ulysses_degree))


def check_strategies(rank, world, configs):
    """For each (strategy, Ulysses degree), batch of samples, causal or not, MHA/GQA/MQA: max diffs
    against single-device masked attention, the ranks' shards unsharded."""
    results = {}
    for strategy, u in configs:
        state = ParallelState.build(sp_size=world, ulysses_degree=u)
        for names in BATCHES:
            ids = ids_of(names)
            for causal in (True, False):
                module, layout = strategy_module(strategy, state, causal)
                for hkv in (4, 2, 1):
                    q, k, v, dout = inputs(len(names), hkv, seed=10 * hkv + causal)
                    ref = masked_reference(q, k, v, dout, ids, causal)
                    leaves = [layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
                    out = module(*leaves, documents=Documents(ids))
                    out.backward(layout.shard(dout, rank))
                    got = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
                    got = {name: gather_full(t, layout) for name, t in got.items()}
                    results[(strategy, u, tuple(names), causal, hkv)] = max_diffs(got, ref)
    return results


@pytest.mark.parametrize("world, configs", [
    (1, [("local", None), ("ulysses", None), ("ring", None)]),
    (2, [("ulysses", None), ("ring", None), ("hybrid", 1)]),
    (4, [("ulysses", None), ("ring", None), ("hybrid", 2), ("ring contiguous", 1)]),
])
def test_strategies_with_documents_match_single_device(world, configs):
    for per_rank in run_ranks(world, check_strategies, configs):
        assert len(per_rank) == len(configs) * len(BATCHES) * 2 * 3
        for case, diffs in per_rank.items():
            assert max(diffs.values()) <= TOL, f"{case}: {diffs}"


def test_no_eod_is_full_causal_attention():
    ids = ids_of(["no EOD"])
    q, k, v, dout = inputs(1, 2)
    masked = masked_reference(q, k, v, dout, ids, True)
    plain = attention_forward(q, k, v, True, D ** -0.5, "torch")[0]
    torch.testing.assert_close(masked["out"], plain, rtol=0, atol=0)


# --- the ring skips what documents make unnecessary --------------------------------------------------

def count_ring_work(rank, world, eod_at):
    """Kernel calls, and rows sent per k/v hop, of one forward + backward of the ring (zigzag, causal)."""
    from megatron_sp.attention import ring as ring_module
    from megatron_sp.parallel.comm import Ring
    calls, sent = {"forward": 0, "backward": 0}, []
    real_fwd, real_bwd, real_shift = ring_module.attention_forward, ring_module.attention_backward, Ring.shift

    def fwd(*a, **kw):
        calls["forward"] += 1
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        calls["backward"] += 1
        return real_bwd(*a, **kw)

    def shift(self, send, recv=None):
        sent.append(send.shape[2])  # rows of a [2, b, rows, h, d] message
        return real_shift(self, send, recv)
    ring_module.attention_forward, ring_module.attention_backward, Ring.shift = fwd, bwd, shift
    tokens = torch.zeros(1, S, dtype=torch.long)
    tokens[0, eod_at] = EOD
    ids = document_ids(tokens, EOD)
    state = ParallelState.build(sp_size=world, ulysses_degree=1)
    layout = layout_for("ring", world)
    q, k, v, dout = inputs(1, 2)
    ref = masked_reference(q, k, v, dout, ids, True)
    leaves = [layout.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    module = build_inner_attention("ring", state, causal=True, backend="torch")
    out = module(*leaves, documents=Documents(ids))
    out.backward(layout.shard(dout, rank))
    got = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    diffs = max_diffs({name: gather_full(t, layout) for name, t in got.items()}, ref)
    return calls, sent, diffs


def test_ring_skips_blocks_and_transfers_documents_do_not_need():
    """P = 4, chunks of 4 tokens. Documents inside chunks: only the diagonal block is computed (1 forward
    call, 2 backward calls: the split diagonal's off-diagonal half is skipped too) and no k/v row travels.
    One document over the chunk 0 / chunk 1 boundary (tokens 2..5): rank 1 attends 2 rows of rank 0's
    block at step 1 and only those 2 rows travel, one hop."""
    inside = list(range(3, S, 4))
    for calls, sent, diffs in run_ranks(4, count_ring_work, inside):
        assert calls == {"forward": 1, "backward": 2}, calls
        assert max(diffs.values()) <= TOL and sum(sent) == 0, (sent, diffs)
    across = [1, 5] + list(range(7, S, 4))
    results = run_ranks(4, count_ring_work, across)
    for rank, (calls, sent, diffs) in enumerate(results):
        assert max(diffs.values()) <= TOL, diffs
        assert calls["forward"] == (2 if rank == 1 else 1), (rank, calls)
    forward_sends = [sent[:3] for _, sent, _ in results]  # 3 k/v hops per forward, per rank
    assert forward_sends[0] == [2, 0, 0] and all(s == [0, 0, 0] for s in forward_sends[1:]), forward_sends
