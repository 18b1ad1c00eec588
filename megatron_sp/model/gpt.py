"""GPT model (Megatron layout): embeddings, pre-norm transformer blocks, output layer.

The model knows nothing of parallelism. It sees only its rank's tokens ``[b, s_local]`` and their
positions in the full sample ``[b, s_local]``; every attention layer calls
``self.inner_attention(q, k, v)`` and a sequence-parallel strategy is installed by giving the
model a different ``make_inner_attention``. Everything else (norms, MLP, loss) is per token.
Packed samples (--reset-attention-mask) add ``documents``, the whole samples' document ids
(megatron_sp.attention.documents), which the model hands to the inner attention untouched.
"""
import hashlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_sp.config import ModelConfig
from megatron_sp.kernels.compiled import Fused
from megatron_sp.model import fused
from megatron_sp.model.loss import chunked_cross_entropy
from megatron_sp.model.recompute import layer_runner, mlp_runner
from megatron_sp.model.rotary import rotary_cos_sin
from megatron_sp.model.split_linear import SplitLinear


class Norm(nn.Module):
    """LayerNorm (weight, bias) or RMSNorm (weight) over the last dimension."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if cfg.normalization == "layernorm" else None
        self.eps = cfg.layernorm_epsilon
        self.norm = Fused(fused.layer_norm if self.bias is not None else fused.rms_norm, cfg.fused_elementwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Fused QKV projection, rotary, the inner attention slot, output projection."""

    def __init__(self, cfg: ModelConfig, head_dim: int, inner_attention: nn.Module):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        bias = not cfg.disable_bias_linear
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv = SplitLinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=bias)  # -> q, k, v parts
        self.out = nn.Linear(self.num_heads * head_dim, cfg.hidden_size, bias=bias)
        self.inner_attention = inner_attention
        self.rotate = Fused(fused.apply_rotary, cfg.fused_elementwise)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                documents=None) -> torch.Tensor:
        b, s, _ = x.shape  # x: [b, s_local, h]
        q, k, v = self.qkv(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        if rotary is not None:
            q, k = self.rotate(q, *rotary), self.rotate(k, *rotary)
        # documents only when given, so any (q, k, v) module still fits the slot
        extra = {} if documents is None else {"documents": documents}
        out = self.inner_attention(q, k, v, **extra)  # [b, s_local, heads, head_dim]
        return self.out(out.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """h -> f -> h with GELU, or SwiGLU (one fused h -> 2f projection, silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = (Fused(fused.swiglu, cfg.fused_elementwise, kernel=fused.swiglu_kernel) if cfg.swiglu
                           else Fused(F.gelu, cfg.fused_elementwise))
        bias = not cfg.disable_bias_linear
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size * (2 if cfg.swiglu else 1), bias=bias)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block. ``run_mlp`` (model/recompute.py) runs the MLP sublayer: plainly, checkpointed
    (selective recompute: only its input is kept, its norm output and SwiGLU intermediates, more than
    half of the layer's activations, are rebuilt while attention's, costly to recompute, are kept) or
    in checkpointed tiles along the sequence (--mlp-tile-tokens)."""

    def __init__(self, cfg: ModelConfig, head_dim: int, inner_attention: nn.Module):
        super().__init__()
        self.input_norm = Norm(cfg, cfg.hidden_size)
        self.attention = Attention(cfg, head_dim, inner_attention)
        self.post_attention_norm = Norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.run_mlp = mlp_runner(cfg)

    def mlp_sublayer(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.post_attention_norm(x)))

    def forward(self, x: torch.Tensor, rotary, documents=None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.input_norm(x), rotary, documents))
        return x + self.run_mlp(self.mlp_sublayer, x)


