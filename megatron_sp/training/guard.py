"""--check-for-nan-in-loss-and-grad: iterations whose loss or gradient norm is not finite are said with their
number, counted in the log line, never saved, and stop the run after --max-nonfinite-iterations in a row.

Cost on the hot path: no host sync of its own. Each step's two flags (loss, grad norm not finite) are computed on
the device and copied to pinned host memory without waiting; they are read one step later (poll), once the host
has queued the next step, so the device does not idle for the check. A run therefore stops at most one iteration
after the limit. Before a save, a log line or the end, every flag is read (settle): those sync anyway.
DeepSpeed skips the update of a step whose gradient norm is not finite in every mode but fp32 without ZeRO, where
the weights then become nan and every later step is non-finite too, so the run stops either way.
"""
from collections import deque
import math

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device, loss_only: bool, say):
        self.limit, self.device, self.loss_only, self.say = limit, device, loss_only, say
        self.pending: deque = deque()  # (iteration, host flags [2] bool, CUDA event or None)
        self.in_a_row, self.in_window, self.first_bad = 0, 0, None

    def add(self, iteration: int, loss: torch.Tensor, grad_norm) -> None:
        """Queue the flags of `iteration`: loss a device scalar; grad_norm a device scalar, a float or None."""
        # DeepSpeed reports a nan/inf norm as inf, or as its sentinel -1
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.to(self.device)
            grad_bad = ~torch.isfinite(grad_norm) | (grad_norm < 0)
        else:  # None or a float on the host; made on the device, not copied there (no host sync)
            bad = grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0)
            grad_bad = (torch.ones if bad else torch.zeros)((), dtype=torch.bool, device=self.device)
        self.pending.append((iteration, *copy_to_host_later(torch.stack([~torch.isfinite(loss), grad_bad]))))

    def poll(self) -> str | None:
        """Read the flags of every step but the newest -> the reason to stop, or None."""
        return self._read(keep=1)

    def settle(self) -> str | None:
        """Read every flag (waits for the last step) -> the reason to stop, or None."""
        return self._read(keep=0)

    @property
    def last_was_bad(self) -> bool:
        """Whether the newest settled iteration was non-finite (its state must not be saved)."""
        return self.in_a_row > 0

    def window_count(self) -> int:
        """Non-finite iterations since the last call (for the log line)."""
        count, self.in_window = self.in_window, 0
        return count

    def _read(self, keep: int) -> str | None:
        while len(self.pending) > keep:
            iteration, host, event = self.pending.popleft()
            loss_bad, grad_bad = read_host_copy(host, event).tolist()
            grad_bad = grad_bad and not self.loss_only
            if not (loss_bad or grad_bad):
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.in_window += 1
            self.first_bad = iteration if self.in_a_row == 1 else self.first_bad
            what = {(True, False): "the loss is", (False, True): "the gradient norm is"}.get(
                (loss_bad, grad_bad), "the loss and the gradient norm are")
            self.say(f"warning: iteration {iteration}: {what} not finite ({self.in_a_row} such iteration"
                     f"{'s' if self.in_a_row > 1 else ''} in a row; the run stops at {self.limit})")
            if self.in_a_row >= self.limit:
                return (f"iterations {self.first_bad}-{iteration}: the loss or gradient norm was not finite "
                        f"{self.in_a_row} times in a row (--max-nonfinite-iterations {self.limit})")
        return None


def copy_to_host_later(t: torch.Tensor) -> tuple:
    """(host copy, CUDA event or None): a CUDA tensor is copied to pinned host memory without waiting; the copy
    is readable once the event is done (read_host_copy). Any other tensor is its own host copy."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def read_host_copy(host: torch.Tensor, event) -> torch.Tensor:
    """The host copy of copy_to_host_later, waiting for its event if it is not done yet."""
    if event is not None:
        event.synchronize()
    return host


def weights_are_finite(engine) -> bool:
    """Whether every weight is finite on every rank (under ZeRO-3 each rank checks its shard): one pass over the
    weights and one all-reduce, before each save, so that no checkpoint ever holds a nan."""
    shards = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    finite = torch.stack([torch.isfinite(w).all() for w in shards]).all().to(torch.int32)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
