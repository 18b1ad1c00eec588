"""Document masks for the Triton flash attention: per block, the range of the other side that it can see.

A packed sample holds several documents; attention stays inside each. The mask is given as per-token document
ids, q_docs [b, sq] and k_docs [b, sk] int32, each non-decreasing along the sequence (documents are contiguous
runs). Key j is visible to query i iff q_docs[i] == k_docs[j] (and j <= i when causal). Because the ids are
monotone, the keys a block of queries can see are one contiguous range, and so are the queries a block of keys
is seen by: the kernels loop over that range only, so a sample of short documents costs about the sum of the
squares of its document lengths, not the square of its length.

Each range is [lo, hi) cut in three (lo <= mid <= full <= hi), with full - mid a multiple of the kernel's step:
[lo, mid) and [full, hi) are stepped through with element-wise masks, [mid, full) is seen whole by every row of
the block, so the kernel runs its unmasked fast path there. The tables are int32 [b, n_blocks, 4], built on the
device with a few searchsorted calls (no host synchronisation).
"""
import torch


def _block_bounds(n: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First index [n_blocks] and one past the last index [n_blocks] of each block of `block` rows."""
    starts = torch.arange(0, n, block, device=device)
    return starts, (starts + block).clamp(max=n)


def _first_last(docs: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts, ends, document of each block's first row [b, n_blocks], of its last row [b, n_blocks])."""
    starts, ends = _block_bounds(docs.shape[1], block, docs.device)
    return starts, ends, docs[:, starts], docs[:, ends - 1]


def _align(lo, mid, bulk_end, hi, step: int) -> torch.Tensor:
    """Stack (lo, mid, full, hi) with mid, full moved onto lo's step grid: mid rounded up (clamped to hi),
    full = the last grid point <= bulk_end (at least mid)."""
    hi = torch.maximum(hi, lo)
    mid = torch.minimum(lo + (mid - lo + step - 1).div(step, rounding_mode="floor") * step, hi)
    full = mid + (bulk_end - mid).clamp(min=0).div(step, rounding_mode="floor") * step
    return torch.stack([lo, mid, full, hi], dim=-1).to(torch.int32).contiguous()


def query_block_ranges(q_docs: torch.Tensor, k_docs: torch.Tensor, block_m: int, block_n: int,
                       causal: bool) -> torch.Tensor:
    """For each block of block_m queries: the keys it sees, stepped by block_n. [b, cdiv(sq, block_m), 4] int32.
    The forward and dq kernels loop over keys; their masked head [lo, mid) is always empty (mid = lo)."""
    starts, ends, first, last = _first_last(q_docs, block_m)
    lo = torch.searchsorted(k_docs, first, side="left")  # first key of the block's first document
    hi = torch.searchsorted(k_docs, last, side="right")  # one past the last key of its last document
    # one document in the block: every key of [lo, hi) is of that document, so seen by every row
    bulk_end = torch.where(first == last, hi, lo)
    if causal:  # key j <= query i: the block sees keys < its end, and all its rows see keys <= its first row
        hi = torch.minimum(hi, ends)
        bulk_end = torch.minimum(bulk_end, starts + 1)
    return _align(lo, lo, bulk_end, hi, block_n)


def key_block_ranges(q_docs: torch.Tensor, k_docs: torch.Tensor, block_n: int, block_m: int,
                     causal: bool) -> torch.Tensor:
    """For each block of block_n keys: the queries that see it, stepped by block_m. [b, cdiv(sk, block_n), 4]
    int32, for the dk/dv kernel (which loops over queries)."""
    starts, ends, first, last = _first_last(k_docs, block_n)
    lo = torch.searchsorted(q_docs, first, side="left")  # first query of the block's first document
    hi = torch.searchsorted(q_docs, last, side="right")
    bulk_start, bulk_end = lo, torch.where(first == last, hi, lo)
    if causal:  # query i >= key j: queries from the block's first key see some of it, from its last key all
        lo = torch.maximum(lo, starts)
        bulk_start = torch.maximum(bulk_start, ends - 1)
    return _align(lo, bulk_start, bulk_end, hi, block_m)


def check_docs(q_docs, k_docs, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_docs, k_docs) as contiguous int32, None if both are None, or a ValueError for bad ids. Monotonicity is
    checked on CPU only: on a GPU it would cost a host synchronisation per call, so there the caller ensures it."""
    if q_docs is None and k_docs is None:
        return None
    if (q_docs is None) != (k_docs is None):
        raise ValueError("q_docs and k_docs go together: pass both (a document mask) or neither")
    for name, docs, x in (("q_docs", q_docs, q), ("k_docs", k_docs, k)):
        if docs.shape != x.shape[:2] or docs.dtype.is_floating_point or docs.dtype.is_complex:
            raise ValueError(f"{name} must be integer document ids [b, s] = {tuple(x.shape[:2])}; "
                             f"got {docs.dtype} {tuple(docs.shape)}")
        if docs.device != x.device:
            raise ValueError(f"{name} is on {docs.device}, the tensors on {x.device}")
        if docs.device.type == "cpu" and bool((docs[:, 1:] < docs[:, :-1]).any()):
            raise ValueError(f"{name} must be non-decreasing along the sequence (documents are contiguous runs)")
    return q_docs.to(torch.int32).contiguous(), k_docs.to(torch.int32).contiguous()
