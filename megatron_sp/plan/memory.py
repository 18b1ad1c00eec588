"""Per-GPU memory of a run, from the flags alone: parameters, gradients, optimizer, activations, buffers.

Model states follow the ZeRO paper's accounting (Ψ parameters of a pipeline stage, N = its ranks, since
DeepSpeed sees a stage's DP x SP ranks as data-parallel, see training/engine.py), checked against DeepSpeed
0.19.8:

    bytes per parameter     params   grads    optimizer (fp32 master + Adam m, v)
    stage 0, fp32           4        4        8         (torch AdamW on the fp32 weights)
    stage 0, bf16/fp16      2        2        12        (fp32 master + m + v, not partitioned)
    stage 1                 e        e        12 / N
    stage 2                 e        e / N    12 / N
    stage 3                 e / N    e / N    12 / N    (e = 2 for bf16/fp16, 4 for fp32)

ZeRO stages 1-3 keep an fp32 partition copy even for fp32 models, hence 12 there too.
offload_optimizer (cpu/nvme) moves the optimizer column to the host; offload_param (stage 3) the
parameter column. Activations are counted per local token (b * s / P) in ``activations.py``; with
--checkpoint-in-cpu the layers' kept tensors move to the host except the kept last layers and, during
backward, the layer in use and the one being brought back.

Under ZeRO 0-1 gradients are freed after each step and rebuilt during backward, so the peak of a long
sequence (the last layer's backward, every checkpoint still alive) sees almost none of them; with the
checkpoints on the host the first layer's backward (all gradients, few activations) can be the peak.
With the layer model of activations.py this reproduces the 1.3B model's measured peaks at 64k-512k
tokens within 5 % (docs/benchmarks.md).
"""
from dataclasses import dataclass, field

from megatron_sp.config import RunConfig, zero_stage_of
from megatron_sp.plan.activations import layer_bytes, loss_bytes, outside_layers_bytes
from megatron_sp.parallel.pipeline import stage_layers
from megatron_sp.parallel.sharding import effective_strategy
from megatron_sp.training.zero_reduction import reduction_changes_nothing

GIB = 2 ** 30
DEFAULT_REDUCE_BUCKET = int(5e8)  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)
DEFAULT_PREFETCH_BUCKET = int(5e7)  # stage3_prefetch_bucket_size default (elements)


def layer_parameters(cfg: RunConfig) -> int:
    """Parameters of one TransformerLayer (model/gpt.py); also what ZeRO-3 gathers at a time."""
    m, d = cfg.model, cfg.head_dim
    h, hq, hkv, f = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.ffn_hidden_size
    bias = not m.disable_bias_linear
    fc1_out = f * (2 if m.swiglu else 1)  # gate and up fused for SwiGLU
    return (2 * norm_parameters(cfg)
            + h * (hq + 2 * hkv) * d + (hq + 2 * hkv) * d * bias  # fused qkv
            + hq * d * h + h * bias                                # attention out
            + h * fc1_out + fc1_out * bias                         # fc1
            + f * h + h * bias)                                    # fc2


def norm_parameters(cfg: RunConfig) -> int:
    """RMSNorm has a weight, LayerNorm a weight and a bias."""
    return cfg.model.hidden_size * (1 if cfg.model.normalization == "rmsnorm" else 2)


def count_parameters(cfg: RunConfig) -> int:
    """Exactly sum(p.numel() for p in GPTModel(...).parameters()) for these flags."""
    m, vocab = cfg.model, cfg.padded_vocab_size
    embeddings = vocab * m.hidden_size + (m.max_position_embeddings * m.hidden_size if m.learned_positions else 0)
    output = vocab * m.hidden_size if m.untie_embeddings_and_output_weights else 0
    return embeddings + m.num_layers * layer_parameters(cfg) + norm_parameters(cfg) + output


def stage_parameters(cfg: RunConfig, pp_rank: int) -> int:
    """Exactly sum(p.numel() for p in GPTStage(..., pp_rank=pp_rank).parameters()): its share of the layers,
    the embeddings on the first stage, the final norm and the output layer on the last (with tied embeddings
    the last stage's output layer is its own copy of the word embedding)."""
    m, pp, vocab = cfg.model, cfg.parallel.pipeline_model_parallel_size, cfg.padded_vocab_size
    if pp == 1:
        return count_parameters(cfg)
    params = m.num_layers // pp * layer_parameters(cfg)
    if pp_rank == 0:
        params += vocab * m.hidden_size + (m.max_position_embeddings * m.hidden_size if m.learned_positions else 0)
    if pp_rank == pp - 1:
        params += norm_parameters(cfg) + vocab * m.hidden_size
    return params


