"""Triton FlashAttention-2 forward kernel (online softmax, GQA, causal, ragged lengths, head dims up to 256 that are a
power of two or the sum of two, document masks) and its launcher."""
import functools

import torch
import triton
import triton.language as tl

from megatron_sp.kernels.flash_attn_tiles import (advance, chunk_offsets, dot_into_d, dot_over_d, head_dim_chunks,
                                                  load_rows, scale_chunks, store_rows, tile_sources, zero_chunks)

LOG2E_F = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))
LOG2E = tl.constexpr(LOG2E_F)  # kernels may read only constexpr globals
LN2 = tl.constexpr(0.6931471805599453)  # lse is returned in natural log: ln(x) = log2(x) * ln(2)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m, offs_n, lo,
               hi, sk, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, TMA: tl.constexpr,
               PREC: tl.constexpr):
    """Fold key blocks [lo, hi) into (acc [M, d] as a pair of chunks, l_i [M], m_i [M]); m_i is a running max in
    log2 units.

    MASKED: the blocks may hold keys past sk, past the causal diagonal or of another document, so loads are
    bounded and the scores masked; the unmasked variant (the bulk of the work) does neither.
    TMA: k_src, v_src hold descriptors (tile_sources), which bound the rows themselves.
    """
    # pointer path: scalar base pointers advance; the per-element offsets (int32, loop-invariant) stay put: half the
    # registers of a loop-carried tensor of 64-bit pointers. int64: lo * stride can pass 2**31 at ~1M tokens.
    k_src = advance(k_src, tl.cast(lo, tl.int64) * stride_ks, TMA)
    v_src = advance(v_src, tl.cast(lo, tl.int64) * stride_vs, TMA)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # [N] key index
        k = load_rows(k_src, start_n, k_off, cols[None, :] < sk, HEAD_DIM, D0, MASKED, TMA, True)  # [d, N]
        v = load_rows(v_src, start_n, v_off, cols[:, None] < sk, HEAD_DIM, D0, MASKED, TMA, False)  # [N, d]
        qk = dot_over_d(q, k, HEAD_DIM, D0, PREC)  # [M, N] fp32
        if MASKED:
            ok = cols[None, :] < sk
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= cols[None, :])
            if HAS_DOCS:  # key j is seen only by queries of its own document
                kd = tl.load(kd_base + cols, mask=cols < sk, other=-1)
                ok = ok & (qd[:, None] == kd[None, :])
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot_into_d(p, v, scale_chunks(acc, alpha[:, None], HEAD_DIM, D0), HEAD_DIM, D0, PREC)
        m_i = m_new
        k_src = advance(k_src, BLOCK_N * stride_ks, TMA)
        v_src = advance(v_src, BLOCK_N * stride_vs, TMA)
    return acc, l_i, m_i


