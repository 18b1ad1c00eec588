"""Parameter names and layouts of our GPTModel <-> LlamaForCausalLM / GPT2LMHeadModel, and safetensors files.

Each of our parameters is one or more Hugging Face tensors stacked on dim 0:
    layers.i.attention.qkv   [(hq + 2 hkv) d, h]  = q_proj [hq d, h] ; k_proj [hkv d, h] ; v_proj [hkv d, h]
                             (GPT-2: one c_attn, the same q ; k ; v rows, stored transposed)
    layers.i.mlp.fc1         [2f, h] (SwiGLU)     = gate_proj [f, h] ; up_proj [f, h]  (fused.swiglu: gate first)
GPT-2's Conv1D layers store [in, out], the transpose of nn.Linear's [out, in]. Rotary needs no permutation: ours
rotates halves (rotate_half), as transformers' Llama does. Both directions only split, stack and transpose, so
a conversion is exact in any dtype and import followed by export gives back the same tensors.
"""
import json
import os
import re

import torch

from megatron_sp.config import ModelConfig
from megatron_sp.hf import ConfigError, require
from megatron_sp.hf.config import GPT2, LLAMA

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Non-parameter tensors some transformers versions saved; they carry no weights.
BUFFERS = re.compile(r".*(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")

_TOP = {LLAMA: {"word_embeddings": "model.embed_tokens", "final_norm": "model.norm", "output_layer": "lm_head"},
        GPT2: {"word_embeddings": "transformer.wte", "position_embeddings": "transformer.wpe",
               "final_norm": "transformer.ln_f", "output_layer": "lm_head"}}
_LAYER_PREFIX = {LLAMA: "model.layers.{}.", GPT2: "transformer.h.{}."}
_LAYER = {LLAMA: {"input_norm": ("input_layernorm",), "post_attention_norm": ("post_attention_layernorm",),
                  "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "attention.out": ("self_attn.o_proj",), "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj"),
                  "mlp.fc2": ("mlp.down_proj",)},
          GPT2: {"input_norm": ("ln_1",), "post_attention_norm": ("ln_2",), "attention.qkv": ("attn.c_attn",),
                 "attention.out": ("attn.c_proj",), "mlp.fc1": ("mlp.c_fc",), "mlp.fc2": ("mlp.c_proj",)}}
_LINEAR = ("attention.qkv", "attention.out", "mlp.fc1", "mlp.fc2")


def hf_parts(name: str, m: ModelConfig, arch: str) -> tuple[list[tuple[str, int]], bool]:
    """One of our parameter names -> ([(Hugging Face name, rows on dim 0)], stored transposed)."""
    module, _, kind = name.rpartition(".")  # kind: weight or bias
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if layer is None:
        return [(f"{_TOP[arch][module]}.{kind}", -1)], False
    index, part = layer.groups()
    names = [_LAYER_PREFIX[arch].format(index) + f"{hf}.{kind}" for hf in _LAYER[arch][part]]
    transposed = arch == GPT2 and part in _LINEAR and kind == "weight"
    if len(names) == 1:
        return [(names[0], -1)], transposed
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    rows = {"attention.qkv": [q, kv, kv], "mlp.fc1": [m.ffn_hidden_size, m.ffn_hidden_size]}[part]
    return list(zip(names, rows)), transposed


def parameter_shapes(m: ModelConfig, vocab_size: int) -> dict[str, torch.Size]:
    """Our model's parameter names and shapes for this config, from a model on the meta device (no memory)."""
    from megatron_sp.model.gpt import GPTModel
    with torch.device("meta"):
        model = GPTModel(m, torch.nn.Identity, vocab_size, init_seed=0)  # shapes only: no init is drawn
    return {name: p.shape for name, p in model.named_parameters()}


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig, arch: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face tensors in `dtype`, each its own contiguous copy (safetensors stores no
    views). The state is consumed: each of its tensors is dropped once converted, so a model's fp32 state and
    its converted copy are never held whole at once. A GPT-2-style model without biases gets zero biases:
    transformers' GPT-2 always has them."""
    out = {}
    for name in list(state):
        tensor = state.pop(name)
        parts, transposed = hf_parts(name, m, arch)
        pieces = tensor.split([rows for _, rows in parts]) if len(parts) > 1 else [tensor]
        for (hf_name, _), piece in zip(parts, pieces):
            out[hf_name] = (piece.t() if transposed else piece).to(dtype, memory_format=torch.contiguous_format,
                                                                     copy=True)
    if arch == GPT2 and m.disable_bias_linear:
        for name in [n for n in out if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                   "mlp.c_proj.weight"))]:
            out[name.removesuffix("weight") + "bias"] = torch.zeros(out[name].shape[1], dtype=dtype)
    return out


