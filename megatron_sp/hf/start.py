"""--load-hf DIR: a run starts from a local Hugging Face model.

Three steps, each where the run already does that kind of work:
    apply_hf_config   at parse time: config.json gives the model flags (a flag given on the command line that
                      contradicts it is one error line; --seq-length, --rotary-base and the rope scaling flags
                      may change, for context extension); its tokenizer becomes the default
    check_start       once the tokenizer is known: the embedding keeps the model's vocab_size rows (padding
                      included, so that its logits and softmax are the model's), the tokenizer must fit in them,
                      and every weight must be in the safetensors with its shape: all before anything is allocated
    hf_weights        the init: our parameter name -> its tensor, read when engine.build_model asks (under ZeRO-3
                      rank 0 fills each gathered parameter in turn, so no rank holds the whole model twice)
"""
import os

from megatron_sp.config import ModelConfig, RunConfig
from megatron_sp.hf import ConfigError
from megatron_sp.hf.config import MODEL_TYPES, model_fields, read_config
from megatron_sp.hf.weights import SafetensorsDir, check_weights, expected_shapes, from_hf, parameter_shapes

TOKENIZER_FIELDS = {"data.tokenizer_type", "data.tokenizer_model", "data.vocab_file", "data.merge_file"}


def _spelled(name: str, value) -> str:
    """A ModelConfig field's value as the command line says it: '--num-layers 2', '--swiglu', 'no --swiglu'."""
    on_by_default = ModelConfig.__dataclass_fields__[name].default is True
    flag = ("--no-" if on_by_default else "--") + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value != on_by_default else f"no {flag}"
    return f"{flag} {value}"


def apply_hf_config(cfg: RunConfig, given: set[str]) -> None:
    """Set cfg.model from --load-hf's config.json. given: the fields the command line names ('model.num_layers')."""
    hf_dir, m = cfg.training.load_hf, cfg.model
    if cfg.training.finetune:
        raise ConfigError("--load-hf and --finetune both name the weights a run starts from; give one")
    path = os.path.join(hf_dir, "config.json")
    arch, fixed, free = model_fields(read_config(hf_dir), path)
    for name, value in fixed.items():
        if f"model.{name}" in given and getattr(m, name) != value:
            raise ConfigError(f"{_spelled(name, getattr(m, name))} contradicts {path} (a {arch} with "
                              f"{_spelled(name, value)}); drop the flag: --load-hf takes the model's shape from it")
        setattr(m, name, value)
    for name, value in free.items():
        if f"model.{name}" not in given and value is not None:
            setattr(m, name, value)
    if "model.make_vocab_size_divisible_by" in given:
        cfg.ignored.append(f"--make-vocab-size-divisible-by (the embedding keeps the vocab_size rows of {path})")
    if not given & TOKENIZER_FIELDS and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        cfg.data.tokenizer_type, cfg.data.tokenizer_model = "HFTokenizer", hf_dir


def _architecture(hf_dir: str) -> str:
    return MODEL_TYPES[read_config(hf_dir)["model_type"]]  # checked by apply_hf_config


def check_start(cfg: RunConfig, tokenizer_vocab_size: int) -> int:
    """The embedding's rows for a --load-hf run (its config.json's vocab_size), once the weights are checked
    against the config (names and shapes, from the safetensors headers); one ConfigError line otherwise."""
    hf_dir = cfg.training.load_hf
    config, arch = read_config(hf_dir), _architecture(hf_dir)
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < tokenizer_vocab_size:
        raise ConfigError(f"--load-hf {hf_dir}: its embedding has vocab_size {vocab} rows, fewer than the "
                          f"tokenizer's {tokenizer_vocab_size} tokens; use the model's own tokenizer (the "
                          "default when the directory holds tokenizer.json)")
    check_weights(SafetensorsDir(hf_dir, arch), expected_shapes(parameter_shapes(cfg.model, vocab), cfg.model, arch),
                  f"the {arch} of its config.json")
    return vocab


def hf_weights(hf_dir: str, m: ModelConfig):
    """name -> tensor: our parameter `name` read from hf_dir's safetensors (checked by check_start)."""
    arch = _architecture(hf_dir)
    weights = SafetensorsDir(hf_dir, arch)
    return lambda name: from_hf(weights, name, m, arch)