class Layers(nn.ModuleDict):
    """Transformer layers keyed by their index in the whole model (a pipeline stage holds a range of them), used
    like a ModuleList: iteration yields them in order, layers[i] is the whole model's layer i."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index: int | str) -> nn.Module:
        return super().__getitem__(str(index))


class GPTModel(nn.Module):
    """forward(tokens, position_ids, labels, documents=None) -> per-token loss [b, s_local] in fp32.

    Built whole by default. A pipeline stage (megatron_sp/model/stage.py) builds a slice: ``layer_ids``
    the transformer layers it holds, ``embedding`` whether it holds the input embeddings, ``head`` whether
    it holds the final norm and the output layer (with tied embeddings a head without the embedding holds
    its own copy of the word embedding). Layers keep the whole model's numbering (``layers.7.mlp.fc1.weight``)
    and every parameter is initialised from (init_seed, its name) alone, so a slice holds exactly the
    whole model's parameters, under the same names.
    """

    def __init__(self, cfg: ModelConfig, make_inner_attention: Callable[[], nn.Module], padded_vocab_size: int,
                 *, init_seed: int | None = None, layer_ids: range | None = None, embedding: bool = True,
                 head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        # default: a seed drawn from torch's generator, so torch.manual_seed still decides the init
        self.init_seed = int(torch.randint(2 ** 62, ())) if init_seed is None else init_seed
        tied = not cfg.untie_embeddings_and_output_weights
        if embedding or (head and tied):
            self.word_embeddings = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        if embedding:
            self.position_embeddings = (nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                                        if cfg.learned_positions else None)
            self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.layers = Layers({str(i): TransformerLayer(cfg, self.head_dim, make_inner_attention()) for i in layer_ids})
        self.run_layers = layer_runner(cfg)  # plain, checkpointed or offloaded (model/recompute.py)
        if head:
            self.final_norm = Norm(cfg, cfg.hidden_size)
            self.output_layer = None if tied else nn.Linear(cfg.hidden_size, padded_vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if not p.is_meta:  # a model built on the meta device for its shapes alone has nothing to draw
                self.init_parameter(name, p)

    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """Megatron init of one parameter: N(0, std) for matrices, std / sqrt(2 L) for the projections
        into the residual stream, ones for norm weights, zeros for biases. One parameter at a time so
        a caller that holds parameters sharded (ZeRO-3) can gather, init and re-shard each in turn; the
        random draws come from a generator seeded by (init_seed, name), whoever builds the parameter."""
        std = self.cfg.init_method_std
        generator = torch.Generator(p.device).manual_seed(parameter_seed(self.init_seed, name))
        if p.dim() == 1:
            nn.init.ones_(p) if "norm" in name and name.endswith("weight") else nn.init.zeros_(p)
        elif name.endswith(("attention.out.weight", "mlp.fc2.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2.0 * self.cfg.num_layers), generator=generator)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)

    def output_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[b, s_local] tokens and their positions (in the sample, or in their document with
        --reset-position-ids) -> embeddings [b, s_local, h]."""
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return self.embedding_dropout(x)

    def decoder(self, x: torch.Tensor, position_ids: torch.Tensor, documents=None) -> torch.Tensor:
        """The transformer layers (with their rotary angles) on [b, s_local, h]: where every way of running them
        (self.run_layers, model/recompute.py: plain, each layer recomputed in backward, its checkpoints on the
        host) is chosen, for the whole model and for a pipeline stage alike. documents: see the module doc."""
        rotary = None
        if self.cfg.use_rotary_position_embeddings:
            rotary = rotary_cos_sin(position_ids, self.head_dim, self.cfg.rotary_percent,
                                    self.cfg.rotary_position_embeddings_theta, x.dtype,
                                    self.cfg.rope_scaling_factor if self.cfg.use_rope_scaling else None)
        return self.run_layers(self.layers, x, rotary, documents)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last layer's output [b, s_local, h] -> per-token loss [b, s_local] (final norm, output layer)."""
        return chunked_cross_entropy(self.final_norm(x), self.output_weight(), labels,
                                     fused=self.cfg.fused_elementwise)

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor, documents=None) -> torch.Tensor:
        """[b, s_local] tokens and their positions -> final-norm hidden states [b, s_local, h]."""
        return self.final_norm(self.decoder(self.embed(tokens, position_ids), position_ids, documents))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                documents=None) -> torch.Tensor:
        return self.loss(self.decoder(self.embed(tokens, position_ids), position_ids, documents), labels)

    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor, documents=None) -> torch.Tensor:
        """Full logits [b, s_local, vocab] (inference and tests; training never builds them)."""
        return self.hidden_states(tokens, position_ids, documents) @ self.output_weight().t()


def parameter_seed(init_seed: int, name: str) -> int:
    """The seed of one parameter's random init: a stable 63-bit hash of the run's seed and its name."""
    digest = hashlib.blake2b(f"{init_seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
