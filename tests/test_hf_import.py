"""Start from a Hugging Face model (--load-hf): random LlamaForCausalLM / GPT2LMHeadModel saved with save_pretrained
give our model the same logits (fp32, rtol 1e-5; with Llama 3.1's rope scaling); a run
from one trains under ZeRO-3 at SP 2 and its export is the original safetensors byte for byte; what cannot be
expressed, a missing weight, a shape or a flag that does not fit, are each one line."""
import json
import os
import shutil

import pytest
import torch

from tests.runs import flags, train
from tests.test_data_preprocess import hf_tokenizer_dir  # noqa: F401  (a fixture: a Llama-3-shaped tokenizer)
from tests.test_hf_export import convert

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def randomized(model):
    """Every parameter random, norms around 1, so that every weight shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name or "norm" in name else 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """GQA, untied, rotary base 500000 with Llama 3.1's scaling; the shape of tests/runs.py's tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=72, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=LLAMA3, max_position_embeddings=131072, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    randomized(LlamaForCausalLM(config)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=72, n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="gelu")
    path = tmp_path_factory.mktemp("gpt2")
    randomized(GPT2LMHeadModel(config)).save_pretrained(path)
    return path


def start(hf_dir, *extra: str):
    """configure() of a one-process run from hf_dir -> (cfg, tokenizer)."""
    from megatron_sp.configure import configure
    return configure(["--load-hf", str(hf_dir), "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                      "64", "--train-iters", "1", "--seq-length", "32", "--attention-backend", "torch",
                      "--hidden-dropout", "0", *extra], 1)


def our_model(cfg):
    """The model as a run builds it (engine.build_model with the --load-hf weights), on one process."""
    from megatron_sp.attention import LocalAttention
    from megatron_sp.hf.start import hf_weights
    from megatron_sp.model.gpt import GPTModel
    from megatron_sp.training.engine import build_model
    return build_model(lambda: GPTModel(cfg.model, lambda: LocalAttention(causal=True, backend="torch"),
                                        cfg.padded_vocab_size), {"zero_optimization": {"stage": 0}}, None, 0,
                       hf_weights(cfg.training.load_hf, cfg.model)).eval()


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_a_hugging_face_model_gives_our_model_its_logits(fixture, request):
    from transformers import AutoModelForCausalLM
    hf_dir = request.getfixturevalue(fixture)
    cfg, _ = start(hf_dir)
    assert cfg.padded_vocab_size == 72  # the model's rows, not the tokenizer's 65 rounded up
    tokens = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        ours = our_model(cfg).logits(tokens, torch.arange(32).expand(2, 32))
        theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # fp32: summation orders differ


def test_a_config_written_by_transformers_4_reads_the_same(llama_dir, tmp_path):
    """transformers 4.x wrote rope_theta and rope_scaling (as Llama 3.2's own config.json has them); 5.x writes
    rope_parameters."""
    path = _edited(llama_dir, tmp_path, {"rope_parameters": None, "rope_theta": 250000.0,
                                         "rope_scaling": {**LLAMA3, "factor": 32.0}})
    m = start(path)[0].model
    assert (m.rotary_position_embeddings_theta, m.use_rope_scaling, m.rope_scaling_factor) == (250000.0, True, 32.0)
    m = start(path, "--rotary-base", "1e6", "--rope-scaling-factor", "64", "--seq-length", "64")[0].model
    assert (m.rotary_position_embeddings_theta, m.rope_scaling_factor, m.seq_length) == (1e6, 64.0, 64)


@pytest.mark.parametrize("layout", [("--zero-stage", "3", "--sequence-parallel-size", "2"),
                                    ("--zero-stage", "1", "--pipeline-model-parallel-size", "2")],
                         ids=["zero3-sp2", "zero1-pp2"])
def test_a_run_from_it_trains_and_exports_the_same_bytes(corpus, llama_dir, tmp_path, layout):
    """lr 0: one real step (forward, backward, AdamW) that leaves the weights as loaded; each pipeline stage
    loads its own layers (they keep the whole model's names)."""
    from transformers import AutoConfig
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    train(2, flags(corpus, "--load-hf", str(llama_dir), *layout,
                   "--lr", "0", "--lr-warmup-iters", "0", "--min-lr", "0", "--save", str(ckpt), iters=1))
    assert convert("--load", ckpt, "--to-hf", out)[0] == 0
    assert (out / "model.safetensors").read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    exported, original = (AutoConfig.from_pretrained(str(p)).to_dict() for p in (out, llama_dir))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act"):
        assert exported[key] == original[key], key


