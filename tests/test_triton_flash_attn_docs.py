"""Document masks in the Triton flash attention (packed samples): tiny shapes against a float64 reference on CPU
(interpreter), the block ranges that let the kernels skip what is masked, and bf16 on a GPU."""
import dataclasses

import pytest
import torch

from megatron_sp.kernels.flash_attn import default_configs, flash_attn_backward, flash_attn_forward
from megatron_sp.kernels.flash_attn_docs import key_block_ranges, query_block_ranges
from tests.test_triton_flash_attn import (DEVICE, ON_GPU, TOL, assert_within_twice_sdpa, configs, make_inputs, rel_err,
                                         sdpa_grads)


def doc_ids(*lengths_per_sample) -> torch.Tensor:
    """[b, s] int32 document ids from each sample's document lengths (every sample of one total length)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in lengths_per_sample]).int().to(DEVICE)


def visible(q_docs, k_docs, causal) -> torch.Tensor:
    """[b, sq, sk] bool: key j is seen by query i (same document; j <= i when causal, top-left aligned)."""
    ok = q_docs[:, :, None] == k_docs[:, None, :]
    if causal:
        ok &= torch.ones(q_docs.shape[1], k_docs.shape[1], dtype=torch.bool, device=ok.device).tril()
    return ok


def masked_reference(q, k, v, dout, causal, scale, q_docs, k_docs):
    """float64 (out, lse, dq, dk, dv) of attention under the document mask; a row that sees no key: out 0,
    lse -inf, no gradient."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kr, vr = (x.repeat_interleave(group, dim=2) for x in (k64, v64))
    s = torch.einsum("bqhd,bkhd->bhqk", q64, kr) * scale
    s = s.masked_fill(~visible(q_docs, k_docs, causal)[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, h, sq]
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])  # 0 on rows that see nothing
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def run_case(q_docs, k_docs, hq, hkv, d, dtype, causal, bwd_config=None, fwd_config=None):
    q, k, v, dout = make_inputs(q_docs.shape[0], q_docs.shape[1], k_docs.shape[1], hq, hkv, d, dtype, seed=hq + d)
    mask = dict(q_docs=q_docs, k_docs=k_docs)
    got = flash_attn_forward(q, k, v, causal, d ** -0.5, fwd_config, **mask)
    got = (*got, *flash_attn_backward(dout, q, k, v, *got, causal, d ** -0.5, bwd_config, **mask))
    return (q, k, v, dout), got, masked_reference(q, k, v, dout, causal, d ** -0.5, q_docs, k_docs)


CASES = {  # (q_docs, k_docs, hq, hkv): ragged lengths (not multiples of the 16/32-row CPU tiles) throughout
    "short documents, GQA": (doc_ids([1, 7, 1, 1, 19, 2, 9], [12, 28]), doc_ids([1, 7, 1, 1, 19, 2, 9], [12, 28]), 2, 1),
    "one document": (doc_ids([37]), doc_ids([37]), 2, 1),
    "rows that see no key": (doc_ids([5, 6, 0, 4]), doc_ids([0, 9, 14]), 2, 2),  # q docs 0, 3 have no keys
}


def check_masked(got, want, tol):
    """got, want: (out, lse, dq, dk, dv) of ours and masked_reference; rows that see no key exactly so."""
    seen = torch.isfinite(want[1])
    assert torch.equal(torch.isinf(got[1]), ~seen)  # lse -inf exactly where a row sees no key
    assert (got[1][seen].double() - want[1][seen]).abs().max().item() < 1e-4
    unseen_rows = (~seen).transpose(1, 2)  # [b, sq, h]
    assert (got[0][unseen_rows] == 0).all() and (got[2][unseen_rows] == 0).all()  # out 0, no gradient
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert rel_err(x, ref) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_document_mask_matches_reference(case, causal, dtype):
    q_docs, k_docs, hq, hkv = CASES[case]
    _, got, want = run_case(q_docs, k_docs, hq, hkv, 64, dtype, causal)
    check_masked(got, want, TOL[dtype])


@pytest.mark.parametrize("case,dtype,causal,d,dq_atomic", [
    ("short documents, GQA", torch.float16, True, 96, False),
    ("rows that see no key", torch.float32, False, 64, False),
    ("one document", torch.float32, True, 80, True)])
