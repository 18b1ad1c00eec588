"""SwiGLU forward and backward as two Triton kernels that stream at memory bandwidth.

h [.., 2f] holds (gate, up) side by side, as the fused fc1 projection writes it; out = silu(gate) * up [.., f].
The backward writes d_gate and d_up into one [.., 2f] gradient, each program a tile of both halves of one row, so
every load and store is a contiguous run. torch.compile's backward of the same Python (model/fused.py) computes
each output element of that concatenation on its own and ran at about half the bandwidth on an H200
(docs/benchmarks.md). Arithmetic in fp32, one rounding to the output dtype, as torch.compile's kernels do."""
import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns of one half per program


@triton.jit
def _gate_and_up(h_row_ptr, f, cols, inside):
    """Columns `cols` of one row's gate half and up half, in fp32."""
    gate = tl.load(h_row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(h_row_ptr + f + cols, mask=inside, other=0.0).to(tl.float32)
    return gate, up


@triton.jit
def _swiglu_forward_kernel(h_ptr, out_ptr, f, h_row_stride, out_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < f
    gate, up = _gate_and_up(h_ptr + row * h_row_stride, f, cols, inside)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_backward_kernel(h_ptr, dout_ptr, dh_ptr, f, h_row_stride, dout_row_stride, dh_row_stride,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < f
    gate, up = _gate_and_up(h_ptr + row * h_row_stride, f, cols, inside)
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dout * gate * sig
    tl.store(dh_ptr + row * dh_row_stride + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=inside)
    tl.store(dh_ptr + row * dh_row_stride + f + cols, d_up.to(dh_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [.., n] as [rows, n] with a unit stride on n (a view where it can be)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """h [.., 2f] -> silu(gate) * up [.., f]."""
    f = h.shape[-1] // 2
    rows = _rows(h)
    out = torch.empty(rows.shape[0], f, dtype=h.dtype, device=h.device)
    if out.numel():
        _swiglu_forward_kernel[(rows.shape[0], triton.cdiv(f, BLOCK))](
            rows, out, f, rows.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out.view(*h.shape[:-1], f)


def swiglu_backward(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """The gradient [.., 2f] of h given dout [.., f], the gradient of swiglu_forward(h)."""
    f = h.shape[-1] // 2
    rows, drows = _rows(h), _rows(dout)
    dh = torch.empty(rows.shape[0], 2 * f, dtype=h.dtype, device=h.device)
    if dh.numel():
        _swiglu_backward_kernel[(rows.shape[0], triton.cdiv(f, BLOCK))](
            rows, drows, dh, f, rows.stride(0), drows.stride(0), dh.stride(0), BLOCK=BLOCK, num_warps=4)
    return dh.view(h.shape)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h [.., 2f] with the Triton kernels above; saves h (as the compiled form does)."""

    @staticmethod
    def forward(ctx, h):
        if h.shape[-1] % 2:
            raise ValueError(f"swiglu needs an even last dimension (gate, up), got {h.shape[-1]}")
        ctx.save_for_backward(h)
        return swiglu_forward(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return swiglu_backward(h, dout)
