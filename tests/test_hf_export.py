"""Export to Hugging Face (tools/convert_checkpoint.py --to-hf): transformers loads the directory with no extra
code and its logits are our model's (fp32, rtol 1e-5) for a Llama-style model (GQA, untied output) saved by
ZeRO-3 at SP 2 and for a GPT-2-style one (biases, learned positions, tied) saved by ZeRO-0 at DP 2, sharded, with
its GPT-2 BPE tokenizer, and for one saved by 2 pipeline stages; a bf16 run exports in bf16; what cannot be exported is one line."""
import contextlib
import importlib.util
import io
import json
import os

import pytest
import torch

from megatron_sp.config import ModelConfig
from tests.runs import VOCAB, flags, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(*args: str) -> tuple[int, str, str]:
    """tools/convert_checkpoint.py in this process -> (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools",
                                                                                      "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = tool.main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def gpt2_flags(corpus, *extra, **kwargs) -> list[str]:
    """tests/runs.py's tiny run as a GPT-2-style model: LayerNorm, GELU, learned positions, biases, no GQA."""
    argv = [a for a in flags(corpus, **kwargs)
            if a not in ("--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear")]
    argv[argv.index("--normalization") + 1] = "layernorm"
    argv[argv.index("--num-key-value-heads") + 1] = "4"
    return [*argv, *extra]


def our_logits(ckpt, tag: str, tokens: torch.Tensor) -> torch.Tensor:
    """The checkpoint's model on one process; its weights merged by DeepSpeed (zero_to_fp32) or, for ZeRO-0,
    read from the model states."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from megatron_sp.attention import LocalAttention
    from megatron_sp.hf.export import model_config
    from megatron_sp.model.gpt import GPTModel
    from megatron_sp.training.checkpoint import read_run_record
    record = read_run_record(os.path.join(ckpt, tag))
    model = GPTModel(model_config(record), lambda: LocalAttention(causal=True, backend="torch"),
                     record["config"]["padded_vocab_size"]).eval()
    if record["config"]["training"]["zero_stage"] == 0:
        state = torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.logits(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_llama_export_from_zero3_at_sp2_gives_our_logits(corpus, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    train(2, flags(corpus, "--zero-stage", "3", "--sequence-parallel-size", "2",
                   "--untie-embeddings-and-output-weights", "--save", str(ckpt), iters=2))
    status, said, _ = convert("--load", ckpt, "--to-hf", out)
    assert status == 0 and said.startswith(f"wrote {out}: LlamaForCausalLM from global_step2 in float32")
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (72, 2, False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]  # no tokenizer
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        exported = hf_model(out)(input_ids=tokens).logits
    torch.testing.assert_close(exported, our_logits(ckpt, "global_step2", tokens), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory):
    """A byte-level BPE vocab.json + merges.txt (GPT-2's format), <|endoftext|> first."""
    from tokenizers import ByteLevelBPETokenizer
    d = tmp_path_factory.mktemp("bpe")
    with open(os.path.join(ROOT, "data", "sample", "austen.jsonl")) as f:
        texts = [json.loads(next(f))["text"] for _ in range(5)]
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(d))
    return d, texts


