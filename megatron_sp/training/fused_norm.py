"""--fused-grad-norm (on by default): DeepSpeed's ZeRO-1/2 optimizer step with one multi-tensor gradient norm
in place of its per-parameter fp64 norms and per-parameter inf/NaN scan; an inf/NaN gradient still skips the
step. With bf16 and torch's fused AdamW the step also runs without a host sync: the clipping factor and the
skip travel to AdamW as device tensors."""
import torch
import torch.distributed as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from megatron_sp.training.guard import copy_to_host_later, read_host_copy


class FusedNormZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed 0.19's ZeRO-1/2 optimizer with a few methods replaced; install() swaps the class of the object
    deepspeed.initialize built (DeepSpeed constructs it itself, so a subclass cannot be passed in).

    DeepSpeed's step with bf16 (check_grad_overflow, its default) first scans every gradient tensor for inf/NaN
    (has_overflow: a few kernels per tensor, a byte all-reduce and a host sync), then takes the norm of every
    gradient tensor in fp64 (a fp64 copy and a norm per tensor, stacked and all-reduced), then syncs the host
    again to check that norm and skips the step if it is inf/NaN. Here the scan is gone: an inf/NaN gradient
    makes the norm inf/NaN, and that check skips the step as before, on every rank (the norm is all-reduced).
    The norm is torch._foreach_norm over this rank's gradient partition, accumulated in fp32: a couple of
    multi-tensor kernels. It differs from DeepSpeed's fp64 norm by fp32 rounding (~1e-7 relative), which
    reaches the weights only through the clipping factor. A squared norm beyond fp32's range (entries above
    ~1e19) reads as inf and skips the step, where fp64 would have clipped it.

    Without a host sync (`sync_free`, see install): the host never reads the norm inside the step. DeepSpeed's
    clip (a multiply over the whole fp32 gradient partition, after a host check of the norm) becomes AdamW's
    grad_scale (its kernel divides each gradient by the clipping factor as it reads it), and the skip becomes
    AdamW's found_inf (its kernel leaves weights, moments and step count as they were). The host learns of a
    skip one step later (account_skipped_step): DeepSpeed's engine, told of no overflow, advanced the lr
    schedule and did not count the skip; both are put right before the next step's update, a log line or a
    save, so the lr of every update and the saved counters are those of DeepSpeed's own step."""

    sync_free = False
    on_skipped = None  # () -> None: the engine's bookkeeping for an update that did not happen
    _skip = None  # float32 device scalar of the newest sync-free step: 1.0 if AdamW skipped its update
    _clip_factor = None  # float32 device scalar of that step: what AdamW divides its gradients by (None: no clip)
    _pending_skip = None  # (that flag on the host, its CUDA event or None), until account_skipped_step reads it

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

    def step(self, closure=None):
        self.account_skipped_step()  # before this step's update runs at the scheduler's lr
        super().step(closure)
        if self.sync_free and self._skip is not None:
            self._pending_skip, self._skip, self._clip_factor = copy_to_host_later(self._skip), None, None

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        if not self.sync_free:
            super().unscale_and_clip_grads(grad_groups_flat, total_norm)
        # sync-free: _optimizer_step hands the factor to AdamW

    def _optimizer_step(self, group_no):
        """Sync-free: AdamW divides the gradients by the clipping factor and skips the update if the norm is not
        finite, both read on the device from the norm step() stored in _global_grad_norm (float32, inf/NaN)."""
        if not self.sync_free:
            return super()._optimizer_step(group_no)
        if self._skip is None:  # once per step, at its first parameter group
            norm = self._global_grad_norm
            self._skip = (~torch.isfinite(norm)).float()
            # DeepSpeed's factor: max(1, (norm + 1e-6) / clip)
            self._clip_factor = ((norm + 1e-6) / self.clip_grad).clamp_(min=1.0) if self.clip_grad > 0 else None
        inner = self.optimizer
        if self._clip_factor is not None:
            inner.grad_scale = self._clip_factor
        inner.found_inf = self._skip
        try:
            super()._optimizer_step(group_no)
        finally:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)

    def account_skipped_step(self) -> None:
        """Tell the engine (on_skipped) if the newest sync-free step skipped its update. Waits for that step's
        flag: at the next step the GPU has long passed it; before a log line or a save it is a sync anyway."""
        if self._pending_skip is None:
            return
        skipped, self._pending_skip = bool(read_host_copy(*self._pending_skip)), None
        if skipped and self.on_skipped is not None:
            self.on_skipped()

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


def install(optimizer, on_skipped=None) -> bool:
    """Make DeepSpeed's ZeRO-1/2 optimizer a FusedNormZeroOptimizer where it can be (not with optimizer
    offload, MoE layers or compute_grad_norm off, not on ZeRO-0/3's optimizers); whether it did. Elsewhere
    DeepSpeed's norm runs. Its step is sync-free with bf16 (no loss scale) when the inner optimizer is torch's
    fused Adam/AdamW, whose kernel takes grad_scale and found_inf; on_skipped is then called, one step late,
    for each update the kernel skipped."""
    if (type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload or optimizer.has_moe_layers
            or not optimizer.compute_grad_norm):
        return False
    optimizer.__class__ = FusedNormZeroOptimizer
    inner = optimizer.optimizer
    if (optimizer.dtype == torch.bfloat16 and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
            and all(group.get("fused") for group in inner.param_groups)):
        optimizer.sync_free, optimizer.on_skipped = True, on_skipped
        optimizer.check_grad_overflow = False  # with bf16, DeepSpeed's step then leaves the norm on the device
    return True


def account_skipped_step(optimizer) -> None:
    """Settle the engine's skip count and lr schedule with the newest step (a no-op for other optimizers)."""
    if isinstance(optimizer, FusedNormZeroOptimizer):
        optimizer.account_skipped_step()
