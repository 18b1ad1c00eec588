"""A checkpoint of ours -> a Hugging Face model directory (config.json, safetensors, generation_config.json and
the run's tokenizer) that transformers' AutoModelForCausalLM / AutoTokenizer load with no extra code.

The weights: where ZeRO keeps fp32 master weights in optimizer partitions (stages 1-3, and bf16 runs),
DeepSpeed's zero_to_fp32 merges them over the ranks that saved (any DP x SP layout), one pipeline stage at a
time; a stage-0 checkpoint holds each stage's module weights whole. They are written in the run's precision unless --dtype says otherwise.
The vocabulary keeps its padding (make_vocab_size_divisible_by): config.json's vocab_size is the embedding's
rows, so the exported model's softmax, and so every log-likelihood an evaluation computes, is the trained
model's; Hugging Face models commonly have more rows than tokens (Llama 3, Qwen, Pythia).
"""
import contextlib
import glob
import io
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, fields

import torch

from megatron_sp.config import ModelConfig
from megatron_sp.hf import ConfigError, require
from megatron_sp.hf.config import architecture_of, hf_config
from megatron_sp.hf.tokenizer import TokenizerExport, tokenizer_export
from megatron_sp.hf.weights import parameter_shapes, to_hf, write_safetensors
from megatron_sp.training.checkpoint import LATEST, RUN_FILE, latest_tag, read_run_record
from megatron_sp.training.checkpoint_files import unpickling_reason, weights_only_loads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Exported:
    """What export() wrote, for the tool's report."""
    out_dir: str
    arch: str
    tag: str
    dtype: str
    files: list[str]
    tokenizer: str  # which tokenizer files, or why there are none
    has_tokenizer: bool


def step_dir(load_dir: str, step: int | None) -> str:
    """The step directory to export: global_step<step>, or the one `latest` names."""
    if step is None:
        if not os.path.isfile(os.path.join(load_dir, LATEST)):
            raise ConfigError(f"--load {load_dir}: no '{LATEST}' file, so no checkpoint to export")
        tag = latest_tag(load_dir)
    else:
        tag = f"global_step{step}"
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(load_dir, "global_step*")))
        raise ConfigError(f"--load {load_dir}: no {tag} there (step directories: {', '.join(found) or 'none'})")
    return path


def model_config(record: dict) -> ModelConfig:
    """The ModelConfig a run record holds (fields this version does not know are left out)."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in record["config"]["model"].items() if k in known})


def read_state_dict(tag_dir: str) -> dict[str, torch.Tensor]:
    """Our model's parameters from a step directory, every pipeline stage's (a tied word embedding's copies on
    the first and the last stage are equal: the first is kept)."""
    stages = sorted(set(re.findall(r"mp_rank_(\d+)_model_states\.pt", " ".join(os.listdir(tag_dir)))))
    if not stages:
        raise ConfigError(f"{tag_dir} holds no DeepSpeed model states: this checkpoint is incomplete")
    state = {}
    for stage in stages:
        for name, tensor in _stage_state_dict(tag_dir, stage).items():
            state.setdefault(name, tensor)
    return state


def _stage_state_dict(tag_dir: str, stage: str) -> dict[str, torch.Tensor]:
    """One stage's parameters, every file read weights-only (a crafted file is refused before it runs code)."""
    try:
        with weights_only_loads():
            return _read_stage(tag_dir, stage)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{tag_dir}: {unpickling_reason(err)}") from None


def _read_stage(tag_dir: str, stage: str) -> dict[str, torch.Tensor]:
    """One pipeline stage's parameters (all of the model without a pipeline): fp32 master weights merged by
    zero_to_fp32 where ZeRO saved optimizer partitions, else the module's weights (stage 0). zero_to_fp32 reads
    every rank's files in a step directory, so it is shown only this stage's, linked into a directory of their own."""
    mine = [f for f in os.listdir(tag_dir) if f"mp_rank_{stage}_" in f]
    if not any(f.endswith("_optim_states.pt") for f in mine):
        path = os.path.join(tag_dir, f"mp_rank_{stage}_model_states.pt")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with tempfile.TemporaryDirectory() as view:
        tag = os.path.basename(tag_dir)
        os.mkdir(os.path.join(view, tag))
        for f in mine:
            os.symlink(os.path.abspath(os.path.join(tag_dir, f)), os.path.join(view, tag, f))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            return get_fp32_state_dict_from_zero_checkpoint(view, tag=tag)


def _checked(state: dict[str, torch.Tensor], m: ModelConfig, vocab: int, tag_dir: str) -> dict[str, torch.Tensor]:
    """The state's parameters, in the model's order, once they match the recorded config; else one line."""
    shapes = parameter_shapes(m, vocab)
    for name, shape in shapes.items():
        if name not in state or state[name].shape != shape:
            found = list(state[name].shape) if name in state else "missing"
            raise ConfigError(f"{tag_dir}: {name} is {found}, but {RUN_FILE} describes a model whose {name} is "
                              f"{list(shape)}")
    return {name: state[name] for name in shapes}


def export(load_dir: str, out_dir: str, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 5 * 2 ** 30, tokenizer_files: dict | None = None,
           with_tokenizer: bool = True, record: dict | None = None) -> Exported:
    """Write the Hugging Face directory out_dir from load_dir's latest (or `step`'s) checkpoint. Everything that
    can be refused is refused before anything is written; out_dir must not exist or be empty, and appears whole
    (written as out_dir.partial, then renamed). record: the run's configuration (checkpoint.run_record) for a
    checkpoint saved without one."""
    tag_dir = step_dir(load_dir, step)
    record = record or read_run_record(tag_dir)
    if record is None:
        raise ConfigError(f"{tag_dir} has no {RUN_FILE} (saved before checkpoints recorded their configuration): "
                          "give the run's pretrain_gpt.py flags after --, e.g. -- --num-layers 24 --hidden-size "
                          "2048 ... --tokenizer-type ...")
    m, vocab = model_config(record), record["config"]["padded_vocab_size"]
    arch = architecture_of(m)
    dtype = dtype or PRECISION_DTYPE[_precision(record)]
    tokenizer = (tokenizer_export(record["tokenizer"], tokenizer_files or {}) if with_tokenizer
                 else "no tokenizer files (--no-tokenizer)")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"--to-hf {out_dir} exists and is not empty; choose a new directory (nothing is overwritten)")
    require("safetensors")
    tensors = to_hf(_checked(read_state_dict(tag_dir), m, vocab, tag_dir), m, arch, DTYPES[dtype])
    partial = out_dir.rstrip("/") + ".partial"
    os.makedirs(partial, exist_ok=True)
    files = write_safetensors(tensors, partial, max_shard_bytes)
    bos = tokenizer.write(partial, m.seq_length) if isinstance(tokenizer, TokenizerExport) else None
    eos = record["tokenizer"]["eod"] if isinstance(tokenizer, TokenizerExport) else None
    for name, content in (("config.json", hf_config(m, arch, vocab, dtype, bos, eos)),
                          ("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})):
        with open(os.path.join(partial, name), "w") as f:
            json.dump(content, f, indent=2)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.rename(partial, out_dir)
    written = isinstance(tokenizer, TokenizerExport)
    about = f"the tokenizer files of its {tokenizer.kind}" if written else tokenizer
    return Exported(out_dir, arch, os.path.basename(tag_dir), dtype, files, about, written)


def _precision(record: dict) -> str:
    t = record["config"]["training"]
    return "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "fp32"
