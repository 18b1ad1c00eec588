"""The planner's printout: parallel layout, per-GPU memory by part, FLOPs and SP traffic per iteration."""
import copy
import dataclasses

from megatron_sp.config import RunConfig
from megatron_sp.parallel.sharding import effective_strategy, ulysses_degree_of
from megatron_sp.plan.activations import layer_terms
from megatron_sp.plan.choose import ACHIEVED_FLOPS, MEMORY_RESERVE, iteration_seconds
from megatron_sp.plan.memory import (GIB, ZeroSetup, count_parameters, estimate_memory, heaviest_stage,
                                     in_flight_micro_batches)
from megatron_sp.flops import flops_per_token

def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f} GiB"


def memory_lines(cfg: RunConfig, world: int, zero: ZeroSetup, gpu_gib: float) -> list[str]:
    """The memory estimate for the configured SP size and strategy, a warning line last if it does not fit."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    sp = p.sequence_parallel_size
    strategy, elem = effective_strategy(p.sequence_parallel_strategy, sp), cfg.elem_bytes
    pp = p.pipeline_model_parallel_size
    stage, est = heaviest_stage(cfg, world, sp, strategy, p.ulysses_degree, zero)
    ckpt = "on" if m.checkpoint_activations else "selective (MLP)" if m.recompute_granularity == "selective" else "off"
    where = (f" of pipeline stage {stage} (the largest; {in_flight_micro_batches(cfg, world, sp, stage)} micro batches "
             f"in flight under 1F1B)") if pp > 1 else ""
    lines = [f"memory per GPU{where} (estimate): ZeRO {zero.stage} over {world // pp} ranks, {cfg.precision}, "
             f"activation checkpointing {ckpt}, {est.local_tokens} local tokens (micro batch {t.micro_batch_size} x "
             f"{m.seq_length} / SP {sp})"]
    lines += [f"  {name:<20}{_gib(value)}" for name, value in est.parts.items()]
    lines.append(f"  {'total':<20}{_gib(est.total)} of {gpu_gib:.1f} GiB")
    if pp > 1:
        totals = [estimate_memory(cfg, world, sp, strategy, p.ulysses_degree, zero, r).total for r in range(pp)]
        lines.append("  per stage: " + ", ".join(f"{r}: {value / GIB:.2f}" for r, value in enumerate(totals)) + " GiB")
    flipped = copy.copy(cfg)
    flipped.model = dataclasses.replace(m, checkpoint_activations=not m.checkpoint_activations,
                                        recompute_granularity=None)
    alt = estimate_memory(flipped, world, sp, strategy, p.ulysses_degree, zero, stage)
    lines.append(f"  with activation checkpointing {'off' if m.checkpoint_activations else 'on'}: activations "
                 f"{_gib(alt.parts['activations']).strip()}, total {_gib(alt.total).strip()}")
    for name, value in est.host.items():
        lines.append(f"  offloaded to host memory: {name} {_gib(value).strip()} per rank")
    terms = layer_terms(cfg, strategy, ulysses_degree_of(strategy, sp, p.ulysses_degree), elem)
    lines.append(f"  bytes per local token per layer: {sum(terms.values()):.0f} = "
                 + " + ".join(f"{k} {v:.0f}" for k, v in terms.items() if v)
                 + f"; checkpointed: {elem * m.hidden_size} (layer input)")
    lines.append("  not counted: CUDA context, NCCL buffers, allocator fragmentation "
                 f"(the auto planner keeps {1 - MEMORY_RESERVE:.0%} free for them)")
    if est.total > gpu_gib * GIB:
        lines.append(f"WARNING: the estimate ({est.total / GIB:.1f} GiB) exceeds the GPU memory "
                     f"({gpu_gib:.1f} GiB); to fit: {memory_remedies(cfg, zero)}")
    return lines


def memory_remedies(cfg: RunConfig, zero: ZeroSetup) -> str:
    """The memory levers this configuration has not pulled yet, as one phrase."""
    levers = ["a larger --sequence-parallel-size (or auto) or --pipeline-model-parallel-size"]
    if not cfg.model.checkpoint_activations:
        if cfg.model.recompute_granularity != "selective":
            levers.append("--recompute-granularity selective")
        levers.append("--checkpoint-activations")
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
    sp = p.sequence_parallel_size
    strategy = effective_strategy(p.sequence_parallel_strategy, sp)
    seconds, sent = iteration_seconds(cfg, world, sp, strategy, p.ulysses_degree, gpus_per_node, t.global_batch_size)
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
