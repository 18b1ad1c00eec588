"""The elementwise pieces of a layer (norms, SwiGLU, rotary) fused by torch.compile on GPU.

In eager mode RMSNorm is ~5 kernels forward and more backward, SwiGLU 3, rotary ~6 per tensor, each
reading and writing the whole activation: together up to ~15 % of a 1.3B step at 64k tokens
(docs/benchmarks_history.md). Compiled, each becomes one kernel forward and one backward. The Python below
is the single definition: CPU (and --no-fused-elementwise) runs it eagerly, CUDA compiles it
(kernels/compiled.py's Fused), except SwiGLU, which runs a Triton kernel pair there (swiglu_kernel) unless
inside a compiled layer (--compile-layers).
"""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[.., 2f] (gate, up) -> [.., f] silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_kernel(h: torch.Tensor) -> torch.Tensor:
    """swiglu by the Triton kernels of kernels/swiglu.py (GPU; imported on first use: Triton is Linux-only)."""
    from megatron_sp.kernels.swiglu import SwiGLU
    return SwiGLU.apply(h)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, head_dim] rotated in its first rot_dim channels (the rotate-half convention);
    cos/sin [b, s, 1, rot_dim]."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    first, second = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out
