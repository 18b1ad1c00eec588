"""The planner behind --dry-run, tools/plan.py and the 'auto' flags; allocates nothing.

    cfg, tokenizer = megatron_sp.configure.configure(argv, world)     # resolves 'auto' with resolve_auto
    print("\\n".join(plan_report(cfg, world, gpus_per_node)))

memory.py: parameters / gradients / optimizer by ZeRO stage and the peak's moment; activations.py: bytes per
local token; fit.py: GPU and host capacity, kept layers, the longest sequence; choose.py: the SP-size and
strategy search; report.py: the printout.
"""
from megatron_sp.config import RunConfig, fill_defaults, read_deepspeed_json
from megatron_sp.errors import ConfigError
from megatron_sp.parallel.layout import layout_lines
from megatron_sp.parallel.pipeline import schedule_lines
from megatron_sp.parallel.sharding import configured_sp
from megatron_sp.plan.choose import candidates, choose
from megatron_sp.plan.fit import HOST_RESERVE, MEMORY_RESERVE, estimate_for, host_memory_gib, keep_layers_that_fit
from megatron_sp.plan.memory import (GIB, MemoryEstimate, ZeroSetup, count_parameters, detect_gpu_memory_gib,
                                     estimate_memory, layers_per_stage)
from megatron_sp.plan.report import flops_lines, memory_lines


def gpu_memory_gib(cfg: RunConfig) -> float:
    return cfg.training.gpu_memory_gb or detect_gpu_memory_gib()


def zero_setup(cfg: RunConfig) -> ZeroSetup:
    """ZeRO stage and offloading from the flags and the DeepSpeed JSON (flags win)."""
    path = cfg.training.deepspeed_config
    return ZeroSetup.from_config(cfg, read_deepspeed_json(path) if path else {})


def configured_estimate(cfg: RunConfig, world: int, pp_rank: int | None = None) -> MemoryEstimate:
    """The per-rank estimate for the flags as given (their SP size, strategy, Ulysses degree, ZeRO setup and
    GPU memory; what --dry-run prints) of pipeline stage pp_rank, by default of the stage that needs the most."""
    return estimate_for(cfg, world, *configured_sp(cfg.parallel), zero_setup(cfg), gpu_memory_gib(cfg), pp_rank)


def resolve_auto(cfg: RunConfig, world: int, gpus_per_node: int) -> list[str]:
    """Replace --sequence-parallel-size auto by the planner's pick (SP size, strategy, Ulysses degree)
    and return the table of candidates and the reason. Needs cfg.padded_vocab_size."""
    fill_defaults(cfg)
    gib, host = gpu_memory_gib(cfg), host_memory_gib(cfg, world, gpus_per_node)
    try:
        cands = candidates(cfg, world, gpus_per_node, zero_setup(cfg), gib, host)
        pick, why = choose(cands)
    except ValueError as err:
        raise ConfigError(f"--sequence-parallel-size auto: {err}") from None
    p = cfg.parallel
    p.sequence_parallel_size = pick.sp
    if pick.sp > 1:
        p.sequence_parallel_strategy = pick.strategy
    p.ulysses_degree = pick.ulysses_degree
    lines = [f"--sequence-parallel-size auto over {world} GPUs ({gpus_per_node} per node, {gib:.1f} GiB each, "
             f"fit = under {MEMORY_RESERVE:.0%}; s/iter at global batch "
             f"{cfg.training.global_batch_size or cfg.training.micro_batch_size * world // p.pipeline_model_parallel_size}):",
             f"  {'candidate':<40} {'memory GiB':>10} {'SP GB/iter':>10} {'s/iter':>8}  fits"]
    for c in cands:
        lines.append(f"  {c.name:<40} {c.memory.total / GIB:>10.1f} {c.comm_bytes / 1e9:>10.2f} {c.seconds:>8.2f}  "
                     f"{'yes' if c.fits else 'no'}{'   <- picked' if c is pick else ''}")
    lines.append(f"  picked {pick.name}: {why}")
    return lines


def resolve_keep_layers(cfg: RunConfig, world: int, gpus_per_node: int) -> list[str]:
    """Replace --checkpoint-in-cpu-keep-layers auto by the most layers whose checkpoints fit on the GPU
    beside everything else (fit.keep_layers_that_fit); returns the line that says so."""
    gib = gpu_memory_gib(cfg)
    keep = keep_layers_that_fit(cfg, world, *configured_sp(cfg.parallel), zero_setup(cfg), gib)
    cfg.model.checkpoint_in_cpu_keep_layers = keep
    host = max(configured_estimate(cfg, world, r).host_total
               for r in range(cfg.parallel.pipeline_model_parallel_size))
    layers = layers_per_stage(cfg)
    return [f"--checkpoint-in-cpu-keep-layers auto: {keep} of {layers} layers keep their checkpoints on the "
            f"GPU (the most under {MEMORY_RESERVE:.0%} of {gib:.1f} GiB); the other {layers - keep} use "
            f"{host / GIB:.1f} GiB of host memory per rank (of {host_memory_gib(cfg, world, gpus_per_node):.1f}, "
            f"fit = under {HOST_RESERVE:.0%})"]


def plan_report(cfg: RunConfig, world: int, gpus_per_node: int) -> list[str]:
    """Report lines (layout, FLOPs, memory, then any warning) for a validated config."""
    return [*layout_lines(cfg, world, gpus_per_node), *pipeline_schedule_lines(cfg, world),
            *flops_lines(cfg, world, gpus_per_node),
            *memory_lines(cfg, world, zero_setup(cfg), gpu_memory_gib(cfg), host_memory_gib(cfg, world, gpus_per_node))]


def pipeline_schedule_lines(cfg: RunConfig, world: int) -> list[str]:
    """The stages' 1F1B schedule and its bubble (nothing without a pipeline)."""
    p, t = cfg.parallel, cfg.training
    pp = p.pipeline_model_parallel_size
    if pp == 1:
        return []
    dp = world // (pp * p.sequence_parallel_size)
    return schedule_lines(pp, cfg.model.num_layers, t.micro_batches_per_step(dp))


__all__ = ["resolve_auto", "resolve_keep_layers", "plan_report", "count_parameters", "estimate_memory",
           "configured_estimate", "ZeroSetup", "zero_setup"]
