"""One pipeline stage of the GPT model: a slice of GPTModel's parts (see parallel/pipeline.py for the pipeline).

The first stage holds the embeddings and turns tokens into hidden states; the last holds the final norm and
the output layer and turns hidden states into per-token losses; every stage runs its share of the layers
through GPTModel.decoder, so activation recompute works per stage as it does for the whole model.
"""
import torch
from torch import nn

from megatron_sp.model.gpt import GPTModel
from megatron_sp.parallel.pipeline import stage_layers


class GPTStage(GPTModel):
    """forward(inputs, position_ids, labels, documents=None): inputs are the tokens [b, s_local] on the first
    stage and the previous stage's output [b, s_local, h] elsewhere -> the per-token loss [b, s_local] on the
    last stage, the hidden states [b, s_local, h] elsewhere. Every stage reads the same micro batches, so
    positions, labels and documents (packed samples) come from the data, not over the pipeline."""

    def __init__(self, cfg, make_inner_attention, padded_vocab_size: int, *, init_seed: int, pp_size: int,
                 pp_rank: int):
        first, last = pp_rank == 0, pp_rank == pp_size - 1
        super().__init__(cfg, make_inner_attention, padded_vocab_size, init_seed=init_seed,
                         layer_ids=stage_layers(cfg.num_layers, pp_size, pp_rank), embedding=first, head=last)
        self.is_first, self.is_last = first, last

    def tied_parameters(self) -> list[nn.Parameter]:
        """The word embedding on the first and the last stage when the output layer is tied to it: each
        holds a copy, initialised alike (same name, same seed) and kept equal by sync_tied_gradients."""
        tied = not self.cfg.untie_embeddings_and_output_weights
        return [self.word_embeddings.weight] if tied and (self.is_first or self.is_last) else []

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                documents=None) -> torch.Tensor:
        x = self.embed(inputs, position_ids) if self.is_first else inputs
        x = self.decoder(x, position_ids, documents)
        return self.loss(x, labels) if self.is_last else x
