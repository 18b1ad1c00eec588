"""Communication for sequence parallelism: autograd-aware all-to-alls (Ulysses) and async ring p2p.

Groups are always passed in. The all-to-all Functions are differentiable (forward op, backward
op, one docstring each); the ring helpers are plain async transfers for the hand-written
ring-attention autograd Function, which schedules its own backward communication; AsyncAllToAll
is the same kind of plain async transfer for Ulysses' UlyssesFn.
"""
import torch
import torch.distributed as dist


def send_layout(x: torch.Tensor, world: int, scatter_dim: int) -> torch.Tensor:
    """[.., n, ..] -> [P, .., n/P, ..], the chunk for rank j at index j: a view, whose .contiguous()
    is an all-to-all send buffer (P contiguous chunks). A one-line ValueError if P does not divide n."""
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all-to-all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not "
                         f"divisible by the group size {world}")
    return x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0)


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into P chunks along scatter_dim, send chunk j to rank j, and concatenate what
    arrives, in rank order, along gather_dim: size[scatter] / P, size[gather] * P."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    send = send_layout(x, world, scatter_dim).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is source rank j's piece; put the source index just before gather_dim and merge them
    out_shape = list(recv.shape[1:])
    out_shape[gather_dim] *= world
    return recv.movedim(0, gather_dim).reshape(out_shape)


class AllToAll(torch.autograd.Function):
    """Forward: scatter `scatter_dim` over the group and gather `gather_dim` (see _all_to_all).
    Backward: the inverse all-to-all on the gradient (scatter gather_dim, gather scatter_dim)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s/P, h, d] -> [b, s, h/P, d]: scatter heads, gather the sequence. Backward: head_to_seq."""
    return AllToAll.apply(x, group, 2, 1)


def head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h/P, d] -> [b, s/P, h, d]: scatter the sequence, gather heads. Backward: seq_to_head."""
    return AllToAll.apply(x, group, 1, 2)


def qkv_seq_to_head(q, k, v, group):
    """seq_to_head for q, k, v in as few all-to-alls as the shapes allow: one when q, k, v match
    (stacked as [b, s/P, 3, h, d], heads scattered so each rank gets the same heads of all three),
    else two (q alone, k and v stacked). Backward: the matching inverse all-to-alls."""
    if dist.get_world_size(group) == 1:
        return q, k, v
    if q.shape == k.shape:
        return AllToAll.apply(torch.stack([q, k, v], dim=2), group, 3, 1).unbind(2)
    kv = AllToAll.apply(torch.stack([k, v], dim=2), group, 3, 1)
    return (seq_to_head(q, group), *kv.unbind(2))


class AsyncAllToAll:
    """all_to_all_single in two halves, so compute can run while the data moves (UlyssesFn). Takes a
    packed send buffer [P, ...] (send_layout(...).contiguous(): chunk j goes to rank j) and starts the
    transfer with async_op=True; wait() returns the receive buffer [P, ...], chunk j from rank j.
    Not differentiable: for hand-written backwards.

    Stream and lifetime rules: on NCCL the transfer runs on the group's internal stream, which
    waits for the current stream at the constructor (so the send buffer may be produced just before),
    and `wait()` makes the current stream wait for the transfer (so the result may be used just after).
    This object holds the send buffer until `wait()`: call it exactly once, on every rank, in the same
    order as the other collectives of the group. On gloo the transfer runs on a background thread and
    `wait()` blocks the caller.
    """

    def __init__(self, send: torch.Tensor, group):
        self.send, self.recv = send, torch.empty_like(send)
        self.work = dist.all_to_all_single(self.recv, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        self.send = None  # transfer done; the send buffer may be freed (the stream already waits for it)
        return self.recv


class Ring:
    """Neighbours of this rank in a ring `group`: send to group rank + 1, receive from group rank - 1.

    `send_recv` starts both transfers at once (dist.batch_isend_irecv) and returns the receive
    buffer with the handles; compute on the current block, then `wait` before touching the buffer.
    Every rank of the ring must issue the same sequence of send_recv calls (p2p ops match in order).
    """

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor | None = None):
        """Start sending `send` (contiguous, must stay unmodified until waited) to the next rank and
        receiving the previous rank's tensor of the same shape into `recv` (new if None)."""
        recv = torch.empty_like(send) if recv is None else recv
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(handles) -> None:
        for handle in handles:
            handle.wait()