def test_its_tokenizer_is_the_default_and_must_fit_the_embedding(tmp_path_factory, hf_tokenizer_dir):  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatron_sp.configure import configure
    from megatron_sp.errors import ConfigError
    from megatron_sp.data.tokenizer import build_tokenizer
    tokens = build_tokenizer("HFTokenizer", tokenizer_model=str(hf_tokenizer_dir)).vocab_size
    for vocab in (tokens + 10, tokens - 1):
        path = tmp_path_factory.mktemp("with_tokenizer")
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4)).save_pretrained(path)
        for name in os.listdir(hf_tokenizer_dir):
            shutil.copy(hf_tokenizer_dir / name, path / name)
        argv = ["--load-hf", str(path), "--mock-data", "--train-iters", "1"]
        if vocab < tokens:
            with pytest.raises(ConfigError, match=f"its embedding has vocab_size {vocab} rows, fewer than the "
                                                  f"tokenizer's {tokens} tokens; use the model's own tokenizer"):
                configure(argv, 1)
        else:
            cfg, _ = configure(argv, 1)
            assert (cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.padded_vocab_size) == (
                "HFTokenizer", str(path), vocab)


def _edited(src, tmp_path, config: dict | None = None, drop: str | None = None):
    """A copy of the model directory src with config.json keys replaced and/or one tensor left out."""
    from safetensors.torch import load_file, save_file
    path = tmp_path / "edited"
    shutil.copytree(src, path)
    if config:
        content = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**content, **config}))
    if drop:
        tensors = load_file(path / "model.safetensors")
        del tensors[drop]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("model, config, drop, extra, says", [
    ("llama_dir", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, None, [],
     "config.json: rope scaling 'yarn' has no counterpart here (only Llama 3.1's 'llama3' frequency scaling is "
     "implemented)"),
    ("llama_dir", {"rope_parameters": {**LLAMA3, "low_freq_factor": 2.0, "rope_theta": 1e4}}, None, [],
     "config.json: llama3 rope scaling with low_freq_factor 2.0 has no counterpart here (--use-rope-scaling fixes "
     "it at 1, as Megatron does)"),
    ("llama_dir", {"model_type": "mistral"}, None, [], "config.json: model_type 'mistral' has no counterpart here"),
    ("gpt2_dir", {"activation_function": "gelu_new"}, None, [],
     "config.json: activation_function 'gelu_new' has no counterpart here (the GELU here is the exact one, 'gelu')"),
    ("llama_dir", None, "model.layers.1.mlp.up_proj.weight", [],
     "model.layers.1.mlp.up_proj.weight, a weight of the LlamaForCausalLM of its config.json, is missing"),
    ("llama_dir", {"intermediate_size": 40}, None, [],
     "model.layers.0.mlp.gate_proj.weight has shape [48, 32], the LlamaForCausalLM of its config.json needs [40, 32]"),
    ("gpt2_dir", {"n_inner": 64}, None, [],
     "transformer.h.0.mlp.c_fc.weight has shape [32, 128], the GPT2LMHeadModel of its config.json needs [32, 64]"),
    ("llama_dir", None, None, ["--num-layers", "3"],
     "--num-layers 3 contradicts {path}/config.json (a LlamaForCausalLM with --num-layers 2); drop the flag"),
    ("gpt2_dir", None, None, ["--swiglu"],
     "--swiglu contradicts {path}/config.json (a GPT2LMHeadModel with no --swiglu); drop the flag"),
    ("llama_dir", None, None, ["--finetune", "--load", "x"],
     "--load-hf and --finetune both name the weights a run starts from; give one"),
])
def test_what_does_not_fit_is_one_line(model, config, drop, extra, says, request, tmp_path, capsys):
    from pretrain_gpt import main
    path = _edited(request.getfixturevalue(model), tmp_path, config, drop)
    assert main(["--load-hf", str(path), "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
                 "--train-iters", "1", "--seq-length", "32", *extra]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: ") and said.count("\n") == 1 and says.format(path=path) in said


def test_without_safetensors_the_feature_says_how_to_install_it(llama_dir, monkeypatch):
    import sys
    from megatron_sp.errors import ConfigError
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now raises ImportError
    with pytest.raises(ConfigError, match=r"^safetensors is not installed: pip install -e \.\[hf\] \(transformers and "
                                          r"safetensors, for Hugging Face import and export\)$"):
        start(llama_dir)
