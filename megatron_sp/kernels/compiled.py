"""torch.compile for the memory-bound glue between big kernels (norms, SwiGLU, rotary, all-to-all packing),
or for whole transformer layers (compile_layers, --compile-layers)."""
from typing import Callable, Iterable

import torch
from torch import nn


def _device_type(args) -> str | None:
    """Device type of the first tensor in args (looking inside lists and tuples), None if there is none."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and (found := _device_type(a)) is not None:
            return found
    return None


class Fused:
    """Calls ``fn`` eagerly, or its torch.compile'd form when its first tensor argument is on a GPU, or there
    ``kernel`` (a hand-written equivalent of fn, where one measured faster than the compiled form) if given.

    Compiled lazily (first GPU call). The first shapes get a static-shape kernel (training shapes do not
    change); a dimension seen with a second size is recompiled once as dynamic (torch.compile's automatic
    dynamic shapes), so a process that runs many lengths (evaluation, benchmarks) never exhausts dynamo's
    recompile limit, which under fullgraph=True is a hard error. Eager on CPU (and with enabled=False)
    keeps one Python definition as the reference the compiled form must match.
    """

    def __init__(self, fn: Callable, enabled: bool, backend: str = "inductor", devices: tuple[str, ...] = ("cuda",),
                 kernel: Callable | None = None):
        self.fn, self.enabled, self.backend, self.devices, self.kernel = fn, enabled, backend, devices, kernel
        self._compiled = None

    def __call__(self, *args):
        # inside a compiled region (compile_layers) the enclosing graph traces fn and fuses it with its neighbours
        if not (self.enabled and _device_type(args) in self.devices) or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.kernel is not None:
            return self.kernel(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, backend=self.backend, dynamic=None, fullgraph=True)
        return self._compiled(*args)


LAYER_BACKEND = "inductor"  # compile_layers' default; tests on CPU swap in aot_eager (no code generation)


def compile_layers(layers: Iterable[nn.Module], backend: str | None = None) -> None:
    """torch.compile each transformer layer in place, as torchtitan compiles each block.

    nn.Module.compile keeps the layer's parameter names (checkpoints load unchanged) and works under
    activation checkpointing (the checkpoint calls the compiled layer; selective recompute inside the
    layer traces as a checkpoint region). The inner attention slot stays eager: torch.compiler.disable
    makes each layer two graphs, before and after it (norm, QKV, rotary | output projection, residual,
    norm, MLP, residual), because the slot's strategies communicate and call private aten attention ops
    that a whole-layer graph (fullgraph) cannot hold. Inside a compiled layer the Fused pieces trace into
    the layer's graph, so the compiler can also fuse the residual adds, the QKV split and their backward.
    Dropout draws other random masks than eager mode."""
    for layer in layers:
        for module in layer.modules():
            slot = getattr(module, "inner_attention", None)
            if slot is not None:
                slot.forward = torch.compiler.disable(slot.forward, recursive=True)
        layer.compile(backend=backend or LAYER_BACKEND)
