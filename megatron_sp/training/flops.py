"""FLOPs per token the Megatron way, written out so the logged TFLOP/s can be checked by hand."""
from megatron_sp.config import RunConfig


def forward_flops_per_token(cfg: RunConfig) -> tuple[float, float]:
    """(transformer layers, output layer) forward FLOPs per token; 2 FLOPs per multiply-add.

    Per layer: QKV and output projections 2*h*(hq + 2*hkv + hq)*d, MLP 2*h*f*(3 if SwiGLU else 2),
    attention scores and weighted values 2 * 2 * s * hq * d, halved for the causal mask (a token
    attends to s/2 others on average). Output layer 2*h*V. Equals issue 7's
    24*(8h^2 + 6hf + 2hs) + 2hV for the 1.3B Llama shape.
    """
    m = cfg.model
    d, hq, hkv, h = cfg.head_dim, m.num_attention_heads, m.num_key_value_heads, m.hidden_size
    projections = 2 * h * (2 * hq + 2 * hkv) * d
    attention = 2 * 2 * m.seq_length * hq * d / 2  # causal
    return m.num_layers * (projections + mlp_forward_flops(cfg) + attention), 2 * h * cfg.padded_vocab_size


def mlp_forward_flops(cfg: RunConfig) -> float:
    """One layer's MLP forward FLOPs per token: 2*h*f*(3 if SwiGLU else 2)."""
    m = cfg.model
    return 2 * m.hidden_size * m.ffn_hidden_size * (3 if m.swiglu else 2)


def flops_per_token(cfg: RunConfig, with_recompute: bool) -> float:
    """Training FLOPs per token: forward + backward (2x forward); recompute adds one more forward of
    what is recomputed: whole layers (full) or the MLPs (selective)."""
    layers, output = forward_flops_per_token(cfg)
    m = cfg.model
    recompute = 0.0
    if with_recompute and m.checkpoint_activations:
        recompute = layers
    elif with_recompute and m.recompute_granularity == "selective":
        recompute = m.num_layers * mlp_forward_flops(cfg)
    return 3 * (layers + output) + recompute
