"""DeepSpeed set-up: the JSON config merged with the flags, the mpu adapter, deepspeed.initialize."""
import difflib
import math

import deepspeed
import pydantic
import torch

from megatron_sp.config import RunConfig, read_deepspeed_json, zero_stage_of
from megatron_sp.errors import ConfigError
from megatron_sp.parallel.state import ParallelState
from megatron_sp.training import fused_norm
from megatron_sp.training.schedule import LRSchedule


class DeepSpeedMPU:
    """What DeepSpeed asks of Megatron's ``mpu``, answered from a ParallelState.

    DeepSpeed is shown every rank of a pipeline stage (DP x SP; all ranks without a pipeline) as a
    data-parallel rank: ZeRO shards parameters, gradients and optimizer state over them and averages
    gradients over them (the loop scales each rank's loss so that this average is the exact global-batch
    gradient). DeepSpeed's own sequence-parallel hooks are deliberately not offered: with them, DeepSpeed
    0.19.8's ZeRO-3 reduces wrong gradients (tests/test_training.py would catch it).
    The model-parallel group is the pipeline group (one rank per stage): DeepSpeed sums gradient norms
    over it, so clipping sees the whole model, and names each stage's checkpoint files by its rank in it
    (mp_rank_01_model_states.pt for stage 1). No tensor parallelism: that group is each rank on its own.
    """

    def __init__(self, ps: ParallelState, self_group):
        self.ps, self._self_group = ps, self_group

    def get_data_parallel_group(self): return self.ps.stage_group
    def get_data_parallel_world_size(self): return self.ps.stage_size
    def get_data_parallel_rank(self): return self.ps.rank % self.ps.stage_size
    # the pipeline: every stage holds other parameters
    def get_model_parallel_group(self): return self.ps.pipeline_group
    def get_model_parallel_world_size(self): return self.ps.pp_size
    def get_model_parallel_rank(self): return self.ps.pp_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    # no tensor parallelism
    def get_tensor_model_parallel_group(self): return self._self_group
    def get_tensor_model_parallel_world_size(self): return 1
    def get_tensor_model_parallel_rank(self): return 0


def mark_pipeline_parameters(stage: torch.nn.Module, replicas: list[torch.nn.Parameter]) -> None:
    """Tell DeepSpeed's gradient norm (summed over its model-parallel group, the pipeline) which parameters a
    stage counts: all of its own (`model_parallel`: distinct on every stage; the model-parallel rank > 0 of
    later stages would otherwise leave them out), not `replicas` (`ds_pipe_replicated`: the last stage's
    copy of the tied word embedding, which the first stage counts)."""
    replica_ids = {id(p) for p in replicas}
    for p in stage.parameters():
        p.model_parallel = id(p) not in replica_ids
        setattr(p, fused_norm.PIPE_REPLICATED, id(p) in replica_ids)


# The top-level keys DeepSpeed 0.19 reads (its runtime/config.py and the sections it delegates to). DeepSpeed
# ignores any other key without a word, so a misspelt section would silently not apply.
DEEPSPEED_KEYS = frozenset("""
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
    communication_data_type seq_parallel_communication_data_type prescale_gradients gradient_predivide_factor
    sparse_gradients fp16 bf16 bfloat16 amp gradient_clipping zero_optimization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer aio activation_checkpointing sparse_attention data_efficiency curriculum_learning
    tensorboard wandb csv_monitor comet flops_profiler elasticity autotuning compression_training checkpoint
    data_types comms_logger steps_per_print wall_clock_breakdown dump_state memory_breakdown disable_allgather
    dataloader_drop_last pipeline compile timers hybrid_engine eigenvalue progressive_layer_drop quantize_training
    weight_quantization nebula torch_autocast tensor_parallel expert_parallel gradient_allreduce_op graph_harvesting
    zenflow disable_python_gc managed_gradient_accumulation log_level vocabulary_size sequence_parallel_size
    datastates_ckpt use_data_before_expert_parallelism""".split())


def _check_json(ds: dict, source: str) -> list[str]:
    """What DeepSpeed would refuse with a pydantic traceback, as one ConfigError line (checked with DeepSpeed's own
    model of the ZeRO section); returns a note per top-level key DeepSpeed would ignore."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    zero = ds["zero_optimization"]  # its stage checked by zero_stage_of
    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as err:
        raise ConfigError(pydantic_line(err, source, "zero_optimization.")) from None
    notes = []
    for key in sorted(set(ds) - DEEPSPEED_KEYS):
        close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1, cutoff=0.8)
        notes.append(f"{source}: '{key}' is not a DeepSpeed setting, so DeepSpeed ignores it"
                     + (f" (did you mean '{close[0]}'?)" if close else ""))
    return notes


def pydantic_line(err: pydantic.ValidationError, source: str, prefix: str = "") -> str:
    """DeepSpeed's config validation error (a pydantic traceback) as one line naming the key."""
    first = err.errors()[0]
    key = prefix + ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key} (DeepSpeed refuses keys it does not know in this section)"
    return f"{source}: {key}: {first['msg']}, got {first.get('input')!r}"


