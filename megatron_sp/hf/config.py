"""Hugging Face config.json <-> ModelConfig.

Two architectures have an exact counterpart here:
    LlamaForCausalLM   RMSNorm, SwiGLU, rotary on every head channel (optionally Llama 3.1's scaling), no
                       position table, GQA, biases in all linear layers or none, tied or untied output
    GPT2LMHeadModel    LayerNorm, exact GELU, a learned position table, no rotary, as many kv heads as query
                       heads, biases, tied or untied output
Anything else is refused in one line that says which requirement it misses. config.json is written with the
keys transformers 4.x wrote (rope_theta, rope_scaling, torch_dtype), which 5.x reads as well.
"""
import json
import os

from megatron_sp.config import ModelConfig
from megatron_sp.hf import ConfigError
from megatron_sp.model.rotary import (LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT,
                                      rotary_dim)

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
MODEL_TYPES = {"llama": LLAMA, "gpt2": GPT2}
LLAMA3_CONSTANTS = {"low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                    "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
EXACT_GELU = "gelu"  # transformers' name for erf GELU (F.gelu); gelu_new & co. are tanh approximations


def architecture_of(m: ModelConfig) -> str:
    """LLAMA or GPT2 for a model with an exact Hugging Face counterpart, else one ConfigError line saying why.
    A rotary model can only be a Llama, a model without rotary only a GPT-2."""
    if m.use_rotary_position_embeddings:
        arch, needs = LLAMA, "RMSNorm, SwiGLU and rotary on every head channel"
        misfits = [m.normalization != "rmsnorm" and f"--normalization {m.normalization}",
                   not m.swiglu and "a GELU MLP (no --swiglu)",
                   rotary_dim(m.head_dim, m.rotary_percent) != m.head_dim and
                   f"rotary on {rotary_dim(m.head_dim, m.rotary_percent)} of {m.head_dim} channels "
                   f"(--rotary-percent {m.rotary_percent})"]
    else:
        arch, needs = GPT2, "LayerNorm, GELU, a learned position table, as many kv heads as heads, head dim h/heads"
        misfits = [m.normalization != "layernorm" and f"--normalization {m.normalization}",
                   m.swiglu and "--swiglu",
                   not m.learned_positions and "no position table (--no-position-embedding)",
                   m.num_key_value_heads != m.num_attention_heads and
                   f"{m.num_key_value_heads} kv heads for {m.num_attention_heads} heads",
                   m.head_dim * m.num_attention_heads != m.hidden_size and f"head dim {m.head_dim} (--kv-channels)"]
    misfits = [text for text in misfits if text]
    if misfits:
        kind = "a rotary model" if arch == LLAMA else "a model without rotary"
        raise ConfigError(f"this model has no Hugging Face counterpart: {kind} exports as {arch}, which needs "
                          f"{needs}; this one has {', '.join(misfits)}")
    return arch


def hf_config(m: ModelConfig, arch: str, vocab_size: int, dtype: str, bos: int | None, eos: int | None) -> dict:
    """config.json of the exported model. vocab_size: the embedding's rows (our padded vocabulary)."""
    common = {"architectures": [arch], "vocab_size": vocab_size, "tie_word_embeddings":
              not m.untie_embeddings_and_output_weights, "bos_token_id": bos, "eos_token_id": eos,
              "torch_dtype": dtype, "initializer_range": m.init_method_std, "use_cache": True}
    if arch == GPT2:
        return {**common, "model_type": "gpt2", "n_layer": m.num_layers, "n_embd": m.hidden_size,
                "n_head": m.num_attention_heads, "n_inner": m.ffn_hidden_size,
                "n_positions": m.max_position_embeddings, "n_ctx": m.max_position_embeddings,
                "activation_function": EXACT_GELU, "layer_norm_epsilon": m.layernorm_epsilon,
                "resid_pdrop": m.hidden_dropout, "embd_pdrop": m.hidden_dropout, "attn_pdrop": 0.0,
                "scale_attn_weights": True}
    rope_scaling = ({"rope_type": "llama3", "factor": m.rope_scaling_factor, **LLAMA3_CONSTANTS}
                    if m.use_rope_scaling else None)
    return {**common, "model_type": "llama", "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim, "hidden_act": "silu",
            "max_position_embeddings": max(m.max_position_embeddings or 0, m.seq_length),
            "rms_norm_eps": m.layernorm_epsilon, "rope_theta": m.rotary_position_embeddings_theta,
            "rope_scaling": rope_scaling, "attention_bias": not m.disable_bias_linear,
            "mlp_bias": not m.disable_bias_linear, "attention_dropout": 0.0, "pretraining_tp": 1}


def read_config(hf_dir: str) -> dict:
    """hf_dir/config.json as a dict, or one ConfigError line (no directory, no file, not JSON)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--load-hf {hf_dir}: no config.json there (a local Hugging Face model directory is "
                          "expected; nothing is downloaded)")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a model config (a JSON object is expected)")
    return config


def model_fields(config: dict, path: str) -> tuple[str, dict, dict]:
    """config.json -> (architecture, fixed, free): ModelConfig fields the weights fix (a flag may not contradict
    them) and those that only default from it (context extension: rotary base, rope scaling, positions)."""
    arch = MODEL_TYPES.get(config.get("model_type"))
    if arch is None:
        raise ConfigError(f"{path}: model_type {config.get('model_type')!r} has no counterpart here; "
                          f"--load-hf reads {' and '.join(MODEL_TYPES)} models ({', '.join(MODEL_TYPES.values())})")
    try:
        return (arch, *(_llama_fields(config, path) if arch == LLAMA else _gpt2_fields(config, path)))
    except KeyError as err:
        raise ConfigError(f"{path}: has no {err.args[0]}, which a {arch} config needs") from None


def _refuse(path: str, what: str, why: str):
    raise ConfigError(f"{path}: {what} has no counterpart here ({why})")


def _rope(config: dict, path: str) -> tuple[float, float | None]:
    """(rotary base, Llama 3.1 scaling factor or None) from transformers 4.x keys (rope_theta, rope_scaling)
    or 5.x ones (rope_parameters)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(path, f"partial_rotary_factor {partial}", "a Llama rotates every head channel")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        _refuse(path, f"rope scaling {kind!r}", "only Llama 3.1's 'llama3' frequency scaling is implemented")
    for key, value in LLAMA3_CONSTANTS.items():
        if float(rope.get(key, -1)) != value:
            _refuse(path, f"llama3 rope scaling with {key} {rope.get(key)}",
                    f"--use-rope-scaling fixes it at {value:g}, as Megatron does")
    return theta, float(rope["factor"])


def _llama_fields(c: dict, path: str) -> tuple[dict, dict]:
    if c.get("hidden_act", "silu") != "silu":
        _refuse(path, f"hidden_act {c['hidden_act']!r}", "SwiGLU is silu(gate) * up")
    if c.get("attention_bias", False) != c.get("mlp_bias", False):
        _refuse(path, "attention_bias != mlp_bias", "--disable-bias-linear removes the biases of all linear layers")
    heads = c["num_attention_heads"]
    theta, factor = _rope(c, path)
    fixed = dict(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                 ffn_hidden_size=c["intermediate_size"], num_attention_heads=heads,
                 num_key_value_heads=c.get("num_key_value_heads") or heads,
                 kv_channels=c.get("head_dim") or c["hidden_size"] // heads, normalization="rmsnorm",
                 layernorm_epsilon=c.get("rms_norm_eps", 1e-6), swiglu=True, use_rotary_position_embeddings=True,
                 rotary_percent=1.0, disable_bias_linear=not c.get("attention_bias", False),
                 untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False))
    free = dict(rotary_position_embeddings_theta=theta, use_rope_scaling=factor is not None,
                max_position_embeddings=c.get("max_position_embeddings"))
    if factor is not None:
        free["rope_scaling_factor"] = factor
    return fixed, free


def _gpt2_fields(c: dict, path: str) -> tuple[dict, dict]:
    act = c.get("activation_function", "gelu_new")
    if act != EXACT_GELU:
        _refuse(path, f"activation_function {act!r}", "the GELU here is the exact one, 'gelu'")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        _refuse(path, "attention scaled other than by 1/sqrt(head dim)", "scale_attn_weights")
    hidden, heads = c["n_embd"], c["n_head"]
    fixed = dict(num_layers=c["n_layer"], hidden_size=hidden, ffn_hidden_size=c.get("n_inner") or 4 * hidden,
                 num_attention_heads=heads, num_key_value_heads=heads, kv_channels=hidden // heads,
                 normalization="layernorm", layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5), swiglu=False,
                 use_rotary_position_embeddings=False, position_embedding=True,
                 max_position_embeddings=c["n_positions"], disable_bias_linear=False,
                 untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True))
    return fixed, {}
