"""Tiles of [rows, d] matrices for the FlashAttention kernels: the head dim as two power-of-two chunks, each tile a
pair (one per chunk), loaded and stored through pointers or TMA tensor descriptors, and the matmuls over d that
take such pairs. Shared by the forward (flash_attn_fwd) and backward (flash_attn_bwd) kernels.

The head dim runs as the two chunks of head_dim_chunks: lanes [0, D0) and, when HEAD_DIM is not a power of two,
[D0, HEAD_DIM). Every [rows, d] operand is a pair (chunk 0, chunk 1); without a second chunk, element 1 repeats
element 0 and is never read (each use of it sits under `if HEAD_DIM > D0`, decided at compile time)."""
import triton
import triton.language as tl


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(d0, d1): the head dim as two power-of-two chunks the kernels tile it with, d0 the largest power of two
    <= head_dim and d1 = head_dim - d0 (0 for a power of two). 80 = 64 + 16, 96 = 64 + 32, 192 = 128 + 64: every
    matmul over d runs once per chunk, so no lanes are padded and computed for nothing."""
    d0 = 1 << (head_dim.bit_length() - 1)
    d1 = head_dim - d0
    if d1 & (d1 - 1) or 0 < d1 < 16:  # tl.dot needs power-of-two sides of at least 16
        raise ValueError(f"head_dim {head_dim} is not a power of two or the sum of two of at least 16")
    return d0, d1


@triton.jit
def lane_offsets(rows, stride_s, stride_d, FIRST: tl.constexpr, WIDTH: tl.constexpr, TRANS: tl.constexpr):
    """Element offsets of a [rows, WIDTH] tile of head-dim lanes [FIRST, FIRST + WIDTH) ([WIDTH, rows] when TRANS)."""
    lanes = FIRST + tl.arange(0, WIDTH)
    if TRANS:
        offs = rows[None, :] * stride_s + lanes[:, None] * stride_d
    else:
        offs = rows[:, None] * stride_s + lanes[None, :] * stride_d
    return offs


@triton.jit
def chunk_offsets(rows, stride_s, stride_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr, TRANS: tl.constexpr):
    """lane_offsets of both chunks: the pointer path's addresses of a [rows, d] tile ([d, rows] when TRANS)."""
    offs0 = lane_offsets(rows, stride_s, stride_d, 0, D0, TRANS)
    if HEAD_DIM > D0:
        offs1 = lane_offsets(rows, stride_s, stride_d, D0, HEAD_DIM - D0, TRANS)
    else:
        offs1 = offs0
    return offs0, offs1


@triton.jit
def tile_sources(base, rows, stride_s, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, D0: tl.constexpr,
                 TMA: tl.constexpr):
    """Where load_rows reads [BLOCK_ROWS, chunk] tiles of the [rows, HEAD_DIM] matrix of one (batch, head) at `base`
    (row stride stride_s, d contiguous) from, per chunk. TMA: a tensor descriptor per chunk, which zero-fills rows
    >= rows, so it needs no per-element addresses or masks. Else the base pointer itself, for both chunks."""
    if TMA:
        src0 = tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_s, 1],
                                         block_shape=[BLOCK_ROWS, D0])
        if HEAD_DIM > D0:
            src1 = tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_s, 1],
                                             block_shape=[BLOCK_ROWS, HEAD_DIM - D0])
        else:
            src1 = src0
    else:
        src0 = base
        src1 = base
    return src0, src1


@triton.jit
def load_rows(src, row, offs, ok, HEAD_DIM: tl.constexpr, D0: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr, TRANS: tl.constexpr):
    """The tile of rows [row, row + BLOCK_ROWS) of a pair of tile_sources, as a pair of [rows, chunk] tiles
    ([chunk, rows] when TRANS).

    TMA: src holds descriptors, read at (row, first lane of the chunk). Else src holds the pointer to the tile's first
    row and offs (chunk_offsets) are its elements; when MASKED, `ok` (broadcast to offs) bounds the rows, and rows
    out of range read 0. Unmasked: the plain load of the fast path.
    """
    x0 = _load_chunk(src[0], row, 0, offs[0], ok, MASKED, TMA, TRANS)
    if HEAD_DIM > D0:
        x1 = _load_chunk(src[1], row, D0, offs[1], ok, MASKED, TMA, TRANS)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def _load_chunk(src, row, lane, offs, ok, MASKED: tl.constexpr, TMA: tl.constexpr, TRANS: tl.constexpr):
    if TMA:
        x = src.load([row, lane])
        if TRANS:
            x = tl.trans(x)
    elif MASKED:
        x = tl.load(src + offs, mask=ok, other=0.0)
    else:
        x = tl.load(src + offs)
    return x


@triton.jit
def advance(src, step, TMA: tl.constexpr):
    """The pointer path's tile_sources moved on by `step` elements; descriptors are addressed by row instead."""
    if not TMA:
        src = (src[0] + step, src[1] + step)
    return src


@triton.jit
def dot_over_d(a, b, HEAD_DIM: tl.constexpr, D0: tl.constexpr, PREC: tl.constexpr):
    """a [M, d] @ b [d, N] in fp32, each given as a pair of chunks: the product summed over both chunks."""
    acc = tl.dot(a[0], b[0], input_precision=PREC)
    if HEAD_DIM > D0:
        acc = tl.dot(a[1], b[1], acc, input_precision=PREC)
    return acc


@triton.jit
def dot_into_d(p, b, acc, HEAD_DIM: tl.constexpr, D0: tl.constexpr, PREC: tl.constexpr):
    """acc + p [M, N] @ b [N, d], with b and acc [M, d] (fp32) as pairs of chunks; p is cast to b's dtype once."""
    p = p.to(b[0].dtype)
    acc0 = tl.dot(p, b[0], acc[0], input_precision=PREC)
    if HEAD_DIM > D0:
        acc1 = tl.dot(p, b[1], acc[1], input_precision=PREC)
    else:
        acc1 = acc0
    return acc0, acc1


@triton.jit
def scale_chunks(x, factor, HEAD_DIM: tl.constexpr, D0: tl.constexpr):
    """Both chunks of x times factor (broadcast)."""
    if HEAD_DIM > D0:
        x = (x[0] * factor, x[1] * factor)
    else:
        x0 = x[0] * factor
        x = (x0, x0)
    return x


@triton.jit
def zero_chunks(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr):
    """An fp32 accumulator [ROWS, d] as a pair of chunks, zeroed."""
    x0 = tl.zeros([ROWS, D0], dtype=tl.float32)
    if HEAD_DIM > D0:
        x1 = tl.zeros([ROWS, HEAD_DIM - D0], dtype=tl.float32)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def store_rows(base, rows, stride_s, stride_d, x, ok, HEAD_DIM: tl.constexpr, D0: tl.constexpr):
    """Store x, a pair of chunks of [rows, d] (cast to base's dtype), at rows `rows` of the [s, d] matrix at base;
    ok [rows, 1] bounds the rows."""
    offs = chunk_offsets(rows, stride_s, stride_d, HEAD_DIM, D0, False)
    tl.store(base + offs[0], x[0].to(base.dtype.element_ty), mask=ok)
    if HEAD_DIM > D0:
        tl.store(base + offs[1], x[1].to(base.dtype.element_ty), mask=ok)


@triton.jit
def trans_chunks(x, HEAD_DIM: tl.constexpr, D0: tl.constexpr):
    """Each chunk of a pair transposed."""
    x0 = tl.trans(x[0])
    if HEAD_DIM > D0:
        x1 = tl.trans(x[1])
    else:
        x1 = x0
    return x0, x1