def deepspeed_config(cfg: RunConfig, dp_size: int) -> tuple[dict, list[str]]:
    """The user's JSON (if any) with batch sizes, precision, clipping and ZeRO stage filled in.

    Returns (config, notes). A JSON value that contradicts a flag is a ConfigError. The JSON's
    train_batch_size means what it means in Megatron-DeepSpeed (the global batch); DeepSpeed
    itself is given that times the SP size, since it counts every rank as data-parallel.
    """
    t = cfg.training
    ds, notes = {}, []
    if t.deepspeed_config:
        ds = read_deepspeed_json(t.deepspeed_config)
    grad_acc = t.micro_batches_per_step(dp_size)
    wanted = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": grad_acc}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{t.deepspeed_config}: {key} = {ds[key]} contradicts the flags, which give {value} "
                              f"(global batch {t.global_batch_size}, micro batch {t.micro_batch_size}, DP {dp_size})")
        ds[key] = value
    ds["train_batch_size"] = t.global_batch_size * cfg.parallel.sequence_parallel_size
    for section in ("optimizer", "scheduler"):
        if ds.pop(section, None) is not None:
            notes.append(f"the {section} section of {t.deepspeed_config} is ignored (the Megatron flags set it)")
    if t.universal_checkpoint:  # DeepSpeed then reads the tag named in latest_universal
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    stage = zero_stage_of(cfg, ds)
    ds.setdefault("zero_optimization", {})["stage"] = stage
    if t.fp16:
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": True, "loss_scale": t.loss_scale or 0,
                      "initial_scale_power": int(round(math.log2(t.initial_loss_scale))),
                      "loss_scale_window": t.loss_scale_window, "hysteresis": t.hysteresis,
                      "min_loss_scale": t.min_loss_scale}
        ds.pop("bf16", None)
    elif t.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        ds.pop("fp16", None)
    else:
        for key in ("fp16", "bf16"):
            if ds.get(key, {}).get("enabled"):
                notes.append(f"{key} is enabled in {t.deepspeed_config} but not by a flag: training in fp32")
            ds.pop(key, None)
    ds["gradient_clipping"] = t.clip_grad
    ds.setdefault("steps_per_print", 10 ** 9)  # our own log line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer (on by default) synchronizes the device as each step starts and ends, so the
    # GPU idles while the host queues the next step's first kernels; our log line measures throughput instead
    ds.setdefault("timers", {}).setdefault("throughput", {"enabled": False})
    notes += _check_json(ds, t.deepspeed_config or "the DeepSpeed config")
    return ds, notes


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's real shape, also when ZeRO-3 holds only a shard of it (then p.shape is [0])."""
    return getattr(p, "ds_shape", p.shape)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms)."""
    decay = [p for p in model.parameters() if len(full_shape(p)) > 1]
    no_decay = [p for p in model.parameters() if len(full_shape(p)) <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(make_model, ds_config: dict, mpu: DeepSpeedMPU, rank: int, weights=None) -> torch.nn.Module:
    """The model (or this rank's pipeline stage), built so that no rank ever holds all of it under ZeRO-3.

    ZeRO-3: under deepspeed.zero.Init each parameter is partitioned over the stage's ranks as soon as its
    module is built (a 30B model would otherwise be materialised whole on every rank and moved
    whole to its GPU); then each parameter in turn is gathered, given the Megatron init on the stage's
    first rank (`rank` is the rank in the stage) and re-partitioned. Other stages: built whole; DeepSpeed
    broadcasts the first rank's copy.
    weights: name -> tensor, the values to start from instead of the init (--load-hf).
    """
    def init(model, name, p):
        if weights is None:
            model.init_parameter(name, p)
        else:
            with torch.no_grad():
                p.copy_(weights(name))

    if ds_config["zero_optimization"]["stage"] != 3:
        model = make_model()
        if weights is not None:
            for name, p in model.named_parameters():
                init(model, name, p)
        return model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu, data_parallel_group=mpu.get_data_parallel_group()):
        model = make_model()  # its reset_parameters saw only empty shards: a no-op
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                init(model, name, p)
    return model


def _count_skipped_step(engine, scheduler) -> None:
    """What DeepSpeed's engine does for a step whose update was skipped (inf/NaN gradients), for a sync-free
    step whose skip the host learnt of one step late: count it, and take back the lr schedule's step."""
    engine.skipped_steps += 1
    scheduler.undo_step()


def initialize(make_model, cfg: RunConfig, ps: ParallelState, self_group, weights=None):
    """Build the model (build_model, from `weights` if given) and wrap it in a DeepSpeed engine with AdamW and
    the Megatron lr schedule -> (engine, scheduler, DeepSpeed config, notes for the user)."""
    ds_config, notes = deepspeed_config(cfg, ps.dp_size)
    t = cfg.training
    ds_config["optimizer"] = {"type": "AdamW", "params": {
        "lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay,
        "torch_adam": True, "adam_w_mode": True,
        "fused": True}}  # torch's one-kernel AdamW (CPU and GPU): no DeepSpeed op to build
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    mpu = DeepSpeedMPU(ps, self_group)
    try:  # DeepSpeed validates the other sections of the JSON as it parses them, before any collective
        model = build_model(make_model, ds_config, mpu, mpu.get_data_parallel_rank(), weights)
        if ps.pp_size > 1:
            mark_pipeline_parameters(model, model.tied_parameters() if ps.is_last_stage else [])
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, t.weight_decay), config=ds_config,
            mpu=mpu, lr_scheduler=lambda opt: LRSchedule(opt, cfg))
    except pydantic.ValidationError as err:
        raise ConfigError(pydantic_line(err, t.deepspeed_config or "the DeepSpeed config")) from None
    if t.fused_grad_norm:
        fused_norm.install(engine.optimizer, on_skipped=lambda: _count_skipped_step(engine, scheduler))
    return engine, scheduler, ds_config, notes
