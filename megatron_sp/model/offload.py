"""Activation offload (--checkpoint-in-cpu): what a layer keeps for backward moves to host memory during
forward and comes back one layer ahead of backward.

A layer runs inside ``ActivationOffload.layer()``, a ``torch.autograd.graph.saved_tensors_hooks`` context:
every tensor autograd saves there is copied to a host buffer and its device memory is released. With full
recompute that is only the layer's checkpointed input (non-reentrant checkpoint saves its inputs through
the same hooks); with selective recompute it is what attention keeps and the MLP sublayer's input.
Parameters and the tensors every layer shares (rotary tables) stay where they are.

In backward, the first tensor a layer needs brings back all of that layer's tensors (if they are not on
their way already) and starts bringing back the layer before it, so each copy runs while the layer after
it computes. At the end of forward the last layer's tensors start back at once.

On CUDA the copies run on one side stream into pinned host buffers (pinned at their exact size and reused
from step to step); the compute stream waits on an event before it reads a copy. On CPU host and device
are one memory: the same bookkeeping makes plain copies, which is how the mechanics are tested.
"""
import contextlib
import weakref

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

PAGE = 4096


def _pinned_exact(nbytes: int) -> torch.Tensor:
    """A host byte buffer of exactly `nbytes`, page-locked. torch's pinned allocator rounds every request
    up to a power of two (a 6 GiB buffer would pin 8 GiB), so a plain buffer is registered instead."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    buf = raw[start:start + nbytes]
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister returned {err}")
    except (RuntimeError, AttributeError):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr()).atexit = False  # the process's end frees all
    return buf


class HostPool:
    """Host byte buffers by exact size, reused from step to step (a step offloads the same sizes each time).

    Every copy into or out of a buffer runs on the offload's one side stream, in issue order, so a buffer
    given back is handed out again without waiting: the next copy into it queues behind the last one out.
    `held` is every byte the pool owns (pinned on CUDA), `peak_in_use` the most in use at once."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: dict[int, list[torch.Tensor]] = {}  # nbytes -> buffers
        self.held = self.in_use = self.peak_in_use = 0

    def take(self, nbytes: int) -> torch.Tensor:
        spare = self.free.get(nbytes)
        if spare:
            buf = spare.pop()
        else:
            buf = _pinned_exact(nbytes) if self.pinned else torch.empty(nbytes, dtype=torch.uint8)
            self.held += nbytes
        self.in_use += nbytes
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault(buf.numel(), []).append(buf)
        self.in_use -= buf.numel()


class _Saved:
    """One saved tensor of a layer: its host copy until backward brings it back, then its device copy.
    Autograd holds this object in place of the tensor; dropping it returns an unused host buffer."""
    __slots__ = ("layer", "buffer", "host", "tensor", "__weakref__")

    def __init__(self, layer: "_Layer", buffer, host, tensor):
        self.layer, self.buffer, self.host, self.tensor = layer, buffer, host, tensor

    def __del__(self):
        if self.buffer is not None:  # never brought back (no backward ran)
            self.layer.offload.pool.give(self.buffer)


class _Reshaped:
    """A saved tensor that is a reshaped view of one saved before it in the same layer."""
    __slots__ = ("saved", "shape")

    def __init__(self, saved: _Saved, shape: torch.Size):
        self.saved, self.shape = saved, shape


class _Layer:
    """What one layer saved in one forward pass. `previous`: the layer run before it in the same pass,
    whose tensors backward needs next."""
    __slots__ = ("offload", "index", "on_device", "previous", "saved", "seen", "ready", "fetched", "used")

    def __init__(self, offload: "ActivationOffload", index: int, on_device: bool, previous):
        self.offload, self.index, self.on_device, self.previous = offload, index, on_device, previous
        self.saved: list = []  # weak references to this layer's _Saved on the host
        self.seen: dict = {}  # memory key (_pack) -> (tensor, _Saved) while the layer runs forward
        self.ready = None  # event: the device copies are written (CUDA)
        self.fetched = on_device
        self.used = False


