"""Activation bytes per local token (one of the b * s / P tokens a rank holds), read off model/gpt.py.

What autograd keeps for one TransformerLayer, e = bytes per element (2 bf16/fp16, 4 fp32), h hidden,
f FFN size, hq / hkv heads, d head_dim, K = kv heads as attention sees them (hkv; under Ulysses over
u ranks with hkv % u != 0 each kv head is replicated, K = u):

  attention sublayer (A)
    layer input, in front of the first norm                e * h
    norm statistics (fp32 mean + rstd | rstd)              8 (LayerNorm) | 4 (RMSNorm)
    norm output, the qkv projection's input                e * h
    q, k, v as the attention Function saves them (dense)   e * (hq + 2K) * d
    attention output (saved by the attention Function)     e * hq * d
    ... again as out-projection input after the
        Ulysses all-to-all back (ulysses/hybrid only)      e * hq * d
    log-sum-exp [b, hq, s] fp32 (hq values per token)      4 * hq
    dropout mask (bool, only when --hidden-dropout > 0)    h
  MLP sublayer (M)
    its input (the residual after attention)               e * h
    norm statistics and norm output                        8 | 4, e * h
    SwiGLU: fc1 output [2f] and fc2's input [f]            3 * e * f   (eager, --no-fused-elementwise:
                                                                        + silu(gate) [f]; GELU: 2 * e * f)
    dropout mask                                           h

Rotary cos/sin are built once per step and shared by every layer. What a layer keeps for backward:
nothing recomputed A + M; selective recompute A + the MLP input; full recompute its input, e * h.
With --mlp-tile-tokens the MLP keeps only its input (its tiles are rebuilt one at a time).

The backward of one layer holds what the layer keeps (rebuilt first, under recompute) plus, at its
worst moment, either the MLP's gradients (the gradient arriving from above, fc1's and fc2's input
gradients, minus fc2's input, freed as its gradient is made) or attention's (the residual and output
gradients, dq, dk, dv and the kernel's fp32 dq accumulator) while the MLP's tensors are freed.
One term is calibrated (docs/benchmarks.md): MLP_GRADIENTS_ALIVE, the share of the MLP gradient tensors
counted at once.
"""
from dataclasses import dataclass

from megatron_sp.attention.ulysses import kv_replication
from megatron_sp.config import RunConfig
from megatron_sp.model.loss import DEFAULT_CHUNK_TOKENS
from megatron_sp.model.rotary import rotary_dim
from megatron_sp.parallel.sharding import ulysses_degree_of

# Of the MLP backward's gradient tensors (fc1's output gradient, fc2's input gradient, the gradient from
# above, less fc2's freed input) the shape count has all alive at once; the measured peaks of the 1.3B
# model at 64k-512k tokens are matched best (within 5 %) with this share (docs/benchmarks.md).
MLP_GRADIENTS_ALIVE = 0.6


def kv_heads_seen(hq: int, hkv: int, degree: int) -> int:
    """kv heads per token after Ulysses over `degree` ranks (replicated when hkv % degree != 0)."""
    return hkv * kv_replication(hq, hkv, degree)


def norm_stats(cfg: RunConfig) -> int:
    return 8 if cfg.model.normalization == "layernorm" else 4


