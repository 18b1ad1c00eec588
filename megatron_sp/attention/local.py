"""Single-device attention as an autograd Function over the backend pair: the model's default inner attention."""
import math

import torch
from torch import nn

from megatron_sp.attention.backends import attention_backward, attention_forward, resolve_backend


class LocalAttentionFn(torch.autograd.Function):
    """Forward: attention_forward -> (out [b, s, hq, d], lse [b, hq, s], not differentiable).
    Backward: attention_backward with the saved out and lse (no recomputation of the forward).
    docs: document ids int32 [b, s] of both q and k, or None (backends.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, backend: str, docs=None):
        # saved dense: a view of the fused qkv projection would keep all of it alive until backward
        q, k, v = (x.contiguous() for x in (q, k, v))
        out, lse = attention_forward(q, k, v, causal, scale, backend, q_docs=docs, k_docs=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.backend, ctx.docs = causal, scale, backend, docs
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend,
                                        q_docs=ctx.docs, k_docs=ctx.docs)
        return dq, dk, dv, None, None, None, None


class AttentionConfig(nn.Module):
    """Shared settings of every attention module: mask, backend request, softmax scale."""

    def __init__(self, causal: bool = True, backend: str = "auto", softmax_scale: float | None = None):
        super().__init__()
        self.causal, self.backend, self.softmax_scale = causal, backend, softmax_scale
        self._resolved: dict = {}  # (device, dtype, documents, d, s) -> backend: resolved once, not per call

    def kernel_args(self, q: torch.Tensor, documents=None, gathered: int = 1) -> tuple[bool, float, str]:
        """(causal, scale, concrete backend) for inputs like q, with a document mask when `documents`
        (attention/documents.py) is given; scale defaults to 1/sqrt(d). gathered: how many shards of
        q's length the kernel sees (the all-to-all's group size; `auto` picks by that length)."""
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        key = (q.device, q.dtype, documents is not None, q.shape[-1], q.shape[1] * gathered)
        if key not in self._resolved:  # `auto` may pick by shape; q [b, s, h, d] is this rank's shard
            self._resolved[key] = resolve_backend(self.backend, q.device, q.dtype, documents=key[2],
                                                  head_dim=q.shape[-1], seq_len=key[4], causal=self.causal)
        return self.causal, scale, self._resolved[key]

    def extra_repr(self) -> str:
        return f"causal={self.causal}, backend={self.backend!r}, softmax_scale={self.softmax_scale}"


class LocalAttention(AttentionConfig):
    """forward(q [b, s, hq, d], k, v [b, s, hkv, d], documents=None) -> out [b, s, hq, d], all on one
    device; documents: the samples' Documents (attention/documents.py) for a document mask."""

    def forward(self, q, k, v, documents=None):
        docs = None
        if documents is not None:
            documents.check_local_length(q.shape[1], 1)
            docs = documents.ids
        return LocalAttentionFn.apply(q, k, v, *self.kernel_args(q, documents), docs)[0]