@triton.jit
def query_block_keys(RANGES, Q_DOCS, off_b, start_m, offs_m, sq, sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(lo, full, hi, qd) of query block start_m (of the forward or dq grid): keys [lo, full) are seen by every
    row of the block (and exist), [full, hi) need masks; qd [M] is each query's document (HAS_DOCS only)."""
    if HAS_DOCS:  # from flash_attn_docs.query_block_ranges: (lo, -, full, hi) per block
        ranges = RANGES + (off_b * tl.num_programs(0) + start_m) * 4
        lo = tl.load(ranges)
        full = tl.load(ranges + 2)
        hi = tl.load(ranges + 3)
        qd = tl.load(Q_DOCS + off_b * sq + offs_m, mask=offs_m < sq, other=-1)
    else:
        lo = 0
        qd = offs_m  # unused
        if CAUSAL:
            hi = tl.minimum((start_m + 1) * BLOCK_M, sk)
            full = tl.minimum(start_m * BLOCK_M, sk) // BLOCK_N * BLOCK_N
        else:
            hi = sk
            full = sk // BLOCK_N * BLOCK_N
    return lo, full, hi, qd


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Q_DOCS, K_DOCS, RANGES, sq, sk, qk_scale,
                stride_qb, stride_qs, stride_qh, stride_qd,
                stride_kb, stride_ks, stride_kh, stride_kd,
                stride_vb, stride_vs, stride_vh, stride_vd,
                stride_ob, stride_os, stride_oh, stride_od,
                stride_lb, stride_lh,
                H, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                TMA: tl.constexpr, PREC: tl.constexpr):
    """One program = one block of BLOCK_M queries of one (batch, q head). Grid: (cdiv(sq, BLOCK_M), b * H).

    The head dim runs as the chunks of head_dim_chunks: lanes [0, D0), and [D0, HEAD_DIM) when HEAD_DIM is not a
    power of two. HAS_DOCS: Q_DOCS [b, sq], K_DOCS [b, sk] int32 document ids and RANGES [b, cdiv(sq, BLOCK_M), 4]
    int32, per query block (first visible key, -, end of the unmasked keys, end of the visible keys), from
    flash_attn_docs.query_block_ranges. Without docs these three pointers are never read.
    TMA: q, k and v tiles come from tensor descriptors (the launcher checks that the strides allow them); the
    offset tensors below then go unused and the compiler drops them.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # causal: the last query blocks see the most keys; launch them first so the tail of the grid is short
    start_m = tl.num_programs(0) - 1 - pid_m if CAUSAL else pid_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # GQA: GROUP consecutive q heads share one kv head
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    q_ok = offs_m[:, None] < sq

    q_src = tile_sources(Q + off_b * stride_qb + off_h * stride_qh, sq, stride_qs, HEAD_DIM, BLOCK_M, D0, TMA)
    q = load_rows(q_src, start_m * BLOCK_M, chunk_offsets(rows, stride_qs, stride_qd, HEAD_DIM, D0, False), q_ok,
                  HEAD_DIM, D0, True, TMA, False)  # [M, d]
    k_src = tile_sources(K + off_b * stride_kb + off_hk * stride_kh, sk, stride_ks, HEAD_DIM, BLOCK_N, D0, TMA)
    v_src = tile_sources(V + off_b * stride_vb + off_hk * stride_vh, sk, stride_vs, HEAD_DIM, BLOCK_N, D0, TMA)
    k_off = chunk_offsets(offs_n, stride_ks, stride_kd, HEAD_DIM, D0, True)  # [d, N]: k^T, so q @ k^T is a plain dot
    v_off = chunk_offsets(offs_n, stride_vs, stride_vd, HEAD_DIM, D0, False)  # [N, d]

    acc = zero_chunks(BLOCK_M, HEAD_DIM, D0)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block never gives inf - inf
    lo, full, hi, qd = query_block_keys(RANGES, Q_DOCS, off_b, start_m, offs_m, sq, sk, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_DOCS)
    kd_base = K_DOCS + off_b * sk
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs,
                               offs_m, offs_n, lo, full, sk, qk_scale, HEAD_DIM, D0, BLOCK_N, False, CAUSAL, HAS_DOCS,
                               TMA, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs,
                               offs_m, offs_n, full, hi, sk, qk_scale, HEAD_DIM, D0, BLOCK_N, True, CAUSAL, HAS_DOCS,
                               TMA, PREC)

    seen = l_i > 0.0  # a row that sees no key gets out = 0, lse = -inf (the identity of the lse merge)
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    out = scale_chunks(acc, 1.0 / l_safe[:, None], HEAD_DIM, D0)
    store_rows(O + off_b * stride_ob + off_h * stride_oh, rows, stride_os, stride_od, out, q_ok, HEAD_DIM, D0)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=offs_m < sq)


def tma_qualifies(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address each of these [b, s, h, d] tensors: d contiguous, the base address and
    every other stride multiples of 16 bytes (TMA's rules), and on CUDA a GPU of compute capability >= 9 (Hopper).
    A tensor off CUDA counts as capable: Triton's interpreter emulates descriptors, so CPU tests run this path."""
    for x in tensors:
        if x.device.type == "cuda" and not _hopper_or_newer(x.device):
            return False
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any(s * x.element_size() % 16 for s in x.stride()[:-1]):
            return False
    return True


@functools.cache
def _hopper_or_newer(device: torch.device) -> bool:
    """Compute capability >= 9, asked once per device instead of at every launch."""
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _scratch_allocator(device: torch.device):
    """Triton's allocator for the global scratch that device-side descriptors are written to, on `device`."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)


def use_tma(wanted: bool, *tensors: torch.Tensor) -> bool:
    """The TMA switch of a launch: True when the config asks for it and every tensor qualifies, else the pointer
    path, silently. When True it also hands Triton the scratch allocator. Triton keeps that in a per-thread context
    variable, and autograd runs the backward on its own thread, so it is set at each such launch (a cheap set)."""
    if not (wanted and tma_qualifies(*tensors)):
        return False
    triton.set_allocator(_scratch_allocator(tensors[0].device))
    return True


def launch_forward(q, k, v, out, lse, causal, scale, cfg, prec, docs=None):
    """q [b, sq, hq, d], k/v [b, sk, hkv, d] (any strides) -> fills out [b, sq, hq, d] and lse [b, hq, sq] (contiguous).
    docs: None, or (q_docs [b, sq], k_docs [b, sk], ranges [b, cdiv(sq, block_m), 4]), all int32 contiguous."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    q_docs, k_docs, ranges = docs if docs is not None else (lse, lse, lse)  # placeholders, never read
    grid = (triton.cdiv(sq, cfg.block_m), b * hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, q_docs, k_docs, ranges, sq, sk, scale * LOG2E_F,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0), lse.stride(1),
        H=hq, GROUP=hq // hkv, HEAD_DIM=d, D0=head_dim_chunks(d)[0], BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, CAUSAL=causal, HAS_DOCS=docs is not None, TMA=use_tma(cfg.tma, q, k, v), PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
