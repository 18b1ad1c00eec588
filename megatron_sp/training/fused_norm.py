"""--fused-grad-norm (on by default): DeepSpeed's ZeRO-1/2 optimizer step with one multi-tensor gradient norm
in place of its per-parameter fp64 norms and per-parameter inf/NaN scan; an inf/NaN gradient still skips the
step."""
import torch
import torch.distributed as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


class FusedNormZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed 0.19's ZeRO-1/2 optimizer with two methods replaced; install() swaps the class of the object
    deepspeed.initialize built (DeepSpeed constructs it itself, so a subclass cannot be passed in).

    DeepSpeed's step with bf16 (check_grad_overflow, its default) first scans every gradient tensor for inf/NaN
    (has_overflow: a few kernels per tensor, a byte all-reduce and a host sync), then takes the norm of every
    gradient tensor in fp64 (a fp64 copy and a norm per tensor, stacked and all-reduced), then syncs the host
    again to check that norm and skips the step if it is inf/NaN. Here the scan is gone: an inf/NaN gradient
    makes the norm inf/NaN, and that check skips the step as before, on every rank (the norm is all-reduced).
    The norm is torch._foreach_norm over this rank's gradient partition, accumulated in fp32: a couple of
    multi-tensor kernels. It differs from DeepSpeed's fp64 norm by fp32 rounding (~1e-7 relative), which
    reaches the weights only through the clipping factor. A squared norm beyond fp32's range (entries above
    ~1e19) reads as inf and skips the step, where fp64 would have clipped it."""

    def has_overflow(self, partition_gradients=True):
        return False  # scaled_global_norm carries any inf/NaN into step()'s own check of the norm

    def scaled_global_norm(self, norm_type=2):
        """||gradients of all ranks||_2 as a float32 device tensor, inf if any gradient is inf/NaN."""
        if norm_type != 2:
            raise ValueError("only the L2 gradient norm is supported")
        grads = list(self._counted_gradients())
        device = torch.device(self.device) if grads == [] else grads[0].device
        squares = (torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum() if grads
                   else torch.zeros((), dtype=torch.float32, device=device))
        dist.all_reduce(squares, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=squares, op=dist.ReduceOp.SUM)
        return squares.nan_to_num_(nan=float("inf")).sqrt()

    def _counted_gradients(self):
        """This rank's gradient pieces that DeepSpeed's own norm counts: ZeRO's alignment padding is no gradient;
        under a pipeline (model-parallel group = the stages) a replicated copy (ds_pipe_replicated: the last
        stage's tied word embedding) is counted on its other stage only, and a parameter not marked
        model-parallel on model-parallel rank 0 only."""
        for i in range(len(self.bit16_groups)):
            grads = (g for g in self.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
            for g, p in zip(grads, self.params_in_partition[i]):
                if counted_once(p) and (is_model_parallel_parameter(p)
                                                               or self.model_parallel_rank == 0):
                    yield g


def counted_once(p: torch.nn.Parameter) -> bool:
    """False for the copy of a parameter another pipeline stage also holds and counts (the last stage's tied
    word embedding, marked by engine.mark_pipeline_parameters): norms and parameter counts skip it."""
    return not getattr(p, PIPE_REPLICATED, False)


def install(optimizer) -> bool:
    """Make DeepSpeed's ZeRO-1/2 optimizer a FusedNormZeroOptimizer where it can be (not with optimizer
    offload or MoE layers, not on ZeRO-0/3's optimizers); whether it did. Elsewhere DeepSpeed's norm runs."""
    if type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload or optimizer.has_moe_layers:
        return False
    optimizer.__class__ = FusedNormZeroOptimizer
    return True