def test_gpt2_export_from_zero0_at_dp2_is_sharded_with_its_tokenizer(corpus, tmp_path, gpt2_bpe):
    from transformers import AutoTokenizer
    from megatron_sp.data.tokenizer import build_tokenizer
    bpe, texts = gpt2_bpe
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    tokenizer = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(bpe / "vocab.json"),
                 "--merge-file", str(bpe / "merges.txt")]
    train(2, gpt2_flags(corpus, "--zero-stage", "0", "--save", str(ckpt), *tokenizer, iters=2))
    status, said, _ = convert("--load", ckpt, "--to-hf", out, "--max-shard-size", "40KB")
    assert status == 0 and f"lm_eval --model hf --model_args pretrained={out} " in said
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]  # tied
    tokens = torch.randint(0, 400, (2, 32))
    with torch.no_grad():
        exported = hf_model(out)(input_ids=tokens).logits
    torch.testing.assert_close(exported, our_logits(ckpt, "global_step2", tokens), rtol=1e-5, atol=1e-6)
    ours, theirs = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe / "vocab.json"),
                                   merge_file=str(bpe / "merges.txt")), AutoTokenizer.from_pretrained(str(out))
    for text in texts:
        assert theirs.encode(text) == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod == json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_a_bf16_run_exports_in_bf16_and_an_old_checkpoint_needs_its_flags(corpus, tmp_path):
    from safetensors.torch import load_file
    ckpt = tmp_path / "ckpt"
    run_flags = flags(corpus, "--zero-stage", "1", "--bf16", "--save", str(ckpt), iters=1)
    train(1, run_flags)
    assert convert("--load", ckpt, "--to-hf", tmp_path / "bf16")[0] == 0
    assert convert("--load", ckpt, "--to-hf", tmp_path / "fp32", "--dtype", "float32")[0] == 0
    bf16, fp32 = (load_file(tmp_path / name / "model.safetensors") for name in ("bf16", "fp32"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert bf16.keys() == fp32.keys() and all(bf16[k].equal(fp32[k].bfloat16()) for k in bf16)
    assert hf_model(tmp_path / "bf16", dtype=torch.bfloat16).model.embed_tokens.weight.equal(
        bf16["model.embed_tokens.weight"])

    (ckpt / "global_step1" / "megatron_sp_config.json").unlink()  # as saved before checkpoints recorded it
    status, _, said = convert("--load", ckpt, "--to-hf", tmp_path / "old")
    assert status == 2 and said.count("\n") == 1
    assert said.startswith(f"error: {ckpt / 'global_step1'} has no megatron_sp_config.json (saved before ")
    assert convert("--load", ckpt, "--to-hf", tmp_path / "old", "--", *run_flags)[0] == 0
    assert load_file(tmp_path / "old" / "model.safetensors").keys() == bf16.keys()
    status, _, said = convert("--load", ckpt, "--to-hf", tmp_path / "bf16", "--", *run_flags)
    assert status == 2 and said == f"error: --to-hf {tmp_path / 'bf16'} exists and is not empty; choose a new " \
                                   "directory (nothing is overwritten)\n"
    status, _, said = convert("--load", ckpt, "--to-hf", tmp_path / "x", "--step", "7")
    assert status == 2 and said == f"error: --load {ckpt}: no global_step7 there (step directories: global_step1)\n"


def test_a_gpt2_style_model_without_biases_exports_zero_biases(tmp_path):
    """transformers' GPT-2 always has biases: a model trained with --disable-bias-linear gets zeros there."""
    from megatron_sp.attention import LocalAttention
    from megatron_sp.hf.config import GPT2, hf_config
    from megatron_sp.hf.weights import to_hf, write_safetensors
    from megatron_sp.model.gpt import GPTModel
    m = ModelConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, ffn_hidden_size=64, seq_length=16,
                    max_position_embeddings=16, disable_bias_linear=True, hidden_dropout=0.0)
    torch.manual_seed(0)
    ours = GPTModel(m, lambda: LocalAttention(causal=True, backend="torch"), 64).eval()
    state = ours.state_dict()
    tensors = to_hf(state, m, GPT2, torch.float32)
    assert not state  # consumed as converted: never the state and its copy whole at once
    params = {p.data_ptr() for p in ours.parameters()}
    assert all(t.is_contiguous() and t.data_ptr() not in params for t in tensors.values())  # copies, also in fp32
    assert tensors["transformer.h.0.mlp.c_fc.bias"].equal(torch.zeros(64))
    write_safetensors(tensors, str(tmp_path), 2 ** 30)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(m, GPT2, 64, "float32", None, None)))
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = ours.logits(tokens, torch.arange(16).expand(2, 16))
        torch.testing.assert_close(hf_model(tmp_path)(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-6)


def _model(**overrides) -> ModelConfig:
    llama = dict(normalization="rmsnorm", swiglu=True, use_rotary_position_embeddings=True, num_attention_heads=4,
                 num_key_value_heads=2, hidden_size=32, ffn_hidden_size=64)
    return ModelConfig(**{**llama, **overrides})


@pytest.mark.parametrize("overrides, says", [
    (dict(rotary_percent=0.5), "a rotary model exports as LlamaForCausalLM, which needs RMSNorm, SwiGLU and rotary "
                               "on every head channel; this one has rotary on 4 of 8 channels (--rotary-percent 0.5)"),
    (dict(normalization="layernorm", swiglu=False), "this one has --normalization layernorm, a GELU MLP (no --swiglu)"),
    (dict(use_rotary_position_embeddings=False, normalization="layernorm", swiglu=False),
     "a model without rotary exports as GPT2LMHeadModel, which needs LayerNorm, GELU, a learned position table, as "
     "many kv heads as heads, head dim h/heads; this one has 2 kv heads for 4 heads"),
    (dict(use_rotary_position_embeddings=False, position_embedding=False),
     "this one has --normalization rmsnorm, --swiglu, no position table (--no-position-embedding), 2 kv heads"),
])
def test_a_model_without_a_hugging_face_counterpart_is_one_line(overrides, says):
    from megatron_sp.errors import ConfigError
    from megatron_sp.hf.config import architecture_of
    with pytest.raises(ConfigError, match="this model has no Hugging Face counterpart: ") as refused:
        architecture_of(_model(**overrides))
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_pipeline_checkpoint_exports_every_stage(corpus, tmp_path):
    """PP 2 under ZeRO-1: each stage saved its own files (the tied word embedding on both); the export merges
    the stages' fp32 masters, and its logits are those of the model the stages' module weights make up."""
    from megatron_sp.attention import LocalAttention
    from megatron_sp.hf.export import model_config
    from megatron_sp.model.gpt import GPTModel
    from megatron_sp.training.checkpoint import read_run_record
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    train(2, flags(corpus, "--zero-stage", "1", "--pipeline-model-parallel-size", "2", "--global-batch-size", "4",
                   "--eval-iters", "0", "--save", str(ckpt), iters=2))
    status, said, _ = convert("--load", ckpt, "--to-hf", out)
    assert status == 0, said
    record = read_run_record(str(ckpt / "global_step2"))
    model = GPTModel(model_config(record), lambda: LocalAttention(causal=True, backend="torch"),
                     record["config"]["padded_vocab_size"]).eval()
    first, last = (torch.load(ckpt / "global_step2" / f"mp_rank_0{r}_model_states.pt", weights_only=False)["module"]
                   for r in (0, 1))
    model.load_state_dict({**last, **first})
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        ours = model.logits(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))
        exported = hf_model(out)(input_ids=tokens).logits
    torch.testing.assert_close(exported, ours, rtol=1e-5, atol=1e-6)