def in_flight_micro_batches(cfg: RunConfig, world: int, sp: int, pp_rank: int) -> int:
    """Micro batches whose activations stage pp_rank holds at its peak under 1F1B: min(PP - pp_rank, m)."""
    p, t = cfg.parallel, cfg.training
    dp = world // (p.pipeline_model_parallel_size * sp)
    return max(1, min(p.pipeline_model_parallel_size - pp_rank, t.micro_batches_per_step(dp)))


@dataclass
class ZeroSetup:
    """What the memory model needs from the DeepSpeed JSON (flags win, as in training/engine.py)."""
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = DEFAULT_REDUCE_BUCKET
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET
    overlap_comm: bool = False  # DeepSpeed's default below stage 3
    predivide_factor: float = 1.0  # the JSON's gradient_predivide_factor

    @classmethod
    def from_config(cls, cfg: RunConfig, ds_json: dict) -> "ZeroSetup":
        zero = ds_json.get("zero_optimization", {})
        stage = zero_stage_of(cfg, ds_json)
        offloaded = lambda key: str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")  # noqa: E731
        return cls(stage=int(stage), offload_optimizer=offloaded("offload_optimizer"),
                   offload_param=offloaded("offload_param") and int(stage) == 3,
                   reduce_bucket=int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)),
                   prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET)),
                   overlap_comm=bool(zero.get("overlap_comm", int(stage) == 3)),
                   predivide_factor=float(ds_json.get("gradient_predivide_factor", 1.0)))


