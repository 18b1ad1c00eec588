"""Local (single-device) attention kernels behind one forward/backward pair that also returns the LSE.

Every sequence-parallel strategy is built from these two calls. Tensors are [b, s, h, d]; the
log-sum-exp is [b, hq, sq], natural log of the scaled scores, float32 (float64 for float64 inputs).
The backward takes the forward's output and LSE explicitly, so the ring can recompute any block
against the *final* (merged) output and LSE, which is what makes its per-block gradients exact.

Document masks (packed samples): q_docs int32 [b, sq] and k_docs int32 [b, sk], the document of each
query / key token, non-decreasing along the sequence; key j is visible to query i iff q_docs[b, i] ==
k_docs[b, j] (and i >= j when causal). Both None: no document mask, no cost. A query row that sees no
key gets out = 0, lse = -inf and no gradient. Backends with a document mask: torch, sdpa_flash and
flash_attn (varlen FlashAttention-2, attention/varlen.py) and triton (kernels/flash_attn_docs.py).
"""
import functools
import importlib
import inspect

import torch

from megatron_sp.attention.varlen import varlen_backward, varlen_forward
from megatron_sp.kernels import triton_runs_on
from megatron_sp.kernels.choice import auto_candidates

BACKENDS = ("torch", "cudnn", "sdpa_flash", "flash_attn", "triton")


