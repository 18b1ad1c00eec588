"""Document-masked attention through variable-length ("varlen") kernels: FlashAttention-2's packed layout.

A varlen kernel attends N independent sequences packed back to back: q [T, hq, d], k/v [T, hkv, d],
boundaries cu_seqlens int32 [N+1] (0, end of sequence 0, ..., T), the longest one max_len; lse [hq, T].
Documents are exactly such sequences: flatten the batch ([b, s, h, d] -> [b*s, h, d], a view) and cut
it wherever the document id changes or a sample starts. Causal then means causal inside each document,
which is what a document mask with a causal mask is, and a document costs its own length squared.

This covers the blocks that need a document mask under every strategy: queries and keys are the same
tokens (local and Ulysses attention, the ring's diagonal block). A ring block between different tokens
is cut by the ring to a rectangle of one document before any kernel sees it (attention/ring_plan.py),
so it needs no mask at all. q and k with different document runs are refused here.

The kernel pair is passed in (aten's FlashAttention-2 for sdpa_flash, the flash_attn package), so the
packing, the cut and the lse layout are tested on CPU with a reference kernel.
"""
import torch


def segments(q_docs: torch.Tensor, k_docs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N+1] on the docs' device, longest run) of the runs of equal ids in q_docs [b, s],
    flattened over the batch; k_docs must hold the same runs. Reads the ids on the host (one device
    sync: the launch needs the run count and the longest run)."""
    host = q_docs.to("cpu")
    if k_docs is not q_docs and not torch.equal(host, k_docs.to("cpu")):
        raise ValueError("varlen attention kernels need queries and keys in the same documents "
                         "(a block between different tokens needs the torch or triton backend)")
    b, s = host.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = host[:, 1:] != host[:, :-1]
    bounds = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([b * s])])
    return bounds.to(q_docs.device, torch.int32, non_blocking=True), int((bounds[1:] - bounds[:-1]).max())


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h, d] -> [b*s, h, d], a view of a contiguous buffer."""
    return x.contiguous().flatten(0, 1)


def varlen_forward(kernel, q, k, v, causal: bool, scale: float, q_docs, k_docs):
    """Document-masked attention_forward over a varlen kernel(q, k, v, cu_seqlens, max_len, causal, scale)
    -> (out [T, hq, d], lse [hq, T]). Returns (out [b, s, hq, d], lse [b, hq, s] as the kernel gives it)."""
    b, s, hq, d = q.shape
    cu, max_len = segments(q_docs, k_docs)
    out, lse = kernel(_packed(q), _packed(k), _packed(v), cu, max_len, causal, scale)
    if lse.shape != (hq, b * s):
        raise RuntimeError(f"varlen kernel returned lse {tuple(lse.shape)}, expected [heads, tokens] = "
                           f"{(hq, b * s)} (an older padded layout is not supported)")
    return out.view(b, s, hq, d), lse.view(hq, b, s).transpose(0, 1)


def varlen_backward(kernel, dout, q, k, v, out, lse, causal: bool, scale: float, q_docs, k_docs):
    """Gradients for varlen_forward through kernel(dout, q, k, v, out, lse [hq, T], cu_seqlens, max_len,
    causal, scale) -> (dq, dk, dv) packed; lse [b, hq, s] may be one the forward did not produce."""
    b, s, hq, d = q.shape
    cu, max_len = segments(q_docs, k_docs)
    packed_lse = lse.transpose(0, 1).reshape(hq, b * s).contiguous()
    dq, dk, dv = kernel(_packed(dout), _packed(q), _packed(k), _packed(v), _packed(out), packed_lse,
                        cu, max_len, causal, scale)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
