"""Communication for sequence parallelism: async all-to-alls (Ulysses) and async ring p2p.

Groups are always passed in. Both are plain async transfers, not autograd ops: the attention
Functions that use them (UlyssesFn, RingAttentionFn) write their backward by hand and schedule
its communication themselves.
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


class RingShift:
    """One ring hop in flight: `send` leaves for the next rank while the previous rank's tensor arrives
    in `recv` (default: a new tensor of send's shape and dtype; a given buffer may differ in size, as
    long as it matches what the previous rank sends). Holds the send buffer until `wait()`, which returns
    the received tensor (the current stream waits for it on NCCL; gloo blocks the caller). Call wait()
    exactly once."""

    def __init__(self, ring: "Ring", send: torch.Tensor, recv: torch.Tensor | None = None):
        self.send, self.recv = send, torch.empty_like(send) if recv is None else recv
        ops = [dist.P2POp(dist.isend, send, ring.next, ring.group),
               dist.P2POp(dist.irecv, self.recv, ring.prev, ring.group)]
        self.handles = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for handle in self.handles:
            handle.wait()
        self.send = None
        return self.recv


class Ring:
    """Neighbours of this rank in a ring `group`: send to group rank + 1, receive from group rank - 1.

    `shift(t)` starts one hop (RingShift); compute on the current block, then `wait()` before using
    what arrived. Every rank of the ring must issue the same sequence of shifts (p2p ops match in order).
    """

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, send: torch.Tensor, recv: torch.Tensor | None = None) -> RingShift:
        """Start sending `send` (contiguous; left unmodified until waited) to the next rank, and
        receiving into `recv` (RingShift) from the previous one."""
        return RingShift(self, send, recv)
