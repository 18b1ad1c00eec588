"""Activation bytes per local token (one of the b * s / P tokens a rank holds), read off model/gpt.py.

What autograd keeps for one TransformerLayer, e = bytes per element (2 bf16/fp16, 4 fp32), h hidden,
f FFN size, hq / hkv heads, d head_dim, K = kv heads as attention sees them (hkv; under Ulysses over
u ranks with hkv % u != 0 each kv head is replicated, K = u):

    residual stream in front of each norm (2 norms)       2 * e * h
    norm statistics (fp32 mean + rstd | rstd)             2 * 8 (LayerNorm) | 2 * 4 (RMSNorm)
    norm outputs, inputs of qkv and fc1                   2 * e * h
    q, k, v as the attention Function saves them          e * (hq + 2K) * d
    attention output (saved by the attention Function)    e * hq * d
    ... again as out-projection input after the
        Ulysses all-to-all back (ulysses/hybrid only)     e * hq * d
    log-sum-exp [b, hq, s] fp32 (hq values per token)     4 * hq
    MLP: SwiGLU fc1 out [2f] + silu(gate) [f] + product   4 * e * f    (GELU: fc1 out + gelu out, 2 * e * f)
    dropout masks (bool, only when --hidden-dropout > 0)  2 * h

Rotary cos/sin are built once per step and shared by every layer. With activation checkpointing a layer
keeps only its input (e * h per token) and the whole layer is rebuilt, one at a time, in backward.
Selective recompute drops the MLP sublayer's share (its norm statistics and output, the MLP
intermediates, its dropout mask) and rebuilds one layer's MLP at a time in backward.
"""
from megatron_sp.attention.ulysses import kv_replication
from megatron_sp.config import RunConfig
from megatron_sp.model.loss import DEFAULT_CHUNK_TOKENS
from megatron_sp.model.rotary import rotary_dim
from megatron_sp.parallel.sharding import ulysses_degree_of


def kv_heads_seen(hq: int, hkv: int, degree: int) -> int:
    """kv heads per token after Ulysses over `degree` ranks (replicated when hkv % degree != 0)."""
    return hkv * kv_replication(hq, hkv, degree)


def layer_terms(cfg: RunConfig, strategy: str, degree: int, elem: int) -> dict[str, float]:
    """Bytes per local token that one layer keeps for backward, by source (the table above)."""
    m, d = cfg.model, cfg.head_dim
    h, hq, f = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size
    kv = kv_heads_seen(m.num_attention_heads, m.num_key_value_heads, degree)
    stats = 8 if m.normalization == "layernorm" else 4
    return {
        "norm inputs": 2 * elem * h + 2 * stats,
        "norm outputs": 2 * elem * h,
        "q, k, v": elem * (hq + 2 * kv) * d,
        "attention out": elem * hq * d * (2 if strategy in ("ulysses", "hybrid") else 1),
        "lse": 4 * hq,
        "mlp": (4 if m.swiglu else 2) * elem * f,
        "dropout masks": 2 * h if m.hidden_dropout > 0 else 0,
    }


def comm_buffer_bytes(cfg: RunConfig, strategy: str, degree: int, elem: int) -> float:
    """Transient bytes per local token of the SP communication of one layer (the peak of fwd/bwd).

    Ulysses: the rotated q/k/v, their packed send buffers and the receive buffers are alive at once:
    3 * e * (hq + 2K) * d (measured peaks unchanged when UlyssesFn replaced the stacked all-to-all).
    Ring (K kv heads): forward k/v stack + spare receive buffer, 2 * 2 * e * K * d; backward adds the
    fp32 dk/dv pair travelling behind them (home + spare, 2 * 2 * 4 * K * d) and an fp32 dq (4 * hq * d).
    Hybrid: the larger of its Ulysses all-to-all and its ring (the ring runs on [s/r, K/u] blocks, the
    same count per local token).
    """
    m, d = cfg.model, cfg.head_dim
    hq = m.num_attention_heads
    kv = kv_heads_seen(m.num_attention_heads, m.num_key_value_heads, degree)
    a2a = 3 * elem * (hq + 2 * kv) * d
    ring = 2 * 2 * elem * kv * d + 2 * 2 * 4 * kv * d + 4 * hq * d
    return {"local": 0, "ulysses": a2a, "ring": ring, "hybrid": max(a2a, ring)}[strategy]


