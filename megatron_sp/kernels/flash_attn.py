"""Public face of our Triton FlashAttention-2: forward/backward with lse and tuned configs. The autograd op is
megatron_sp.attention.LocalAttention(backend="triton"); the torch reference is attention_forward(..., "torch").

Layout everywhere: q [b, sq, hq, d], k/v [b, sk, hkv, d] (hq % hkv == 0, GQA), out like q, lse [b, hq, sq]
float32 natural log. Ring attention merges partial outputs by lse and hands a *global* lse back to the
backward, which therefore uses the lse it is given.
"""
from dataclasses import dataclass

import torch

from megatron_sp.kernels.flash_attn_bwd import launch_backward
from megatron_sp.kernels.flash_attn_fwd import launch_forward

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FwdConfig:
    """Forward tiling: block_m queries per program, block_n keys per inner step."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """Backward tiling. Kernel 1 (dk/dv): block_n1 keys per program, block_m1 queries per step
    (block_n1 % block_m1 == 0). Kernel 2 (dq): block_m2 queries per program, block_n2 keys per step.
    dq_atomic: kernel 1 also accumulates dq with fp32 atomics and kernel 2 is skipped."""
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps1: int
    num_stages1: int
    num_warps2: int
    num_stages2: int
    dq_atomic: bool = False


# Hopper (H200) picks from tools/bench_flash_attn.py --sweep (docs/kernels.md has the table); bf16/fp16.
# d=128 is measured (16k causal: fwd 503, bwd 433 TFLOP/s); d=64 is a guess checked only for correctness.
_GPU_FWD = {64: FwdConfig(128, 64, 4, 3), 128: FwdConfig(128, 64, 8, 3)}
_GPU_BWD = {64: BwdConfig(64, 128, 128, 64, 4, 3, 4, 3), 128: BwdConfig(64, 128, 128, 64, 8, 3, 8, 3)}
# fp32 operands are twice as wide: halve the tiles so shared memory still fits
_GPU_FWD_F32 = FwdConfig(64, 32, 4, 2)
_GPU_BWD_F32 = BwdConfig(32, 64, 64, 32, 4, 2, 4, 2)
# CPU interpreter: small tiles keep the numpy emulation fast; tails and diagonals still get exercised
_CPU_FWD = FwdConfig(16, 16, 4, 1)
_CPU_BWD = BwdConfig(16, 32, 32, 16, 4, 1, 4, 1)


def default_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[FwdConfig, BwdConfig]:
    """The (forward, backward) tiling used when the caller passes none."""
    if device.type != "cuda":
        return _CPU_FWD, _CPU_BWD
    if dtype == torch.float32:
        return _GPU_FWD_F32, _GPU_BWD_F32
    return _GPU_FWD[head_dim], _GPU_BWD[head_dim]


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


def flash_attn_forward(q, k, v, causal: bool, scale: float, config: FwdConfig | None = None):
    """q [b, sq, hq, d], k/v [b, sk, hkv, d] -> (out [b, sq, hq, d] in q's dtype, lse [b, hq, sq] float32).

    causal: query i sees keys j <= i (top-left aligned). Inputs may be strided views.
    """
    _check(q, k, v)
    b, sq, hq, d = q.shape
    cfg = config or default_configs(d, q.dtype, q.device)[0]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if sq == 0:
        return out, lse
    launch_forward(q, k, v, out, lse, bool(causal), float(scale), cfg, _precision(q.dtype))
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, causal: bool, scale: float, config: BwdConfig | None = None):
    """Gradients (dq, dk, dv) shaped like (q, k, v). lse [b, hq, sq] float32 is used as given (may be global)."""
    _check(q, k, v)
    b, sq, hq, d = q.shape
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (b, hq, sq):
        raise ValueError(f"dout/out must be {tuple(q.shape)} and lse {(b, hq, sq)}; "
                         f"got {tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    cfg = config or default_configs(d, q.dtype, q.device)[1]
    if cfg.block_n1 % cfg.block_m1:
        raise ValueError(f"block_n1 ({cfg.block_n1}) must be a multiple of block_m1 ({cfg.block_m1})")
    if sq == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return launch_backward(dout, q, k, v, out, lse.float(), bool(causal), float(scale), cfg, _precision(q.dtype))