def expected_shapes(param_shapes: dict[str, torch.Size], m: ModelConfig, arch: str) -> dict[str, tuple]:
    """The Hugging Face tensors (name -> shape) that our parameters of these shapes are made of."""
    shapes = {}
    for name, shape in param_shapes.items():
        parts, transposed = hf_parts(name, m, arch)
        for hf_name, rows in parts:
            shape_i = (shape[0] if rows < 0 else rows, *shape[1:])
            shapes[hf_name] = tuple(reversed(shape_i)) if transposed else shape_i
    return shapes


class SafetensorsDir:
    """The safetensors weights of a Hugging Face directory (one file or shards named by the index), opened
    lazily and memory-mapped: a tensor is read when asked for. Names are those of the *ForCausalLM model;
    files saved from the base model (no 'model.' / 'transformer.' prefix) are read too."""

    def __init__(self, hf_dir: str, arch: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            files = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise ConfigError(f"--load-hf {hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (other weight formats are not "
                              "read: save the model with transformers' save_pretrained, which writes safetensors)")
        base = _TOP[arch]["word_embeddings"].split(".")[0] + "."
        self.stored = {(n if n.startswith((base, "lm_head.")) else base + n): n for n in files}  # ours -> stored
        self.files = {n: files[stored] for n, stored in self.stored.items()}
        self._handles = {}

    def _open(self, file: str):
        safetensors = require("safetensors")
        return safetensors.safe_open(os.path.join(self.dir, file), framework="pt")

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def names(self) -> list[str]:
        return [name for name in self.files if not BUFFERS.match(name)]

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(self.stored[name]).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(self.stored[name])


def check_weights(weights: SafetensorsDir, expected: dict[str, tuple], what: str) -> None:
    """Every expected tensor there with its shape and nothing else, or one ConfigError line naming the first
    misfit. what: the model config.json describes, e.g. 'the LlamaForCausalLM of its config.json'."""
    there = set(weights.names())
    for name, shape in expected.items():
        if name not in there:
            raise ConfigError(f"--load-hf {weights.dir}: {name}, a weight of {what}, is missing from its safetensors")
        if weights.shape(name) != shape:
            raise ConfigError(f"--load-hf {weights.dir}: {name} has shape {list(weights.shape(name))}, "
                              f"{what} needs {list(shape)}")
    extra = sorted(there - set(expected))
    if extra and not (extra == ["lm_head.weight"] and "lm_head.weight" not in expected):  # a tied copy saved too
        raise ConfigError(f"--load-hf {weights.dir}: {extra[0]} is not a weight of {what}"
                          f"{f' ({len(extra) - 1} more)' if len(extra) > 1 else ''}")


def from_hf(weights: SafetensorsDir, name: str, m: ModelConfig, arch: str) -> torch.Tensor:
    """Our parameter `name`, stacked from its Hugging Face tensors."""
    parts, transposed = hf_parts(name, m, arch)
    pieces = [weights.tensor(hf_name) for hf_name, _ in parts]
    pieces = [p.t() for p in pieces] if transposed else pieces
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards model-0000i-of-0000n.safetensors (in parameter order, each at most
    max_shard_bytes unless one tensor is larger) with model.safetensors.index.json -> the files written."""
    save_file = require("safetensors.torch").save_file
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, file), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {n: file for file, names in zip(files, shards) for n in sorted(names)}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return [*files, INDEX_FILE]