def _check(q, k, v, causal, q_docs=None, k_docs=None):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [b, sq, hq, d], k/v [b, sk, hkv, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs sq == sk, got {q.shape[1]} and {k.shape[1]}")
    if (q_docs is None) != (k_docs is None):
        raise ValueError("give both q_docs and k_docs, or neither")
    if q_docs is not None and (q_docs.shape != q.shape[:2] or k_docs.shape != k.shape[:2]):
        raise ValueError(f"q_docs {tuple(q_docs.shape)} and k_docs {tuple(k_docs.shape)} must be "
                         f"[b, sq] = {tuple(q.shape[:2])} and [b, sk] = {tuple(k.shape[:2])}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- torch: explicit math, the reference every other path is tested against -----------------------

def _scores(q, k, causal, scale, q_docs=None, k_docs=None):
    """Scaled scores [b, hkv, g, sq, sk] in the accumulation dtype, -inf where masked; GQA by grouping q,
    never repeating k."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    ct = accumulation_dtype(q.dtype)
    qg = q.to(ct).view(b, sq, hkv, hq // hkv, d)  # q head = kv_head * g + i
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(ct)) * scale
    if causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    if q_docs is not None:
        other_document = q_docs[:, :, None] != k_docs[:, None, :]  # [b, sq, sk]
        s = s.masked_fill(other_document[:, None, None], float("-inf"))
    return s, qg


def _finite(lse):
    """lse with -inf (a row that sees no key) read as 0, so exp(score - lse) is 0 there, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _torch_forward(q, k, v, causal, scale, q_docs=None, k_docs=None):
    b, sq, hq, d = q.shape
    s, _ = _scores(q, k, causal, scale, q_docs, k_docs)
    lse = torch.logsumexp(s, dim=-1)  # [b, hkv, g, sq]; -inf for a row that sees no key
    p = torch.exp(s - _finite(lse).unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(s.dtype)).reshape(b, sq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, sq)


def _torch_backward(dout, q, k, v, out, lse, causal, scale, q_docs=None, k_docs=None):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    s, qg = _scores(q, k, causal, scale, q_docs, k_docs)
    ct = s.dtype
    p = torch.exp(s - _finite(lse.to(ct)).reshape(b, hkv, hq // hkv, sq, 1))  # masked scores give 0
    do = dout.to(ct).view(b, sq, hkv, hq // hkv, d)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)  # sums over the GQA group
    dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(ct))
    delta = (do * out.to(ct).view_as(do)).sum(-1).permute(0, 2, 3, 1)  # rowsum(dO * O) [b, hkv, g, sq]
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(ct)).reshape(b, sq, hq, d) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- aten SDPA ops (cuDNN, FlashAttention-2): private, so called by argument name ------------------

@functools.cache
def _schema_plan(op, names: frozenset) -> tuple[tuple[str, bool], ...]:
    """(argument, passed by keyword) for each argument of `op` that _call_by_schema fills when it is
    given `names`; worked out once per op and call site, not on every kernel call."""
    plan, positional = [], True
    for arg in op._schema.arguments:
        if arg.name not in names:
            if arg.has_default_value():
                positional = False  # later arguments must go by name
                continue
            if not isinstance(arg.type, torch._C.OptionalType):
                raise RuntimeError(f"{op._schema.name}: don't know how to fill argument {arg.name!r}")
        plan.append((arg.name, arg.kwarg_only or not positional))
    return tuple(plan)


def _call_by_schema(op, values: dict):
    """Call an aten overload with arguments looked up by name in its schema. Private SDPA ops gain
    and reorder arguments between torch releases; an unknown optional argument is left to its
    default (or None), an unknown required one is an error naming it."""
    args, kwargs = [], {}
    for name, by_keyword in _schema_plan(op, frozenset(values)):
        if by_keyword:
            kwargs[name] = values.get(name)
        else:
            args.append(values.get(name))
    return op(*args, **kwargs)


_ATEN_OPS = {"cudnn": "_scaled_dot_product_cudnn_attention",
             "sdpa_flash": "_scaled_dot_product_flash_attention"}


def _aten_op(backend: str, backward: bool):
    name = _ATEN_OPS[backend] + ("_backward" if backward else "")
    return getattr(torch.ops.aten, name).default


def _repeat_kv(x, hq):
    """[b, s, hkv, d] -> [b, s, hq, d] for kernels without GQA (kv head j serves q heads j*g..)."""
    return x if x.shape[2] == hq else x.repeat_interleave(hq // x.shape[2], dim=2)


def _reduce_kv(dx, hkv):
    """Gradient of _repeat_kv: [b, s, hq, d] -> [b, s, hkv, d], summed over each group."""
    b, s, hq, d = dx.shape
    return dx if hq == hkv else dx.view(b, s, hkv, hq // hkv, d).sum(3)


def _bhsd(x):
    """[b, s, h, d] -> the [b, h, s, d] view aten SDPA takes, always over a contiguous [b, s, h, d]
    buffer: torch 2.11's cuDNN backward caches its plan without the strides of out/grad_out, so a
    call with other strides (a ring half-block, an einsum output) silently reuses a wrong plan."""
    return x.contiguous().transpose(1, 2)


def _aten_forward(backend, q, k, v, causal, scale):
    b, sq, hq, _ = q.shape
    t = lambda x: _bhsd(_repeat_kv(x, hq))  # noqa: E731
    res = _call_by_schema(_aten_op(backend, False), dict(
        query=t(q), key=t(k), value=t(v), attn_bias=None, compute_log_sumexp=True, dropout_p=0.0,
        is_causal=causal, return_debug_mask=False, scale=scale))
    return res[0].transpose(1, 2), res[1].reshape(b, hq, sq).float()


def _aten_backward(backend, dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, _ = q.shape
    t = lambda x: _bhsd(_repeat_kv(x, hq))  # noqa: E731
    empty = torch.empty(0, dtype=torch.int64, device=q.device)  # no dropout: RNG state unused
    # cuDNN's softmax statistics tensor is always 4-D [b, h, sq, 1]; flash takes [b, h, sq]
    lse = lse.contiguous().view(b, hq, sq, *((1,) if backend == "cudnn" else ()))
    dq, dk, dv = _call_by_schema(_aten_op(backend, True), dict(
        grad_out=t(dout), query=t(q), key=t(k), value=t(v), out=t(out), logsumexp=lse,
        philox_seed=empty, philox_offset=empty, attn_bias=None, cum_seq_q=None, cum_seq_k=None,
        max_q=sq, max_k=k.shape[1], dropout_p=0.0, is_causal=causal, scale=scale))
    hkv = k.shape[2]
    return dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), hkv), _reduce_kv(dv.transpose(1, 2), hkv)


# --- flash_attn package (native [b, s, h, d] and GQA) ----------------------------------------------

def _call_by_signature(fn, values: dict):
    """Call a Python function with the keyword arguments it declares (flash_attn's private API
    renames and adds arguments between releases: window_size vs window_size_left/right, softcap)."""
    params = inspect.signature(fn).parameters
    return fn(**{name: values[name] for name in params if name in values})


def _flash_attn_forward(q, k, v, causal, scale):
    from flash_attn import flash_attn_interface as fa
    res = _call_by_signature(fa._flash_attn_forward, dict(
        q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1),
        window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False))
    return res[0], (res[1] if len(res) == 4 else res[5]).float()  # <2.6 returned 8 values


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    from flash_attn import flash_attn_interface as fa
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_by_signature(fa._flash_attn_backward, dict(
        dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse.contiguous(), dq=dq, dk=dk,
        dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1),
        window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
        deterministic=False, rng_state=None))
    return dq, dk, dv


# --- varlen FlashAttention-2 kernels for document masks (attention/varlen.py) ---------------------

def _aten_flash_varlen_forward(q, k, v, cu, max_len, causal, scale):
    """aten's FlashAttention-2 over packed q [T, hq, d], k/v [T, hkv, d] (GQA-native) -> (out, lse [hq, T])."""
    res = _call_by_schema(torch.ops.aten._flash_attention_forward.default, dict(
        query=q, key=k, value=v, cum_seq_q=cu, cum_seq_k=cu, max_q=max_len, max_k=max_len, dropout_p=0.0,
        is_causal=causal, return_debug_mask=False, scale=scale))
    return res[0], res[1]


def _aten_flash_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale):
    empty = torch.empty(0, dtype=torch.int64, device=q.device)  # no dropout: the RNG state is not read
    return _call_by_schema(torch.ops.aten._flash_attention_backward.default, dict(
        grad_out=dout, query=q, key=k, value=v, out=out, logsumexp=lse, cum_seq_q=cu, cum_seq_k=cu,
        max_q=max_len, max_k=max_len, dropout_p=0.0, is_causal=causal, scale=scale,
        rng_state=torch.zeros(2, dtype=torch.uint64, device=q.device), unused=empty,
        philox_seed=empty, philox_offset=empty))


def _flash_attn_varlen_forward(q, k, v, cu, max_len, causal, scale):
    from flash_attn import flash_attn_interface as fa
    res = _call_by_signature(fa._flash_attn_varlen_forward, dict(
        q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None))
    return res[0], (res[1] if len(res) == 4 else res[5])  # <2.6 returned 8 values


def _flash_attn_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale):
    from flash_attn import flash_attn_interface as fa
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_by_signature(fa._flash_attn_varlen_backward, dict(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu,
        cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, dropout_p=0.0, softmax_scale=scale,
        causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, deterministic=False, rng_state=None))
    return dq, dk, dv


