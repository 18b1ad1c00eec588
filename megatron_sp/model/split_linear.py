"""A linear layer whose output is used in parts (the fused q/k/v projection), without copies of the parts.

With `nn.Linear(x).split(...)`, autograd hands the backward of the split the parts' gradients separately and
concatenates them into one [.., out] gradient before the projection's backward: a copy of the whole projection
output per layer (2.4 ms of a 16k step of the 1.3B benchmark model on one H200). Here the backward takes the
parts' gradients as they come: dx is the sum of one matmul per part (each accumulating into dx), and each part's
weight gradient is written into its rows of dW. The matmuls are as large as before along every other axis, so
they run at the same rate; the sum costs the re-read of dx in the matmul epilogue, not a pass of its own. The
forward is one matmul per part too, so that each part is dense (v goes to attention as it is, not copied).
In bf16, dx is rounded after each part's product: the rounding torchtitan's and Hugging Face's Llama, with
separate q, k and v projections, get.
"""
import itertools

import torch
from torch import nn


class SplitLinear(nn.Linear):
    """nn.Linear(in_features, sum(sizes)) returning its output as len(sizes) contiguous parts instead of one
    tensor; the parameters (and so checkpoints) are exactly nn.Linear's."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool = True):
        super().__init__(in_features, sum(sizes), bias=bias)
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return LinearInParts.apply(x, self.weight, self.bias, self.sizes)


class LinearInParts(torch.autograd.Function):
    """x [.., in] @ weight[out, in]^T + bias[out] -> parts [.., size_i] along the last dim."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes):
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
        # one matmul per part, so each part is a contiguous tensor of its own: a strided view of one output
        # would be copied by whatever needs it dense (cuDNN attention copies v in its forward and backward)
        return tuple(torch.nn.functional.linear(x, w, b) for w, b in zip(weight.split(sizes), biases))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        want_dx, want_dw, want_db = ctx.needs_input_grad[:3]  # want_db is False without a bias
        dw = torch.empty_like(weight) if want_dw else None  # every part's rows are written below
        db = weight.new_empty(weight.shape[0]) if want_db else None
        dx, ends = None, list(itertools.accumulate(ctx.sizes))
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        for grad, rows, end in zip(grads, weight.split(ctx.sizes), ends):  # rows [size_i, in]: this part's weights
            start = end - rows.shape[0]  # [start, end): this part's rows of the output
            if grad is None:  # a part the loss did not reach: no gradient from it
                if want_dw:
                    dw[start:end].zero_()
                if want_db:
                    db[start:end].zero_()
                continue
            g2 = grad.reshape(-1, rows.shape[0])  # [tokens, size_i]
            if want_dx:
                dx = g2 @ rows if dx is None else dx.addmm_(g2, rows)  # [tokens, in]
            if want_dw:
                torch.mm(g2.t(), x2, out=dw[start:end])
            if want_db:
                torch.sum(g2, dim=0, out=db[start:end])
        return (None if dx is None else dx.view(x.shape)), dw, db, None
