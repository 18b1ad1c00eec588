"""Activation offload (--checkpoint-in-cpu) and the tiled MLP on CPU: the saved tensors really leave and come
back one layer ahead, host buffers are reused, and gradients and training losses equal the plain run's
(to the bit where the order of operations is the same; the tiled MLP's weight gradients are summed tile by
tile, rtol 1e-6) at SP 1, 2 and 4 under ZeRO 1 and 3, also across a resume."""
import gc
import weakref

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megatron_sp.attention import LocalAttention
from megatron_sp.configure import configure
from megatron_sp.kernels.compiled import compile_layers
from megatron_sp.model.gpt import GPTModel
from megatron_sp.model.offload import ActivationOffload
from tests.runs import flags, train


def _toy_layers(n=3, width=8):
    torch.manual_seed(0)
    return [torch.nn.Linear(width, width) for _ in range(n)]


def _run(layers, x, offload=None, keep=0, probe=None):
    """Each layer: tanh(linear(x)) * x, checkpointed, optionally inside the offload hooks; probe gets the
    checkpoint input of the first layer (to watch whether anything still holds it)."""
    if offload is not None:
        offload.begin_pass()
    for i, lin in enumerate(layers):
        x = x * 1.0  # a fresh tensor per layer: the checkpoint input nothing else keeps
        if probe is not None and i == 0:
            probe.append(weakref.ref(x))
        fn = lambda t, lin=lin: torch.tanh(lin(t)) * t  # noqa: E731
        if offload is None:
            x = checkpoint(fn, x, use_reentrant=False)
        else:
            with offload.layer(i, on_device=i >= len(layers) - keep):
                x = checkpoint(fn, x, use_reentrant=False)
    if offload is not None:
        offload.end_pass()
    return x.square().sum()


def _grads(layers):
    return [p.grad.clone() for lin in layers for p in lin.parameters()]


def test_saved_tensors_leave_the_device_and_come_back_exactly():
    layers, x = _toy_layers(), torch.randn(4, 8, requires_grad=True)
    kept, moved = [], []
    loss = _run(layers, x, probe=kept)
    gc.collect()
    assert kept[0]() is not None  # plain checkpointing holds the first layer's input until backward
    loss.backward()
    reference = _grads(layers) + [x.grad.clone()]
    for lin in layers:
        lin.zero_grad()
    x.grad = None
    offload = ActivationOffload(torch.device("cpu"))
    loss = _run(layers, x, offload, probe=moved)
    gc.collect()
    assert moved[0]() is None  # offloaded: only the host copy is left
    assert offload.offloaded_bytes == 3 * 4 * 8 * 4  # three [4, 8] fp32 inputs went to the host ...
    assert offload.pool.in_use == 2 * 4 * 8 * 4  # ... and the last one started back at the end of forward
    loss.backward()
    assert offload.pool.in_use == 0
    for got, want in zip(_grads(layers) + [x.grad], reference):
        assert torch.equal(got, want)


class _Spy(ActivationOffload):
    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.fetched = []

    def _fetch(self, layer):
        if not layer.fetched:
            self.fetched.append(layer.index)
        super()._fetch(layer)


@pytest.mark.parametrize("keep, expected", [(0, [3, 2, 1, 0]), (2, [1, 0]), (4, [])])
def test_backward_brings_back_one_layer_ahead(keep, expected):
    """keep=0: the last layer starts back at the end of forward; the first use of each layer in backward
    starts the one before it. Kept layers are never copied, but still start their predecessor."""
    layers, x = _toy_layers(4), torch.randn(4, 8, requires_grad=True)
    offload = _Spy()
    loss = _run(layers, x, offload, keep=keep)
    assert offload.fetched == ([3] if keep == 0 else [])
    loss.backward()
    assert offload.fetched == expected
    assert offload.offloaded_bytes == (4 - keep) * 4 * 8 * 4


