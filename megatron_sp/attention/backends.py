"""Local (single-device) attention kernels behind one forward/backward pair that also returns the LSE.

Every sequence-parallel strategy is built from these two calls. Tensors are [b, s, h, d]; the
log-sum-exp is [b, hq, sq], natural log of the scaled scores, float32 (float64 for float64 inputs).
The backward takes the forward's output and LSE explicitly, so the ring can recompute any block
against the *final* (merged) output and LSE, which is what makes its per-block gradients exact.
"""
import functools
import importlib
import inspect

import torch

BACKENDS = ("torch", "cudnn", "sdpa_flash", "flash_attn", "triton")


def _check(q, k, v, causal):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [b, sq, hq, d], k/v [b, sk, hkv, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs sq == sk, got {q.shape[1]} and {k.shape[1]}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- torch: explicit math, the reference every other path is tested against -----------------------

def _scores(q, k, causal, scale):
    """Scaled scores [b, hkv, g, sq, sk] in the accumulation dtype; GQA by grouping q, never repeating k."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    ct = accumulation_dtype(q.dtype)
    qg = q.to(ct).view(b, sq, hkv, hq // hkv, d)  # q head = kv_head * g + i
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(ct)) * scale
    if causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return s, qg


def _torch_forward(q, k, v, causal, scale):
    b, sq, hq, d = q.shape
    s, _ = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)  # [b, hkv, g, sq]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(s.dtype)).reshape(b, sq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, sq)


def _torch_backward(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    s, qg = _scores(q, k, causal, scale)
    ct = s.dtype
    p = torch.exp(s - lse.to(ct).reshape(b, hkv, hq // hkv, sq, 1))  # masked scores give 0
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


# --- the project's Triton kernel -------------------------------------------------------------------

def _triton_module():
    return importlib.import_module("megatron_sp.kernels.flash_attn")


def _triton_forward(q, k, v, causal, scale):
    return _triton_module().flash_attn_forward(q, k, v, causal, scale)  # GQA-native


def _triton_backward(dout, q, k, v, out, lse, causal, scale):
    return _triton_module().flash_attn_backward(dout, q, k, v, out, lse, causal, scale)


# --- availability and dispatch ---------------------------------------------------------------------

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
        try:
            _triton_module()
        except ImportError as exc:
            return f"megatron_sp.kernels.flash_attn cannot be imported ({exc})"
        return None
    return f"it is unknown (choose auto or one of {', '.join(BACKENDS)})"


def resolve_backend(name: str, device, dtype: torch.dtype) -> str:
    """The concrete backend for `name` on `device` and `dtype`: `auto` picks cudnn on CUDA bf16/fp16,
    else sdpa_flash, else torch; an explicit backend that cannot run is a one-line ValueError."""
    device = torch.device(device)
    if name == "auto":
        if dtype in (torch.bfloat16, torch.float16):
            for candidate in ("cudnn", "sdpa_flash"):
                if _unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    reason = _unavailable_reason(name, device)
    if reason is None and name in (*_ATEN_OPS, "flash_attn") and dtype not in (torch.bfloat16, torch.float16):
        reason = f"it runs in bf16 or fp16 only, not {str(dtype).removeprefix('torch.')} (add --bf16)"
    if reason is not None:
        raise ValueError(f"attention backend {name!r} is unavailable on {device}: {reason}")
    return name


def attention_forward(q, k, v, causal: bool, scale: float, backend: str = "torch"):
    """Attention of q [b, sq, hq, d] over k, v [b, sk, hkv, d] -> (out [b, sq, hq, d] in q's dtype,
    lse [b, hq, sq] float32/float64). `causal`: query i sees key j <= i (needs sq == sk)."""
    _check(q, k, v, causal)
    if backend == "torch":
        return _torch_forward(q, k, v, causal, scale)
    if backend in _ATEN_OPS:
        return _aten_forward(backend, q, k, v, causal, scale)
    if backend == "flash_attn":
        return _flash_attn_forward(q, k, v, causal, scale)
    if backend == "triton":
        return _triton_forward(q, k, v, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def attention_backward(dout, q, k, v, out, lse, causal: bool, scale: float, backend: str = "torch"):
    """Gradients (dq, dk, dv) of attention given dout, the forward's inputs and the out/lse to
    differentiate against (possibly merged over several blocks, as in the ring)."""
    _check(q, k, v, causal)
    if backend == "torch":
        return _torch_backward(dout, q, k, v, out, lse, causal, scale)
    if backend in _ATEN_OPS:
        return _aten_backward(backend, dout, q, k, v, out, lse, causal, scale)
    if backend == "flash_attn":
        return _flash_attn_backward(dout, q, k, v, out, lse, causal, scale)
    if backend == "triton":
        return _triton_backward(dout, q, k, v, out, lse, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
