"""Local attention backends: the torch reference against plain math, GQA, lse, backend selection."""
import sys

import pytest
import torch

from megatron_sp.attention.backends import (_call_by_schema, attention_backward, attention_forward,
                                            resolve_backend)
from megatron_sp.attention.local import LocalAttention
from megatron_sp.attention.ring import _merge

SCALE = 0.3


def plain_attention(q, k, v, causal, scale):
    """Textbook attention on [b, s, h, d] with k/v heads repeated: (out, lse [b, h, sq])."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), s.logsumexp(-1)


def inputs(hq=4, hkv=2, sq=6, sk=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(2, sq, hq, 8), make(2, sk, hkv, 8), make(2, sk, hkv, 8), make(2, sq, hq, 8)


CASES = [(causal, hkv) for causal in (True, False) for hkv in (4, 2, 1)]


@pytest.mark.parametrize("causal, hkv", CASES)
def test_torch_backend_matches_plain_math(causal, hkv):
    q, k, v, dout = inputs(hkv=hkv)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = plain_attention(*leaves, causal, SCALE)
    ref_out.backward(dout)
    out, lse = attention_forward(q, k, v, causal, SCALE, "torch")
    assert lse.shape == (2, 4, 6) and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    grads = attention_backward(dout, q, k, v, out, lse, causal, SCALE, "torch")
    for got, leaf in zip(grads, leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got, leaf.grad, rtol=0, atol=1e-12)


def test_backward_against_a_merged_lse_gives_exact_block_gradients():
    """What the ring relies on: attend two k/v blocks apart, merge, then differentiate each block
    against the merged out/lse; the block gradients add up to the full ones."""
    q, k, v, dout = inputs(sq=4, sk=10)
    full_out, full_lse = attention_forward(q, k, v, False, SCALE, "torch")
    full = attention_backward(dout, q, k, v, full_out, full_lse, False, SCALE, "torch")
    blocks = [slice(0, 3), slice(3, 10)]
    out, lse = attention_forward(q, k[:, blocks[0]], v[:, blocks[0]], False, SCALE, "torch")
    o2, l2 = attention_forward(q, k[:, blocks[1]], v[:, blocks[1]], False, SCALE, "torch")
    _merge(out, lse, o2, l2)
    torch.testing.assert_close(out, full_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=1e-12)
    dq = torch.zeros_like(q)
    for cols in blocks:
        bdq, bdk, bdv = attention_backward(dout, q, k[:, cols], v[:, cols], out, lse, False, SCALE, "torch")
        dq += bdq
        torch.testing.assert_close(bdk, full[1][:, cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(bdv, full[2][:, cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(dq, full[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype_and_fp32_lse(dtype):
    q, k, v, dout = inputs(dtype=dtype)
    out, lse = attention_forward(q, k, v, True, SCALE, "torch")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert all(g.dtype == dtype for g in attention_backward(dout, q, k, v, out, lse, True, SCALE, "torch"))
    ref, _ = plain_attention(q.double(), k.double(), v.double(), True, SCALE)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 3e-2)


def test_local_attention_module_autograd():
    q, k, v, dout = inputs(hkv=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = plain_attention(*leaves, True, 8 ** -0.5)
    ref.backward(dout)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out = LocalAttention(causal=True, backend="auto")(*mine)
    out.backward(dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(mine, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_call_by_schema_drives_an_aten_sdpa_op():
    """The name-based caller the cuDNN/flash backends use, on the CPU flash op torch ships."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        pytest.skip("no CPU flash attention op in this torch")
    q, k, v, _ = inputs(hkv=4)
    out, lse = _call_by_schema(op.default, dict(query=q.transpose(1, 2), key=k.transpose(1, 2),
                                                value=v.transpose(1, 2), dropout_p=0.0, is_causal=True,
                                                scale=SCALE))
    ref_out, ref_lse = attention_forward(q, k, v, True, SCALE, "torch")
    torch.testing.assert_close(out.transpose(1, 2), ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="query"):
        _call_by_schema(op.default, dict(key=k, value=v))