def test_host_buffers_are_reused_from_step_to_step_and_returned_without_backward():
    layers, x = _toy_layers(), torch.randn(4, 8, requires_grad=True)
    offload = ActivationOffload(torch.device("cpu"))
    for _ in range(3):
        _run(layers, x, offload).backward()
    assert offload.pool.held == offload.pool.peak_in_use == 3 * 4 * 8 * 4 and offload.pool.in_use == 0
    loss = _run(layers, x, offload)  # a graph dropped without backward gives its buffers back
    del loss
    gc.collect()
    assert offload.pool.in_use == 0 and offload.pool.held == 3 * 4 * 8 * 4


def _page_locked(buf: torch.Tensor) -> bool:
    """Pinned by torch's allocator, or registered with CUDA (registering it again is refused as already done:
    torch's is_pinned does not see memory registered with cudaHostRegister)."""
    if buf.is_pinned():
        return True
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    already_registered = 712  # cudaErrorHostMemoryAlreadyRegistered
    return int(getattr(err, "value", err)) == already_registered


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: streams, events and pinned host buffers")
def test_on_a_gpu_copies_run_on_a_side_stream_into_pinned_buffers():
    layers = [lin.cuda() for lin in _toy_layers(4, width=256)]
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    _run(layers, x).backward()
    reference = _grads(layers) + [x.grad.clone()]
    for lin in layers:
        lin.zero_grad()
    x.grad = None
    offload = ActivationOffload(torch.device("cuda"))
    for _ in range(2):  # the second step reuses the first one's pinned buffers
        _run(layers, x, offload, keep=1).backward()
        got = _grads(layers) + [x.grad.clone()]
        for lin in layers:
            lin.zero_grad()
        x.grad = None
        assert all(torch.equal(a, b) for a, b in zip(got, reference))
    buffers = [buf for spare in offload.pool.free.values() for buf in spare]
    assert len(buffers) == 3 and all(_page_locked(buf) for buf in buffers)
    assert offload.pool.held == 3 * 4096 * 256 * 4 and offload.pool.in_use == 0


TINY = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
        "--seq-length", "64", "--swiglu", "--normalization", "rmsnorm", "--use-rotary-position-embeddings",
        "--disable-bias-linear", "--hidden-dropout", "0", "--mock-data", "--train-iters", "1",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--attention-backend", "torch"]


def compile_on_cpu(model):
    """Run the model's fused elementwise ops compiled, as on a GPU (aot_eager: traced, no code generation)."""
    from megatron_sp.kernels.compiled import Fused
    for module in model.modules():
        for fused in (v for v in vars(module).values() if isinstance(v, Fused)):
            fused.devices, fused.backend = ("cpu",), "aot_eager"


def _model_steps(*extra, steps=2, compiled=False, layers_backend=None):
    """(loss, {name: grad}) of `steps` forward/backward passes of a tiny fp32 model on fixed tokens;
    layers_backend: each layer compiled whole with it (--compile-layers)."""
    cfg, _ = configure([*TINY, *extra], 1)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, LocalAttention, cfg.padded_vocab_size)
    if compiled:
        compile_on_cpu(model)
    if layers_backend:
        compile_layers(model.layers, backend=layers_backend)
    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 100, (2, 64), generator=gen) for _ in range(2))
    positions = torch.arange(64).expand(2, 64)
    out = []
    for _ in range(steps):
        loss = model(tokens, positions, labels).sum()
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    return out, model


@pytest.mark.parametrize("mode", [["--checkpoint-activations"], ["--recompute-granularity", "selective"]])
@pytest.mark.parametrize("keep", ["0", "1"])
def test_model_gradients_with_checkpoints_on_the_host_are_bit_exact(mode, keep):
    plain, _ = _model_steps()
    offloaded, model = _model_steps(*mode, "--checkpoint-in-cpu", "--checkpoint-in-cpu-keep-layers", keep)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, offloaded):
        assert loss_a == loss_b
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    offload = model.run_layers.offload
    assert offload.pool.in_use == 0 and offload.pool.held == offload.offloaded_bytes > 0
    if mode == ["--checkpoint-activations"]:  # the inputs of the layers not kept: [2, 64, 32] fp32 each
        assert offload.offloaded_bytes == (3 - int(keep)) * 2 * 64 * 32 * 4


