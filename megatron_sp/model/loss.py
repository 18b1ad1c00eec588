"""Cross-entropy straight from hidden states, a chunk of tokens at a time, never holding all logits.

Full logits are [tokens, vocab]: at 64k tokens and a 32k vocabulary that is 8 GiB in fp32 — more
than the rest of a layer's activations. Each chunk's logits are built, reduced to a loss and
dropped; backward rebuilds them one chunk at a time (activation checkpointing per chunk).
On GPU the cast to fp32, the log-softmax and the pick of the label's term run as one compiled kernel
(and its backward as one), instead of a cast, a softmax, a gather and a cast back over each chunk.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_sp.kernels.compiled import Fused

DEFAULT_CHUNK_TOKENS = 4096


def cross_entropy_fp32(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] in the model dtype, labels [n] -> loss [n] with softmax statistics in fp32
    (fp64 stays fp64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, labels, reduction="none")


FUSED_CROSS_ENTROPY = Fused(cross_entropy_fp32, True)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
    logits = hidden @ weight.t()  # [n, vocab] in the model dtype (the matmul runs in bf16 on GPU)
    return (FUSED_CROSS_ENTROPY if fused else cross_entropy_fp32)(logits, labels)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = DEFAULT_CHUNK_TOKENS, fused: bool = True) -> torch.Tensor:
    """hidden [b, s, h], output weight [vocab, h], labels [b, s] -> per-token loss [b, s] (fp32/fp64).
    fused: compile the per-chunk cross-entropy on GPU (--no-fused-elementwise: eager)."""
    b, s, h = hidden.shape
    # split, not slices: backward joins the chunks' hidden-state gradients once; a slice's backward
    # would write each chunk into a zeroed full-length [b * s, h] tensor (s / chunk of them)
    chunks = zip(hidden.reshape(b * s, h).split(chunk_tokens), labels.reshape(b * s).split(chunk_tokens))
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    losses = [checkpoint(_chunk_loss, part, weight, part_labels, fused, use_reentrant=False) if recompute
              else _chunk_loss(part, weight, part_labels, fused) for part, part_labels in chunks]
    return torch.cat(losses).view(b, s)
