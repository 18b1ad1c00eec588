"""One optimizer step and one evaluation, exact over DP x SP whatever the loss mask does.

The loss of a step is the mean over every unmasked token of the global batch. Ranks hold
different numbers of unmasked tokens (a sequence shard may be mostly padding), so each rank's
share is ``its token-loss sum / the global token count``; the count is summed over all ranks
before backward. DeepSpeed then averages gradients over all ranks (it sees DP x SP of them as
data-parallel), which is why the local loss is multiplied by the world size.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from megatron_sp.attention.documents import Documents
from megatron_sp.errors import RankError
from megatron_sp.data.loader import get_batch
from megatron_sp.parallel.sharding import SequenceLayout


PHASES = ("step.forward", "step.backward", "step.optimizer")  # the profiler ranges train_step opens


@dataclass
class StepContext:
    """What a step needs besides the engine; built once."""
    layout: SequenceLayout
    sp_rank: int
    world_size: int
    eod: int
    reset_position_ids: bool
    eod_mask_loss: bool
    device: torch.device
    vocab_size: int  # the embedding's rows (padded vocabulary)
    reset_attention_mask: bool = False  # attention stays inside each document (Documents)

    def batch(self, micro_batch: dict) -> dict:
        """A loader micro batch {"text": [b, s+1]} -> this rank's tokens/labels/mask/positions on device,
        and with reset_attention_mask "documents": the whole samples' Documents, made once per micro
        batch and shared by every layer (the model hands it to its inner attention).
        A token id the embedding has no row for (data tokenized for another vocabulary) is a one-line
        RankError here, on the host, instead of an index error (a device-side assert on GPU) later."""
        text = micro_batch["text"]
        low, high = (int(x) for x in torch.aminmax(text))  # one pass over [b, s+1] on the host
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise RankError(f"the data holds token id {bad}, outside this model's vocabulary of {self.vocab_size} "
                            "(padded); tokenize it with this run's tokenizer, or set --tokenizer-type/"
                            "--tokenizer-model/--vocab-size to the ones it was made with", echoed=self.sp_rank > 0)
        parts = get_batch(text, eod=self.eod, layout=self.layout, sp_rank=self.sp_rank,
                          reset_position_ids=self.reset_position_ids, eod_mask_loss=self.eod_mask_loss,
                          reset_attention_mask=self.reset_attention_mask)
        ids = parts.pop("document_ids", None)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in parts.items()}
        batch["documents"] = None if ids is None else Documents(ids, self.device)
        return batch


def model_inputs(b: dict) -> tuple:
    """The engine's arguments for one prepared micro batch (StepContext.batch)."""
    return b["tokens"], b["position_ids"], b["labels"], b["documents"]


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def fp32_grad_norm(engine) -> torch.Tensor | None:
    """The gradient norm DeepSpeed computes but does not keep in one case: fp32 without ZeRO.

    There its clip_fp32_gradients discards the norm; every other optimizer wrapper stores it.
    Call after the last backward of a step (gradients are reduced), before engine.step().
    """
    if engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train_step(engine, micro_batches: list[dict], ctx: StepContext):
    """Forward/backward over the step's micro batches, then the optimizer step.

    Returns (loss sum, unmasked token count, grad norm or None) over the whole global batch, as
    device tensors summed over ranks and not yet synced to the host (the caller divides them at
    log time; a None grad norm means DeepSpeed reports it through get_global_grad_norm).
    """
    batches = [ctx.batch(mb) for mb in micro_batches]
    local_count = sum(b["loss_mask"].sum() for b in batches).double()
    global_count = _global_sum(local_count.clone()).clamp_min(1.0)
    scale = ctx.world_size / global_count  # the same for every micro batch of the step
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    grad_norm = None
    for i, b in enumerate(batches):
        # named ranges for tools/bench_e2e.py --profile; without a running profiler each costs a few us
        with record_function(PHASES[0]):
            token_loss = engine(*model_inputs(b))  # [b, s/P] fp32
            local_sum = (token_loss * b["loss_mask"]).sum()
        with record_function(PHASES[1]):
            engine.backward(local_sum * scale.to(local_sum.dtype), scale_wrt_gas=False)
        if i == len(batches) - 1:
            grad_norm = fp32_grad_norm(engine)
        with record_function(PHASES[2]):
            engine.step()
        loss_sum += local_sum.detach().double()
    return _global_sum(loss_sum), global_count, grad_norm


@torch.no_grad()
def evaluate(engine, micro_batches, ctx: StepContext) -> float:
    """Mean token loss over the given micro batches (all ranks)."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for mb in micro_batches:
        b = ctx.batch(mb)
        token_loss = engine(*model_inputs(b))
        loss_sum += (token_loss * b["loss_mask"]).sum().double()
        count += b["loss_mask"].sum().double()
    engine.train()
    total = _global_sum(torch.stack([loss_sum, count]))
    return (total[0] / total[1].clamp_min(1.0)).item()