def gradient_work_bytes(cfg: RunConfig, strategy: str, degree: int, elem: int) -> float:
    """Gradients alive while one layer runs backward, per local token: the residual gradient pair
    (2 * e * h) plus the larger of the MLP's (SwiGLU: d fc1-out [2f] + d product [f]; GELU: 2f)
    and attention's (dq, dk, dv and dout)."""
    m, d = cfg.model, cfg.head_dim
    hq, f = m.num_attention_heads, m.ffn_hidden_size
    kv = kv_heads_seen(m.num_attention_heads, m.num_key_value_heads, degree)
    mlp = (3 if m.swiglu else 2) * f
    attention = (2 * hq + 2 * kv) * d
    return elem * (2 * m.hidden_size + max(mlp, attention))


def mlp_sublayer_bytes(cfg: RunConfig, elem: int) -> float:
    """What selective recompute does not keep, per token per layer: the MLP's norm statistics and
    output, its intermediates and its dropout mask (the sublayer input is kept: it is the residual)."""
    m = cfg.model
    stats = 8 if m.normalization == "layernorm" else 4
    return (stats + elem * m.hidden_size + (4 if m.swiglu else 2) * elem * m.ffn_hidden_size
            + (m.hidden_size if m.hidden_dropout > 0 else 0))


def activation_bytes(cfg: RunConfig, sp: int, strategy: str, ulysses_degree: int | None, elem: int,
                     layers: int | None = None) -> dict:
    """Bytes per local token: {"layer": one layer, "full": all layers + outside them, "checkpointed":
    layer inputs + outside, "selective": layers without their MLP share + outside, "mlp": that share,
    "comm": SP buffers, "grad_work": backward gradients}. `layers`: how many a rank holds (default all;
    a pipeline stage holds its share)."""
    m = cfg.model
    layers = m.num_layers if layers is None else layers
    degree = ulysses_degree_of(strategy, sp, ulysses_degree)
    layer = sum(layer_terms(cfg, strategy, degree, elem).values())
    mlp = mlp_sublayer_bytes(cfg, elem)
    rot_dim = rotary_dim(cfg.head_dim, m.rotary_percent) if m.use_rotary_position_embeddings else 0
    stats = 8 if m.normalization == "layernorm" else 4
    # final norm input + stats + its output (the loss checkpoints it), rotary cos/sin, embedding
    # indices and the batch (tokens, labels, positions int64; mask, loss fp32), embedding dropout mask
    outside = (2 * elem * m.hidden_size + stats + 2 * rot_dim * elem + 8 + 3 * 8 + 2 * 4
               + (m.hidden_size if m.hidden_dropout > 0 else 0))
    return {"layer": layer, "full": layers * layer + outside,
            "checkpointed": layers * elem * m.hidden_size + outside,
            "selective": layers * (layer - mlp) + outside, "mlp": mlp,
            "comm": comm_buffer_bytes(cfg, strategy, degree, elem),
            "grad_work": gradient_work_bytes(cfg, strategy, degree, elem)}


def logits_bytes(cfg: RunConfig, local_tokens: int, elem: int) -> float:
    """Chunked cross-entropy (model/loss.py): one chunk of min(4096, tokens) logits is alive at a time,
    in backward as the matmul output (e), its fp32 copy (4, bf16 only), log-softmax (4), its gradient
    (4) and that gradient in the model dtype (e, bf16 only); plus the hidden-state gradient (e * h)."""
    chunk = min(DEFAULT_CHUNK_TOKENS, local_tokens)
    per_logit = elem + 4 + 4 + (4 + elem if elem != 4 else 0)
    return chunk * cfg.padded_vocab_size * per_logit + local_tokens * elem * cfg.model.hidden_size
