"""Packed samples end to end: Megatron's document boundaries, a packed sample's loss equal to its documents
run one by one (SP 1 and 2), and training with --reset-attention-mask equal over SP sizes."""
import numpy as np
import pytest
import torch

from megatron_sp.attention import Documents, LocalAttention, build_inner_attention
from megatron_sp.config import ModelConfig
from megatron_sp.data.loader import document_ids, get_batch
from megatron_sp.model.gpt import GPTModel
from megatron_sp.parallel.sharding import layout_for
from tests.distributed import run_ranks
from tests.runs import flags, train
from tests.test_data_get_batch import EOD, megatron_masks, sample_text


def megatron_attention_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Megatron's get_ltor_masks_and_position_ids with reset_attention_mask, transcribed: bool [b, s, s],
    True where query i may attend key j."""
    b, s = tokens.shape
    mask = torch.tril(torch.ones(b, s, s, dtype=torch.bool))
    for i in range(b):
        for j in (tokens[i] == eod).nonzero().flatten().tolist():
            mask[i, j + 1:, :j + 1] = False
    return mask


def test_document_ids_are_megatrons_reset_attention_mask():
    tokens = sample_text(3, 64)[:, :-1]
    tokens[1, -1] = EOD  # an EOD as the last token
    tokens[2] = 1  # no EOD at all: one document
    ids = document_ids(tokens, EOD)
    same_document = ids[:, :, None] == ids[:, None, :]
    assert torch.equal(same_document & torch.tril(torch.ones(64, 64, dtype=torch.bool)),
                       megatron_attention_mask(tokens, EOD))
    assert ids.dtype == torch.int32 and (ids[2] == 0).all() and (ids.diff(dim=1) >= 0).all()
    # --reset-position-ids counts from each document's first token: the same boundaries
    positions = megatron_masks(tokens, EOD, True, False)[1]
    first = torch.stack([torch.searchsorted(row, row, right=False) for row in ids])
    assert torch.equal(positions, torch.arange(64) - first)


def test_get_batch_hands_the_whole_samples_ids_only_when_asked():
    text = sample_text(2, 64)
    layout = layout_for("ring", 4)
    assert "document_ids" not in get_batch(text, eod=EOD, layout=layout, sp_rank=1)
    shard = get_batch(text, eod=EOD, layout=layout, sp_rank=1, reset_attention_mask=True)
    assert torch.equal(shard["document_ids"], document_ids(text[:, :-1], EOD))  # [b, s]: not cut
    assert shard["tokens"].shape == (2, 16)


def tiny_model() -> GPTModel:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, seq_length=32,
                      max_position_embeddings=32, ffn_hidden_size=48, hidden_dropout=0.0, attention_dropout=0.0,
                      swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True)
    torch.manual_seed(0)
    return GPTModel(cfg, lambda: LocalAttention(causal=True, backend="torch"), 128)


def packed_text() -> torch.Tensor:
    """[2, 33]: documents of 1 to 13 tokens, one crossing the middle, an EOD as the last input token."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, EOD, (2, 33), generator=g)
    for row, ends in ((0, [0, 4, 17, 22, 31]), (1, [2, 3, 15, 25])):
        text[row, ends] = EOD
    return text


def one_by_one_losses(model, text) -> tuple[torch.Tensor, torch.Tensor]:
    """Each document run alone (positions from 0, no mask): (per-token losses, loss mask) [b, s]."""
    tokens, labels = text[:, :-1], text[:, 1:]
    ids = document_ids(tokens, EOD)
    losses = torch.empty(tokens.shape)
    for b in range(tokens.shape[0]):
        for doc in ids[b].unique().tolist():
            at = ids[b] == doc
            n = int(at.sum())
            losses[b, at] = model(tokens[b:b + 1, at], torch.arange(n)[None], labels[b:b + 1, at])[0]
    return losses, (tokens != EOD).float()


def packed_losses(rank, world, strategy):
    """The packed sample's per-token losses with --reset-attention-mask --reset-position-ids --eod-mask-loss
    on `world` ranks (forked), gathered to [b, s] in sample order."""
    import torch.distributed as dist
    from megatron_sp.parallel.state import ParallelState
    model = tiny_model()
    if world > 1:
        state = ParallelState.build(sp_size=world, ulysses_degree=1 if strategy == "ring" else None)
        for layer in model.layers:
            layer.attention.inner_attention = build_inner_attention(strategy, state, causal=True, backend="torch")
    layout = layout_for(strategy, world)
    batch = get_batch(packed_text(), eod=EOD, layout=layout, sp_rank=rank, reset_position_ids=True,
                      eod_mask_loss=True, reset_attention_mask=True)
    with torch.no_grad():
        local = model(batch["tokens"], batch["position_ids"], batch["labels"], Documents(batch["document_ids"]))
        unmasked = model(batch["tokens"], batch["position_ids"], batch["labels"])
    shards = [torch.empty_like(local) for _ in range(world)]
    if world > 1:
        dist.all_gather(shards, local)
    else:
        shards = [local]
    packed = layout.unshard(shards, dim=1).numpy()  # numpy: tensors would travel as shared memory
    return packed, unmasked.numpy() if world == 1 else None


@pytest.mark.parametrize("world, strategy", [(1, "local"), (2, "ring"), (2, "ulysses")])
def test_packed_loss_equals_its_documents_run_one_by_one(world, strategy):
    with torch.no_grad():
        alone, mask = one_by_one_losses(tiny_model(), packed_text())
    packed, unmasked = (None if x is None else torch.from_numpy(x) for x in run_ranks(world, packed_losses, strategy)[0])
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=0)
    weighted = (alone * mask).sum() / mask.sum()  # token-weighted sum of the documents' mean losses
    torch.testing.assert_close((packed * mask).sum() / mask.sum(), weighted, rtol=1e-6, atol=0)
    if unmasked is not None:  # the check can fail: without the document mask later documents differ
        assert not torch.allclose(unmasked, alone, rtol=1e-3)


def test_training_with_document_masks_is_equal_over_sp_sizes(corpus):
    """Through pretrain_gpt's configure, DeepSpeed and the loop: the same losses at SP 1 and ring SP 2
    (every strategy takes the documents the same way; each is checked exactly at the attention level),
    and not those of the run without --reset-attention-mask. The corpus has documents followed by runs
    of EOD tokens: many documents, most of one token."""
    common = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss", "--zero-stage", "1",
              "--global-batch-size", "4"]
    reference = train(1, flags(corpus, *common, name="eodheavy", iters=3, seq=64))
    ring = ["--sequence-parallel-strategy", "ring", "--sequence-parallel-size", "2"]
    np.testing.assert_allclose(train(2, flags(corpus, *common, *ring, name="eodheavy", iters=3, seq=64)),
                               reference, rtol=1e-5)
    unmasked = train(1, flags(corpus, *common[1:], name="eodheavy", iters=3, seq=64))
    assert not np.allclose(unmasked, reference, rtol=1e-4)
