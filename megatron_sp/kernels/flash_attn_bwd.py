"""Triton FlashAttention-2 backward kernels (delta preprocess, dk/dv over key blocks, dq over query blocks) and launcher."""
import torch
import triton
import triton.language as tl

from megatron_sp.kernels.flash_attn_fwd import LOG2E, LOG2E_F, query_block_keys, use_tma
from megatron_sp.kernels.flash_attn_tiles import (advance, chunk_offsets, dot_into_d, dot_over_d, head_dim_chunks,
                                                  load_rows, scale_chunks, store_rows, tile_sources, trans_chunks,
                                                  zero_chunks)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sq,
                      stride_ob, stride_os, stride_oh, stride_od,
                      stride_dob, stride_dos, stride_doh, stride_dod,
                      H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d] (fp32). Grid: (cdiv(sq, BLOCK_M), b * H)."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    ok = (offs_m[:, None] < sq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_os + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dos + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * sq + offs_m, delta, mask=offs_m < sq)


@triton.jit
def _add_dq_chunk(dst, row, lane, offs, x, ok, MASKED: tl.constexpr, TMA: tl.constexpr):
    """Add one chunk of a dq tile into the fp32 dq sum: with TMA one bulk reduce-add through the descriptor (which
    drops rows >= sq), else element-wise atomics (ok bounds the rows when MASKED)."""
    if TMA:
        dst.atomic_add([row, lane], x)
    elif MASKED:
        tl.atomic_add(dst + offs, x, mask=ok, sem="relaxed")
    else:
        tl.atomic_add(dst + offs, x, sem="relaxed")


