"""The run's tokenizer in Hugging Face form, so that AutoTokenizer.from_pretrained(dir) gives the training ids.

    HFTokenizer                  the directory's tokenizer files copied as they are (a tokenizer_config.json
                                 without tokenizer_class gets PreTrainedTokenizerFast: tokenizer.json as is;
                                 a special token given as a bare {"content": ...} becomes its string)
    GPT2BPETokenizer             vocab.json + merges.txt as GPT2Tokenizer (byte-level BPE, no prefix space)
    SentencePieceTokenizer,      tokenizer.model, and tokenizer.json built from it (hf/sentencepiece.py) with
    GPTSentencePieceTokenizer    Megatron's special tokens at their training ids
    NullTokenizer                none: ids written as text have no Hugging Face form
eos is the run's end-of-document token (what --append-eod put between documents).
"""
import json
import os
import shutil
from dataclasses import dataclass

from megatron_sp.hf import ConfigError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
OVERRIDE_FLAGS = {"tokenizer_model": "--tokenizer-model", "vocab_file": "--vocab-file", "merge_file": "--merge-file"}
SENTENCEPIECE = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")


@dataclass
class TokenizerExport:
    """A tokenizer to write: its type, source files by role (tokenizer_model, vocab_file, merge_file), eod id."""
    kind: str
    files: dict
    eod: int

    def write(self, out_dir: str, max_length: int) -> int | None:
        """Write the tokenizer files into out_dir -> the bos id (None where the tokenizer has none)."""
        if self.kind == "HFTokenizer":
            return _copy_hf(self.files["tokenizer_model"], out_dir)
        if self.kind == "GPT2BPETokenizer":
            shutil.copyfile(self.files["vocab_file"], os.path.join(out_dir, "vocab.json"))
            shutil.copyfile(self.files["merge_file"], os.path.join(out_dir, "merges.txt"))
            token = "<|endoftext|>"
            _write_json(out_dir, "tokenizer_config.json", {
                "tokenizer_class": "GPT2Tokenizer", "bos_token": token, "eos_token": token, "unk_token": token,
                "add_prefix_space": False, "model_max_length": max_length})
            return self.eod
        return _write_sentencepiece(self.kind, self.files["tokenizer_model"], out_dir, max_length)


def tokenizer_export(record: dict, overrides: dict) -> TokenizerExport | str:
    """The tokenizer a checkpoint's run record names (files as overridden) -> a TokenizerExport, or a note saying
    why there is none. A file that is not there is one ConfigError line naming the flag that gives its place."""
    kind = record["type"]
    roles = {"HFTokenizer": ["tokenizer_model"], "GPT2BPETokenizer": ["vocab_file", "merge_file"],
             **{k: ["tokenizer_model"] for k in SENTENCEPIECE}}.get(kind)
    if roles is None:
        return f"no tokenizer files: {kind} (ids written as text) has no Hugging Face form"
    files = {role: overrides.get(role) or record.get(role) for role in roles}
    if not all(files.values()):
        return "no tokenizer files: the run named none (mock data)"
    for role, path in files.items():
        if not os.path.exists(path):
            raise ConfigError(f"the run's tokenizer file {path} is not there; give its place with "
                              f"{OVERRIDE_FLAGS[role]}, or pass --no-tokenizer to export the model alone")
    if kind in SENTENCEPIECE:
        from megatron_sp.hf.sentencepiece import check_model_type
        check_model_type(files["tokenizer_model"])
    return TokenizerExport(kind, files, record["eod"])


def _write_json(out_dir: str, name: str, content: dict) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(content, f, indent=2)


def _copy_hf(path: str, out_dir: str) -> int | None:
    source = path if os.path.isdir(path) else os.path.dirname(path)
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    # a special token as a bare {"content": ...} (HFTokenizer reads it; transformers only a string or an AddedToken)
    tokens = {key: value["content"] for key, value in config.items()
              if key.endswith("_token") and isinstance(value, dict) and "__type" not in value}
    if tokens or "tokenizer_class" not in config:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config, **tokens}
        _write_json(out_dir, "tokenizer_config.json", config)
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if bos is None:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")).token_to_id(bos)


def _write_sentencepiece(kind: str, model_file: str, out_dir: str, max_length: int) -> int | None:
    from megatron_sp.data.tokenizer import build_tokenizer
    from megatron_sp.hf.sentencepiece import read_model, spm_tokenizer
    ours = build_tokenizer(kind, tokenizer_model=model_file)
    tokenizer = spm_tokenizer(model_file, ours.special_tokens)
    shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    spec = read_model(model_file).trainer_spec
    bos = spec.bos_id if 0 <= spec.bos_id < tokenizer.get_vocab_size() else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.id_to_token(ours.eod),
              "unk_token": tokenizer.id_to_token(spec.unk_id), "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}
    if bos is not None:
        config["bos_token"] = tokenizer.id_to_token(bos)
    if "<PAD>" in ours.special_tokens:
        config["pad_token"] = "<PAD>"
    _write_json(out_dir, "tokenizer_config.json", config)
    return bos
