"""Public face of our Triton FlashAttention-2: forward/backward with lse and tuned configs. The autograd op is
megatron_sp.attention.LocalAttention(backend="triton"); the torch reference is attention_forward(..., "torch").

Layout everywhere: q [b, sq, hq, d], k/v [b, sk, hkv, d] (hq % hkv == 0, GQA), out like q, lse [b, hq, sq]
float32 natural log. Ring attention merges partial outputs by lse and hands a *global* lse back to the
backward, which therefore uses the lse it is given. Head dims of HEAD_DIMS; one that is not a power of two runs
as two power-of-two chunks of the head dim (96 = 64 + 32), never padded or copied. Optional document masks
(q_docs, k_docs) keep attention inside each document of a packed sample (flash_attn_docs).
"""
import functools
from dataclasses import dataclass, replace

import torch
import triton

from megatron_sp.kernels.flash_attn_bwd import launch_backward
from megatron_sp.kernels.flash_attn_docs import check_docs, key_block_ranges, query_block_ranges
from megatron_sp.kernels.flash_attn_fwd import launch_forward

HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)  # each a power of two or the sum of two (flash_attn_tiles.head_dim_chunks)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FwdConfig:
    """Forward tiling: block_m queries per program, block_n keys per inner step. tma: load q, k, v tiles through
    tensor descriptors (Hopper TMA) where the tensors allow it (flash_attn_fwd.use_tma), else through pointers."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


@dataclass(frozen=True)
class BwdConfig:
    """Backward tiling. Kernel 1 (dk/dv): block_n1 keys per program, block_m1 queries per step
    (block_n1 % block_m1 == 0). Kernel 2 (dq): block_m2 queries per program, block_n2 keys per step.
    dq_atomic: kernel 1 also adds dq up in fp32 (element-wise atomics, or with tma one bulk reduce-add per tile)
    and kernel 2 is skipped: 5 matmuls instead of 7, not deterministic, slower on H200 (docs/kernels.md).
    tma: both kernels load q, k, v, dout tiles through tensor descriptors where allowed, as FwdConfig.tma."""
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps1: int
    num_stages1: int
    num_warps2: int
    num_stages2: int
    dq_atomic: bool = False
    tma: bool = False


def block_d(head_dim: int) -> int:
    """The head dim's width class, the next power of two (80, 96 -> 128; 192 -> 256): the fp32 tilings and the bench
    tool's sweep candidates are keyed by it. The kernels themselves run d as two power-of-two chunks
    (flash_attn_tiles.head_dim_chunks), so no padded lanes are computed."""
    return triton.next_power_of_2(head_dim)


# Hopper (H200), per head dim, each swept in bf16 (tools/bench_flash_attn.py --sweep) within the 227 KB of shared
# memory a block may use. docs/kernels.md has the table and the reasons.
_BWD_128 = BwdConfig(64, 128, 128, 64, 8, 3, 8, 3)
_BWD_256 = BwdConfig(64, 64, 128, 32, 8, 2, 8, 2)
_GPU_FWD = {32: FwdConfig(64, 64, 4, 3), 64: FwdConfig(64, 64, 4, 3), 80: FwdConfig(128, 64, 8, 4),
            96: FwdConfig(128, 64, 8, 3), 128: FwdConfig(128, 128, 8, 3), 192: FwdConfig(64, 32, 4, 3),
            256: FwdConfig(128, 64, 8, 2)}
_GPU_BWD = {32: BwdConfig(64, 64, 64, 64, 4, 3, 4, 3), 64: BwdConfig(32, 64, 128, 64, 4, 3, 8, 3),
            80: BwdConfig(32, 64, 64, 64, 4, 4, 4, 4),
            96: _BWD_128, 128: _BWD_128, 192: _BWD_256, 256: _BWD_256}
# The d=128 forward's 128x128 tile needs 225 KB of shared memory and d=256's kernels ~193 KB, which only
# Hopper-class GPUs give a block (227 KB); one with less (A100: 163 KB) gets tilings that fit there. The other
# defaults fit 163 KB.
_HOPPER_SHARED_MEMORY = 227 * 1024
_GPU_LESS_SHARED_MEMORY = {128: (FwdConfig(128, 64, 8, 3), _BWD_128),
                           256: (FwdConfig(128, 32, 8, 2), BwdConfig(32, 64, 64, 32, 8, 2, 8, 2))}
# fp32 (exact "ieee" dots on the FMA units, no tensor cores): operands twice as wide and held in registers, so
# small tiles, the ones that spill least
_F32_NARROW = (FwdConfig(16, 32, 4, 2), BwdConfig(16, 32, 32, 16, 4, 2, 4, 2))
_GPU_F32 = {32: _F32_NARROW, 64: _F32_NARROW, 128: _F32_NARROW,
            256: (FwdConfig(32, 32, 8, 2), BwdConfig(16, 32, 32, 16, 8, 2, 8, 2))}
# TMA tensor descriptors in the 16-bit GPU defaults (FwdConfig.tma, BwdConfig.tma): the backward ~5-7 % faster at
# d=128 (docs/kernels.md). Not for fp32: compiled for sm_90 with descriptors, its narrow tiles spill kilobytes.
_GPU_TMA = True
# CPU interpreter: small tiles keep the numpy emulation fast; tails and diagonals still get exercised
_CPU_FWD = FwdConfig(16, 16, 4, 1)
_CPU_BWD = BwdConfig(16, 32, 32, 16, 4, 1, 4, 1)


def default_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[FwdConfig, BwdConfig]:
    """The (forward, backward) tiling used when the caller passes none."""
    if device.type != "cuda":
        return _CPU_FWD, _CPU_BWD
    if dtype == torch.float32:
        return _GPU_F32[block_d(head_dim)]
    fwd, bwd = _GPU_FWD[head_dim], _GPU_BWD[head_dim]
    if head_dim in _GPU_LESS_SHARED_MEMORY and max_shared_memory(device) < _HOPPER_SHARED_MEMORY:
        fwd, bwd = _GPU_LESS_SHARED_MEMORY[head_dim]
    return replace(fwd, tma=_GPU_TMA), replace(bwd, tma=_GPU_TMA)


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a block may use on this CUDA device (with opt-in), as Triton checks a launch. On a
    machine without a GPU (the defaults listed or compiled offline for sm_90): Hopper's."""
    if not torch.cuda.is_available():
        return _HOPPER_SHARED_MEMORY
    return _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache
def _max_shared_memory(index: int) -> int:
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (not tf32) so fp32 really means fp32; 16-bit ignores this
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v as [b, s, h, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [b={b}, sk, hkv, d={d}]")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} not supported by the Triton flash attention (supported: {HEAD_DIMS})")
    if hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")


def flash_attn_forward(q, k, v, causal: bool, scale: float, config: FwdConfig | None = None, *,
                       q_docs=None, k_docs=None):
    """q [b, sq, hq, d], k/v [b, sk, hkv, d] -> (out [b, sq, hq, d] in q's dtype, lse [b, hq, sq] float32).

    causal: query i sees keys j <= i (top-left aligned). Inputs may be strided views.
    q_docs [b, sq], k_docs [b, sk]: integer document ids, non-decreasing along the sequence (flash_attn_docs);
    key j is then seen by query i only if their ids are equal. A query that sees no key gets out 0, lse -inf.
    """
    _check(q, k, v)
    b, sq, hq, d = q.shape
    cfg = config or default_configs(d, q.dtype, q.device)[0]
    docs = check_docs(q_docs, k_docs, q, k)  # None without a document mask
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0:
        return out, lse
    if docs is not None:
        docs = (*docs, query_block_ranges(*docs, cfg.block_m, cfg.block_n, causal))
    launch_forward(q, k, v, out, lse, bool(causal), float(scale), cfg, _precision(q.dtype), docs)
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, causal: bool, scale: float, config: BwdConfig | None = None, *,
                        q_docs=None, k_docs=None):
    """Gradients (dq, dk, dv) shaped like (q, k, v). lse [b, hq, sq] float32 is used as given (may be global).
    q_docs, k_docs: the document mask of the forward (see flash_attn_forward)."""
    _check(q, k, v)
    b, sq, hq, d = q.shape
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (b, hq, sq):
        raise ValueError(f"dout/out must be {tuple(q.shape)} and lse {(b, hq, sq)}; "
                         f"got {tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    cfg = config or default_configs(d, q.dtype, q.device)[1]
    if cfg.block_n1 % cfg.block_m1:
        raise ValueError(f"block_n1 ({cfg.block_n1}) must be a multiple of block_m1 ({cfg.block_m1})")
    docs = check_docs(q_docs, k_docs, q, k)  # None without a document mask
    if sq == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if docs is not None:
        docs = (*docs, key_block_ranges(*docs, cfg.block_n1, cfg.block_m1, causal),
                query_block_ranges(*docs, cfg.block_m2, cfg.block_n2, causal))
    return launch_backward(dout, q, k, v, out, lse.float(), bool(causal), float(scale), cfg, _precision(q.dtype),
                           docs)