_VARLEN_KERNELS = {"sdpa_flash": (_aten_flash_varlen_forward, _aten_flash_varlen_backward),
                   "flash_attn": (_flash_attn_varlen_forward, _flash_attn_varlen_backward)}


# --- the project's Triton kernel -------------------------------------------------------------------

def _triton_module():
    return importlib.import_module("megatron_sp.kernels.flash_attn")


def _triton_forward(q, k, v, causal, scale, **docs):
    return _triton_module().flash_attn_forward(q, k, v, causal, scale, **docs)  # GQA-native


def _triton_backward(dout, q, k, v, out, lse, causal, scale, **docs):
    return _triton_module().flash_attn_backward(dout, q, k, v, out, lse, causal, scale, **docs)


# --- availability and dispatch ---------------------------------------------------------------------

DOCUMENT_BACKENDS = ("torch", "sdpa_flash", "flash_attn", "triton")
"""Backends with a document mask (--reset-attention-mask)."""


def documents_unsupported(backend: str) -> str | None:
    """None when `backend` has a document mask, else the one-line reason it is refused."""
    if backend in DOCUMENT_BACKENDS:
        return None
    return (f"attention backend {backend!r} has no document mask (--reset-attention-mask); use sdpa_flash "
            "(varlen FlashAttention-2, GPU), flash_attn, triton or torch")


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a short reason."""
    if backend == "torch":
        return None
    if backend in _ATEN_OPS:
        if device.type != "cuda" or not torch.cuda.is_available():
            return "it needs a CUDA device"
        if not hasattr(torch.ops.aten, _ATEN_OPS[backend]):
            return f"this torch ({torch.__version__}) has no aten.{_ATEN_OPS[backend]}"
        if backend == "cudnn" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
        return None
    if backend == "flash_attn":
        if device.type != "cuda":
            return "it needs a CUDA device"
        try:
            importlib.import_module("flash_attn.flash_attn_interface")
        except ImportError:
            return "the flash_attn package is not installed"
        return None
    if backend == "triton":
        if not triton_runs_on(device):  # Triton's CPU interpreter is a test tool: it alone admits CPU
            return "it needs a CUDA device"
        try:
            _triton_module()
        except ImportError as exc:
            return f"megatron_sp.kernels.flash_attn cannot be imported ({exc})"
        return None
    return f"it is unknown (choose auto or one of {', '.join(BACKENDS)})"


def resolve_backend(name: str, device, dtype: torch.dtype, documents: bool = False, head_dim: int | None = None,
                    seq_len: int | None = None, causal: bool = True) -> str:
    """The concrete backend for `name` on `device` and `dtype`: `auto` takes the first available of
    kernels.choice.auto_candidates (on CUDA with the shape known, the faster of triton and cudnn), else torch;
    `documents`: a document mask is needed; head_dim, seq_len (the queries') and causal describe the shape
    when the caller knows it. An explicit backend that cannot run, or has no document mask when one is
    needed, is a one-line ValueError."""
    device = torch.device(device)
    if name == "auto":
        for candidate in auto_candidates(device.type, dtype, head_dim, seq_len, causal, documents):
            if _unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = _unavailable_reason(name, device)
    if reason is None and name in (*_ATEN_OPS, "flash_attn") and dtype not in (torch.bfloat16, torch.float16):
        reason = f"it runs in bf16 or fp16 only, not {str(dtype).removeprefix('torch.')} (add --bf16)"
    if reason is not None:
        raise ValueError(f"attention backend {name!r} is unavailable on {device}: {reason}")
    if documents and (reason := documents_unsupported(name)):
        raise ValueError(reason)
    return name


def attention_forward(q, k, v, causal: bool, scale: float, backend: str = "torch", q_docs=None, k_docs=None):
    """Attention of q [b, sq, hq, d] over k, v [b, sk, hkv, d] -> (out [b, sq, hq, d] in q's dtype,
    lse [b, hq, sq] float32/float64). `causal`: query i sees key j <= i (needs sq == sk). q_docs [b, sq],
    k_docs [b, sk]: document ids (module docstring), None for no document mask."""
    _check(q, k, v, causal, q_docs, k_docs)
    if q_docs is not None:
        return _documents_forward(q, k, v, causal, scale, backend, q_docs, k_docs)
    if backend == "torch":
        return _torch_forward(q, k, v, causal, scale)
    if backend in _ATEN_OPS:
        return _aten_forward(backend, q, k, v, causal, scale)
    if backend == "flash_attn":
        return _flash_attn_forward(q, k, v, causal, scale)
    if backend == "triton":
        return _triton_forward(q, k, v, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def attention_backward(dout, q, k, v, out, lse, causal: bool, scale: float, backend: str = "torch",
                       q_docs=None, k_docs=None):
    """Gradients (dq, dk, dv) of attention given dout, the forward's inputs and the out/lse to
    differentiate against (possibly merged over several blocks, as in the ring)."""
    _check(q, k, v, causal, q_docs, k_docs)
    if q_docs is not None:
        return _documents_backward(dout, q, k, v, out, lse, causal, scale, backend, q_docs, k_docs)
    if backend == "torch":
        return _torch_backward(dout, q, k, v, out, lse, causal, scale)
    if backend in _ATEN_OPS:
        return _aten_backward(backend, dout, q, k, v, out, lse, causal, scale)
    if backend == "flash_attn":
        return _flash_attn_backward(dout, q, k, v, out, lse, causal, scale)
    if backend == "triton":
        return _triton_backward(dout, q, k, v, out, lse, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _documents_forward(q, k, v, causal, scale, backend, q_docs, k_docs):
    if backend == "torch":
        return _torch_forward(q, k, v, causal, scale, q_docs, k_docs)
    if backend in _VARLEN_KERNELS:
        return varlen_forward(_VARLEN_KERNELS[backend][0], q, k, v, causal, scale, q_docs, k_docs)
    if backend == "triton":
        return _triton_forward(q, k, v, causal, scale, q_docs=q_docs, k_docs=k_docs)
    raise ValueError(documents_unsupported(backend) or f"unknown attention backend {backend!r}")


def _documents_backward(dout, q, k, v, out, lse, causal, scale, backend, q_docs, k_docs):
    if backend == "torch":
        return _torch_backward(dout, q, k, v, out, lse, causal, scale, q_docs, k_docs)
    if backend in _VARLEN_KERNELS:
        return varlen_backward(_VARLEN_KERNELS[backend][1], dout, q, k, v, out, lse, causal, scale, q_docs, k_docs)
    if backend == "triton":
        return _triton_backward(dout, q, k, v, out, lse, causal, scale, q_docs=q_docs, k_docs=k_docs)
    raise ValueError(documents_unsupported(backend) or f"unknown attention backend {backend!r}")
