"""Triton FlashAttention-2 backward kernels (delta preprocess, dk/dv over key blocks, dq over query blocks) and launcher."""
import torch
import triton
import triton.language as tl

from megatron_sp.kernels.flash_attn_fwd import LOG2E, LOG2E_F, load_rows, query_block_keys, tile_source, use_tma


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
def _dkdv_inner(dk, dv, k, v, kd, q_src, do_src, l_ptrs, d_ptrs, qd_ptrs, dq_base, q_off, do_off, dq_off,
                stride_qs, stride_dos, stride_ls, stride_dqs, offs_n, d_ok, lo, hi, sq, qk_scale,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                HAS_DOCS: tl.constexpr, DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dk, dv [N, D] of one key block over query blocks [lo, hi); transposed form (rows = keys).

    With DQ_ATOMIC, also add this key block's share of dq, unscaled, into the fp32 dq buffer: element-wise atomics
    (FA2's original scheme), or with TMA one bulk reduce-add per tile through the descriptor dq_base (FA3's).
    TMA: q_src, do_src are descriptors (tile_source) and q_off, do_off go unused.
    """
    # pointer path: scalar bases advance, int32 offsets stay (q_off [D, M]: q^T; do_off, dq_off [M, D]): fewer
    # registers than loop-carried tensors of 64-bit pointers. A descriptor is addressed by row instead.
    offs_m = tl.arange(0, BLOCK_M)
    if not TMA:
        q_src += tl.cast(lo, tl.int64) * stride_qs
        do_src += tl.cast(lo, tl.int64) * stride_dos
    if DQ_ATOMIC and not TMA:
        dq_base += tl.cast(lo, tl.int64) * stride_dqs
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        qT = load_rows(q_src, start_m, q_off, rows[None, :] < sq, d_ok[:, None], MASKED, PAD_D, TMA, True)  # [D, M]
        do = load_rows(do_src, start_m, do_off, rows[:, None] < sq, d_ok[None, :], MASKED, PAD_D, TMA, False)
        if MASKED:
            lse2 = tl.load(l_ptrs + rows * stride_ls, mask=rows < sq, other=float("inf")) * LOG2E  # p = 0 past sq
            delta = tl.load(d_ptrs + rows, mask=rows < sq, other=0.0)
        else:
            lse2 = tl.load(l_ptrs + rows * stride_ls) * LOG2E
            delta = tl.load(d_ptrs + rows)
        kqT = tl.dot(k, qT, input_precision=PREC)  # [N, M] scores^T (unscaled)
        pT = tl.math.exp2(kqT * qk_scale - lse2[None, :])  # probabilities from the lse we were given
        if MASKED:
            if CAUSAL:
                pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
            if HAS_DOCS:  # also clears rows that see no key at all (lse = -inf makes pT inf there)
                qd = tl.load(qd_ptrs + rows, mask=rows < sq, other=-1)
                pT = tl.where(kd[:, None] == qd[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # [N, M] = (dout @ v^T)^T
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=PREC)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)  # [M, D], unscaled (the launcher scales the sum)
            if TMA:  # one bulk reduce-add of the tile; the descriptor drops rows >= sq and lanes >= HEAD_DIM
                dq_base.atomic_add([start_m, 0], dq)
            elif MASKED:
                tl.atomic_add(dq_base + dq_off, dq, mask=(rows[:, None] < sq) & d_ok[None, :], sem="relaxed")
            elif PAD_D:
                tl.atomic_add(dq_base + dq_off, dq, mask=d_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_base + dq_off, dq, sem="relaxed")
            if not TMA:
                dq_base += BLOCK_M * stride_dqs
        if not TMA:
            q_src += BLOCK_M * stride_qs
            do_src += BLOCK_M * stride_dos
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
                     H_KV, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                     DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """One program = one key block of one (batch, kv head); loops over the GROUP q heads sharing it, so GQA's
    dk/dv sum needs no atomics. Grid: (cdiv(sk, BLOCK_N), b * H_KV). DQ (fp32) is only touched with DQ_ATOMIC.
    HAS_DOCS: document ids as in the forward; RANGES [b, cdiv(sk, BLOCK_N), 4] from key_block_ranges.
    TMA: k, v, q and dout tiles come from tensor descriptors, one per (batch, head), and so does DQ's reduce-add."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    cols = offs_n.to(tl.int64)[:, None]
    kmask = offs_n[:, None] < sk
    k_src = tile_source(K + off_b * stride_kb + off_hk * stride_kh, sk, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    v_src = tile_source(V + off_b * stride_vb + off_hk * stride_vh, sk, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    k = load_rows(k_src, start_n, cols * stride_ks + offs_d[None, :] * stride_kd, kmask, d_ok[None, :], True, PAD_D,
                  TMA, False)  # [N, D]; rows past sk are 0 and never stored
    v = load_rows(v_src, start_n, cols * stride_vs + offs_d[None, :] * stride_vd, kmask, d_ok[None, :], True, PAD_D,
                  TMA, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
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
    q_off = offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd  # [D, M]: q^T
    do_off = offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod  # [M, D]
    dq_off = offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_src = tile_source(Q + off_b * stride_qb + off_h * stride_qh, sq, stride_qs, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
        do_src = tile_source(DO + off_b * stride_dob + off_h * stride_doh, sq, stride_dos, HEAD_DIM, BLOCK_M, BLOCK_D,
                             TMA)
        dq_base = tile_source(DQ + off_b * stride_dqb + off_h * stride_dqh, sq, stride_dqs, HEAD_DIM, BLOCK_M, BLOCK_D,
                              TMA and DQ_ATOMIC)  # fp32 [sq, D]; a descriptor for TMA's reduce-add
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
            dk, dv = _dkdv_inner(dk, dv, k, v, kd, q_src, do_src, l_ptrs, d_ptrs, qd_ptrs, dq_base, q_off, do_off,
                                 dq_off, stride_qs, stride_dos, stride_ls, stride_dqs, offs_n, d_ok, p_lo, p_hi, sq,
                                 qk_scale, BLOCK_M, phase != 1, CAUSAL, PAD_D, HAS_DOCS, DQ_ATOMIC, TMA, PREC)
    dk = dk * scale  # s = scale * q.k, so d/dk carries one factor of scale
    out_off = off_b * stride_dkb + off_hk * stride_dkh + cols * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask & d_ok[None, :])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask & d_ok[None, :])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
              offs_n, d_ok, lo, hi, sk, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              PAD_D: tl.constexpr, HAS_DOCS: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dq [M, D] of one query block over key blocks [lo, hi). TMA: k_src, v_src are descriptors."""
    if not TMA:  # as the forward: base pointers advance over the fixed offsets k_off, v_off [D, N] (k^T, v^T)
        k_src += tl.cast(lo, tl.int64) * stride_ks
        v_src += tl.cast(lo, tl.int64) * stride_vs
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = load_rows(k_src, start_n, k_off, cols[None, :] < sk, d_ok[:, None], MASKED, PAD_D, TMA, True)  # [D, N]
        vT = load_rows(v_src, start_n, v_off, cols[None, :] < sk, d_ok[:, None], MASKED, PAD_D, TMA, True)
        qk = tl.dot(q, kT, input_precision=PREC)  # [M, N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            ok = cols[None, :] < sk
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= cols[None, :])
            if HAS_DOCS:
                kd = tl.load(kd_base + cols, mask=cols < sk, other=-2)
                ok = ok & (qd[:, None] == kd[None, :])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)  # [M, N]
        ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=PREC)
        if not TMA:
            k_src += BLOCK_N * stride_ks
            v_src += BLOCK_N * stride_vs
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, Q_DOCS, K_DOCS, RANGES, sq, sk, qk_scale, scale,
                   stride_qb, stride_qs, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_dob, stride_dos, stride_doh, stride_dod,
                   stride_lb, stride_lh, stride_ls,
                   stride_dqb, stride_dqs, stride_dqh, stride_dqd,
                   H, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    rows = offs_m.to(tl.int64)[:, None]
    rmask = offs_m[:, None] < sq
    q_src = tile_source(Q + off_b * stride_qb + off_h * stride_qh, sq, stride_qs, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    do_src = tile_source(DO + off_b * stride_dob + off_h * stride_doh, sq, stride_dos, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    q = load_rows(q_src, start_m * BLOCK_M, rows * stride_qs + offs_d[None, :] * stride_qd, rmask, d_ok[None, :],
                  True, PAD_D, TMA, False)  # [M, D]
    do = load_rows(do_src, start_m * BLOCK_M, rows * stride_dos + offs_d[None, :] * stride_dod, rmask, d_ok[None, :],
                   True, PAD_D, TMA, False)
    lse2 = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ls, mask=offs_m < sq,
                   other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * sq + offs_m, mask=offs_m < sq, other=0.0)
    k_src = tile_source(K + off_b * stride_kb + off_hk * stride_kh, sk, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    v_src = tile_source(V + off_b * stride_vb + off_hk * stride_vh, sk, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    k_off = offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_off = offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full, hi, qd = query_block_keys(RANGES, Q_DOCS, off_b, start_m, offs_m, sq, sk, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_DOCS)  # the forward's split
    kd_base = K_DOCS + off_b * sk
    dq = _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
                   offs_n, d_ok, lo, full, sk, qk_scale, BLOCK_N, False, CAUSAL, PAD_D, HAS_DOCS, TMA, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, qd, k_src, v_src, kd_base, k_off, v_off, stride_ks, stride_vs, offs_m,
                   offs_n, d_ok, full, hi, sk, qk_scale, BLOCK_N, True, CAUSAL, PAD_D, HAS_DOCS, TMA, PREC)
    dq = dq * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=rmask & d_ok[None, :])


def launch_backward(dout, q, k, v, out, lse, causal, scale, cfg, prec, docs=None):
    """Shapes as the forward; returns (dq, dk, dv) contiguous in q/k/v's shapes and dtype. docs: None, or
    (q_docs [b, sq], k_docs [b, sk], key-block ranges of the dk/dv kernel, query-block ranges of the dq kernel)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    block_d = triton.next_power_of_2(d)
    q_docs, k_docs, key_ranges, query_ranges = docs if docs is not None else (lse,) * 4  # placeholders, unread
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(sq, 64), b * hq)](
        out, dout, delta, sq, *out.stride(), *dout.stride(), H=hq, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64)
    # dk/dv of every q head of a group land in one kv-head slot, so they are written as [b, sk, hkv, d]
    dk = torch.empty((b, sk, hkv, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, sk, hkv, d), dtype=v.dtype, device=q.device)
    # with dq_atomic the dk/dv kernel also adds dq into an fp32 buffer; else dq gets its own kernel over q blocks
    dq_acc = torch.zeros((b, sq, hq, d), dtype=torch.float32, device=q.device) if cfg.dq_atomic else None
    common = (q, k, v, dout, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    shape = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_DOCS=docs is not None, PREC=prec,
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
