"""How the layer stack and each layer's MLP sublayer run for backward: kept, recomputed, tiled or offloaded.

GPTModel runs its layers through ``run_layers(layers, x, *shared)`` (shared: what every layer gets besides
x, the rotary tables and any document ids) and each TransformerLayer its MLP sublayer through
``run_mlp(sublayer, x)``; ``layer_runner(cfg)`` and ``mlp_runner(cfg)`` pick the runner once from the
flags, so the model holds no branch per memory-saving mode:

    run_layers   plain loop | checkpoint each layer (--checkpoint-activations)
                 | either, with each layer's saved tensors on the host (--checkpoint-in-cpu, offload.py)
    run_mlp      plain call | checkpoint (--recompute-granularity selective)
                 | tiles of --mlp-tile-tokens tokens, each checkpointed (the tiled MLP)

Every runner computes the same values in the same order as the plain one (only the tiled MLP's weight
gradients are summed tile by tile). Recompute runs only while training with gradients enabled.
"""
import torch
from torch.utils.checkpoint import checkpoint

from megatron_sp.config import ModelConfig
from megatron_sp.model.offload import ActivationOffload


def _recomputing(module) -> bool:
    return module.training and torch.is_grad_enabled()


# --- the MLP sublayer: fn(x [b, s, h]) -> [b, s, h], per token ---------------------------------------

def run_plain(fn, x: torch.Tensor) -> torch.Tensor:
    return fn(x)


def run_checkpointed(fn, x: torch.Tensor) -> torch.Tensor:
    """Keep only x; rebuild fn's intermediates in backward."""
    return checkpoint(fn, x, use_reentrant=False) if torch.is_grad_enabled() else fn(x)


class TiledRunner:
    """fn over `tokens`-token tiles of the flattened [b * s, h] input, each tile checkpointed: the
    sublayer's [tokens, ffn] intermediates exist one tile at a time, in forward and in its recompute.
    (Dropout inside fn draws its mask tile by tile, so with dropout the random stream differs from
    the untiled run.)"""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def __call__(self, fn, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tiles = x.reshape(b * s, h).split(self.tokens)
        outs = [run_checkpointed(fn, tile) for tile in tiles]
        return torch.cat(outs).view(b, s, h)


def mlp_runner(cfg: ModelConfig):
    if cfg.mlp_tile_tokens:
        return TiledRunner(cfg.mlp_tile_tokens)
    return run_checkpointed if cfg.recompute_granularity == "selective" else run_plain


# --- the layer stack: layers(x [b, s, h], *shared) -> x ----------------------------------------------

def _call_layer(layer, x, *shared):
    return layer(x, *shared)


def _checkpoint_layer(layer, x, *shared):
    return checkpoint(layer, x, *shared, use_reentrant=False)


class LayerStack:
    """Each layer in turn, through `run_one` (a plain call, or a checkpoint of the layer)."""

    def __init__(self, run_one):
        self.run_one = run_one

    def __call__(self, layers, x: torch.Tensor, *shared) -> torch.Tensor:
        run_one = self.run_one if _recomputing(layers) else _call_layer
        for layer in layers:
            x = run_one(layer, x, *shared)
        return x


class OffloadedStack(LayerStack):
    """LayerStack whose layers keep their saved tensors in host memory, except the last `keep_layers`
    (backward needs those first). The ActivationOffload is made at the first training forward, on
    the device the activations live on, and reused: its host buffers serve every step."""

    def __init__(self, run_one, keep_layers: int):
        super().__init__(run_one)
        self.keep_layers = keep_layers
        self.offload: ActivationOffload | None = None

    def __call__(self, layers, x: torch.Tensor, *shared) -> torch.Tensor:
        if not _recomputing(layers):
            return super().__call__(layers, x, *shared)
        if self.offload is None or self.offload.device != x.device:
            self.offload = ActivationOffload(x.device)
        self.offload.begin_pass(shared=_tensors(shared))
        first_kept = len(layers) - self.keep_layers
        for i, layer in enumerate(layers):
            with self.offload.layer(i, on_device=i >= first_kept):
                x = self.run_one(layer, x, *shared)
        self.offload.end_pass()
        return x


def _tensors(shared) -> list[torch.Tensor]:
    """The tensors among the shared layer arguments (rotary's (cos, sin) pair; None and other objects skipped)."""
    found = []
    for item in shared:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            found += _tensors(item)
    return found


def layer_runner(cfg: ModelConfig) -> LayerStack:
    run_one = _checkpoint_layer if cfg.checkpoint_activations else _call_layer
    if cfg.checkpoint_in_cpu:
        return OffloadedStack(run_one, int(cfg.checkpoint_in_cpu_keep_layers))
    return LayerStack(run_one)


def host_memory_stats(model) -> dict:
    """What --checkpoint-in-cpu holds in host memory for `model` (GPTModel), in bytes: `held` (pinned on
    CUDA), `peak_in_use` and `offloaded_per_step` (the last forward's copies); {} without it."""
    offload = getattr(getattr(model, "run_layers", None), "offload", None)
    if offload is None:
        return {}
    return {"held": offload.pool.held, "peak_in_use": offload.pool.peak_in_use,
            "offloaded_per_step": offload.offloaded_bytes}
