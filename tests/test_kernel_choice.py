"""`--attention-backend auto`: the faster of our Triton kernel and cuDNN from the measured table (pure lookups)."""
import pytest
import torch

import megatron_sp.attention.backends as backends
import megatron_sp.kernels.choice as choice
from megatron_sp.attention.local import AttentionConfig
from megatron_sp.kernels.choice import auto_candidates, measured_choice

BF16 = torch.bfloat16


def test_measured_table_lookup(monkeypatch):
    monkeypatch.setattr(choice, "MEASURED", {(192, "bfloat16", True): ((4096, "triton"), (65536, "cudnn"))})
    assert measured_choice(192, BF16, 1024, True) == "triton"  # below the first length: the first entry
    assert measured_choice(192, BF16, 16384, True) == "triton"
    assert measured_choice(192, BF16, 65536, True) == "cudnn"
    assert measured_choice(192, BF16, 65536, False) is None  # not measured
    assert measured_choice(192, torch.float16, 65536, True) is None
    # a measurement admits cuDNN where the static rule would not (d=192 > 128), on the cuDNN it was measured with
    monkeypatch.setattr(choice, "cudnn_version", lambda: choice.MEASURED_CUDNN)
    assert auto_candidates("cuda", BF16, 192, 131072, True) == ("cudnn", "triton", "sdpa_flash")
    assert auto_candidates("cuda", BF16, 192, 8192, True) == ("triton", "sdpa_flash")
    # an older cuDNN may not run d=192, and none at all does not: ours
    for older in (choice.MEASURED_CUDNN - 100, None):
        monkeypatch.setattr(choice, "cudnn_version", lambda: older)
        assert auto_candidates("cuda", BF16, 192, 131072, True) == ("triton", "sdpa_flash")


def test_checked_in_table_prefers_cudnn_at_d128_and_above(monkeypatch):
    monkeypatch.setattr(choice, "cudnn_version", lambda: choice.MEASURED_CUDNN)
    for causal in (True, False):
        for d in (128, 192, 256):
            assert auto_candidates("cuda", BF16, d, 16384, causal)[0] == "cudnn"
    for (d, dtype, causal), entries in choice.MEASURED.items():  # well-formed: ascending lengths, known kernels
        assert [length for length, _ in entries] == sorted(length for length, _ in entries)
        assert {kernel for _, kernel in entries} <= {"cudnn", "triton"}


@pytest.mark.parametrize("device, dtype, d, seq, want", [
    ("cpu", BF16, 128, 4096, ()),  # off CUDA auto is the torch reference
    ("cuda", torch.float64, 128, 4096, ()),
    ("cuda", BF16, None, None, ("cudnn", "sdpa_flash")),  # shape unknown: as before the table existed
    ("cuda", torch.float32, None, None, ()),
    ("cuda", torch.float32, 96, 4096, ("triton",)),  # cuDNN and SDPA flash take 16-bit only
    ("cuda", BF16, 96, 4096, ("cudnn", "triton", "sdpa_flash")),  # not measured, cuDNN runs it
    ("cuda", torch.float16, 256, 4096, ("triton", "sdpa_flash")),  # not measured, cuDNN may not run it
    ("cuda", torch.float16, 192, 4096, ("triton", "sdpa_flash")),
    ("cuda", BF16, 48, 4096, ("cudnn", "sdpa_flash")),  # our kernel does not take d=48
])
def test_auto_candidates(device, dtype, d, seq, want, monkeypatch):
    monkeypatch.setattr(choice, "cudnn_version", lambda: choice.MEASURED_CUDNN)
    assert auto_candidates(device, dtype, d, seq, True) == want


def test_auto_candidates_with_documents():
    """cuDNN has no document mask: SDPA's varlen FlashAttention-2, then ours; fp32 ours alone."""
    assert auto_candidates("cuda", BF16, 128, 4096, True, documents=True) == ("triton", "sdpa_flash")
    assert auto_candidates("cuda", BF16, None, None, True, documents=True) == ("sdpa_flash",)
    assert auto_candidates("cuda", torch.float32, 96, 4096, True, documents=True) == ("triton",)
    assert auto_candidates("cpu", BF16, 128, 4096, True, documents=True) == ()


def test_resolve_backend_takes_the_first_available(monkeypatch):
    monkeypatch.setattr(backends, "_unavailable_reason", lambda name, device: None)  # as on a GPU
    monkeypatch.setattr(choice, "cudnn_version", lambda: None)
    assert backends.resolve_backend("auto", "cuda", BF16, head_dim=256, seq_len=4096) == "triton"
    monkeypatch.setattr(choice, "cudnn_version", lambda: choice.MEASURED_CUDNN)
    assert backends.resolve_backend("auto", "cuda", BF16, head_dim=256, seq_len=4096) == "cudnn"
    assert backends.resolve_backend("auto", "cuda", BF16, head_dim=128, seq_len=4096) == "cudnn"
    assert backends.resolve_backend("auto", "cuda", torch.float32, head_dim=64, seq_len=4096) == "triton"
    monkeypatch.setattr(backends, "_unavailable_reason", lambda name, device: "no" if name == "cudnn" else None)
    assert backends.resolve_backend("auto", "cuda", BF16, head_dim=128, seq_len=4096) == "triton"
    assert backends.resolve_backend("auto", "cuda", BF16) == "sdpa_flash"
    assert backends.resolve_backend("auto", "cpu", BF16, head_dim=128, seq_len=4096) == "torch"


def test_attention_modules_resolve_with_their_shape(monkeypatch):
    """The model's attention passes each shard's head dim, length and mask to the choice, once per shape."""
    calls = []
    monkeypatch.setattr("megatron_sp.attention.local.resolve_backend",
                        lambda name, device, dtype, **shape: calls.append(shape) or "torch")
    attn = AttentionConfig(causal=True, backend="auto")
    for s in (32, 32, 64):
        assert attn.kernel_args(torch.zeros(1, s, 2, 96))[2] == "torch"
    shape = dict(documents=False, head_dim=96, causal=True)
    assert calls == [dict(shape, seq_len=32), dict(shape, seq_len=64)]


def _lengths_seen_by_auto(rank, world, strategy, ulysses_degree):
    """The sequence lengths `auto` is asked about when `strategy` attends a [1, 8, 4, 16] shard."""
    from megatron_sp.attention import build_inner_attention
    from megatron_sp.parallel.state import ParallelState
    import megatron_sp.attention.local as local
    seen = []

    def record(name, device, dtype, **shape):
        seen.append(shape["seq_len"])
        return "torch"
    local.resolve_backend = record  # this forked rank's own module
    state = ParallelState.build(sp_size=world, ulysses_degree=ulysses_degree)
    attn = build_inner_attention(strategy, state, backend="auto")
    q = torch.randn(1, 8, 4, 16)
    attn(q, q.clone(), q.clone())
    return seen


@pytest.mark.parametrize("strategy,ulysses_degree,length", [("ulysses", None, 16), ("hybrid", 2, 16),
                                                            ("ring", None, 8)])
def test_auto_picks_by_the_length_the_kernel_sees(strategy, ulysses_degree, length):
    """After Ulysses' all-to-all the kernel attends P shards (hybrid: its u shards); the ring's blocks are
    one shard each. `auto`'s measured table is by length, so it must be asked about that length."""
    from tests.distributed import run_ranks
    assert run_ranks(2, _lengths_seen_by_auto, strategy, ulysses_degree) == [[length], [length]]
