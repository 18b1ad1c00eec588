"""Our kernels (Triton) and the choice between them and the library ones. Importing this package needs no Triton."""
import os

import torch


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on `device`: a CUDA GPU, or any device under Triton's CPU interpreter
    (TRITON_INTERPRET=1, a test tool)."""
    return (device.type == "cuda" and torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1"