def layer_terms(cfg: RunConfig, strategy: str, degree: int, elem: int, qkv_kept_whole: bool = False) -> dict:
    """Bytes per local token one layer keeps with nothing recomputed, by source (the table above).
    qkv_kept_whole: local and ring attention saved v as a view of the fused projection, keeping all of it
    (the layer as measured before they saved dense tensors; the planner's calibration uses it)."""
    m, d = cfg.model, cfg.head_dim
    h, hq, f = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size
    kv = kv_heads_seen(m.num_attention_heads, m.num_key_value_heads, degree)
    mask = h if m.hidden_dropout > 0 else 0
    mlp = (3 + (not m.fused_elementwise)) * f if m.swiglu else 2 * f
    return {
        "layer input": elem * h,
        "norm statistics": 2 * norm_stats(cfg),
        "norm outputs": 2 * elem * h,
        "q, k, v": elem * (hq + 2 * kv) * d + (elem * (hq + kv) * d if qkv_kept_whole and strategy in
                                               ("local", "ring") else 0),
        "attention out": elem * hq * d * (2 if strategy in ("ulysses", "hybrid") else 1),
        "lse": 4 * hq,
        "mlp input": elem * h,
        "mlp": elem * mlp,
        "dropout masks": 2 * mask,
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


@dataclass
class LayerBytes:
    """Per local token, for one layer. kept: what it keeps for backward under the configured recompute
    (what --checkpoint-in-cpu moves to the host); backward_peak: the most its backward holds at once
    (all it keeps, rebuilt under recompute, plus the larger moment's gradients and SP buffers)."""
    kept: float
    backward_peak: float
    terms: dict  # layer_terms, for the printout


def layer_bytes(cfg: RunConfig, sp: int, strategy: str, ulysses_degree: int | None, elem: int,
                qkv_kept_whole: bool = False) -> LayerBytes:
    """LayerBytes of one layer (the table of the module docstring) for these flags, SP size and strategy."""
    m, d = cfg.model, cfg.head_dim
    h, hq, f = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size
    degree = ulysses_degree_of(strategy, sp, ulysses_degree)
    kv = kv_heads_seen(hq, m.num_key_value_heads, degree)
    t = layer_terms(cfg, strategy, degree, elem, qkv_kept_whole)
    mask = t["dropout masks"] / 2
    attention = t["layer input"] + t["norm statistics"] / 2 + t["norm outputs"] / 2 + t["q, k, v"] \
        + t["attention out"] + t["lse"] + mask
    mlp_input = t["mlp input"]
    tiled = m.mlp_tile_tokens > 0
    if tiled:  # one tile at a time; its input gradients are joined into one [tokens, h] at the end
        mlp, mlp_grads = mlp_input, elem * h + 2 * elem * h
    else:  # the gradient from above [h], fc2's input gradient [f], fc1's output gradient; fc2's input [f] freed
        fc1_out = 2 * f if m.swiglu else f
        mlp = sum(t[k] for k in ("mlp input", "mlp")) + t["norm statistics"] / 2 + t["norm outputs"] / 2 + mask
        mlp_grads = MLP_GRADIENTS_ALIVE * elem * (h + fc1_out)
    # residual and attention-output gradients, dq, dk, dv, the kernel's fp32 dq accumulator, SP buffers
    attention_grads = (elem * h + elem * hq * d + elem * (hq + 2 * kv) * d + 4 * hq * d
                       + comm_buffer_bytes(cfg, strategy, degree, elem))
    peak = max(attention + mlp + mlp_grads, attention + attention_grads)
    if m.checkpoint_activations:
        kept = t["layer input"]
    elif m.recompute_granularity == "selective" or tiled:
        kept = attention + mlp_input
    else:
        kept = attention + mlp
    return LayerBytes(kept=kept, backward_peak=peak, terms=t)


def outside_layers_bytes(cfg: RunConfig, elem: int) -> float:
    """Per local token, alive through the whole step outside the layers: rotary cos/sin, the batch
    (tokens, labels, positions int64; loss mask and per-token loss fp32), embedding dropout mask."""
    m = cfg.model
    rot = rotary_dim(cfg.head_dim, m.rotary_percent) if m.use_rotary_position_embeddings else 0
    return 2 * rot * elem + 3 * 8 + 2 * 4 + (m.hidden_size if m.hidden_dropout > 0 else 0)


def loss_bytes(cfg: RunConfig, local_tokens: int, elem: int) -> float:
    """The chunked cross-entropy's backward (model/loss.py): the final norm's input and output, the
    chunks' hidden-state gradients and their join (4 * e * h per token), and one chunk of min(4096,
    tokens) logits as the matmul output (e), its fp32 copy (4, bf16 only), log-softmax (4), its gradient
    (4) and that gradient in the model dtype (e, bf16 only)."""
    chunk = min(DEFAULT_CHUNK_TOKENS, local_tokens)
    per_logit = elem + 4 + 4 + (4 + elem if elem != 4 else 0)
    return chunk * cfg.padded_vocab_size * per_logit + local_tokens * 4 * elem * cfg.model.hidden_size
