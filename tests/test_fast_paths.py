"""The opt-in fast paths give what the default paths give: whole compiled layers (--compile-layers), the
fused gradient norm of the ZeRO-1/2 optimizer step (--fused-grad-norm)."""
import numpy as np
import pytest
import torch

from megatron_sp.kernels import compiled
from tests.distributed import run_ranks
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


def test_fused_pieces_trace_into_an_enclosing_compiled_graph():
    """On the GPU the norms, SwiGLU and rotary are Fused (each its own compiled function); inside a compiled
    layer they are traced as plain code into the layer's graph, not compiled again on their own."""
    from megatron_sp.model import fused
    piece = compiled.Fused(fused.swiglu, True, backend="aot_eager", devices=("cpu",))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    outer = torch.compile(lambda t: piece(t * 2) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(outer(x), fused.swiglu(x * 2) + 1, rtol=0, atol=0)
    assert piece._compiled is None


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


def _built(rank, world, argv):
    """This rank's training setup for argv (trainer.build), its torch seed set to the rank."""
    from megatron_sp.configure import configure
    from megatron_sp.training.trainer import build
    cfg, tokenizer = configure(argv, world)
    setup = build(cfg, tokenizer)
    torch.manual_seed(rank)
    return setup


def _backward(setup):
    """Forward and backward of a random micro batch of 2 samples."""
    b = setup.ctx.batch({"text": torch.randint(0, 64, (2, 33))})
    setup.engine.backward(setup.engine(b["tokens"], b["position_ids"], b["labels"]).sum())


def _norms_then_a_nan_step(rank, world, argv):
    """Both norms of one backward's gradients, then a step with a NaN in one gradient of rank 0 only, then a
    finite step -> (optimizer class, sync-free, norms, weights unchanged by the NaN step, lr schedule steps done,
    DeepSpeed's skip count, lr of the finite step)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from megatron_sp.training import fused_norm
    setup = _built(rank, world, argv)
    engine, opt = setup.engine, setup.engine.optimizer
    _backward(setup)
    fused = isinstance(opt, fused_norm.FusedNormZeroOptimizer)
    norms = [DeepSpeedZeroOptimizer.scaled_global_norm(opt).item(),
             fused_norm.FusedNormZeroOptimizer.scaled_global_norm(opt).item() if fused else None]
    before = [p.detach().clone() for p in engine.module.parameters()]
    if rank == 0:
        next(g for g in opt.averaged_gradients[0] if g.numel()).view(-1)[0] = float("nan")
    engine.step()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    _backward(setup)
    engine.step()  # learns of the skip before its update
    lr = opt.param_groups[0]["lr"]
    fused_norm.account_skipped_step(opt)
    return (type(opt).__name__, getattr(opt, "sync_free", False), norms, unchanged, setup.scheduler.steps_done,
            engine.skipped_steps, lr)


@pytest.mark.parametrize("world", [2, 1])
@pytest.mark.parametrize("precision", [[], ["--bf16"]])
def test_fused_grad_norm_equals_deepspeeds_and_still_skips_a_nan_step(corpus, precision, world):
    """ZeRO-1 on 2 ranks (each holds half the gradients): the fused norm is DeepSpeed's fp64 one within fp32
    rounding, and a NaN in one rank's gradient skips the step on both ranks, as DeepSpeed's scan did. With bf16
    the step is sync-free (AdamW's kernel skips the update): the lr schedule and the skip count still end as
    DeepSpeed's, and the step after the skipped one runs at the lr DeepSpeed gives it. The same on one rank,
    where the bf16 gradients skip DeepSpeed's reduction (reduce_gradients)."""
    argv = flags(corpus, "--zero-stage", "1", *precision, "--lr-warmup-iters", "4", iters=4)  # on by default
    expected = run_ranks(world, _norms_then_a_nan_step, argv + ["--no-fused-grad-norm"])[0]
    for name, sync_free, (deepspeed_norm, fused), unchanged, steps_done, skipped, lr in run_ranks(
            world, _norms_then_a_nan_step, argv):
        assert name == "FusedNormZeroOptimizer" and sync_free == (precision != [])
        assert fused == pytest.approx(deepspeed_norm, rel=1e-6) and fused > 0
        assert unchanged
        assert (steps_done, skipped, lr) == (1, 1, expected[6]) == expected[4:]


def test_fused_grad_norm_trains_like_deepspeeds(corpus):
    """Clipping active (--clip-grad 0.05 is below every step's norm): the losses of 6 steps stay within 1e-6."""
    argv = flags(corpus, "--zero-stage", "2", "--clip-grad", "0.05", iters=6)
    np.testing.assert_allclose(train(2, argv), train(2, argv + ["--no-fused-grad-norm"]), rtol=1e-6)


def _weights_after_one_step(rank, world, argv):
    setup = _built(rank, world, argv)
    engine = setup.engine
    start = [w.detach().numpy().copy() for w in engine.optimizer.single_partition_of_fp32_groups]  # arrays: a forked
    # rank's tensors would travel to the parent as shared memory, which dies with the rank
    _backward(setup)
    engine.step()
    return (type(engine.optimizer).__name__, getattr(engine.optimizer, "sync_free", False), start,
            [w.detach().numpy().copy() for w in engine.optimizer.single_partition_of_fp32_groups],
            [p.detach().float().numpy().copy() for p in engine.module.parameters()])


def test_sync_free_step_is_deepspeeds_step(corpus):
    """bf16, ZeRO-1 on 2 ranks, clipping active (--clip-grad 0.05), weight decay, full lr from the first step:
    the sync-free step (one adamw_step per group: bf16 gradients in, clipping factor divided as they are read)
    leaves DeepSpeed's fp32 master weights within a few fp32 roundings, and the bf16 weights the model computes
    with equal those masters rounded. One step: after it, a 1-ulp difference of a master weight can flip its bf16
    rounding and every later step amplifies that; tests/test_adamw_kernel.py follows the kernel over several
    steps against torch's AdamW."""
    argv = flags(corpus, "--zero-stage", "1", "--bf16", "--clip-grad", "0.05", "--lr-warmup-iters", "0", iters=4)
    got, expected = run_ranks(2, _weights_after_one_step, argv), run_ranks(
        2, _weights_after_one_step, argv + ["--no-fused-grad-norm"])
    for (name, sync_free, start, rank_got, bf16_got), (_, _, _, rank_expected, bf16_expected) in zip(got, expected):
        assert (name, sync_free) == ("FusedNormZeroOptimizer", True)
        for s, g, e in zip(start, rank_got, rank_expected):
            assert np.abs(g - s).max() > 1e-4  # the step moved the weights
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8)
        differing = sum(int((g != e).sum()) for g, e in zip(bf16_got, bf16_expected))
        assert differing <= 2  # only where the masters' last-bit difference straddles a bf16 rounding boundary


def test_a_deepspeed_without_a_part_the_sync_free_step_uses_gets_its_own_step(corpus, monkeypatch):
    """Should a DeepSpeed release lack something the sync-free step calls, install() leaves DeepSpeed's step in
    place (not sync-free) and training goes on, rather than failing at the first step."""
    from megatron_sp.training import fused_norm
    monkeypatch.setattr(fused_norm, "DEEPSPEED_PARTS", (*fused_norm.DEEPSPEED_PARTS, "a_method_of_another_release"))
    argv = flags(corpus, "--zero-stage", "1", "--bf16", "--lr-warmup-iters", "0", iters=4)
    name, sync_free, start, after, _ = run_ranks(1, _weights_after_one_step, argv)[0]
    assert (name, sync_free) == ("FusedNormZeroOptimizer", False)
    assert all(np.abs(a - s).max() > 1e-4 for s, a in zip(start, after))


def _three_steps_of_two_micro_batches(rank, world, argv):
    setup = _built(rank, world, argv)
    engine, opt = setup.engine, setup.engine.optimizer
    norms, kinds = [], set()
    for _ in range(3 * 2):
        _backward(setup)
        if engine.is_gradient_accumulation_boundary():
            norms.append(opt.scaled_global_norm().item())
            kinds |= {type(grads).__name__ for grads in opt.averaged_gradients.values()}
        engine.step()
    return (opt.one_rank, kinds, norms,
            [w.detach().cpu().numpy() for w in opt.single_partition_of_fp32_groups],
            [p.detach().float().cpu().numpy() for p in engine.module.parameters()])


def test_one_rank_copies_each_gradient_once_and_steps_as_deepspeed(corpus, monkeypatch):
    """One rank, bf16, two micro batches per step: the gradients go straight into one flat buffer (DeepSpeed's
    contiguous gradient partition is never made) and three steps leave the gradient norms, the fp32 masters and
    the bf16 weights bit for bit as DeepSpeed's reduction over one rank leaves them."""
    from megatron_sp.training import fused_norm
    argv = flags(corpus, "--zero-stage", "1", "--bf16", "--global-batch-size", "4", "--clip-grad", "0.05",
                 "--lr-warmup-iters", "0", iters=3)
    got = run_ranks(1, _three_steps_of_two_micro_batches, argv)[0]
    monkeypatch.setattr(fused_norm, "reduction_is_identity", lambda optimizer: False)
    expected = run_ranks(1, _three_steps_of_two_micro_batches, argv)[0]
    assert got[:2] == (True, {"FlatGradients"}) and expected[:2] == (False, {"list"})
    assert got[2] == expected[2] and len(got[2]) == 3
    for g, e in zip(got[3] + got[4], expected[3] + expected[4]):
        np.testing.assert_array_equal(g, e)


def test_one_rank_path_under_a_pipeline_trains_bit_for_bit_as_deepspeed(corpus, monkeypatch):
    """Two pipeline stages of one data-parallel rank each, bf16, tied embeddings (their gradients summed across
    the stages through p.grad, which the one-rank path has made a view of its flat buffer): four steps' losses
    equal those of DeepSpeed's reduction, bit for bit."""
    from megatron_sp.training import fused_norm
    argv = flags(corpus, "--zero-stage", "1", "--bf16", "--pipeline-model-parallel-size", "2",
                 "--global-batch-size", "4", "--lr-warmup-iters", "0", iters=4)
    got = train(2, argv)
    monkeypatch.setattr(fused_norm, "reduction_is_identity", lambda optimizer: False)
    assert got == train(2, argv)


def test_fused_grad_norm_leaves_other_optimizers_alone():
    from megatron_sp.training import fused_norm
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert not fused_norm.install(adamw) and type(adamw) is torch.optim.AdamW
