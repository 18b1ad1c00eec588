"""The SwiGLU Triton kernels (megatron_sp/kernels/swiglu.py) against the Python definition (model/fused.py) in
float64: under Triton's interpreter in CI, on the GPU where there is one (TRITON_INTERPRET unset)."""
import os

import pytest
import torch

from megatron_sp.kernels.compiled import Fused
from megatron_sp.kernels.swiglu import SwiGLU
from megatron_sp.model import fused

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _reference(h: torch.Tensor, dout: torch.Tensor):
    h64 = h.detach().double().requires_grad_()
    out = fused.swiglu(h64)
    out.backward(dout.double())
    return out, h64.grad


@pytest.mark.parametrize("shape", [(2, 3, 2 * 5), (1, 4, 2 * 1500), (7, 2 * 1024)])
@pytest.mark.parametrize("strided", [False, True])
def test_swiglu_kernels_equal_the_python_definition_in_float64(shape, strided):
    """fp32 inputs, one column block and several (f = 1500 > the kernel's 1024, with a ragged last block),
    contiguous and strided h: out and the gradient of h equal float64's within fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(*shape[:-1], shape[-1] + (6 if strided else 0), generator=gen) * 3
    h = base[..., :shape[-1]].to(DEVICE).requires_grad_()
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(DEVICE)
    out = SwiGLU.apply(h)
    out.backward(dout)
    expected_out, expected_grad = _reference(h, dout)
    torch.testing.assert_close(out.double(), expected_out, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), expected_grad, rtol=2e-6, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_swiglu_kernels_in_bf16_within_the_compiled_forms_error():
    """bf16 on the GPU: the kernels' error against float64 is at most the torch.compile'd form's + 1 ulp."""
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(4096, 2 * 5504, generator=gen) * 3).to(DEVICE, torch.bfloat16).requires_grad_()
    dout = torch.randn(4096, 5504, generator=gen).to(DEVICE, torch.bfloat16)
    expected_out, expected_grad = _reference(h, dout)
    errors = []
    for fn in (SwiGLU.apply, torch.compile(fused.swiglu)):
        h.grad = None
        out = fn(h)
        out.backward(dout)
        errors.append(((out.double() - expected_out).abs().max().item(),
                       (h.grad.double() - expected_grad).abs().max().item()))
    (ours_out, ours_grad), (compiled_out, compiled_grad) = errors
    assert ours_out <= compiled_out * 1.01 + 1e-3 and ours_grad <= compiled_grad * 1.01 + 1e-3


def test_fused_calls_the_kernel_on_its_devices_and_the_python_elsewhere():
    calls = []

    def kernel(h):
        calls.append(h.device.type)
        return SwiGLU.apply(h)
    h = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    on_device = Fused(fused.swiglu, True, devices=(DEVICE.type,), kernel=kernel)
    torch.testing.assert_close(on_device(h), fused.swiglu(h), rtol=1e-6, atol=1e-6)
    assert calls == [DEVICE.type]
    Fused(fused.swiglu, True, devices=("xpu",), kernel=kernel)(h)  # not among its devices: eager, no kernel
    Fused(fused.swiglu, False, devices=(DEVICE.type,), kernel=kernel)(h)  # --no-fused-elementwise: eager
    assert calls == [DEVICE.type]


def test_swiglu_refuses_an_odd_last_dimension():
    with pytest.raises(ValueError, match="even last dimension"):
        SwiGLU.apply(torch.zeros(2, 5))