def test_document_mask_with_tma(case, dtype, causal, d, dq_atomic):
    """The TMA path under document masks (with dq_atomic, dq's reduce-add through a descriptor as well)."""
    q_docs, k_docs, hq, hkv = CASES[case]
    fwd, bwd = configs(d, dtype, tma=True)
    _, got, want = run_case(q_docs, k_docs, hq, hkv, d, dtype, causal, dataclasses.replace(bwd, dq_atomic=dq_atomic),
                            fwd)
    check_masked(got, want, TOL[dtype])


@pytest.mark.parametrize("d, dq_atomic", [(96, False), (256, False), (64, True)])
def test_document_mask_with_padded_head_dims_and_atomic_dq(d, dq_atomic):
    q_docs = doc_ids([3, 1, 20, 9])
    bwd = dataclasses.replace(default_configs(d, torch.float32, torch.device(DEVICE))[1], dq_atomic=dq_atomic)
    _, got, want = run_case(q_docs, q_docs, 2, 1, d, torch.float32, True, bwd)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert rel_err(x, ref) < TOL[torch.float32], name


def test_ids_are_checked():
    q, k, v, _ = make_inputs(1, 8, 8, 2, 2, 64, torch.float32, seed=0)
    ids = doc_ids([4, 4])
    with pytest.raises(ValueError, match="both"):
        flash_attn_forward(q, k, v, True, 1.0, q_docs=ids)
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_forward(q, k, v, True, 1.0, q_docs=ids.flip(1), k_docs=ids)
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        flash_attn_forward(q, k, v, True, 1.0, q_docs=ids[:, :5], k_docs=ids)


# ---- the block ranges: what the kernels loop over ----

def visited(ranges) -> torch.Tensor:
    """Elements each block's loop visits (hi - lo), [b, n_blocks]; the kernels step over [lo, hi)."""
    return ranges[..., 3] - ranges[..., 0]


def test_ranges_skip_other_documents():
    """Four documents of 64 in a 256-token sample: each block of 16 visits only its document (causal: its part
    of it), so the work is a quarter of the dense work, and the unmasked bulk is everything off the diagonal."""
    docs = doc_ids([64] * 4)
    dense = docs.new_zeros(docs.shape)
    for causal, share in ((False, 1 / 4), (True, (4 * 64 * 65 / 2) / (256 * 257 / 2))):
        for ranges_of in (lambda d: query_block_ranges(d, d, 16, 16, causal),
                          lambda d: key_block_ranges(d, d, 16, 16, causal)):
            work = visited(ranges_of(docs)).sum() * 16
            full_work = visited(ranges_of(dense)).sum() * 16
            assert full_work == (256 * 256 if not causal else 16 * 16 * (16 * 17 // 2))
            assert work == (256 * 64 if not causal else 16 * 16 * 4 * (4 * 5 // 2))
            assert abs(work / full_work - share) < 0.1
    r = query_block_ranges(docs, docs, 16, 16, False)[0]
    assert r[5].tolist() == [64, 64, 128, 128]  # queries 80..95 (document 1): keys 64..127, all unmasked
    r = key_block_ranges(docs, docs, 16, 16, True)[0]
    assert r[5].tolist() == [80, 96, 128, 128]  # keys 80..95: queries 80..95 masked (diagonal), 96..127 bulk


def test_ranges_of_blocks_that_straddle_documents():
    """A block with rows of two documents sees both documents' keys, all masked (no unmasked bulk); a key
    block whose queries start off its step grid keeps full - mid a multiple of the step."""
    docs = doc_ids([10, 30])
    r = query_block_ranges(docs, docs, 16, 8, False)[0]
    assert r[0].tolist() == [0, 0, 0, 40] and r[1].tolist() == [10, 10, 34, 40]
    r = key_block_ranges(docs, docs, 16, 8, True)[0]
    assert r[0].tolist() == [0, 16, 16, 40]  # keys 0..15 hold two documents: no unmasked bulk
    assert r[1].tolist() == [16, 32, 40, 40]  # keys 16..31: queries 16..31 masked, 32..39 whole


# ---- GPU: bf16 at real sizes, within 2x of SDPA's error under the same (boolean) mask ----

@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_document_mask_within_twice_sdpa_error(d):
    g = torch.Generator().manual_seed(d)
    lengths = torch.randint(1, 600, (12,), generator=g).tolist()
    q_docs = doc_ids(lengths)
    inputs, got, want = run_case(q_docs, q_docs, 4, 2, d, torch.bfloat16, True)
    base = sdpa_grads(*inputs, False, d ** -0.5, mask=visible(q_docs, q_docs, True)[:, None])
    assert_within_twice_sdpa(got, want, base)