def test_compiled_elementwise_ops_under_the_hooks_are_bit_exact():
    """On a GPU the norms, SwiGLU and rotary run compiled (their saved tensors reach the hooks through
    torch.compile's autograd Function): compiled here too, selective recompute with and without host
    checkpoints."""
    plain, _ = _model_steps("--recompute-granularity", "selective", compiled=True)
    offloaded, _ = _model_steps("--recompute-granularity", "selective", "--checkpoint-in-cpu", compiled=True)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, offloaded):
        assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("mode", [["--checkpoint-activations"], ["--recompute-granularity", "selective"]])
def test_compiled_layers_under_the_hooks_are_bit_exact(mode):
    """--compile-layers: what each compiled layer's graphs save reaches the hooks through AOTAutograd's
    autograd Function and comes back unchanged; with full recompute that is still only the layer inputs."""
    plain, _ = _model_steps(*mode, layers_backend="aot_eager")
    offloaded, model = _model_steps(*mode, "--checkpoint-in-cpu", layers_backend="aot_eager")
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, offloaded):
        assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    offload = model.run_layers.offload
    assert offload.pool.in_use == 0 and offload.offloaded_bytes > 0
    if mode == ["--checkpoint-activations"]:
        assert offload.offloaded_bytes == 3 * 2 * 64 * 32 * 4


def test_tiled_mlp_equals_the_whole_mlp():
    plain, _ = _model_steps()
    tiled, _ = _model_steps("--mlp-tile-tokens", "48")  # 128 tokens: tiles of 48, 48, 32
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, tiled):
        assert loss_b == pytest.approx(loss_a, rel=1e-6)
        for n in grads_a:
            torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6 * grads_a[n].abs().max().item())
    # tiles inside checkpointed layers whose inputs live on the host: the same order of operations
    stacked, _ = _model_steps("--mlp-tile-tokens", "48", "--checkpoint-activations", "--checkpoint-in-cpu")
    for (loss_a, grads_a), (loss_b, grads_b) in zip(tiled, stacked):
        assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("zero", ["1", "3"])
@pytest.mark.parametrize("sp", [1, 2, 4])
def test_training_losses_equal_the_plain_run(corpus, sp, zero):
    common = flags(corpus, "--sequence-parallel-size", str(sp), "--zero-stage", zero, "--global-batch-size", "4",
                   iters=4)
    plain = train(sp, common)
    offloaded = train(sp, [*common, "--checkpoint-activations", "--checkpoint-in-cpu"])
    assert offloaded == plain
    lean = train(sp, [*common, "--recompute-granularity", "selective", "--checkpoint-in-cpu",
                      "--checkpoint-in-cpu-keep-layers", "1", "--mlp-tile-tokens", "24"])
    np.testing.assert_allclose(lean, plain, rtol=1e-6)


@pytest.mark.parametrize("ranks, parallel", [
    (2, ["--sequence-parallel-strategy", "ring", "--zero-stage", "2"]),
    (4, ["--sequence-parallel-strategy", "hybrid", "--ulysses-degree", "2", "--zero-stage", "0", "--bf16"]),
    (2, ["--reset-attention-mask", "--reset-position-ids", "--zero-stage", "1"])])
def test_host_checkpoints_with_ring_hybrid_zero_0_2_bf16_and_documents_are_bit_exact(corpus, ranks, parallel):
    common = flags(corpus, "--sequence-parallel-size", str(ranks), *parallel, "--global-batch-size", "4", iters=3)
    plain = train(ranks, [*common, "--recompute-granularity", "selective"])
    assert train(ranks, [*common, "--recompute-granularity", "selective", "--checkpoint-in-cpu"]) == plain


def test_resume_with_checkpoints_on_the_host_is_exact(corpus, tmp_path):
    common = flags(corpus, "--sequence-parallel-size", "2", "--zero-stage", "1", "--global-batch-size", "4",
                   "--checkpoint-activations", "--checkpoint-in-cpu", "--mlp-tile-tokens", "16", iters=6)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    first = train(2, [*common, "--save", ckpt, "--exit-interval", "3"])
    second = train(2, [*common, "--save", ckpt, "--load", ckpt])
    assert first + second == uninterrupted
