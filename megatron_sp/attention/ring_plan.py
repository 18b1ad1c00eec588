"""The ring's schedule: what each rank computes at each step, and which rows of each k/v block travel.

At step t rank r holds the k/v block of src = (r - t) mod P. `base_block` is the causal zigzag rule
(ring.py's docstring). With document ids each block is refined (`document_pieces`): a diagonal block
(step 0, the same tokens on both sides) keeps its causal mask and needs the document mask only when
several documents meet in it; a block between different tokens is cut to the rectangle of query rows and
key rows that share a document, and dropped when they share none. Under a causal layout the keys of
such a block all precede its queries, so they share at most one document and the rectangle is fully
visible: a plain kernel call without any mask, whatever the backend.

Every rank knows every rank's document ids, so every rank derives the same global table of which rows
of which block are used where (`RingPlan`). A block then carries, on each hop, only the rows still needed
further down the ring (none: an empty message), and its gradients travel from its first use on, over
the rows any rank used. Every rank still takes part in every exchange (possibly with 0 rows), so the
point-to-point calls match on every backend.
"""
import functools
from dataclasses import dataclass

import torch

ALL = slice(None)
NONE = slice(0, 0)


@dataclass(frozen=True)
class Piece:
    """One kernel call: q[batch, rows] against the held block's k/v[batch, cols]."""
    batch: slice
    rows: slice
    """query rows of this rank, [0, n)"""
    cols: slice
    """rows of the k/v block in its owner's numbering, [0, n)"""
    causal: bool
    masked: bool
    """several documents meet here: the kernel needs the document ids"""


def base_block(step: int, rank: int, world: int, n: int, causal: bool, zigzag: bool):
    """(q rows, k/v rows, causal mask) this rank computes at `step` without documents, or None to skip.
    Zigzag: rows [0, n/2) hold chunk rank, rows [n/2, n) chunk 2P-1-rank."""
    everything = slice(0, n)
    if not causal or step == 0:
        return everything, everything, causal
    src, half = (rank - step) % world, n // 2
    if zigzag:  # an earlier rank's first chunk precedes both of ours; only our second chunk follows a later rank's
        return (everything, slice(0, half), False) if src < rank else (slice(half, n), everything, False)
    return (everything, everything, False) if src < rank else None


def _visible_box(qd: torch.Tensor, kd: torch.Tensor):
    """Ids of one sample's query rows qd [nq] and key rows kd [nk], both non-decreasing -> (rows, cols,
    one_document) bounding every pair in the same document, or None when there is none."""
    r0, r1 = (int(torch.searchsorted(qd, kd[i], right=right)) for i, right in ((0, False), (-1, True)))
    c0, c1 = (int(torch.searchsorted(kd, qd[i], right=right)) for i, right in ((0, False), (-1, True)))
    if r0 >= r1 or c0 >= c1:
        return None
    one = qd[r0] == qd[r1 - 1] == kd[c0] == kd[c1 - 1]
    return slice(r0, r1), slice(c0, c1), bool(one)


def _shift(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)


def document_pieces(q_ids: torch.Tensor, k_ids: torch.Tensor, rows: slice, cols: slice, causal: bool):
    """The pieces of the block (rows, cols, causal) under document ids q_ids, k_ids [b, n] (host)."""
    qd, kd = q_ids[:, rows], k_ids[:, cols]
    if causal:  # a diagonal block: the same tokens on both sides, each row sees itself
        return (Piece(ALL, rows, cols, True, bool((qd[:, 0] != qd[:, -1]).any())),)
    boxes = [_visible_box(qd[i], kd[i]) for i in range(qd.shape[0])]
    if all(box is not None and box[:2] == boxes[0][:2] for box in boxes):  # one call for the whole batch
        box_rows, box_cols, _ = boxes[0]
        masked = not all(box[2] for box in boxes)
        return (Piece(ALL, _shift(box_rows, rows.start), _shift(box_cols, cols.start), False, masked),)
    return tuple(Piece(slice(i, i + 1), _shift(box[0], rows.start), _shift(box[1], cols.start), False, not box[2])
                 for i, box in enumerate(boxes) if box is not None)


