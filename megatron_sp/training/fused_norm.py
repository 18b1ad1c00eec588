"""--fused-grad-norm (on by default): DeepSpeed's ZeRO-1/2 optimizer step with one multi-tensor gradient norm
in place of its per-parameter fp64 norms and per-parameter inf/NaN scan; an inf/NaN gradient still skips the
step. With bf16 and torch's fused AdamW, where Triton runs, the step is also one pass over memory without a
host sync: kernels/adamw.py reads the bf16 gradients, and the clipping factor and the skip as device tensors.
On one data-parallel rank, the gradients also skip DeepSpeed's reduction (no value changes there) and its copies."""
import torch
import torch.distributed as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer, all_gather_dp_groups

from megatron_sp.kernels import triton_runs_on
from megatron_sp.kernels.adamw import adamw_state, adamw_step, supports
from megatron_sp.training.guard import copy_to_host_later, read_host_copy
from megatron_sp.training.zero_reduction import reduction_changes_nothing


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

    Without a host sync (`sync_free`, see install): the host never reads the norm inside the step. Per parameter
    group, DeepSpeed's fp32 copy of the gradient partition, its clip (a multiply over that copy, after a host
    check of the norm), torch's AdamW and the fp32 -> bf16 copy of the weights become one adamw_step: it divides
    each gradient by the clipping factor as it reads it, and on an inf/NaN norm leaves weights, moments and step
    count as they were. DeepSpeed's optimizer timers do not time this step. The host learns of a skip one step
    later (account_skipped_step): DeepSpeed's engine, told of no overflow, advanced the lr schedule and did not
    count the skip; both are put right before the next step's update, a log line or a save, so the lr of every
    update and the saved counters are those of DeepSpeed's own step."""

    sync_free = False
    one_rank = False  # one data-parallel rank: reduce_gradients copies each gradient once (see there)
    on_skipped = None  # () -> None: the engine's bookkeeping for an update that did not happen
    _pending_skip = None  # (the newest sync-free step's skip flag on the host, its CUDA event or None)

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

    def reduce_gradients(self, pipeline_parallel=False):
        """ZeRO-1 calls this once per step, at the gradient accumulation boundary. On one data-parallel rank
        (one_rank) DeepSpeed's reduction changes no value but copies every gradient three times: into its reduce
        bucket, through the bucket's all-reduce over one rank, into its contiguous gradient partition; and the
        step then flattens the partition once more. Here each gradient is copied once, into one flat buffer
        laid out as the partition, which adamw_step reads whole."""
        if not self.one_rank:
            return super().reduce_gradients(pipeline_parallel)
        for i, params in enumerate(self.params_in_partition):
            self.averaged_gradients[i] = self._flat_gradients(i, params)
        self._release_ipg_buffers()  # DeepSpeed's end of a reduction: the next backward sets up afresh

    def setup_buckets(self):
        """DeepSpeed's, called by each gradient's hook, less the reduce bucket (reduce_bucket_size elements,
        allocated as the backward's first gradient arrives) that one_rank's reduce_gradients never fills."""
        if not self.one_rank:
            return super().setup_buckets()
        if not self.ready_for_gradients:
            self.micro_step_id += 1
            self.ready_for_gradients = True

    def _flat_gradients(self, i, params):
        """Group i's gradients copied into a new [partition_size] buffer at DeepSpeed's offsets, as views shaped
        like the parameters (each p.grad now one of them), padding marked as DeepSpeed marks it."""
        flat = torch.empty(int(self.partition_size[i]), dtype=self.dtype, device=self.device)
        pieces, end = [], 0
        for p in params:
            start = int(self.grad_partition_insertion_offset[i][0][self.get_param_id(p)])
            if start > end:
                pieces.append(_padding(flat, end, start))
            view = flat.narrow(0, start, p.numel()).view(p.shape)
            if p.grad is None:  # a parameter the loss did not reach: DeepSpeed counts zeros
                view.zero_()
            else:
                view.copy_(p.grad)
                p.grad = view
            pieces.append(view)
            end = start + p.numel()
        if end < flat.numel():
            pieces.append(_padding(flat, end, flat.numel()))
        return FlatGradients(pieces, flat)

    def step(self, closure=None):
        self.account_skipped_step()  # before this step's update runs at the scheduler's lr
        if not self.sync_free:
            return super().step(closure)
        self.micro_step_id = INITIAL_MICRO_STEP_ID
        norm = self._global_grad_norm = self.scaled_global_norm()
        skip = (~torch.isfinite(norm)).float()
        # DeepSpeed's clipping factor, max(1, (norm + 1e-6) / clip); the gradients are divided by it
        clip = ((norm + 1e-6) / self.clip_grad).clamp_(min=1.0) if self.clip_grad > 0 else None
        for i in range(len(self.bit16_groups)):
            self._update_group(i, skip, clip)
        self._lazy_init_hp_params_optimizer_state()  # DeepSpeed links the states after the first update
        all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                             partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                             dp_process_group=self.real_dp_process_group,
                             start_alignment_factor=self.nccl_start_alignment_factor,
                             allgather_bucket_size=self.allgather_bucket_size)
        for i in range(len(self.bit16_groups)):
            self._update_model_bit16_weights(i)
        self._pending_skip = copy_to_host_later(skip)

    def _update_group(self, i, skip, clip):
        """DeepSpeed's update of parameter group i (stage_1_and_2's step without offload, loss scale or Muon), with
        its fp32 gradient copy, clip, AdamW and bf16 copy-back replaced by one adamw_step."""
        group = self.real_dp_process_group[i]
        partition_id = dist.get_rank(group=group)
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        grads = self._get_preflattened_grad_partition(i)  # [partition_size], a buffer of DeepSpeed's or a copy
        if grads is None and partition_id == dist.get_world_size(group=group) - 1:
            grads = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
        elif grads is None:
            grads = self.flatten(self.averaged_gradients[i])
        master = self.single_partition_of_fp32_groups[i]
        adamw_step(master, grads, adamw_state(self.optimizer, master), self.optimizer.param_groups[i],
                   self.parallel_partitioned_bit16_groups[i][partition_id], skip, clip)
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = self.all_grad_tensors[i] = None

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


