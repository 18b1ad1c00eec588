"""get_batch: Megatron's masks and position ids, cut for each sequence-parallel rank by the shared layout."""
import pytest
import torch

from megatron_sp.data.loader import get_batch
from megatron_sp.parallel.sharding import layout_for

EOD = 7


def megatron_masks(tokens: torch.Tensor, eod: int, reset_position_ids: bool, eod_mask_loss: bool):
    """Megatron's get_ltor_masks_and_position_ids (loss mask and position ids), transcribed as the reference."""
    b, s = tokens.shape
    loss_mask = torch.ones(tokens.shape, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand_as(tokens).clone()
    if reset_position_ids:
        for i in range(b):
            prev = 0
            for j in position_ids[i, tokens[i] == eod].tolist():
                position_ids[i, j + 1:] -= j + 1 - prev
                prev = j + 1
    return loss_mask, position_ids


def sample_text(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 50, (batch, seq + 1), generator=g)
    text[text % 9 == 0] = EOD  # plenty of document ends, some adjacent
    text[0, 0] = EOD
    return text


@pytest.mark.parametrize("reset,mask", [(False, False), (True, True), (True, False)])
def test_full_batch_matches_megatron(reset, mask):
    text = sample_text(3, 64)
    out = get_batch(text, eod=EOD, layout=layout_for("ring", 1), sp_rank=0, reset_position_ids=reset,
                    eod_mask_loss=mask)
    loss_mask, position_ids = megatron_masks(text[:, :-1], EOD, reset, mask)
    torch.testing.assert_close(out["tokens"], text[:, :-1])
    torch.testing.assert_close(out["labels"], text[:, 1:])
    torch.testing.assert_close(out["loss_mask"], loss_mask)
    torch.testing.assert_close(out["position_ids"], position_ids)
    assert out["loss_mask"].dtype == torch.float32 and out["position_ids"].dtype == torch.int64
    if reset:
        assert (out["position_ids"] == 0).sum() > 3  # the test data really has documents to reset at


LAYOUTS = [("ulysses", p, None) for p in (1, 2, 4, 8)] + [("ring", p, None) for p in (1, 2, 4, 8)] + \
          [("hybrid", 4, 2), ("hybrid", 8, 2), ("hybrid", 8, 4)]


@pytest.mark.parametrize("strategy,sp,u", LAYOUTS)
def test_sp_shards_reassemble_to_full_sample(strategy, sp, u):
    layout = layout_for(strategy, sp, u)
    text = sample_text(2, 128, seed=sp)
    kw = dict(eod=EOD, layout=layout, reset_position_ids=True, eod_mask_loss=True)
    full = get_batch(text, **{**kw, "layout": layout_for("ring", 1)}, sp_rank=0)
    shards = [get_batch(text, **kw, sp_rank=r) for r in range(sp)]
    for key, value in full.items():
        assert all(s[key].shape == (2, 128 // sp) for s in shards)
        torch.testing.assert_close(layout.unshard([s[key] for s in shards], dim=1), value)
    if sp > 1:  # each rank holds different positions of the sample
        assert not torch.equal(shards[0]["position_ids"], shards[1]["position_ids"])


def test_bad_shape_and_indivisible_length():
    with pytest.raises(ValueError, match="text must be"):
        get_batch(torch.zeros(4, dtype=torch.long), eod=0, layout=layout_for("ring", 1), sp_rank=0)
    with pytest.raises(ValueError, match="divisible"):
        get_batch(torch.zeros(1, 7, dtype=torch.long), eod=0, layout=layout_for("ulysses", 4), sp_rank=0)