def _union(a: slice, b: slice) -> slice:
    if a.stop <= a.start:
        return b
    if b.stop <= b.start:
        return a
    return slice(min(a.start, b.start), max(a.stop, b.stop))


def _bounds(pieces) -> slice:
    """The rows of a block that `pieces` read."""
    return functools.reduce(_union, (p.cols for p in pieces), NONE)


class RingPlan:
    """This rank's schedule in a ring of `world` ranks, each holding n query rows and n k/v rows; the
    forward and the backward share it. refine(q_rank, kv_rank, rows, cols, causal) -> tuple[Piece] turns
    a block into kernel calls (whole, or cut by documents); it is applied to every rank's blocks, giving
    the global table every rank derives alike."""

    def __init__(self, world: int, rank: int, n: int, causal: bool, zigzag: bool, refine):
        self.world, self.rank, self.n, self.causal, self._refine = world, rank, n, causal, refine

        def pieces_of(step, r):
            block = base_block(step, r, world, n, causal, zigzag)
            return () if block is None else refine(r, (r - step) % world, *block)
        self._pieces = [[pieces_of(t, r) for r in range(world)] for t in range(world)]
        # _used[src][t]: rows of block src used at step t (by rank src + t); NONE when unused
        self._used = [[_bounds(self._pieces[t][(src + t) % world]) for t in range(world)] for src in range(world)]

    def pieces(self, step: int) -> tuple:
        return self._pieces[step][self.rank]

    def local_split(self) -> tuple[tuple, tuple]:
        """Step 0's pieces for the backward, as (head, tail): the head runs while the first k/v hop
        travels, the tail while the last dk/dv hop travels home, so no transfer waits on an idle GPU.
        Rows split at h = n/2: causal [h:, :h] is full, [:h, :h] and [h:, h:] causal with equal offsets.
        One part when there is no ring (P = 1) or nothing to split."""
        h, r = self.n // 2, self.rank
        if self.world == 1 or h == 0:
            return self.pieces(0), ()
        top, bottom, everything = slice(0, h), slice(h, self.n), slice(0, self.n)
        if not self.causal:
            return self._refine(r, r, top, everything, False), self._refine(r, r, bottom, everything, False)
        return (self._refine(r, r, top, top, True) + self._refine(r, r, bottom, bottom, True),
                self._refine(r, r, bottom, top, False))

    def source(self, step: int) -> int:
        """Whose block this rank holds at `step`."""
        return (self.rank - step) % self.world

    def carried(self, src: int, step: int) -> slice:
        """Rows of block src that reach step `step` (the owner holds all of it at step 0)."""
        if step == 0:
            return slice(0, self.n)
        return functools.reduce(_union, self._used[src][step:], NONE)

    def held(self, step: int) -> slice:
        return self.carried(self.source(step), step)

    def grad_rows(self, src: int) -> slice:
        """Rows of block src whose gradients other ranks produce (they travel home over these)."""
        return functools.reduce(_union, self._used[src][1:], NONE)

    def first_use(self, src: int) -> int | None:
        """The first step > 0 at which some rank uses block src, None if none does."""
        return next((t for t in range(1, self.world) if _size(self._used[src][t])), None)

    def grads_after(self, src: int, step: int) -> bool:
        """Whether block src's gradients exist after `step` (then they go on to the next rank)."""
        first = self.first_use(src)
        return first is not None and first <= step


def _size(s: slice) -> int:
    return max(0, s.stop - s.start)


def _whole(q_rank, kv_rank, rows, cols, causal):
    return (Piece(ALL, rows, cols, causal, False),)


@functools.lru_cache(maxsize=64)
def plain_plan(world: int, rank: int, n: int, causal: bool, zigzag: bool) -> RingPlan:
    """The plan without documents: base_block alone, every block whole."""
    return RingPlan(world, rank, n, causal, zigzag, _whole)


def document_plan(world: int, rank: int, n: int, causal: bool, zigzag: bool, blocks: list) -> RingPlan:
    """The plan under document ids: blocks[i] = host ids [b, n] of rank i's tokens (its q rows and k/v)."""
    def refine(q_rank, kv_rank, rows, cols, causal):
        return document_pieces(blocks[q_rank], blocks[kv_rank], rows, cols, causal)
    return RingPlan(world, rank, n, causal, zigzag, refine)
