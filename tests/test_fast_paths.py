"""The opt-in fast paths give what the default paths give: whole compiled layers (--compile-layers)."""
import numpy as np
import pytest
import torch

from megatron_sp.kernels import compiled
from tests.runs import flags, train
from tests.test_model import build, tiny

LLAMA = dict(swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True, disable_bias_linear=True)


def _loss_and_grads(model, seed=1):
    torch.manual_seed(seed)
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model.train()
    loss = model(tokens, torch.arange(16).expand(2, 16), labels)
    loss.sum().backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recompute", [{}, {"checkpoint_activations": True}, {"recompute_granularity": "selective"}])
def test_compiled_layers_equal_eager_and_share_their_graphs(recompute):
    """aot_eager runs dynamo's and AOTAutograd's forward/backward graphs without code generation: the same
    values in float64, under both kinds of activation checkpointing. Each layer breaks into graphs at the
    attention slot, and all layers run the same graphs (a recompile per layer would exceed dynamo's limit
    at 24 layers and fall back to eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    cfg = tiny(**LLAMA, **recompute, num_layers=5)
    eager, model = build(cfg), build(cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile_layers(model.layers, backend=counter)
    (loss, grads), (expected_loss, expected_grads) = _loss_and_grads(model), _loss_and_grads(eager)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)
    for name, got, expected in zip([n for n, _ in model.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=name)
    assert 2 <= counter.frame_count < cfg.num_layers
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]  # checkpoints load


def test_compiled_layers_with_inductor_code_match_eager_in_fp32():
    """The real compiler (inductor's generated CPU code) on one layer: fp32 loss and gradients within 1e-5."""
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1  # no worker pool to start on a 2-core machine
    cfg = tiny(**LLAMA, num_layers=1)
    eager, model = build(cfg).float(), build(cfg).float()
    compiled.compile_layers(model.layers, backend="inductor")
    (loss, grads), (expected_loss, expected_grads) = _loss_and_grads(model), _loss_and_grads(eager)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compile_layers_trains_like_eager_with_ulysses(corpus, monkeypatch):
    """--compile-layers through the trainer, ZeRO-1, SP 2: Ulysses' all-to-alls run inside the attention slot
    between a layer's graphs; the losses are eager's."""
    monkeypatch.setattr(compiled, "LAYER_BACKEND", "aot_eager")  # the forked ranks inherit it
    argv = flags(corpus, "--zero-stage", "1", "--sequence-parallel-size", "2", iters=4)
    np.testing.assert_allclose(train(2, argv + ["--compile-layers"]), train(2, argv), rtol=1e-6)


def test_compile_layers_refuses_zero_3():
    from megatron_sp.errors import ConfigError
    from megatron_sp.configure import configure
    with pytest.raises(ConfigError, match="--compile-layers does not work with ZeRO stage 3"):
        configure(["--mock-data", "--train-iters", "2", "--compile-layers", "--zero-stage", "3"], 1)
