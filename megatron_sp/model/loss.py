"""Cross-entropy straight from hidden states, a chunk of tokens at a time, never holding all logits.

Full logits are [tokens, vocab]: at 64k tokens and a 32k vocabulary that is 8 GiB in fp32 — more
than the rest of a layer's activations. Each chunk's logits are built, reduced to a loss and
dropped; backward rebuilds them one chunk at a time (activation checkpointing per chunk).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 4096


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # [n, vocab] in the model dtype (the matmul runs in bf16 on GPU)
    if logits.dtype != torch.float64:
        logits = logits.float()  # softmax statistics in fp32
    return F.cross_entropy(logits, labels, reduction="none")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """hidden [b, s, h], output weight [vocab, h], labels [b, s] -> per-token loss [b, s] (fp32/fp64)."""
    b, s, h = hidden.shape
    flat_hidden, flat_labels = hidden.reshape(b * s, h), labels.reshape(b * s)
    losses = []
    for start in range(0, b * s, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            losses.append(checkpoint(_chunk_loss, flat_hidden[part], weight, flat_labels[part], use_reentrant=False))
        else:
            losses.append(_chunk_loss(flat_hidden[part], weight, flat_labels[part]))
    return torch.cat(losses).view(b, s)
