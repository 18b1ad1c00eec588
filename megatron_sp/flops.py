"""FLOP counts: the one place every logged, planned and benchmarked TFLOP/s comes from.

Convention (the FlashAttention papers'): model FLOPs, 2 per multiply-add; causal attention counted at half
(a query attends to s/2 keys on average); activation recompute not counted ("model" FLOPs), or counted as
one more forward of what is recomputed ("hardware" FLOPs). Training = forward + backward = 3 x forward.
The classic Megatron-LM formula, 24*B*s*L*h^2*(1 + s/(6h) + V/(16*L*h)), counts the full s x s attention
matrix, so at long sequences it reads up to ~1.8x higher than these numbers for the same run.
Attention kernel benchmarks count forward + backward as 3.5 x forward, since the backward recomputes the
probabilities (attention_fwd_flops).
"""
from megatron_sp.config import RunConfig

ATTENTION_MODE_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # an attention pass's FLOPs over its forward's


def attention_fwd_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, kv_seq: int | None = None,
                        doc_lengths: list[int] | None = None) -> float:
    """One attention forward over `seq` queries and `kv_seq` (default `seq`) keys: QK^T and PV, each
    2*b*h*sq*sk*d, halved when causal. Its backward is counted as 2.5x this (fwd + bwd = 3.5x).
    doc_lengths: each sample packed with documents of these lengths (summing to seq; attention inside a
    document only, --reset-attention-mask): sq*sk becomes the sum of L^2."""
    pairs = seq * (seq if kv_seq is None else kv_seq) if doc_lengths is None else sum(n * n for n in doc_lengths)
    return 4 * batch * heads * pairs * head_dim / (2 if causal else 1)


def mlp_forward_flops(cfg: RunConfig) -> float:
    """One layer's MLP forward FLOPs per token: 2*h*f*(3 if SwiGLU else 2)."""
    m = cfg.model
    return 2 * m.hidden_size * m.ffn_hidden_size * (3 if m.swiglu else 2)


def forward_flops_per_token(cfg: RunConfig, doc_lengths: list[int] | None = None) -> tuple[float, float]:
    """(transformer layers, output layer) forward FLOPs per token.

    Per layer: QKV and output projections 2*h*(hq + 2*hkv + hq)*d, MLP (mlp_forward_flops), attention
    2 * 2 * s * hq * d / 2 (causal). Output layer 2*h*V. For a model with as many kv heads as query heads
    and SwiGLU this is 8h^2 + 6hf + 2hs per layer. With documents (doc_lengths of a packed sample) a token
    attends inside its own document only: s becomes sum(L^2) / s."""
    m = cfg.model
    d, hq, hkv, h = cfg.head_dim, m.num_attention_heads, m.num_key_value_heads, m.hidden_size
    projections = 2 * h * (2 * hq + 2 * hkv) * d
    if doc_lengths is None:
        attention = attention_fwd_flops(1, hq, 1, d, causal=True, kv_seq=m.seq_length)  # one query token
    else:  # the sample's attention, per token
        attention = attention_fwd_flops(1, hq, m.seq_length, d, True, doc_lengths=doc_lengths) / m.seq_length
    return m.num_layers * (projections + mlp_forward_flops(cfg) + attention), 2 * h * cfg.padded_vocab_size


def flops_per_token(cfg: RunConfig, with_recompute: bool, doc_lengths: list[int] | None = None) -> float:
    """Training FLOPs per token: forward + backward (2x forward); with_recompute adds one more forward of
    what is recomputed: whole layers (full) or the MLPs (selective, or tiled), and with both full recompute
    and a tiled MLP the MLP a third time (the layer's recompute runs the tiles' forward, each tile's
    backward runs it again). doc_lengths: forward_flops_per_token."""
    layers, output = forward_flops_per_token(cfg, doc_lengths)
    m = cfg.model
    if not with_recompute:
        return 3 * (layers + output)
    recompute = layers if m.checkpoint_activations else 0.0
    if m.recompute_granularity == "selective" or m.mlp_tile_tokens:
        recompute += m.num_layers * mlp_forward_flops(cfg)
    return 3 * (layers + output) + recompute
