"""Hugging Face in and out: start a run from a local LlamaForCausalLM / GPT2LMHeadModel directory (--load-hf), and
export a checkpoint of ours as one (tools/convert_checkpoint.py --to-hf) for evaluation and serving.

    config.py         config.json <-> ModelConfig, and which models have a Hugging Face counterpart
    weights.py        parameter names and layouts both ways; safetensors files read and written (sharded)
    start.py          --load-hf: config.json as the model flags, the weights as the init
    export.py         a checkpoint of ours (any ZeRO stage, DP x SP layout, pipeline) -> a Hugging Face directory
    tokenizer.py      the run's tokenizer in Hugging Face form; sentencepiece.py builds one from a .model file

Nothing is downloaded: every path is a local directory. transformers and safetensors are optional
(pip install -e .[hf]).
"""
import importlib

from megatron_sp.errors import ConfigError


def require(module: str):
    """Import an optional package of the [hf] extra, or one ConfigError line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module.split('.')[0]} is not installed: pip install -e .[hf] (transformers and "
                          "safetensors, for Hugging Face import and export)") from None
