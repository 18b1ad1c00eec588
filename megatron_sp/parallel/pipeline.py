"""Pipeline parallelism: which layers a stage holds, its bubble, and what passes between stages.

A stage (model/stage.py: a slice of GPTModel; the first stage embeds, the last computes the loss) is wrapped
in its own DeepSpeed engine, whose data-parallel group is the stage's DP x SP ranks
(ParallelState.stage_group). The 1F1B schedule that drives the stages is training/pipeline_schedule.py;
StageLink carries activations forward and their gradients back. With tied embeddings the first and the
last stage each hold the word embedding; sync_tied_gradients keeps the two copies equal.
"""
import torch
import torch.distributed as dist
from torch import nn


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The transformer layers stage pp_rank holds: an equal contiguous share (pp_size divides num_layers)."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def bubble_fraction(pp_size: int, micro_batches: int) -> float:
    """Share of a 1F1B step a stage waits, (pp - 1) / (m + pp - 1): the fill and drain of the pipeline."""
    return (pp_size - 1) / (micro_batches + pp_size - 1)


def schedule_lines(pp_size: int, num_layers: int, micro_batches: int) -> list[str]:
    """What the run prints about its pipeline: the stages, the 1F1B schedule and its bubble, and a warning
    when there are fewer micro batches than stages (some stages then idle for most of every step)."""
    lines = [f"pipeline: {pp_size} stages x {num_layers // pp_size} layers, 1F1B over {micro_batches} micro "
             f"batches per step; bubble (PP - 1) / (m + PP - 1) = {bubble_fraction(pp_size, micro_batches):.0%}"]
    if micro_batches < pp_size:
        lines.append(f"WARNING: {micro_batches} micro batches per step for {pp_size} pipeline stages: the pipeline "
                     "never fills; raise --global-batch-size (or lower --micro-batch-size) to at least "
                     f"{pp_size} micro batches per data-parallel rank")
    return lines


def sync_tied_gradients(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of the tied word embedding's two copies (first and last stage) so both take the
    same optimizer step. Runs after DeepSpeed reduced the step's gradients over the stage (and, under ZeRO,
    partitioned them) and before the optimizer step; the full gradient is read and written back through
    DeepSpeed's safe_get/set_full_grad, which know every ZeRO layout. One all-reduce of two equal-shaped
    tensors gives both ranks the same bits, so the copies stay bit-equal."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
    for p in params:
        grad = safe_get_full_grad(p)
        dist.all_reduce(grad, group=group)
        safe_set_full_grad(p, grad)


class StageLink:
    """Point-to-point transfers to the neighbouring stages of a pipeline group, for one micro batch at a time.

    Activations and their gradients have one known shape and dtype ([b, s_local, h] in the model dtype), so
    nothing but the tensor travels. A send and a receive that happen at the same point of the schedule go
    in one batch_isend_irecv, so that two neighbours that both send and receive never wait on each other.
    The first stage has no previous stage and the last no next: those transfers return None / do nothing.
    """

    def __init__(self, pipeline_ranks: tuple[int, ...], pp_rank: int, group, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self.group, self.shape, self.dtype, self.device = group, shape, dtype, device
        self.prev = pipeline_ranks[pp_rank - 1] if pp_rank > 0 else None
        self.next = pipeline_ranks[pp_rank + 1] if pp_rank + 1 < len(pipeline_ranks) else None
        # collective on the whole pipeline group (every rank builds its link): NCCL then creates the group's
        # communicator here, as it must before batched p2p that involves only some of its ranks
        dist.all_reduce(torch.zeros(1, device=device), group=group)

    def _exchange(self, send: torch.Tensor | None, to: int | None, receive_from: int | None) -> torch.Tensor | None:
        ops, received = [], None
        if send is not None and to is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), to, self.group))
        if receive_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, receive_from, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    def recv_forward(self) -> torch.Tensor | None:
        """The previous stage's output for the next micro batch (None on the first stage)."""
        return self._exchange(None, None, self.prev)

    def send_forward(self, output: torch.Tensor) -> None:
        self._exchange(output, self.next, None)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        """Send this micro batch's output on; receive the gradient of an earlier one's (None on the last stage)."""
        return self._exchange(output, self.next, self.next)

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Send a micro batch's input gradient back; receive the next micro batch's input."""
        return self._exchange(input_grad, self.prev, self.prev)

    def recv_backward(self) -> torch.Tensor | None:
        return self._exchange(None, None, self.next)

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        self._exchange(input_grad, self.prev, None)
