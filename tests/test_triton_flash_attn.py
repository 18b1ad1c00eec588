"""Tests of the Triton flash attention kernels against the float64 reference: tiny shapes on CPU (interpreter),
real sizes in bf16 against PyTorch SDPA's own error when a GPU is present."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from megatron_sp.attention import LocalAttention, attention_forward
from megatron_sp.kernels import flash_attn
from megatron_sp.kernels.flash_attn import HEAD_DIMS, default_configs, flash_attn_backward, flash_attn_forward
from megatron_sp.kernels.flash_attn_fwd import tma_qualifies
from megatron_sp.kernels.flash_attn_tiles import head_dim_chunks
from tests.triton_interpreter import teach_descriptor_reduce_add

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    teach_descriptor_reduce_add()  # dq's TMA reduce-add (dq_atomic with tma) under the interpreter


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(b, sq, sk, hq, hkv, d, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device=DEVICE).to(dtype)
               for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    dout = torch.randn(b, sq, hq, d, generator=g, device=DEVICE).to(dtype)
    return q, k, v, dout


def reference_grads(q, k, v, dout, causal, scale):
    """float64 reference (out, lse, dq, dk, dv)."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = attention_forward(q64, k64, v64, causal, scale, "torch")  # plain torch math: autograd works
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def ours(q, k, v, dout, causal, scale, bwd_config=None, fwd_config=None):
    out, lse = flash_attn_forward(q, k, v, causal, scale, config=fwd_config)
    dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, causal, scale, config=bwd_config)
    return out, lse, dq, dk, dv


def configs(d, dtype, tma):
    """The default (forward, backward) configs of this device, with TMA descriptors when tma."""
    return tuple(dataclasses.replace(c, tma=tma) for c in default_configs(d, dtype, torch.device(DEVICE)))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def check_against_reference(got, want, tol):
    """got, want: (out, lse, dq, dk, dv); lse to 1e-4 absolute, the rest to `tol` relative."""
    assert got[0].dtype == got[2].dtype and got[1].dtype == torch.float32 and got[1].shape == want[1].shape
    assert (got[1].double() - want[1]).abs().max().item() < 1e-4
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert x.shape == ref.shape, name
        assert rel_err(x, ref) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s,hq,hkv", [(16, 2, 2), (45, 4, 2)])  # 45: ragged tail; (4, 2): GQA
def test_matches_reference(dtype, causal, s, hq, hkv):
    q, k, v, dout = make_inputs(1, s, s, hq, hkv, 64, dtype, seed=s + hq + causal)
    got = ours(q, k, v, dout, causal, 0.125)
    assert got[0].dtype == dtype
    check_against_reference(got, reference_grads(q, k, v, dout, causal, 0.125), TOL[dtype])


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_every_head_dim(d, causal):
    """fp32, GQA, ragged lengths (sq != sk when not causal); d not a power of two runs padded in the kernel."""
    sq, sk = (27, 27) if causal else (19, 35)
    q, k, v, dout = make_inputs(1, sq, sk, 2, 1, d, torch.float32, seed=d + causal)
    check_against_reference(ours(q, k, v, dout, causal, d ** -0.5), reference_grads(q, k, v, dout, causal, d ** -0.5),
                            TOL[torch.float32])


