"""The CUDA caching allocator's mode for a run: expandable segments unless the user chose otherwise.

With fixed-size cached blocks, long-sequence steps whose tensors change size from layer to layer (some
layers' checkpoints on the GPU, others brought back from the host) strand memory between blocks: at 256k
tokens with selective recompute and --checkpoint-in-cpu-keep-layers auto on one H200, 12.7 GiB sat reserved
and unused when the step ran out of memory; with expandable segments the same step peaked at 125.5 GiB
and ran (docs/memory.md). torchtitan's launcher sets the same mode.
"""
import os

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
NEWER_VARIABLE = "PYTORCH_ALLOC_CONF"  # newer torch's device-neutral name for the same settings


def use_expandable_segments(environ=os.environ, on: bool = True) -> str:
    """Add expandable_segments:True (False with on=False) to PYTORCH_CUDA_ALLOC_CONF unless it or
    PYTORCH_ALLOC_CONF already says expandable_segments (the user's choice stands); returns
    PYTORCH_CUDA_ALLOC_CONF. The allocator reads it when CUDA's first tensor is made, so call this before that."""
    settings = environ.get(VARIABLE, "")
    if "expandable_segments" not in settings + environ.get(NEWER_VARIABLE, ""):
        settings = ",".join(filter(None, [settings, f"expandable_segments:{on}"]))
        environ[VARIABLE] = settings
    return settings