def model_state_bytes(params: int, world: int, stage: int, elem: int) -> dict[str, float]:
    """{parameters, gradients, optimizer} bytes per GPU for `params` parameters over `world` ranks."""
    if stage == 0:
        return {"parameters": elem * params, "gradients": elem * params,
                "optimizer": (8 if elem == 4 else 12) * params}
    shard = lambda nbytes: -(-nbytes // world)  # noqa: E731 - ZeRO pads the last partition: round up
    return {"parameters": shard(elem * params) if stage == 3 else elem * params,
            "gradients": shard(elem * params) if stage >= 2 else elem * params,
            "optimizer": shard(12 * params)}


@dataclass
class MemoryEstimate:
    """Per-GPU bytes at the predicted peak, by what holds them, and when it comes (`phase`); `host` is what
    lives in host memory per rank (offloaded optimizer or parameters, activation checkpoints)."""
    parts: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    local_tokens: int = 0
    phase: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def layers_per_stage(cfg: RunConfig) -> int:
    """Transformer layers one pipeline stage holds (all of them without a pipeline; every stage as many)."""
    return len(stage_layers(cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size, 0))


def layers_on_host(cfg: RunConfig, keep_layers: int | None = None) -> int:
    """Layers of a stage whose checkpoints --checkpoint-in-cpu moves to the host (all but the kept last
    ones); an unresolved 'auto' counts as keeping none."""
    m = cfg.model
    if not m.checkpoint_in_cpu:
        return 0
    keep = m.checkpoint_in_cpu_keep_layers if keep_layers is None else keep_layers
    return max(0, layers_per_stage(cfg) - (0 if keep == "auto" else keep))


def early_gradients(cfg: RunConfig, elem: int, head: bool = True) -> float:
    """Gradient bytes that exist during the last layer's backward when gradients are built during backward
    (ZeRO 0-1; they are freed after each step): the output layer's (the embedding's when tied; on the
    stage with the head) and the last layer's."""
    m = cfg.model
    head_params = cfg.padded_vocab_size * m.hidden_size + norm_parameters(cfg) if head else 0
    return elem * (head_params + layer_parameters(cfg))


def step_temporaries(params: int, world: int, stage: int, elem: int, one_pass: bool = False) -> float:
    """DeepSpeed's optimizer step beside the model states (from its code, not measured): ZeRO 1-2 flatten
    the rank's gradient partition and convert it to fp32; ZeRO 3 converts its partition to fp32. one_pass:
    the sync-free ZeRO 1-2 step (training/fused_norm.py), whose AdamW reads the flat bf16 partition itself."""
    shard = -(-params // world)
    flat = elem if one_pass else elem + 4
    return {0: 0, 1: flat * shard, 2: flat * shard, 3: 4 * shard}[stage]


def estimate_memory(cfg: RunConfig, world: int, sp: int, strategy: str, ulysses_degree: int | None,
                    zero: ZeroSetup, pp_rank: int = 0, keep_layers: int | None = None,
                    qkv_kept_whole: bool = False) -> MemoryEstimate:
    """Peak GPU bytes per rank of pipeline stage pp_rank for SP size `sp` (strategy ulysses/ring/hybrid;
    'local' when sp == 1): the largest of four moments, the backward of the stage's last layer (most
    activations), of its first layer (all gradients), the loss's backward (last stage) and the optimizer
    step. ZeRO splits a stage's model states over world / PP ranks; under 1F1B the stage holds k micro
    batches in flight, whose other k - 1 keep what their layers keep on the GPU. keep_layers overrides
    --checkpoint-in-cpu-keep-layers; qkv_kept_whole: see activations.layer_terms."""
    t, m = cfg.training, cfg.model
    elem, pp, n_layers = cfg.elem_bytes, cfg.parallel.pipeline_model_parallel_size, layers_per_stage(cfg)
    params = stage_parameters(cfg, pp_rank)
    states = model_state_bytes(params, world // pp, zero.stage, elem)
    host = {}
    if zero.offload_optimizer and zero.stage >= 1:
        host["optimizer"] = states.pop("optimizer")
    if zero.offload_param:
        host["parameters"] = states.pop("parameters")
    gradients = states.pop("gradients")
    one_pass = t.bf16 and t.fused_grad_norm and not zero.offload_optimizer  # training/fused_norm.py's step
    # that step where DeepSpeed's reduction changes nothing: the gradients skip it and its bucket. No fp32
    # accumulation attribute: bf16 with fp32 accumulation at ZeRO-1 runs DeepSpeed's BF16_Optimizer instead
    one_rank = one_pass and reduction_changes_nothing(
        partitioned=zero.stage >= 2, data_parallel_ranks=world // pp, overlap_comm=zero.overlap_comm,
        fp32_accumulation_attribute=False, predivide_factor=zero.predivide_factor)
    if zero.stage >= 1 and not one_rank:  # gradient reduce bucket (stages 1-2) / reduce-scatter bucket (stage 3)
        states["ZeRO buckets"] = elem * min(zero.reduce_bucket, params)
    if zero.stage == 3:  # gathered full parameters of the layers in flight (the prefetch window)
        states["ZeRO buckets"] += elem * max(2 * layer_parameters(cfg), zero.prefetch_bucket)
    local = t.micro_batch_size * m.seq_length // sp
    in_flight = in_flight_micro_batches(cfg, world, sp, pp_rank)
    layer = layer_bytes(cfg, sp, effective_strategy(strategy, sp), ulysses_degree, elem, qkv_kept_whole)
    on_host = layers_on_host(cfg, keep_layers)
    if on_host:
        host["activation checkpoints"] = in_flight * on_host * layer.kept * local
    # layers whose kept tensors are on the GPU when backward starts / while one layer's backward runs
    # (with checkpoints on the host: the kept ones, or the layer in use and the one coming back)
    at_start = n_layers - on_host if not on_host else max(n_layers - on_host, 1)
    in_backward = n_layers if not on_host else min(n_layers, max(n_layers - on_host, 2))
    waiting = (in_flight - 1) * at_start * layer.kept * local  # the other micro batches in flight
    outside = in_flight * outside_layers_bytes(cfg, elem) * local
    last = pp_rank == pp - 1
    early = gradients if zero.stage >= 2 else min(gradients, early_gradients(cfg, elem, head=last))
    work = (layer.backward_peak - layer.kept) * local
    phases = {
        "the last layer's backward": {**states, "gradients": early, "activations": waiting + in_backward
                                      * layer.kept * local + outside, "backward workspace": work},
        "the first layer's backward": {**states, "gradients": gradients, "activations": waiting + min(
                                       in_backward, 2 if on_host else 1) * layer.kept * local + outside,
                                       "backward workspace": work},
        "the optimizer step": {**states, "gradients": gradients,
                               "optimizer step": step_temporaries(params, world // pp, zero.stage, elem,
                                                                   one_pass=one_pass)},
    }
    if last:
        phases["the loss's backward"] = {**states, "gradients": early, "activations": waiting + at_start
                                         * layer.kept * local + outside, "logits/loss": loss_bytes(cfg, local, elem)}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    return MemoryEstimate(parts=phases[phase], host=host, local_tokens=local, phase=phase)


def heaviest_stage(cfg: RunConfig, world: int, sp: int, strategy: str, ulysses_degree: int | None,
                   zero: ZeroSetup, keep_layers: int | None = None) -> tuple[int, MemoryEstimate]:
    """(pp_rank, its estimate) of the pipeline stage that needs the most GPU memory (the only one without
    a pipeline)."""
    estimates = [estimate_memory(cfg, world, sp, strategy, ulysses_degree, zero, pp_rank, keep_layers)
                 for pp_rank in range(cfg.parallel.pipeline_model_parallel_size)]
    return max(enumerate(estimates), key=lambda pair: pair[1].total)


def detect_gpu_memory_gib() -> float:
    """Memory of GPU 0 in GiB when torch sees a GPU, else 80 (an 80 GB-class GPU)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except ImportError:
        pass
    return 80.0