@triton.jit
def _dkdv_inner(dk, dv, k, v, kd, q_src, do_src, l_ptrs, d_ptrs, qd_ptrs, dq_dst, q_off, do_off, dq_off,
                stride_qs, stride_dos, stride_ls, stride_dqs, offs_n, lo, hi, sq, qk_scale, HEAD_DIM: tl.constexpr,
                D0: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_DOCS: tl.constexpr, DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dk, dv [N, d] of one key block over query blocks [lo, hi); transposed form (rows = keys). Every
    [rows, d] operand is a pair of head-dim chunks (flash_attn_tiles.head_dim_chunks).

    With DQ_ATOMIC, also add this key block's share of dq, unscaled, into the fp32 dq buffer: element-wise atomics
    (FA2's original scheme), or with TMA one bulk reduce-add per tile through the descriptors dq_dst (FA3's).
    TMA: q_src, do_src hold descriptors (tile_sources) and q_off, do_off go unused.
    """
    # pointer path: scalar bases advance, int32 offsets stay (q_off [d, M]: q^T; do_off, dq_off [M, d]): fewer
    # registers than loop-carried tensors of 64-bit pointers. A descriptor is addressed by row instead.
    offs_m = tl.arange(0, BLOCK_M)
    q_src = advance(q_src, tl.cast(lo, tl.int64) * stride_qs, TMA)
    do_src = advance(do_src, tl.cast(lo, tl.int64) * stride_dos, TMA)
    if DQ_ATOMIC:
        dq_dst = advance(dq_dst, tl.cast(lo, tl.int64) * stride_dqs, TMA)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        qT = load_rows(q_src, start_m, q_off, rows[None, :] < sq, HEAD_DIM, D0, MASKED, TMA, True)  # [d, M]
        do = load_rows(do_src, start_m, do_off, rows[:, None] < sq, HEAD_DIM, D0, MASKED, TMA, False)  # [M, d]
        if MASKED:
            lse2 = tl.load(l_ptrs + rows * stride_ls, mask=rows < sq, other=float("inf")) * LOG2E  # p = 0 past sq
            delta = tl.load(d_ptrs + rows, mask=rows < sq, other=0.0)
        else:
            lse2 = tl.load(l_ptrs + rows * stride_ls) * LOG2E
            delta = tl.load(d_ptrs + rows)
        kqT = dot_over_d(k, qT, HEAD_DIM, D0, PREC)  # [N, M] scores^T (unscaled)
        pT = tl.math.exp2(kqT * qk_scale - lse2[None, :])  # probabilities from the lse we were given
        if MASKED:
            if CAUSAL:
                pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
            if HAS_DOCS:  # also clears rows that see no key at all (lse = -inf makes pT inf there)
                qd = tl.load(qd_ptrs + rows, mask=rows < sq, other=-1)
                pT = tl.where(kd[:, None] == qd[None, :], pT, 0.0)
        dv = dot_into_d(pT, do, dv, HEAD_DIM, D0, PREC)
        dpT = dot_over_d(v, trans_chunks(do, HEAD_DIM, D0), HEAD_DIM, D0, PREC)  # [N, M] = (dout @ v^T)^T
        dsT = pT * (dpT - delta[None, :])
        dk = dot_into_d(dsT, trans_chunks(qT, HEAD_DIM, D0), dk, HEAD_DIM, D0, PREC)
        if DQ_ATOMIC:  # [M, d], unscaled (the launcher scales the sum)
            dq = dot_into_d(tl.trans(dsT), k, zero_chunks(BLOCK_M, HEAD_DIM, D0), HEAD_DIM, D0, PREC)
            _add_dq_chunk(dq_dst[0], start_m, 0, dq_off[0], dq[0], rows[:, None] < sq, MASKED, TMA)
            if HEAD_DIM > D0:
                _add_dq_chunk(dq_dst[1], start_m, D0, dq_off[1], dq[1], rows[:, None] < sq, MASKED, TMA)
            dq_dst = advance(dq_dst, BLOCK_M * stride_dqs, TMA)
        q_src = advance(q_src, BLOCK_M * stride_qs, TMA)
        do_src = advance(do_src, BLOCK_M * stride_dos, TMA)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, Q_DOCS, K_DOCS, RANGES, sq, sk, qk_scale, scale,
                     stride_qb, stride_qs, stride_qh, stride_qd,
                     stride_kb, stride_ks, stride_kh, stride_kd,
                     stride_vb, stride_vs, stride_vh, stride_vd,
                     stride_dob, stride_dos, stride_doh, stride_dod,
                     stride_lb, stride_lh, stride_ls,
                     stride_dkb, stride_dks, stride_dkh, stride_dkd,
                     stride_dqb, stride_dqs, stride_dqh, stride_dqd,
                     H_KV, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                     DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """One program = one key block of one (batch, kv head); loops over the GROUP q heads sharing it, so GQA's
    dk/dv sum needs no atomics. Grid: (cdiv(sk, BLOCK_N), b * H_KV). DQ (fp32) is only touched with DQ_ATOMIC.
    The head dim runs in the chunks of head_dim_chunks (lanes [0, D0) and [D0, HEAD_DIM)).
    HAS_DOCS: document ids as in the forward; RANGES [b, cdiv(sk, BLOCK_N), 4] from key_block_ranges.
    TMA: k, v, q and dout tiles come from tensor descriptors, one per (batch, head), and so does DQ's reduce-add."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols = offs_n.to(tl.int64)
    kmask = offs_n[:, None] < sk
    k_src = tile_sources(K + off_b * stride_kb + off_hk * stride_kh, sk, stride_ks, HEAD_DIM, BLOCK_N, D0, TMA)
    v_src = tile_sources(V + off_b * stride_vb + off_hk * stride_vh, sk, stride_vs, HEAD_DIM, BLOCK_N, D0, TMA)
    k = load_rows(k_src, start_n, chunk_offsets(cols, stride_ks, stride_kd, HEAD_DIM, D0, False), kmask, HEAD_DIM,
                  D0, True, TMA, False)  # [N, d]; rows past sk are 0 and never stored
    v = load_rows(v_src, start_n, chunk_offsets(cols, stride_vs, stride_vd, HEAD_DIM, D0, False), kmask, HEAD_DIM,
                  D0, True, TMA, False)
    dk = zero_chunks(BLOCK_N, HEAD_DIM, D0)
    dv = zero_chunks(BLOCK_N, HEAD_DIM, D0)
    # query rows: [lo, mid) masked (the causal diagonal, document edges), [mid, full) see the whole block (no
    # masks), [full, hi) masked (the ragged tail, document edges). Without documents BLOCK_N % BLOCK_M == 0
    # keeps the phases aligned.
    if HAS_DOCS:
        ranges = RANGES + (off_b * tl.num_programs(0) + tl.program_id(0)) * 4
        lo = tl.load(ranges)
        mid = tl.load(ranges + 1)
        full = tl.load(ranges + 2)
        hi = tl.load(ranges + 3)
        kd = tl.load(K_DOCS + off_b * sk + offs_n, mask=offs_n < sk, other=-2)  # [N] document of each key
    else:
        kd = offs_n  # unused
        if CAUSAL:
            lo = start_n
            mid = tl.minimum(start_n + BLOCK_N, sq)
        else:
            lo = 0
            mid = 0
        full = tl.maximum(mid, sq // BLOCK_M * BLOCK_M)
        hi = sq
    q_off = chunk_offsets(offs_m, stride_qs, stride_qd, HEAD_DIM, D0, True)  # [d, M]: q^T
    do_off = chunk_offsets(offs_m, stride_dos, stride_dod, HEAD_DIM, D0, False)  # [M, d]
    dq_off = chunk_offsets(offs_m, stride_dqs, stride_dqd, HEAD_DIM, D0, False)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_src = tile_sources(Q + off_b * stride_qb + off_h * stride_qh, sq, stride_qs, HEAD_DIM, BLOCK_M, D0, TMA)
        do_src = tile_sources(DO + off_b * stride_dob + off_h * stride_doh, sq, stride_dos, HEAD_DIM, BLOCK_M, D0,
                              TMA)
        dq_dst = tile_sources(DQ + off_b * stride_dqb + off_h * stride_dqh, sq, stride_dqs, HEAD_DIM, BLOCK_M, D0,
                              TMA and DQ_ATOMIC)  # fp32 [sq, d]; descriptors for TMA's reduce-add
        l_ptrs = LSE + off_b * stride_lb + off_h * stride_lh
        d_ptrs = DELTA + (off_b * H_KV * GROUP + off_h) * sq
        qd_ptrs = Q_DOCS + off_b * sq
        for phase in tl.static_range(3):  # masked, bulk (unmasked), masked
            if phase == 0:
                p_lo = lo
                p_hi = mid
            elif phase == 1:
                p_lo = mid
                p_hi = full
            else:
                p_lo = full
                p_hi = hi
            dk, dv = _dkdv_inner(dk, dv, k, v, kd, q_src, do_src, l_ptrs, d_ptrs, qd_ptrs, dq_dst, q_off, do_off,
                                 dq_off, stride_qs, stride_dos, stride_ls, stride_dqs, offs_n, p_lo, p_hi, sq,
                                 qk_scale, HEAD_DIM, D0, BLOCK_M, phase != 1, CAUSAL, HAS_DOCS, DQ_ATOMIC, TMA, PREC)
    dk = scale_chunks(dk, scale, HEAD_DIM, D0)  # s = scale * q.k, so d/dk carries one factor of scale
    store_rows(DK + off_b * stride_dkb + off_hk * stride_dkh, cols, stride_dks, stride_dkd, dk, kmask, HEAD_DIM, D0)
    store_rows(DV + off_b * stride_dkb + off_hk * stride_dkh, cols, stride_dks, stride_dkd, dv, kmask, HEAD_DIM, D0)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
              offs_n, lo, hi, sk, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, TMA: tl.constexpr,
              PREC: tl.constexpr):
    """Accumulate dq [M, d] (a pair of chunks) of one query block over key blocks [lo, hi). TMA: k_src, v_src hold
    descriptors."""
    # as the forward: base pointers advance over the fixed offsets k_off, v_off [d, N] (k^T, v^T)
    k_src = advance(k_src, tl.cast(lo, tl.int64) * stride_ks, TMA)
    v_src = advance(v_src, tl.cast(lo, tl.int64) * stride_vs, TMA)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = load_rows(k_src, start_n, k_off, cols[None, :] < sk, HEAD_DIM, D0, MASKED, TMA, True)  # [d, N]
        vT = load_rows(v_src, start_n, v_off, cols[None, :] < sk, HEAD_DIM, D0, MASKED, TMA, True)
        qk = dot_over_d(q, kT, HEAD_DIM, D0, PREC)  # [M, N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            ok = cols[None, :] < sk
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= cols[None, :])
            if HAS_DOCS:
                kd = tl.load(kd_base + cols, mask=cols < sk, other=-2)
                ok = ok & (qd[:, None] == kd[None, :])
            p = tl.where(ok, p, 0.0)
        dp = dot_over_d(do, vT, HEAD_DIM, D0, PREC)  # [M, N]
        ds = p * (dp - delta[:, None])
        dq = dot_into_d(ds, trans_chunks(kT, HEAD_DIM, D0), dq, HEAD_DIM, D0, PREC)
        k_src = advance(k_src, BLOCK_N * stride_ks, TMA)
        v_src = advance(v_src, BLOCK_N * stride_vs, TMA)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, Q_DOCS, K_DOCS, RANGES, sq, sk, qk_scale, scale,
                   stride_qb, stride_qs, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_dob, stride_dos, stride_doh, stride_dod,
                   stride_lb, stride_lh, stride_ls,
                   stride_dqb, stride_dqs, stride_dqh, stride_dqd,
                   H, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                   TMA: tl.constexpr, PREC: tl.constexpr):
    """One program = one query block of one (batch, q head). Grid: (cdiv(sq, BLOCK_M), b * H).
    HAS_DOCS: as the forward, RANGES [b, cdiv(sq, BLOCK_M), 4] from query_block_ranges. TMA: q, dout, k and v
    tiles come from tensor descriptors."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    start_m = tl.num_programs(0) - 1 - pid_m if CAUSAL else pid_m  # heaviest blocks first
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    rmask = offs_m[:, None] < sq
    q_src = tile_sources(Q + off_b * stride_qb + off_h * stride_qh, sq, stride_qs, HEAD_DIM, BLOCK_M, D0, TMA)
    do_src = tile_sources(DO + off_b * stride_dob + off_h * stride_doh, sq, stride_dos, HEAD_DIM, BLOCK_M, D0, TMA)
    q = load_rows(q_src, start_m * BLOCK_M, chunk_offsets(rows, stride_qs, stride_qd, HEAD_DIM, D0, False), rmask,
                  HEAD_DIM, D0, True, TMA, False)  # [M, d]
    do = load_rows(do_src, start_m * BLOCK_M, chunk_offsets(rows, stride_dos, stride_dod, HEAD_DIM, D0, False),
                   rmask, HEAD_DIM, D0, True, TMA, False)
    lse2 = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ls, mask=offs_m < sq,
                   other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * sq + offs_m, mask=offs_m < sq, other=0.0)
    k_src = tile_sources(K + off_b * stride_kb + off_hk * stride_kh, sk, stride_ks, HEAD_DIM, BLOCK_N, D0, TMA)
    v_src = tile_sources(V + off_b * stride_vb + off_hk * stride_vh, sk, stride_vs, HEAD_DIM, BLOCK_N, D0, TMA)
    k_off = chunk_offsets(offs_n, stride_ks, stride_kd, HEAD_DIM, D0, True)  # [d, N]
    v_off = chunk_offsets(offs_n, stride_vs, stride_vd, HEAD_DIM, D0, True)
    dq = zero_chunks(BLOCK_M, HEAD_DIM, D0)
    lo, full, hi, qd = query_block_keys(RANGES, Q_DOCS, off_b, start_m, offs_m, sq, sk, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_DOCS)  # the forward's split
    kd_base = K_DOCS + off_b * sk
    dq = _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
                   offs_n, lo, full, sk, qk_scale, HEAD_DIM, D0, BLOCK_N, False, CAUSAL, HAS_DOCS, TMA, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
                   offs_n, full, hi, sk, qk_scale, HEAD_DIM, D0, BLOCK_N, True, CAUSAL, HAS_DOCS, TMA, PREC)
    dq = scale_chunks(dq, scale, HEAD_DIM, D0)
    store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, rows, stride_dqs, stride_dqd, dq, rmask, HEAD_DIM, D0)


def launch_backward(dout, q, k, v, out, lse, causal, scale, cfg, prec, docs=None):
    """Shapes as the forward; returns (dq, dk, dv) contiguous in q/k/v's shapes and dtype. docs: None, or
    (q_docs [b, sq], k_docs [b, sk], key-block ranges of the dk/dv kernel, query-block ranges of the dq kernel)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    q_docs, k_docs, key_ranges, query_ranges = docs if docs is not None else (lse,) * 4  # placeholders, unread
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(sq, 64), b * hq)](
        out, dout, delta, sq, *out.stride(), *dout.stride(), H=hq, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=64)
    # dk/dv of every q head of a group land in one kv-head slot, so they are written as [b, sk, hkv, d]
    dk = torch.empty((b, sk, hkv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, hkv, d), dtype=v.dtype, device=q.device)
    # with dq_atomic the dk/dv kernel also adds dq into an fp32 buffer; else dq gets its own kernel over q blocks
    dq_acc = torch.zeros((b, sq, hq, d), dtype=torch.float32, device=q.device) if cfg.dq_atomic else None
    common = (q, k, v, dout, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    shape = dict(HEAD_DIM=d, D0=head_dim_chunks(d)[0], CAUSAL=causal, HAS_DOCS=docs is not None, PREC=prec,
                 TMA=use_tma(cfg.tma, q, k, v, dout))
    _bwd_dkdv_kernel[(triton.cdiv(sk, cfg.block_n1), b * hkv)](
        *common, dk, dv, dq_acc if cfg.dq_atomic else dk, q_docs, k_docs, key_ranges, sq, sk, scale * LOG2E_F,
        scale, *strides, *dk.stride(), *(dq_acc.stride() if cfg.dq_atomic else dk.stride()),
        H_KV=hkv, GROUP=group, BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, DQ_ATOMIC=cfg.dq_atomic, **shape,
        num_warps=cfg.num_warps1, num_stages=cfg.num_stages1)
    if cfg.dq_atomic:
        return (dq_acc * scale).to(q.dtype), dk, dv
    dq = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    _bwd_dq_kernel[(triton.cdiv(sq, cfg.block_m2), b * hq)](
        *common, dq, q_docs, k_docs, query_ranges, sq, sk, scale * LOG2E_F, scale, *strides, *dq.stride(),
        H=hq, GROUP=group, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, **shape,
        num_warps=cfg.num_warps2, num_stages=cfg.num_stages2)
    return dq, dk, dv
