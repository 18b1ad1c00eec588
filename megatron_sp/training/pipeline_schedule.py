"""1F1B: the order in which one pipeline stage runs the forwards and backwards of a step's micro batches.

Stage k of P first runs P - 1 - k forwards (warm-up: the pipeline fills), then alternates one forward and
one backward (steady state), then runs the remaining backwards (the pipeline drains). At most P - k micro
batches are in flight on stage k, instead of all m with "all forwards, then all backwards"; the bubble is
(P - 1) / (m + P - 1) of the step either way (parallel/pipeline.py: bubble_fraction). Without a pipeline
(P = 1) this is forward, backward, forward, backward, ...: the plain gradient-accumulation loop.

Backwards run in micro-batch order on every stage, which is what DeepSpeed's gradient accumulation counts.
"""
from typing import Callable

import torch

from megatron_sp.parallel.pipeline import StageLink

# forward(i, inputs) -> output: inputs are the previous stage's output for micro batch i (None on the
# first stage); backward(i, output, output_grad): output_grad is None on the last stage, whose output is
# the loss share it backpropagates
Forward = Callable[[int, torch.Tensor | None], torch.Tensor]
Backward = Callable[[int, torch.Tensor, torch.Tensor | None], None]


def one_f_one_b(link: StageLink, num_micro: int, pp_size: int, pp_rank: int, forward: Forward,
                backward: Backward) -> None:
    """Run one step's micro batches on this stage in 1F1B order, trading activations and gradients with the
    neighbouring stages through `link`."""
    warmup = min(pp_size - 1 - pp_rank, num_micro)
    inputs, outputs = {}, {}

    def run_forward(i: int, received: torch.Tensor | None) -> torch.Tensor:
        if received is not None:
            received.requires_grad_(True)  # its .grad is what goes back to the previous stage
        inputs[i], outputs[i] = received, forward(i, received)
        return outputs[i].detach()

    def run_backward(i: int, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        received, output = inputs.pop(i), outputs.pop(i)
        backward(i, output, output_grad)
        return None if received is None else received.grad

    for i in range(warmup):
        link.send_forward(run_forward(i, link.recv_forward()))
    received = link.recv_forward() if warmup < num_micro else None
    for i in range(warmup, num_micro):  # steady state: forward i, backward i - warmup
        output_grad = link.send_forward_recv_backward(run_forward(i, received))
        input_grad = run_backward(i - warmup, output_grad)
        received = link.send_backward_recv_forward(input_grad) if i + 1 < num_micro else None
        if i + 1 == num_micro:
            link.send_backward(input_grad)
    for i in range(num_micro - warmup, num_micro):  # drain
        link.send_backward(run_backward(i, link.recv_backward()))