class ActivationOffload:
    """Saved-tensor hooks that move chosen layers' saved tensors to host memory and back (see the module
    docstring). One instance lives with the model; its host buffers are reused from step to step.

        offload.begin_pass(shared=(cos, sin))
        for i, layer in enumerate(layers):
            with offload.layer(i):
                x = checkpoint(layer, x, ...)
        offload.end_pass()
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # "cuda" != "cuda:0" when _movable compares tensors' devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pool = HostPool(pinned=cuda)
        self.offloaded_bytes = 0  # bytes copied to the host in the last forward pass
        self._shared: set[int] = set()
        self._current: _Layer | None = None
        self._last: _Layer | None = None

    def begin_pass(self, shared=()) -> None:
        """A new forward pass; `shared` tensors (used by every layer) are never moved."""
        self._shared = {t.untyped_storage().data_ptr() for t in shared if t is not None}
        self._last, self.offloaded_bytes = None, 0

    def end_pass(self) -> None:
        """Forward is done: the last layer's tensors are the first backward needs; start them back now."""
        if self._last is not None:
            self._fetch(self._last)
        self._last = None

    @contextlib.contextmanager
    def layer(self, index: int, on_device: bool = False):
        """Run layer `index` inside this context. on_device: keep its tensors on the device (only their
        first use in backward is noted, to start bringing back the layer before it)."""
        self._current = _Layer(self, index, on_device, self._last)
        try:
            with saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._current.seen = {}
            self._last, self._current = self._current, None

    def _movable(self, t: torch.Tensor) -> bool:
        """Activations only: floating-point or bool (dropout masks) tensors, not integer indices such as
        document ids or sequence offsets (shared by every layer); not parameters or views of them (a linear
        saves weight.t()), not the shared tensors, not expanded views (their dense copy would be larger)."""
        return (t.device == self.device and t.numel() > 0 and (t.is_floating_point() or t.dtype == torch.bool)
                and not isinstance(t, nn.Parameter)
                and not isinstance(t._base, nn.Parameter)
                and t.untyped_storage().data_ptr() not in self._shared
                and not any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)))

    def _pack(self, t: torch.Tensor):
        layer = self._current
        if layer is None or not self._movable(t):
            return t
        # one copy per piece of memory: a contiguous tensor and its reshaped views share a key
        layout = (t.numel(),) if t.is_contiguous() else (tuple(t.shape), t.stride())
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, *layout)
        if key in layer.seen:
            first, saved = layer.seen[key]
            return saved if first.shape == t.shape else _Reshaped(saved, t.shape)
        saved = _Saved(layer, None, None, t) if layer.on_device else self._to_host(layer, t)
        layer.seen[key] = (t, saved)  # t stays alive while the layer runs, so no new tensor takes its key
        return saved

    def _to_host(self, layer: _Layer, t: torch.Tensor) -> _Saved:
        """Start copying t into a host buffer laid out as t is (dense), on the side stream on CUDA."""
        stride = torch.empty_like(t, device="meta").stride()  # t's own layout if dense, else contiguous
        nbytes = t.numel() * t.element_size()
        buffer = self.pool.take(nbytes)
        host = buffer.view(t.dtype).as_strided(t.shape, stride)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the device memory is reused only after the copy read it
        else:
            host.copy_(t)
        self.offloaded_bytes += nbytes
        saved = _Saved(layer, buffer, host, None)
        layer.saved.append(weakref.ref(saved))
        return saved

    def _fetch(self, layer: _Layer) -> None:
        """Start copying a layer's host tensors back to the device; their host buffers go back to the pool."""
        if layer.fetched:
            return
        layer.fetched = True
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        moving = [s for s in (ref() for ref in layer.saved) if s is not None]
        for s in moving:  # allocated on the compute stream, which the side stream waited for above
            s.tensor = torch.empty_strided(s.host.shape, s.host.stride(), dtype=s.host.dtype, device=self.device)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for s in moving:
                s.tensor.copy_(s.host, non_blocking=self.stream is not None)
        layer.ready = self.stream.record_event() if self.stream is not None else None
        for s in moving:
            self.pool.give(s.buffer)
            s.buffer = s.host = None
        layer.saved = []

    def _unpack(self, saved):
        if isinstance(saved, _Reshaped):
            return self._unpack(saved.saved).view(saved.shape)
        if not isinstance(saved, _Saved):
            return saved
        layer = saved.layer
        if not layer.used:  # this layer's backward begins: bring back the one before it meanwhile
            layer.used = True
            self._fetch(layer)
            if layer.previous is not None:
                self._fetch(layer.previous)
        if layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
        return saved.tensor
