"""From dataset to model inputs: Megatron's pretraining sampler, the batch iterator, and get_batch.

Sample order is a function of the consumed-sample count only: global batch g holds samples
[g * micro * dp, (g + 1) * micro * dp), DP rank r takes its micro-batch-sized slice. So a restart
at any consumed count, or a different DP layout, reads the same samples in the same order; SP
ranks of one DP rank read the same samples and each keeps its part of the sequence (get_batch).
"""
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..parallel.sharding import SequenceLayout


class PretrainingSampler:
    """Megatron's MegatronPretrainingSampler: lists of sample indices, one micro batch of one DP rank each.

    Starts at `consumed_samples` (summed over all DP ranks); drops a last incomplete global batch."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (dataset has {total_samples})")
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro batch {micro_batch_size}, DP rank {dp_rank} of {dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed samples must be >= 0, got {consumed_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        per_step = self.micro_batch_size * self.dp_size
        return max(0, (self.total_samples - self.consumed_samples) // per_step)

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.micro_batch_size * self.dp_size
        for global_start in range(self.consumed_samples, self.total_samples - per_step + 1, per_step):
            first = global_start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def _collate(samples: list[dict]) -> dict:
    return {"text": torch.from_numpy(np.stack([s["text"] for s in samples]))}  # every dataset gives int64


def build_data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> Iterator[dict]:
    """Iterator of {"text": torch.LongTensor [micro_batch_size, seq_length + 1]} for this DP rank.

    Ends when the dataset is exhausted (no further full global batch)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    # its own generator: a DataLoader iterator otherwise draws its seed from torch's global RNG, which would shift
    # the dropout masks of the steps after every evaluation or resume (the order comes from the sampler anyway)
    return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate, generator=torch.Generator()))


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """bool [b, s]: True where a new document starts, i.e. right after an eod token (Megatron's
    get_ltor_masks_and_position_ids: the eod belongs to the document it ends). The first token is not
    marked: it starts document 0 whatever it is."""
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod
    return starts


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """int32 [b, s]: the document index of every token (0 for the first document of each sample), the
    per-token form of Megatron's reset_attention_mask. Non-decreasing along s; a token attends only to
    tokens of its own document."""
    return document_starts(tokens, eod).cumsum(dim=1, dtype=torch.int32)


def position_ids_for(tokens: torch.Tensor, eod: int, reset_position_ids: bool) -> torch.Tensor:
    """int64 [b, s]: 0..s-1, or restarting at 0 after every eod token (Megatron's reset_position_ids)."""
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device).expand(b, s)
    if not reset_position_ids:
        return pos  # an expanded view; get_batch makes it contiguous
    # each token's position minus that of its document's first token (running max of the starts)
    doc_start = torch.cummax(torch.where(document_starts(tokens, eod), pos, 0), dim=1).values
    return pos - doc_start


def get_batch(text: torch.Tensor, *, eod: int, layout: SequenceLayout, sp_rank: int,
              reset_position_ids: bool = False, eod_mask_loss: bool = False,
              reset_attention_mask: bool = False) -> dict[str, torch.Tensor]:
    """text int64 [b, s+1] -> this SP rank's tokens, labels (int64), loss_mask (float32), position_ids
    (int64), each [b, s/P] cut by `layout` (position_ids are positions in the full sample).

    As Megatron's get_ltor_masks_and_position_ids: loss_mask is 0 where the *input token* is eod
    (with eod_mask_loss), position_ids restart after each eod (with reset_position_ids). Positions are
    computed on the whole sample before it is cut, so a document that spans ranks keeps counting.
    With reset_attention_mask also "document_ids": int32 [b, s] of the *whole* sample (document_ids),
    not cut: every attention strategy takes the rows it needs by the layout it knows."""
    if text.dim() != 2 or text.shape[1] < 2:
        raise ValueError(f"text must be [batch, seq_length + 1], got shape {tuple(text.shape)}")
    tokens, labels = text[:, :-1], text[:, 1:]  # views; made contiguous after sharding
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=text.device)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = position_ids_for(tokens, eod, reset_position_ids)
    full = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    batch = {k: layout.shard(v, sp_rank, dim=1).contiguous() for k, v in full.items()}
    if reset_attention_mask:
        batch["document_ids"] = document_ids(tokens, eod)
    return batch