@pytest.mark.parametrize("d", [80, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_in_fp16(d, causal):
    q, k, v, dout = make_inputs(1, 33, 33, 2, 1, d, torch.float16, seed=d)
    check_against_reference(ours(q, k, v, dout, causal, d ** -0.5), reference_grads(q, k, v, dout, causal, d ** -0.5),
                            TOL[torch.float16])


@pytest.mark.parametrize("d", [96, 128])
def test_cross_lengths_and_strided_views(d):
    """sq != sk (non-causal) and q/k/v as strided views of one packed qkv tensor: at d = 96 the padded lanes
    of each row would read the next head's numbers if the kernels did not mask the d axis."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(2, 20, 3, 2, d, generator=g, device=DEVICE)[:, :, 1]  # [b, sq, h, d], not contiguous
    kv = torch.randn(2, 37, 2, 2, d, generator=g, device=DEVICE)
    k, v = kv[:, :, 0], kv[:, :, 1]
    dout = torch.randn(2, 20, 2, d, generator=g, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    got = ours(q, k, v, dout, False, 0.09)
    want = reference_grads(q, k, v, dout, False, 0.09)
    for x, ref in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("dtype,causal,sq,sk,hq,hkv,d", [
    (torch.float32, True, 45, 45, 4, 2, 64),  # ragged tail, GQA
    (torch.float16, False, 19, 35, 2, 1, 96),  # padded head dim, cross lengths
    (torch.float16, True, 33, 33, 2, 2, 80),
    (torch.float32, False, 40, 21, 2, 2, 128)])
def test_tma_matches_reference(dtype, causal, sq, sk, hq, hkv, d):
    """The TMA path: tiles from descriptors, which zero-fill past the sequence end and past d themselves."""
    q, k, v, dout = make_inputs(1, sq, sk, hq, hkv, d, dtype, seed=sq + d)
    assert q.is_cuda or tma_qualifies(q, k, v, dout)  # on CPU the interpreter surely runs the descriptors
    fwd, bwd = configs(d, dtype, tma=True)
    got = ours(q, k, v, dout, causal, d ** -0.5, bwd, fwd)
    check_against_reference(got, reference_grads(q, k, v, dout, causal, d ** -0.5), TOL[dtype])


def test_tma_falls_back_to_pointers_for_tensors_descriptors_cannot_address():
    g = torch.Generator(device=DEVICE).manual_seed(4)
    q = torch.randn(1, 21, 2, 128, generator=g, device=DEVICE)[..., ::2]  # d strided: stride 2
    k = torch.randn(1, 21, 2, 65, generator=g, device=DEVICE)[..., :64]  # head stride 260 bytes
    v = torch.randn(1, 21 * 2 * 64 + 1, generator=g, device=DEVICE)[:, 1:].view(1, 21, 2, 64)  # base off by 4 bytes
    dout = torch.randn(1, 21, 2, 64, generator=g, device=DEVICE)
    assert tma_qualifies(dout) and not any(tma_qualifies(x) for x in (q, k, v))
    fwd, bwd = configs(64, torch.float32, tma=True)
    got = ours(q, k, v, dout, True, 0.125, bwd, fwd)
    check_against_reference(got, reference_grads(q, k, v, dout, True, 0.125), TOL[torch.float32])


def test_head_dims_run_as_two_power_of_two_chunks():
    """No padded lanes: a head dim that is not a power of two is split into two that are, each at least 16 wide
    (tl.dot's least side); every supported head dim splits so, and one that cannot is refused."""
    assert [head_dim_chunks(d) for d in HEAD_DIMS] == [(32, 0), (64, 0), (64, 16), (64, 32), (128, 0), (128, 64),
                                                       (256, 0)]
    for d in (72, 112, 136):  # 64 + 8; 64 + 48; 128 + 8
        with pytest.raises(ValueError, match=f"head_dim {d} is not a power of two"):
            head_dim_chunks(d)


@pytest.mark.parametrize("shared_kb,block_n,wide_tiles", [(227, 128, ((128, 64), 64)), (163, 64, ((128, 32), 32))])
def test_a_gpu_with_less_shared_memory_gets_tilings_that_fit(monkeypatch, shared_kb, block_n, wide_tiles):
    """The d=128 forward's 128x128 tile needs 225 KB and d=256's kernels ~193 KB: Hopper's 227 KB per block; an
    A100's 163 KB gets a 128x64 forward at d=128, and 128x32 forward and 32-row dk/dv tiles at d=256."""
    monkeypatch.setattr(flash_attn, "_max_shared_memory", lambda index: shared_kb * 1024)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fwd, bwd = default_configs(128, torch.bfloat16, torch.device("cuda", 0))
    assert (fwd.block_m, fwd.block_n) == (128, block_n) and fwd.tma and bwd.tma
    fwd, bwd = default_configs(256, torch.bfloat16, torch.device("cuda", 0))
    assert ((fwd.block_m, fwd.block_n), bwd.block_m1) == wide_tiles and fwd.tma and bwd.tma
    for d, fits_either_way in ((64, (64, 64)), (80, (128, 64)), (96, (128, 64))):
        fwd = default_configs(d, torch.bfloat16, torch.device("cuda", 0))[0]
        assert (fwd.block_m, fwd.block_n) == fits_either_way


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run these tilings on the GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 192, 256])
def test_the_gpu_tilings_under_the_interpreter(monkeypatch, d, causal):
    """The 16-bit defaults a Hopper GPU gets (tiles, warps, TMA), run by the interpreter in fp16: their block
    phases, causal diagonals and ragged ends at 333 tokens (200 queries against them when not causal)."""
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(flash_attn, "_max_shared_memory", lambda index: 227 * 1024)
        fwd, bwd = default_configs(d, torch.bfloat16, torch.device("cuda", 0))
    assert fwd.tma and bwd.tma and fwd.block_m >= 64
    q, k, v, dout = make_inputs(1, 333 if causal else 200, 333, 2, 1, d, torch.float16, seed=d)
    got = ours(q, k, v, dout, causal, d ** -0.5, bwd, fwd)
    check_against_reference(got, reference_grads(q, k, v, dout, causal, d ** -0.5), TOL[torch.float16])


@pytest.mark.parametrize("tma,sq,d", [(False, 45, 64), (True, 45, 64), (True, 37, 96)])
def test_dq_atomic_variant(tma, sq, d):
    """dq added up by the dk/dv kernel: fp32 atomics through pointers, or with tma one reduce-add per tile through a
    descriptor per head-dim chunk (d = 96: 64 + 32), which drops the rows past the ragged end."""
    q, k, v, dout = make_inputs(1, sq, sq, 4, 2, d, torch.float32, seed=7)
    cfg = dataclasses.replace(configs(d, torch.float32, tma)[1], dq_atomic=True)
    got = ours(q, k, v, dout, True, d ** -0.5, bwd_config=cfg)
    want = reference_grads(q, k, v, dout, True, d ** -0.5)
    for x, ref in zip(got[2:], want[2:]):
        assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("tma", [False, True])
def test_backward_uses_the_given_global_lse(tma):
    """Ring attention's contract: partial forwards over key chunks, merged by lse; each chunk's backward with
    the merged out and *global* lse yields exactly that chunk's share of the full gradient."""
    q, k, v, dout = make_inputs(1, 24, 40, 2, 2, 64, torch.float32, seed=11)
    fwd, bwd = configs(64, torch.float32, tma)
    chunks = [(0, 17), (17, 40)]
    parts = [flash_attn_forward(q, k[:, a:b], v[:, a:b], False, 0.125, fwd) for a, b in chunks]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # [b, h, sq]
    out = sum(o * torch.exp(l - lse).transpose(1, 2)[..., None] for o, l in parts)
    grads = [flash_attn_backward(dout, q, k[:, a:b], v[:, a:b], out, lse, False, 0.125, bwd) for a, b in chunks]
    want = reference_grads(q, k, v, dout, False, 0.125)
    assert rel_err(out, want[0]) < 1e-5
    assert rel_err(grads[0][0] + grads[1][0], want[2]) < 1e-5
    assert rel_err(torch.cat([g[1] for g in grads], 1), want[3]) < 1e-5
    assert rel_err(torch.cat([g[2] for g in grads], 1), want[4]) < 1e-5


def test_autograd_wrapper():
    q, k, v, dout = make_inputs(1, 16, 16, 2, 1, 64, torch.float32, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    LocalAttention(causal=True, backend="triton")(q, k, v).backward(dout)
    want = reference_grads(q, k, v, dout, True, 64 ** -0.5)
    for x, ref in zip((q.grad, k.grad, v.grad), want[2:]):
        assert rel_err(x, ref) < 1e-5


def test_rejects_bad_shapes():
    q, k, v, _ = make_inputs(1, 8, 8, 2, 2, 64, torch.float32, seed=0)
    for d in (48, 512):
        x = torch.zeros(1, 8, 2, d)
        with pytest.raises(ValueError, match="head_dim"):
            flash_attn_forward(x, x, x, False, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attn_forward(q, k.repeat(1, 1, 3, 1)[:, :, :3], v.repeat(1, 1, 3, 1)[:, :, :3], False, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_triton_backend_is_one_error_line():
    """Outside the interpreter Triton needs a GPU: refused in one line at start, not a traceback at the first step."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "pretrain_gpt.py"), "--mock-data", "--train-iters", "2",
                          "--hidden-size", "64", "--num-attention-heads", "2", "--use-flash-attn-triton"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: attention backend 'triton' is unavailable on cpu: it needs a CUDA device"]


# ---- GPU: real sizes in bf16, error within 2x of SDPA's own bf16 error (both against float64) ----

def sdpa_grads(q, k, v, dout, causal, scale, mask=None):
    """SDPA's own out, dq, dk, dv (whatever backend it picks); mask: an optional boolean [b, 1, sq, sk]."""
    group = q.shape[2] // k.shape[2]
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
    kr, vr = (x.repeat_interleave(group, dim=2) for x in (k_, v_))
    out = torch.nn.functional.scaled_dot_product_attention(
        q_.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask, is_causal=causal,
        scale=scale).transpose(1, 2)
    out.backward(dout)
    return out, q_.grad, k_.grad, v_.grad


def assert_within_twice_sdpa(got, want, base):
    """got, want: (out, lse, dq, dk, dv) of ours and the float64 reference; base: SDPA's (out, dq, dk, dv)."""
    assert (got[1].double() - want[1]).abs().max().item() < 1e-3  # lse: fp32 math on identical inputs
    for name, x, y, ref in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], base, want[:1] + want[2:]):
        assert torch.isfinite(x).all(), name
        ours_e, sdpa_e = rel_err(x, ref), rel_err(y, ref)
        assert ours_e <= 2 * sdpa_e + 1e-3, f"{name}: ours {ours_e:.2e} vs sdpa {sdpa_e:.2e}"


def check_gpu_case(b, s, hq, hkv, d, dtype, causal, bwd_config=None):
    q, k, v, dout = make_inputs(b, s, s, hq, hkv, d, dtype, seed=s + d)
    scale = d ** -0.5
    got = ours(q, k, v, dout, causal, scale, bwd_config)
    torch.cuda.synchronize()
    assert_within_twice_sdpa(got, reference_grads(q, k, v, dout, causal, scale),
                             sdpa_grads(q, k, v, dout, causal, scale))


needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,s,hq,hkv,d,dtype", [
    (2, 1024, 8, 8, 64, torch.bfloat16), (1, 4096, 8, 2, 128, torch.bfloat16),
    (1, 2000, 4, 4, 128, torch.bfloat16), (1, 1536, 4, 2, 64, torch.float16), (1, 1000, 2, 2, 128, torch.float32)])
def test_gpu_within_twice_sdpa_error(causal, b, s, hq, hkv, d, dtype):
    check_gpu_case(b, s, hq, hkv, d, dtype, causal)


@needs_gpu
@pytest.mark.parametrize("d,dtype,causal", [(d, torch.bfloat16, True) for d in HEAD_DIMS] + [
    (96, torch.bfloat16, False), (192, torch.bfloat16, False), (256, torch.float32, True)])
def test_gpu_every_head_dim(d, dtype, causal):
    """Each head dim's GPU tiling compiles (fits shared memory) and is as accurate as SDPA; GQA, ragged 1500."""
    check_gpu_case(1, 1500, 4, 2, d, dtype, causal)


@needs_gpu
@pytest.mark.parametrize("d", [64, 96, 128])
def test_gpu_dq_reduce_add_within_twice_sdpa_error(d):
    """dq added up inside the dk/dv kernel by TMA reduce-adds into fp32 (dq_atomic with tma), bf16, causal, GQA,
    a ragged 1500 tokens."""
    bwd = dataclasses.replace(configs(d, torch.bfloat16, tma=True)[1], dq_atomic=True)
    check_gpu_case(1, 1500, 4, 2, d, torch.bfloat16, True, bwd)
