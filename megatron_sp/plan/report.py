"""The planner's printout: parallel layout, per-GPU and host memory by part, the longest sequence that fits,
FLOPs and SP traffic per iteration."""
import copy
import dataclasses

from megatron_sp.config import RunConfig
from megatron_sp.parallel.sharding import configured_sp
from megatron_sp.plan.activations import layer_bytes
from megatron_sp.plan.choose import ACHIEVED_FLOPS, iteration_seconds
from megatron_sp.plan.fit import HOST_RESERVE, MEMORY_RESERVE, estimate_for, longest_sequence
from megatron_sp.plan.memory import (GIB, ZeroSetup, count_parameters, estimate_memory, in_flight_micro_batches,
                                     layers_on_host, layers_per_stage)
from megatron_sp.flops import flops_per_token

def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f} GiB"


def memory_lines(cfg: RunConfig, world: int, zero: ZeroSetup, gpu_gib: float, host_gib: float) -> list[str]:
    """The memory estimate for the configured SP size and strategy (GPU and host, per rank), the longest
    sequence these flags fit, and a warning line last if this one does not fit."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    (sp, strategy, ulysses_degree), pp = configured_sp(p), p.pipeline_model_parallel_size
    stages = [estimate_for(cfg, world, sp, strategy, ulysses_degree, zero, gpu_gib, r) for r in range(pp)]
    stage = max(range(pp), key=lambda r: stages[r].total)
    est = stages[stage]
    ckpt = "on" if m.checkpoint_activations else "selective (MLP)" if m.recompute_granularity == "selective" else "off"
    where = (f" of pipeline stage {stage} (the largest; {in_flight_micro_batches(cfg, world, sp, stage)} micro batches "
             f"in flight under 1F1B)") if pp > 1 else ""
    lines = [f"memory per GPU{where} (estimate): ZeRO {zero.stage} over {world // pp} ranks, {cfg.precision}, "
             f"activation checkpointing {ckpt}{_saving_modes(cfg, layers_on_host(cfg))}, {est.local_tokens} local "
             f"tokens (micro batch {t.micro_batch_size} x {m.seq_length} / SP {sp}); peak during {est.phase}"]
    lines += [f"  {name:<20}{_gib(value)}" for name, value in est.parts.items()]
    lines.append(f"  {'total':<20}{_gib(est.total)} of {gpu_gib:.1f} GiB")
    if pp > 1:
        lines.append("  per stage: " + ", ".join(f"{r}: {e.total / GIB:.2f}" for r, e in enumerate(stages)) + " GiB")
    if est.host:
        lines.append(f"  host memory per rank: " + ", ".join(f"{k} {_gib(v).strip()}" for k, v in est.host.items())
                     + f"; of {host_gib:.1f} GiB")
    flipped = copy.copy(cfg)
    flipped.model = dataclasses.replace(m, checkpoint_activations=not m.checkpoint_activations,
                                        recompute_granularity=None, checkpoint_in_cpu=False,
                                        checkpoint_in_cpu_keep_layers=0)
    alt = estimate_memory(flipped, world, sp, strategy, ulysses_degree, zero, stage)
    lines.append(f"  with activation checkpointing {'off' if m.checkpoint_activations else 'on'} (GPU only): "
                 f"activations {_gib(alt.parts.get('activations', 0)).strip()}, total {_gib(alt.total).strip()}")
    return lines + _per_token_lines(cfg, world, zero, gpu_gib, host_gib, est)


def _per_token_lines(cfg: RunConfig, world: int, zero: ZeroSetup, gpu_gib: float, host_gib: float, est) -> list[str]:
    """A layer's bytes per local token, the longest sequence that fits, what is not counted, and a warning
    line last if the estimate `est` does not fit."""
    m = cfg.model
    sp, strategy, ulysses_degree = configured_sp(cfg.parallel)
    layer = layer_bytes(cfg, sp, strategy, ulysses_degree, cfg.elem_bytes)
    lines = [f"  bytes per local token per layer with nothing recomputed: {sum(layer.terms.values()):.0f} = "
             + " + ".join(f"{k} {v:.0f}" for k, v in layer.terms.items() if v)
             + f"; kept for backward as configured: {layer.kept:.0f}; a layer's backward at most "
             f"{layer.backward_peak:.0f}"]
    longest = longest_sequence(cfg, world, sp, strategy, ulysses_degree, zero, gpu_gib, host_gib)
    lines.append(f"  longest sequence these flags fit: {longest} tokens per sample (under {MEMORY_RESERVE:.0%} "
                 f"of GPU and {HOST_RESERVE:.0%} of host memory)" if longest else
                 "  longest sequence these flags fit: none")
    lines.append("  not counted: CUDA context, NCCL buffers, allocator fragmentation "
                 f"(the auto planner keeps {1 - MEMORY_RESERVE:.0%} free for them)")
    if est.total > gpu_gib * GIB or est.host_total > host_gib * GIB:
        what = (f"GPU memory ({est.total / GIB:.1f} of {gpu_gib:.1f} GiB)" if est.total > gpu_gib * GIB
                else f"host memory ({est.host_total / GIB:.1f} of {host_gib:.1f} GiB)")
        lines.append(f"WARNING: the estimate exceeds the {what}; to fit: {memory_remedies(cfg, zero)}")
    return lines


def _saving_modes(cfg: RunConfig, on_host: int) -> str:
    m = cfg.model
    text = ""
    if m.checkpoint_in_cpu:
        text += f", checkpoints of {on_host} of {layers_per_stage(cfg)} layers in host memory"
    if m.mlp_tile_tokens:
        text += f", MLP in tiles of {m.mlp_tile_tokens} tokens"
    return text


def memory_remedies(cfg: RunConfig, zero: ZeroSetup) -> str:
    """The memory levers this configuration has not pulled yet, as one phrase."""
    m = cfg.model
    levers = ["a larger --sequence-parallel-size (or auto) or --pipeline-model-parallel-size"]
    if not m.checkpoint_activations:
        if m.recompute_granularity != "selective":
            levers.append("--recompute-granularity selective")
        levers.append("--checkpoint-activations")
    if not m.checkpoint_in_cpu:
        levers.append("--checkpoint-in-cpu")
    elif m.checkpoint_in_cpu_keep_layers:
        levers.append("fewer --checkpoint-in-cpu-keep-layers")
    if not m.mlp_tile_tokens:
        levers.append("--mlp-tile-tokens 8192")
    if zero.stage < 3:
        levers.append(f"--zero-stage {zero.stage + 1}")
    if not zero.offload_optimizer and zero.stage >= 1:
        levers.append("offload_optimizer in the DeepSpeed JSON")
    if cfg.training.micro_batch_size > 1:
        levers.append("a smaller --micro-batch-size")
    return ", ".join(levers) + " or more GPUs"


def flops_lines(cfg: RunConfig, world: int, gpus_per_node: int) -> list[str]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tokens = t.global_batch_size * m.seq_length
    model, hardware = flops_per_token(cfg, False) * tokens, flops_per_token(cfg, True) * tokens
    sp, strategy, ulysses_degree = configured_sp(p)
    seconds, sent = iteration_seconds(cfg, world, sp, strategy, ulysses_degree, gpus_per_node, t.global_batch_size)
    lines = [f"model: {count_parameters(cfg) / 1e9:.3f} B parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
             f"heads {m.num_attention_heads}/{m.num_key_value_heads} (q/kv), FFN {m.ffn_hidden_size}, "
             f"vocab {cfg.padded_vocab_size}",
             f"FLOPs per iteration ({t.global_batch_size} x {m.seq_length} tokens): {model:.3e} model, "
             f"{hardware:.3e} with recompute; {model / world:.3e} model FLOPs per GPU",
             f"  modelled time: {seconds:.2f} s per iteration (compute at an assumed {ACHIEVED_FLOPS / 1e12:.0f} "
             "TFLOP/s per GPU, plus the SP communication the model does not hide"
             + (", stretched by the pipeline bubble)" if p.pipeline_model_parallel_size > 1 else ")")]
    if sp > 1:
        lines.append(f"  SP communication: {sent / 1e9:.2f} GB sent per GPU per iteration")
    return lines
