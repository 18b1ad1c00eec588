"""torch.compile for the memory-bound glue between big kernels (norms, SwiGLU, rotary, all-to-all packing)."""
from typing import Callable

import torch


def _device_type(args) -> str | None:
    """Device type of the first tensor in args (looking inside lists and tuples), None if there is none."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and (found := _device_type(a)) is not None:
            return found
    return None


class Fused:
    """Calls ``fn`` eagerly, or its torch.compile'd form when its first tensor argument is on a GPU.

    Compiled lazily (first GPU call). The first shapes get a static-shape kernel (training shapes do not
    change); a dimension seen with a second size is recompiled once as dynamic (torch.compile's automatic
    dynamic shapes), so a process that runs many lengths (evaluation, benchmarks) never exhausts dynamo's
    recompile limit, which under fullgraph=True is a hard error. Eager on CPU (and with enabled=False)
    keeps one Python definition as the reference the compiled form must match.
    """

    def __init__(self, fn: Callable, enabled: bool, backend: str = "inductor", devices: tuple[str, ...] = ("cuda",)):
        self.fn, self.enabled, self.backend, self.devices = fn, enabled, backend, devices
        self._compiled = None

    def __call__(self, *args):
        if not (self.enabled and _device_type(args) in self.devices):
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, backend=self.backend, dynamic=None, fullgraph=True)
        return self._compiled(*args)