def test_triton_kernel_behind_the_backend_pair():
    """The project's Triton kernel (interpreted on CPU): GQA, causal, a ring-style half block
    differentiated against an lse it did not produce."""
    try:
        resolve_backend("triton", "cpu", torch.float32)
    except ValueError as exc:
        pytest.skip(str(exc))
    q, k, v, dout = (torch.nn.functional.pad(t, (0, 56)).float() for t in inputs(sq=32, sk=32))  # d 64
    out, lse = attention_forward(q, k, v, True, SCALE, "triton")
    ref_out, ref_lse = attention_forward(q, k, v, True, SCALE, "torch")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    half = (slice(None), slice(16, None))
    args = (dout[half], q[half], k, v, ref_out[half], ref_lse[..., 16:], False, SCALE)
    for a, b in zip(attention_backward(*args, "triton"), attention_backward(*args, "torch")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "torch"
    assert resolve_backend("auto", "cpu", torch.float64) == "torch"
    assert resolve_backend("torch", "cpu", torch.float32) == "torch"
    monkeypatch.setitem(sys.modules, "megatron_sp.kernels.flash_attn", None)  # import fails
    for name, reason in [("cudnn", "CUDA"), ("sdpa_flash", "CUDA"), ("flash_attn", "CUDA"),
                         ("triton", "cannot be imported"), ("nope", "unknown")]:
        with pytest.raises(ValueError, match=reason) as err:
            resolve_backend(name, "cpu", torch.bfloat16)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_shape_errors_are_one_line():
    q, k, v, _ = inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_forward(q, k, v, False, SCALE, "torch")
    q, k, v, _ = inputs(sq=4, sk=6)
    with pytest.raises(ValueError, match="sq == sk"):
        attention_forward(q, k, v, True, SCALE, "torch")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("backend", ["cudnn", "sdpa_flash"])
@pytest.mark.parametrize("causal, hkv", [(True, 4), (False, 2), (True, 1)])
def test_gpu_backends_match_torch(backend, causal, hkv):
    if backend == "cudnn" and not torch.backends.cudnn.is_available():
        pytest.skip("no cuDNN")
    q, k, v, dout = (t.cuda() for t in inputs(hkv=hkv, sq=128, sk=128, dtype=torch.bfloat16))
    q, k, v, dout = (torch.nn.functional.pad(t, (0, 56)) for t in (q, k, v, dout))  # head_dim 64
    out, lse = attention_forward(q, k, v, causal, SCALE, resolve_backend(backend, q.device, q.dtype))
    ref_out, ref_lse = attention_forward(q, k, v, causal, SCALE, "torch")
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)
    # backward against the *torch* out/lse: the kernel must accept an lse it did not produce
    got = attention_backward(dout, q, k, v, ref_out, ref_lse, causal, SCALE, backend)
    ref = attention_backward(dout, q, k, v, ref_out, ref_lse, causal, SCALE, "torch")
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2)
    assert resolve_backend("auto", q.device, torch.bfloat16) == ("cudnn" if torch.backends.cudnn.is_available()
                                                                 else "sdpa_flash")


def test_resolve_backend_refuses_fp32_for_the_half_precision_kernels(monkeypatch):
    """cuDNN, SDPA flash and flash-attn take bf16/fp16 only: an fp32 run is one error line at start."""
    import megatron_sp.attention.backends as backends
    monkeypatch.setattr(backends, "_unavailable_reason", lambda name, device: None)  # as on a GPU
    for name in ("cudnn", "sdpa_flash", "flash_attn"):
        with pytest.raises(ValueError, match="runs in bf16 or fp16 only, not float32") as err:
            resolve_backend(name, "cpu", torch.float32)
        assert "\n" not in str(err.value)
        assert resolve_backend(name, "cpu", torch.bfloat16) == name
    assert resolve_backend("triton", "cpu", torch.float32) == "triton"
