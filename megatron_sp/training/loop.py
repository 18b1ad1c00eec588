"""One optimizer step and one evaluation, exact over PP x DP x SP whatever the loss mask does.

The loss of a step is the mean over every unmasked token of the global batch. Ranks hold
different numbers of unmasked tokens (a sequence shard may be mostly padding), so each rank's
share is ``its token-loss sum / the global token count``; the count is summed over the ranks of a
pipeline stage (each stage's DP x SP ranks read the whole global batch) before backward. DeepSpeed
then averages gradients over those ranks (it sees DP x SP of them as data-parallel), which is why
the last stage multiplies its local loss by the stage size; earlier stages backpropagate the
gradient the next stage sends them, which carries that scale already.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.profiler import record_function

from megatron_sp.attention.documents import Documents
from megatron_sp.errors import RankError
from megatron_sp.data.loader import get_batch
from megatron_sp.parallel.pipeline import StageLink, sync_tied_gradients
from megatron_sp.parallel.sharding import SequenceLayout
from megatron_sp.training.fused_norm import counted_once
from megatron_sp.training.pipeline_schedule import one_f_one_b


@dataclass
class PipelinePlace:
    """Where this rank's stage sits in the pipeline; one stage (pp_size 1) when there is no pipeline."""
    link: StageLink
    pp_size: int = 1
    pp_rank: int = 0
    group: object = None
    """The pipeline group: one rank per stage (for the fp32 gradient norm of all stages)."""
    tied: list = field(default_factory=list)
    """This stage's copy of the tied word embedding, if it holds one (GPTStage.tied_parameters)."""
    embedding_group: object = None

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


PHASES = ("step.forward", "step.backward", "step.optimizer")  # the profiler ranges train_step opens


@dataclass
class StepContext:
    """What a step needs besides the engine; built once."""
    layout: SequenceLayout
    sp_rank: int
    stage_size: int  # ranks of a pipeline stage (DP x SP), over which DeepSpeed averages gradients
    eod: int
    reset_position_ids: bool
    eod_mask_loss: bool
    device: torch.device
    vocab_size: int  # the embedding's rows (padded vocabulary)
    pipe: PipelinePlace
    reset_attention_mask: bool = False  # attention stays inside each document (Documents)
    stage_group: object = None  # the stage's ranks; None: all ranks (no pipeline)

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


def model_inputs(b: dict, inputs: torch.Tensor | None = None) -> tuple:
    """The engine's arguments for one prepared micro batch (StepContext.batch); `inputs`, the previous
    pipeline stage's output, replaces the tokens (None on the first stage)."""
    return b["tokens"] if inputs is None else inputs, b["position_ids"], b["labels"], b["documents"]


def _global_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


def fp32_grad_norm(engine, pipeline_group=None) -> torch.Tensor | None:
    """The gradient norm DeepSpeed computes but does not keep in one case: fp32 without ZeRO.

    There its clip_fp32_gradients discards the norm; every other optimizer wrapper stores it.
    Call after the last backward of a step (gradients are reduced), before engine.step(). With a
    pipeline the squares are summed over the stages, the last stage's tied embedding copy left out.
    """
    if engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters()
             if p.grad is not None and counted_once(p)]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one multi-tensor pass
    if pipeline_group is not None and dist.get_world_size(pipeline_group) > 1:
        norm = _global_sum(norm.square(), pipeline_group).sqrt()
    return norm


def train_step(engine, micro_batches: list[dict], ctx: StepContext):
    """Forward/backward over the step's micro batches (1F1B over the pipeline stages), then the optimizer step.

    Returns (loss sum, unmasked token count, grad norm or None) over the whole global batch, as
    device tensors summed over ranks and not yet synced to the host (the caller divides them at
    log time; a None grad norm means DeepSpeed reports it through get_global_grad_norm).
    """
    pipe, batches = ctx.pipe, [ctx.batch(mb) for mb in micro_batches]
    local_count = sum(b["loss_mask"].sum() for b in batches).double()
    global_count = _global_sum(local_count.clone(), ctx.stage_group).clamp_min(1.0)
    scale = ctx.stage_size / global_count  # the same for every micro batch of the step
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)  # stays 0 before the last stage

    # named ranges for tools/bench_e2e.py --profile (they never nest; the stage-to-stage p2p falls between
    # them); without a running profiler each costs a few us
    def forward(i: int, inputs: torch.Tensor | None) -> torch.Tensor:
        b = batches[i]
        with record_function(PHASES[0]):
            output = engine(*model_inputs(b, inputs))
            if not pipe.is_last:
                return output  # [b, s/P, h] for the next stage
            local_sum = (output * b["loss_mask"]).sum()  # output: token losses [b, s/P] fp32
            loss_sum.add_(local_sum.detach().double())
            return local_sum * scale.to(local_sum.dtype)

    def backward(i: int, output: torch.Tensor, output_grad: torch.Tensor | None) -> None:
        with record_function(PHASES[1]):
            engine.backward(output if output_grad is None else (output * output_grad).sum(), scale_wrt_gas=False)
        if i < len(batches) - 1:
            with record_function(PHASES[2]):
                engine.step()  # DeepSpeed counts micro steps; the step's last one updates the weights below

    one_f_one_b(pipe.link, len(batches), pipe.pp_size, pipe.pp_rank, forward, backward)
    with record_function(PHASES[1]):
        sync_tied_gradients(pipe.tied, pipe.embedding_group)
    grad_norm = fp32_grad_norm(engine, pipe.group)
    with record_function(PHASES[2]):
        engine.step()
    return _global_sum(loss_sum), global_count, grad_norm


@torch.no_grad()
def evaluate(engine, micro_batches, ctx: StepContext) -> float:
    """Mean token loss over the given micro batches (all ranks; the last stage computes it)."""
    pipe = ctx.pipe
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for mb in micro_batches:
        b = ctx.batch(mb)
        output = engine(*model_inputs(b, pipe.link.recv_forward()))
        if not pipe.is_last:
            pipe.link.send_forward(output)
            continue
        loss_sum += (output * b["loss_mask"]).sum().double()
        count += b["loss_mask"].sum().double()
    engine.train()
    total = _global_sum(torch.stack([loss_sum, count]))  # only the last stage's ranks add to it
    return (total[0] / total[1].clamp_min(1.0)).item()
