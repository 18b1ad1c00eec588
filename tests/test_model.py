"""The GPT model on one process: shapes, init, rotary, loss, and the inner-attention slot."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_sp.attention import LocalAttention
from megatron_sp.config import ModelConfig
from megatron_sp.model.gpt import GPTModel
from megatron_sp.kernels.compiled import Fused
from megatron_sp.model.loss import chunked_cross_entropy
from megatron_sp.model.fused import apply_rotary
from megatron_sp.model.rotary import rotary_cos_sin


def tiny(**overrides) -> ModelConfig:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, seq_length=16,
                      max_position_embeddings=16, ffn_hidden_size=48, hidden_dropout=0.0, attention_dropout=0.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg, vocab=64):
    torch.manual_seed(0)
    return GPTModel(cfg, lambda: LocalAttention(causal=True, backend="torch"), vocab).double()


@pytest.mark.parametrize("variant", [
    {}, {"swiglu": True, "normalization": "rmsnorm", "use_rotary_position_embeddings": True, "rotary_percent": 0.5},
    {"untie_embeddings_and_output_weights": True, "disable_bias_linear": True}])
def test_loss_equals_full_logits_cross_entropy(variant):
    model = build(tiny(**variant))
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    loss = model(tokens, positions, labels)
    reference = F.cross_entropy(model.logits(tokens, positions).transpose(1, 2), labels, reduction="none")
    assert loss.shape == (2, 16)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)


def test_causal_model_output_at_a_token_ignores_later_tokens():
    model = build(tiny(use_rotary_position_embeddings=True))
    tokens = torch.randint(0, 64, (1, 16))
    positions = torch.arange(16).view(1, 16)
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model.logits(tokens, positions), model.logits(changed, positions)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("rotary", [False, True])
def test_no_position_embedding_drops_the_learned_table(rotary):
    """--no-position-embedding (Megatron's): without rotary the model sees no position at all; with rotary
    it is what rotary alone gives (no table either way)."""
    tokens = torch.randint(0, 64, (1, 16))
    positions = torch.arange(16).view(1, 16)

    def logits(model, shift):
        return model.logits(tokens, positions + shift)
    plain = build(tiny(use_rotary_position_embeddings=rotary, max_position_embeddings=32))
    none = build(tiny(use_rotary_position_embeddings=rotary, max_position_embeddings=32, position_embedding=False))
    assert (plain.position_embeddings is None) == rotary and none.position_embeddings is None
    if rotary:  # the same model: same parameters, same outputs
        assert all(a.equal(b) for a, b in zip(plain.state_dict().values(), none.state_dict().values()))
        assert torch.equal(logits(plain, 0), logits(none, 0))
    else:  # positions reach the model through the learned table only
        assert not torch.allclose(logits(plain, 0), logits(plain, 1))
        assert torch.equal(logits(none, 0), logits(none, 1))


def test_megatron_init():
    model = build(tiny(num_layers=8, hidden_size=256, ffn_hidden_size=512), vocab=128)
    std = 0.02
    assert abs(model.layers[0].attention.qkv.weight.std().item() - std) < 2e-3
    assert abs(model.layers[0].mlp.fc2.weight.std().item() - std / math.sqrt(16)) < 5e-4
    assert torch.all(model.layers[0].attention.qkv.bias == 0) and torch.all(model.final_norm.weight == 1)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        cq = rotary_cos_sin(torch.tensor([[pq]]), 8, 1.0, 10000.0, torch.float64)
        ck = rotary_cos_sin(torch.tensor([[pk]]), 8, 1.0, 10000.0, torch.float64)
        return (apply_rotary(q, *cq) * apply_rotary(k, *ck)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rotary_percent_leaves_the_rest_unrotated():
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(3).view(1, 3), 8, 0.5, 10000.0, torch.float64)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:]) and not torch.equal(out[..., :4], x[..., :4])


def test_chunked_cross_entropy_matches_full_including_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    grads = torch.autograd.grad(chunked.sum(), (hidden, weight))
    full = F.cross_entropy((hidden @ weight.t()).view(-1, 40), labels.view(-1), reduction="none").view(2, 9)
    ref_grads = torch.autograd.grad(full.sum(), (hidden, weight))
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_inner_attention_slot_is_the_only_attention():
    calls = []

    class Recording(LocalAttention):
        def forward(self, q, k, v):
            calls.append(tuple(q.shape))
            return super().forward(q, k, v)

    cfg = tiny()
    model = GPTModel(cfg, lambda: Recording(causal=True, backend="torch"), 64)
    model(torch.randint(0, 64, (2, 16)), torch.arange(16).expand(2, 16), torch.randint(0, 64, (2, 16)))
    assert calls == [(2, 16, 4, 8)] * cfg.num_layers


@pytest.mark.parametrize("recompute", [{"checkpoint_activations": True}, {"recompute_granularity": "selective"}])
def test_recompute_gives_identical_gradients(recompute):
    variant = {"swiglu": True, "use_rotary_position_embeddings": True}
    plain, recomputed = build(tiny(**variant)), build(tiny(**variant, **recompute))
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    for model in (plain, recomputed):
        model.train()
        model(tokens, positions, labels).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "swiglu", "apply_rotary"])
def test_fused_elementwise_traces_whole_and_matches_eager(name):
    """What the GPU compiles: each function must trace as one graph (fullgraph) and give eager's values.
    aot_eager runs the traced forward/backward graphs without code generation, so this runs on CPU."""
    import megatron_sp.model.fused as fused
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(6).expand(2, 6), 8, 0.5, 10000.0, torch.float64)
    args = {"rms_norm": (w, None, 1e-5), "layer_norm": (w, b, 1e-5), "swiglu": (), "apply_rotary": (cos, sin)}[name]
    fn = getattr(fused, name)
    traced = Fused(fn, enabled=True, backend="aot_eager", devices=("cpu",))
    got, expected = traced(x, *args), fn(x, *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), x)[0]
    g_expected = torch.autograd.grad(expected.sum(), x)[0]
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)
    assert traced._compiled is not None


def test_fused_survives_many_shapes():
    """A process that runs many sequence lengths (evaluation, benchmarks) must not hit dynamo's recompile
    limit, a hard error under fullgraph=True: after the first shape, changed sizes compile as dynamic."""
    import megatron_sp.model.fused as fused
    traced = Fused(fused.swiglu, enabled=True, backend="aot_eager", devices=("cpu",))
    limit = torch._dynamo.config.recompile_limit
    for s in range(1, limit + 4):
        x = torch.randn(1, s, 3, 8, dtype=torch.float64)
        torch.testing.assert_close(traced(x), fused.swiglu(x), rtol=0, atol=0)


def test_fused_cross_entropy_traces_whole_and_matches_eager():
    """The loss chunk's compiled cross-entropy (bf16 logits in, fp32 statistics) traces as one graph and
    gives eager's loss and logits gradient."""
    from megatron_sp.model.loss import cross_entropy_fp32
    torch.manual_seed(0)
    logits = torch.randn(12, 40, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    traced = Fused(cross_entropy_fp32, True, backend="aot_eager", devices=("cpu",))
    got, expected = traced(logits, labels), cross_entropy_fp32(logits, labels)
    assert got.dtype == torch.float32 and traced._compiled is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (g_got,), (g_expected,) = (torch.autograd.grad(x.sum(), logits) for x in (got, expected))
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=0)


def test_llama3_rope_scaling_is_transformers_own():
    """--use-rope-scaling: cos/sin bit for bit those of transformers' Llama with rope_type llama3 (and without)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # Llama 3.2's
    positions = torch.tensor([[0, 1, 7, 100, 5000, 60000, 131071]])
    for scaling, factor in ((None, None), (llama3, 32.0)):
        config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling,
                             max_position_embeddings=131072)
        cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 7, 64), positions)
        ours = rotary_cos_sin(positions, 64, 1.0, 500000.0, torch.float32, factor)  # [1, 7, 1, 64]
        assert torch.equal(ours[0][:, :, 0], cos) and torch.equal(ours[1][:, :, 0], sin)