class FlatGradients(list):
    """A group's gradient views (averaged_gradients[i]) over one flat buffer, `flat_partition`, which DeepSpeed's
    _get_preflattened_grad_partition hands the step instead of flattening the views again."""

    def __init__(self, views, flat_partition):
        super().__init__(views)
        self.flat_partition = flat_partition


def _padding(flat, start, end):
    """flat[start:end] zeroed and marked as ZeRO's alignment padding (no gradient of any parameter)."""
    pad = flat[start:end].zero_()
    pad._zero_padding = True
    return pad


def counted_once(p: torch.nn.Parameter) -> bool:
    """False for the copy of a parameter another pipeline stage also holds and counts (the last stage's tied
    word embedding, marked by engine.mark_pipeline_parameters): norms and parameter counts skip it."""
    return not getattr(p, PIPE_REPLICATED, False)


# what the sync-free step uses of DeepSpeed 0.19's ZeRO-1/2 optimizer; a release without one of them gets
# DeepSpeed's own step instead of an AttributeError mid-run
DEEPSPEED_PARTS = ("bit16_groups", "bit16_groups_flat", "real_dp_process_group", "params_in_partition",
                   "params_not_in_partition", "partition_size", "averaged_gradients", "all_grad_tensors",
                   "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
                   "nccl_start_alignment_factor", "allgather_bucket_size", "free_grad_in_param_list",
                   "_get_preflattened_grad_partition", "flatten_dense_tensors_aligned", "flatten",
                   "_release_preflattened_grad_buffers", "_lazy_init_hp_params_optimizer_state",
                   "_update_model_bit16_weights", "partition_gradients", "overlap_comm", "use_grad_accum_attribute",
                   "gradient_predivide_factor", "grad_partition_insertion_offset", "get_param_id", "device",
                   "ready_for_gradients", "micro_step_id", "_release_ipg_buffers")


def install(optimizer, on_skipped=None) -> bool:
    """Make DeepSpeed's ZeRO-1/2 optimizer a FusedNormZeroOptimizer where it can be (not with optimizer
    offload, MoE layers or compute_grad_norm off, not on ZeRO-0/3's optimizers); whether it did. Elsewhere
    DeepSpeed's norm runs. Its step is sync-free (adamw_step) with bf16 (no loss scale) when the inner optimizer
    is torch's fused AdamW (the state format adamw_step keeps), DeepSpeed has the DEEPSPEED_PARTS it uses and
    Triton runs on the weights' device; on_skipped is then called, one step late, for each update the kernel skipped."""
    if (type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload or optimizer.has_moe_layers
            or not optimizer.compute_grad_norm):
        return False
    optimizer.__class__ = FusedNormZeroOptimizer
    if (optimizer.dtype == torch.bfloat16 and supports(optimizer.optimizer) and not getattr(optimizer, "zenflow", 0)
            and getattr(optimizer, "torch_autocast_gradscaler", None) is None
            and all(hasattr(optimizer, name) for name in DEEPSPEED_PARTS)
            and triton_runs_on(optimizer.single_partition_of_fp32_groups[0].device)):
        optimizer.sync_free, optimizer.on_skipped = True, on_skipped
        optimizer.one_rank = reduction_is_identity(optimizer)
    return True


def reduction_is_identity(optimizer) -> bool:
    """Whether this DeepSpeed ZeRO optimizer's gradient reduction leaves every value as it is
    (zero_reduction.reduction_changes_nothing; each parameter group's data-parallel group counts)."""
    return reduction_changes_nothing(
        partitioned=optimizer.partition_gradients, overlap_comm=optimizer.overlap_comm,
        data_parallel_ranks=max(dist.get_world_size(group=group) for group in optimizer.real_dp_process_group),
        fp32_accumulation_attribute=optimizer.use_grad_accum_attribute,
        predivide_factor=optimizer.gradient_predivide_factor)


def account_skipped_step(optimizer) -> None:
    """Settle the engine's skip count and lr schedule with the newest step (a no-op for other optimizers)."""
    if isinstance(optimizer, FusedNormZeroOptimizer):
        optimizer.account_skipped_step()
