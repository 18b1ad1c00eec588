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
parameter column. Activations are counted per local token (b * s / P) in ``activations.py``.
"""
from dataclasses import dataclass, field

from megatron_sp.config import RunConfig, zero_stage_of
from megatron_sp.plan.activations import activation_bytes, logits_bytes
from megatron_sp.parallel.sharding import effective_strategy

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
    micro_batches = (t.global_batch_size or t.micro_batch_size * dp) // (t.micro_batch_size * dp)
    return max(1, min(p.pipeline_model_parallel_size - pp_rank, micro_batches))


@dataclass
class ZeroSetup:
    """What the memory model needs from the DeepSpeed JSON (flags win, as in training/engine.py)."""
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = DEFAULT_REDUCE_BUCKET
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET

    @classmethod
    def from_config(cls, cfg: RunConfig, ds_json: dict) -> "ZeroSetup":
        zero = ds_json.get("zero_optimization", {})
        stage = zero_stage_of(cfg, ds_json)
        offloaded = lambda key: str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")  # noqa: E731
        return cls(stage=int(stage), offload_optimizer=offloaded("offload_optimizer"),
                   offload_param=offloaded("offload_param") and int(stage) == 3,
                   reduce_bucket=int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)),
                   prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET)))


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
    """Per-GPU bytes, by what holds them; `host` is what offloading moved to CPU memory."""
    parts: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    local_tokens: int = 0

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate_memory(cfg: RunConfig, world: int, sp: int, strategy: str, ulysses_degree: int | None,
                    zero: ZeroSetup, pp_rank: int = 0) -> MemoryEstimate:
    """Peak GPU bytes per rank of pipeline stage pp_rank for SP size `sp` (strategy ulysses/ring/hybrid;
    'local' when sp == 1). ZeRO splits a stage's model states over the stage's world / PP ranks; under 1F1B
    the stage holds the activations of in_flight_micro_batches micro batches for its share of the layers."""
    t, m = cfg.training, cfg.model
    elem, pp = cfg.elem_bytes, cfg.parallel.pipeline_model_parallel_size
    params = stage_parameters(cfg, pp_rank)
    states = model_state_bytes(params, world // pp, zero.stage, elem)
    host = {}
    if zero.offload_optimizer and zero.stage >= 1:
        host["optimizer"] = states.pop("optimizer")
    if zero.offload_param:
        host["parameters"] = states.pop("parameters")
    local_tokens = t.micro_batch_size * m.seq_length // sp
    acts = activation_bytes(cfg, sp, effective_strategy(strategy, sp), ulysses_degree, elem, m.num_layers // pp)
    if m.checkpoint_activations:  # one layer at a time is rebuilt in backward
        stored, workspace = acts["checkpointed"], acts["layer"]
    elif m.recompute_granularity == "selective":  # one MLP at a time is rebuilt
        stored, workspace = acts["selective"], acts["mlp"]
    else:
        stored, workspace = acts["full"], 0
    workspace += acts["comm"] + acts["grad_work"]
    parts = {**states,
             "activations": local_tokens * stored * in_flight_micro_batches(cfg, world, sp, pp_rank),
             "backward workspace": local_tokens * workspace}
    if pp_rank == pp - 1:
        parts["logits/loss"] = logits_bytes(cfg, local_tokens, elem)
    if zero.stage >= 1:  # gradient reduce bucket (stages 1-2) / reduce-scatter bucket (stage 3)
        parts["ZeRO buckets"] = elem * min(zero.reduce_bucket, params)
    if zero.stage == 3:  # gathered full parameters of the layers in flight (the prefetch window)
        parts["ZeRO buckets"] += elem * max(2 * layer_parameters(cfg), zero.prefetch_bucket)
    return MemoryEstimate(parts=parts, host=host, local_tokens=local_tokens)


def heaviest_stage(cfg: RunConfig, world: int, sp: int, strategy: str, ulysses_degree: int | None,
                   zero: ZeroSetup) -> tuple[int, MemoryEstimate]:
    """(pp_rank, its estimate) of the pipeline stage that needs the most memory (the only one without a pipeline)."""
    estimates = [estimate_memory(cfg, world, sp, strategy, ulysses_degree, zero, pp_rank)
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
