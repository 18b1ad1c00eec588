"""What fits: a rank's GPU and host memory, how many layers' checkpoints --checkpoint-in-cpu keeps on the GPU
('auto'), and the longest sequence the given flags can train."""
import copy
import dataclasses

from megatron_sp.config import RunConfig
from megatron_sp.plan.memory import GIB, MemoryEstimate, ZeroSetup, estimate_memory, heaviest_stage, layers_per_stage

MEMORY_RESERVE = 0.9  # fit inside 90 % of GPU memory: CUDA context, NCCL buffers and fragmentation are not estimated
HOST_RESERVE = 0.8  # and inside 80 % of a rank's share of host memory: the process itself, data, DeepSpeed
DEFAULT_HOST_GIB = 128.0


def detect_host_memory_gib() -> float:
    """This machine's memory in GiB (MemTotal), else DEFAULT_HOST_GIB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return DEFAULT_HOST_GIB


def host_memory_gib(cfg: RunConfig, world: int, gpus_per_node: int) -> float:
    """A rank's share of its node's host memory (--host-memory-gb or detected, over the GPUs of a node)."""
    return (cfg.training.host_memory_gb or detect_host_memory_gib()) / max(1, min(world, gpus_per_node))


def fits(est: MemoryEstimate, gpu_gib: float, host_gib: float) -> bool:
    return est.total <= MEMORY_RESERVE * gpu_gib * GIB and est.host_total <= HOST_RESERVE * host_gib * GIB


def keep_layers_that_fit(cfg: RunConfig, world: int, sp: int, strategy: str, u: int | None, zero: ZeroSetup,
                         gpu_gib: float) -> int:
    """The most layers per pipeline stage whose checkpoints can stay on the GPU (within MEMORY_RESERVE on
    the heaviest stage), 0 if even none fit: every kept layer is host memory and copy traffic saved."""
    keep = 0
    for n in range(1, layers_per_stage(cfg) + 1):  # GPU memory grows with n: stop at the first that does not fit
        if heaviest_stage(cfg, world, sp, strategy, u, zero, keep_layers=n)[1].total > MEMORY_RESERVE * gpu_gib * GIB:
            break
        keep = n
    return keep


def with_seq_length(cfg: RunConfig, seq_length: int) -> RunConfig:
    """cfg for another sequence length (a learned position table grows with it)."""
    other = copy.copy(cfg)
    m = cfg.model
    other.model = dataclasses.replace(m, seq_length=seq_length,
                                      max_position_embeddings=max(m.max_position_embeddings or 0, seq_length))
    return other


def estimate_for(cfg: RunConfig, world: int, sp: int, strategy: str, u: int | None, zero: ZeroSetup,
                 gpu_gib: float, pp_rank: int | None = None) -> MemoryEstimate:
    """The estimate for cfg as it would run, of pipeline stage pp_rank (default: the heaviest stage):
    --checkpoint-in-cpu-keep-layers auto resolved first."""
    keep = None
    if cfg.model.checkpoint_in_cpu and cfg.model.checkpoint_in_cpu_keep_layers == "auto":
        keep = keep_layers_that_fit(cfg, world, sp, strategy, u, zero, gpu_gib)
    if pp_rank is None:
        return heaviest_stage(cfg, world, sp, strategy, u, zero, keep_layers=keep)[1]
    return estimate_memory(cfg, world, sp, strategy, u, zero, pp_rank, keep_layers=keep)


def longest_sequence(cfg: RunConfig, world: int, sp: int, strategy: str, u: int | None, zero: ZeroSetup,
                     gpu_gib: float, host_gib: float, granule: int = 2048) -> int:
    """The longest multiple of granule * sp tokens per sample that fits GPU and host memory with these
    flags (0 if none does); memory grows with the length, so a doubling then bisection finds it."""
    step = granule * sp

    def ok(n: int) -> bool:
        return fits(estimate_for(with_seq_length(cfg, n * step), world, sp, strategy, u, zero, gpu_gib),
                    gpu_gib, host_gib)

    if not ok(1):
        return 0
    low, high = 1, 2
    while ok(high):
        low, high = high, high * 2
        if high * step > 2 ** 40:  # nothing grows: no sequence limit worth printing
            return low * step
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low * step
