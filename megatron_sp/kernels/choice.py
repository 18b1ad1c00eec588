"""`--attention-backend auto` on a GPU: whichever of our Triton kernel and cuDNN is faster for the shape, from a
small measured table; where cuDNN cannot run the shape, ours. Pure lookups (no GPU, no Triton needed)."""
import torch

# Faster kernel, forward + backward, on one H200 (b=1, 16 heads, bf16; measured 2026-12-03 with the kernel's
# current tilings, docs/kernels.md; where the two are within a few per cent the winner can change between runs).
# Key: (head_dim, dtype, causal); value: ((from_length, kernel), ...) in ascending from_length; the last entry
# whose from_length <= the length applies, and lengths below the first entry take the first. Printed by
#   python tools/bench_flash_attn.py --auto-table --head-dims 64,96,128 --seqlens 4096,16384,65536 \
#       --warmup 2 --reps 5
# and for d = 32, 80, 192 and 256 (their tilings swept later; cuDNN 1.35-1.67x ours at 192 and 256) the same with
# --head-dims 32,80 and --head-dims 192,256, --warmup 1 --reps 3.
MEASURED = {
    (32, "bfloat16", False): ((4096, "cudnn"), (16384, "triton")),
    (32, "bfloat16", True): ((4096, "triton"),),
    (64, "bfloat16", False): ((4096, "triton"), (16384, "cudnn")),
    (64, "bfloat16", True): ((4096, "triton"), (16384, "cudnn")),
    (80, "bfloat16", False): ((4096, "triton"), (16384, "cudnn")),
    (80, "bfloat16", True): ((4096, "cudnn"),),
    (96, "bfloat16", False): ((4096, "cudnn"),),
    (96, "bfloat16", True): ((4096, "cudnn"),),
    (128, "bfloat16", False): ((4096, "cudnn"),),
    (128, "bfloat16", True): ((4096, "cudnn"),),
    (192, "bfloat16", False): ((4096, "cudnn"),),
    (192, "bfloat16", True): ((4096, "cudnn"),),
    (256, "bfloat16", False): ((4096, "cudnn"),),
    (256, "bfloat16", True): ((4096, "cudnn"),),
}
# The cuDNN release MEASURED was taken with (torch 2.11's 9.19). A head dim above 128 counts as cuDNN's only with
# that release or a newer one: older cuDNN 9 releases may not run it, and choosing a backend does not probe.
MEASURED_CUDNN = 91900

HALF = (torch.bfloat16, torch.float16)


def cudnn_runs(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether cuDNN's fused attention surely runs the shape: 16-bit, d % 8 == 0 and d <= 128 (every cuDNN 9
    PyTorch ships with; larger head dims need newer releases, so there only a measurement in MEASURED counts, and
    only on a cuDNN at least as new as MEASURED_CUDNN)."""
    return dtype in HALF and head_dim % 8 == 0 and head_dim <= 128


def cudnn_version() -> int | None:
    """The cuDNN release this torch runs (e.g. 91900), None without cuDNN."""
    return torch.backends.cudnn.version()


def measured_choice(head_dim: int, dtype: torch.dtype, seq_len: int, causal: bool) -> str | None:
    """The kernel MEASURED names for this shape, None if it has no entry."""
    entries = MEASURED.get((head_dim, str(dtype).removeprefix("torch."), bool(causal)))
    if not entries:
        return None
    chosen = entries[0][1]
    for from_length, kernel in entries:
        if seq_len >= from_length:
            chosen = kernel
    return chosen


def triton_runs(head_dim: int) -> bool:
    """Whether our kernel takes this head dim (importing it needs Triton; without Triton it does not run)."""
    try:
        from megatron_sp.kernels.flash_attn import HEAD_DIMS
    except ImportError:
        return False
    return head_dim in HEAD_DIMS


def auto_candidates(device_type: str, dtype: torch.dtype, head_dim: int | None = None, seq_len: int | None = None,
                    causal: bool = True, documents: bool = False) -> tuple[str, ...]:
    """Backends for `auto`, best first; the caller takes the first one available (then torch). None off CUDA.

    Shape unknown (head_dim or seq_len None): cudnn, sdpa_flash for 16-bit (sdpa_flash alone with documents).
    Known, 16-bit: the measured faster of cudnn and triton; without a measurement cuDNN where it surely runs,
    else ours; SDPA's FlashAttention-2 last. With document masks (cuDNN has none): ours, then sdpa_flash's
    varlen entry (ours measured 1.25x faster at 128k tokens in 4k documents, d=128, docs/benchmarks.md).
    fp32: ours (exact fp32, no s x s scores in memory). Other dtypes: none."""
    if device_type != "cuda" or dtype not in (*HALF, torch.float32):
        return ()
    if head_dim is None or seq_len is None:
        if dtype not in HALF:
            return ()
        return ("sdpa_flash",) if documents else ("cudnn", "sdpa_flash")
    if dtype == torch.float32:
        order = ("triton",)
    elif documents:
        order = ("triton", "sdpa_flash")
    else:
        measured = measured_choice(head_dim, dtype, seq_len, causal)
        if measured == "cudnn" and not cudnn_runs(head_dim, dtype) and (cudnn_version() or 0) < MEASURED_CUDNN:
            measured = None  # cuDNN won on a newer release than this one, which may not run the shape
        cudnn_ok = cudnn_runs(head_dim, dtype) or measured == "cudnn"
        first = measured or ("cudnn" if cudnn_ok else "triton")
        order = tuple(kernel for kernel in (first, "triton" if first == "cudnn" else "cudnn", "sdpa_flash")
                      if kernel != "cudnn" or cudnn_ok)
    return tuple(kernel for kernel in order if kernel != "triton" or triton_runs(head_dim))
