"""The pretraining run: process groups, model, data, DeepSpeed engine, the train/eval/save loop."""
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_sp.arguments import ConfigError
from megatron_sp.attention import build_inner_attention
from megatron_sp.attention.backends import resolve_backend
from megatron_sp.config import RunConfig
from megatron_sp.data.gpt_dataset import build_gpt_datasets
from megatron_sp.data.loader import build_data_iterator
from megatron_sp.model.gpt import GPTModel
from megatron_sp.parallel.sharding import effective_strategy, ulysses_degree_of
from megatron_sp.parallel.state import ParallelState
from megatron_sp.plan import gpus_per_node_from_env, layout_lines
from megatron_sp.training import checkpoint, engine as ds_engine
from megatron_sp.training.early_exit import EarlyExit
from megatron_sp.training.flops import flops_per_token
from megatron_sp.training.logger import Logger, iteration_line, max_memory_gib
from megatron_sp.training.loop import StepContext, evaluate, train_step


def init_distributed(cfg: RunConfig) -> torch.device:
    """torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU); env defaults for one process."""
    import deepspeed
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op; skips a 35 s build
    backend = cfg.parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    minutes = cfg.parallel.distributed_timeout_minutes
    deepspeed.init_distributed(dist_backend=backend,
                               **({"timeout": timedelta(minutes=minutes)} if minutes is not None else {}))
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches_of(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


@dataclass
class Setup:
    """Everything a run (or a benchmark of its steps) builds before the first step."""
    device: torch.device
    ps: ParallelState
    engine: object
    scheduler: object
    ds_config: dict
    notes: list[str]
    n_params: int
    ctx: StepContext


def build(cfg: RunConfig, tokenizer) -> Setup:
    """Process groups, seeded model with its inner attention, DeepSpeed engine, step context."""
    device = init_distributed(cfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    m, p, d = cfg.model, cfg.parallel, cfg.data
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    try:  # a kernel this device lacks is one error line now, not a traceback at the first forward
        resolve_backend(p.attention_backend, device, dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    strategy = effective_strategy(p.sequence_parallel_strategy, p.sequence_parallel_size)
    ps = ParallelState.build(p.sequence_parallel_size,
                             ulysses_degree_of(strategy, p.sequence_parallel_size, p.ulysses_degree))
    self_group = [dist.new_group([r]) for r in range(world)][rank]  # DeepSpeed's "model parallel" group
    seed_everything(cfg.training.seed)

    def make_model():
        return GPTModel(m, lambda: build_inner_attention(strategy, ps, causal=True, backend=p.attention_backend,
                                                         ulysses_head_groups=p.ulysses_head_groups,
                                                         fused=m.fused_elementwise),
                        cfg.padded_vocab_size)

    engine, scheduler, ds_config, notes = ds_engine.initialize(make_model, cfg, ps, self_group)
    n_params = sum(math.prod(ds_engine.full_shape(q)) for q in engine.module.parameters())
    ctx = StepContext(ps.sequence_layout(), ps.sp_rank, ps.world_size, tokenizer.eod,
                      d.reset_position_ids, d.eod_mask_loss, device, cfg.padded_vocab_size)
    return Setup(device, ps, engine, scheduler, ds_config, notes, n_params, ctx)


def run(cfg: RunConfig, tokenizer) -> dict:
    """Train as configured; returns {"losses": [per-step loss], "iteration": last step} for tests."""
    t = cfg.training
    if t.finetune and not checkpoint.has_checkpoint(t.load):
        raise ConfigError(f"--finetune: --load {t.load} holds no checkpoint to start from" if t.load else
                          "--finetune needs --load: the checkpoint whose weights the run starts from")
    if t.save and (problem := checkpoint.prepare_save_dir(t.save, t.load, t.finetune)):
        raise ConfigError(f"--save {t.save}: {problem}")
    with EarlyExit(t.exit_duration_in_mins, t.exit_signal_handler) as early_exit:
        return _run(cfg, tokenizer, early_exit)


def _run(cfg: RunConfig, tokenizer, early_exit: EarlyExit) -> dict:
    s = build(cfg, tokenizer)
    device, ps, engine, scheduler, ds_config, ctx = s.device, s.ps, s.engine, s.scheduler, s.ds_config, s.ctx
    world, rank = ps.world_size, ps.rank
    m, t = cfg.model, cfg.training
    log = Logger(rank, cfg.logging.tensorboard_dir)
    notes, n_params = s.notes, s.n_params
    grad_acc = ds_config["gradient_accumulation_steps"]
    for line in [f"model: {n_params / 1e6:.2f}M parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
                 f"heads {m.num_attention_heads}/{m.num_key_value_heads} (q/kv), vocab {cfg.padded_vocab_size}",
                 *layout_lines(cfg, world, gpus_per_node_from_env(world)),
                 f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x grad-accumulation {grad_acc} "
                 f"x DP {ps.dp_size}; {m.seq_length} tokens/sample, {m.seq_length // ps.sp_size} per rank; "
                 f"ZeRO stage {ds_config['zero_optimization']['stage']}; "
                 f"{cfg.precision}",
                 *[f"note: {n}" for n in notes + cfg.ignored]]:
        log.print(line)

    iteration, consumed = 0, 0
    if t.finetune:
        trained, _ = checkpoint.load(engine, t.load, rank, load_optimizer=False, load_rng=False)
        log.print(f"loaded the weights of {t.load} (iteration {trained} there); --finetune: training starts "
                  "at iteration 0 with a fresh optimizer")
    elif checkpoint.has_checkpoint(t.load):
        iteration, consumed = checkpoint.load(engine, t.load, rank, not t.no_load_optim, not t.no_load_rng)
        log.print(f"resumed from {t.load} at iteration {iteration} ({consumed} samples consumed)")
    elif t.load:
        log.print(f"no checkpoint in {t.load}: starting from scratch")

    eval_runs = t.train_iters // t.eval_interval + 1 if t.eval_interval else 0  # 0: no evaluation
    d = cfg.data
    try:  # every rank checks the options and files before rank 0 builds: a mistake is the same everywhere
        train_ds, valid_ds, test_ds = build_gpt_datasets(
            data_path=d.data_path, split=d.split, seq_length=m.seq_length, seed=t.seed,
            num_samples=(t.train_iters * t.global_batch_size, eval_runs * t.eval_iters * t.global_batch_size,
                         t.eval_iters * t.global_batch_size),
            data_cache_path=d.data_cache_path, train_data_path=d.train_data_path, valid_data_path=d.valid_data_path,
            test_data_path=d.test_data_path, mock=d.mock_data, vocab_size=tokenizer.vocab_size,
            is_rank_zero=rank == 0, barrier=dist.barrier)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if train_ds is None:
        raise ConfigError(f"no training data: the train split of {' '.join(d.train_data_path or d.data_path)} "
                          f"holds no documents (--split {d.split})")
    train_iter = build_data_iterator(train_ds, consumed, t.micro_batch_size, ps.dp_rank, ps.dp_size)

    first_iteration = iteration
    last_iteration = (min(t.train_iters, (iteration // t.exit_interval + 1) * t.exit_interval) if t.exit_interval
                      else t.train_iters)
    # per-step losses stay on the device (no host sync per step); read once at the end
    losses = torch.zeros(last_iteration - first_iteration, dtype=torch.float64, device=device)
    window = LogWindow(cfg, world)
    stop_reason = None
    while iteration < last_iteration and stop_reason is None:
        loss_sum, count, step_grad_norm = train_step(engine, micro_batches_of(train_iter, grad_acc), ctx)
        losses[iteration - first_iteration] = loss_sum / count
        iteration += 1
        consumed += t.global_batch_size
        window.add(loss_sum, count)
        stop_reason = early_exit.reason(device, dist.group.WORLD)
        last = iteration == last_iteration or stop_reason is not None
        if cfg.logging.log_interval and iteration % cfg.logging.log_interval == 0 or last:
            grad_norm = engine.get_global_grad_norm() if step_grad_norm is None else step_grad_norm
            stats = window.close(consumed, scheduler.get_lr()[0], grad_norm, device)
            if t.fp16:
                stats["loss_scale"] = engine.optimizer.cur_scale
            log.print(iteration_line(iteration, t.train_iters, stats))
            log.scalars(iteration, {"lm-loss": stats["loss"], "learning-rate": stats["lr"],
                                    "grad-norm": stats["grad_norm"], "tokens-per-sec": stats["tokens_per_sec"],
                                    "model-tflops": stats["model_tflops"], "batch-size": t.global_batch_size,
                                    "memory-gib": stats["memory_gib"]})
        if (valid_ds is not None and t.eval_interval and iteration % t.eval_interval == 0 and t.eval_iters
                and stop_reason is None):  # a job near its time limit saves first
            run_eval(engine, valid_ds, "validation", iteration // t.eval_interval - 1, f"iteration {iteration}",
                     iteration, t, ps, ctx, log)
        if t.save and (t.save_interval and iteration % t.save_interval == 0 or last):
            path = checkpoint.save(engine, t.save, iteration, consumed, rank)
            log.print(f"saved checkpoint at iteration {iteration} to {path}")
    if stop_reason is not None:
        log.print(f"exiting at iteration {iteration} of {t.train_iters}: {stop_reason}")
    elif iteration == t.train_iters and t.eval_interval and t.eval_iters:  # as Megatron, after the last step
        for dataset, split, block, label in ((valid_ds, "validation", eval_runs - 1, "val"),
                                             (test_ds, "test", 0, "test")):
            if dataset is not None:
                run_eval(engine, dataset, split, block, f"the end of training for {label} data", iteration,
                         t, ps, ctx, log)
    log.close()
    return {"losses": losses[:iteration - first_iteration].tolist(), "iteration": iteration}


class LogWindow:
    """Loss and throughput over the steps since the last log line (Megatron averages the same way)."""

    def __init__(self, cfg: RunConfig, world: int):
        self.cfg, self.world = cfg, world
        self.tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
        self.model_flops, self.hw_flops = flops_per_token(cfg, False), flops_per_token(cfg, True)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.count, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        self.loss_sum, self.count, self.steps = self.loss_sum + loss_sum, self.count + count, self.steps + 1

    def close(self, consumed: int, lr: float, grad_norm, device: torch.device) -> dict:
        """The iteration line's numbers (one host sync), then start a new window."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - self.start) / self.steps
        mem_name, mem = max_memory_gib()
        per_gpu = self.tokens_per_step / seconds / self.world / 1e12
        stats = dict(consumed_samples=consumed, consumed_tokens=consumed * self.cfg.model.seq_length,
                     ms_per_iter=seconds * 1e3, lr=lr, global_batch_size=self.cfg.training.global_batch_size,
                     loss=(self.loss_sum / self.count).item(),
                     grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                     tokens_per_sec=self.tokens_per_step / seconds, model_tflops=per_gpu * self.model_flops,
                     hardware_tflops=per_gpu * self.hw_flops, memory_name=mem_name, memory_gib=mem)
        self._reset()
        return stats


def run_eval(engine, dataset, split: str, block: int, label: str, iteration: int, t, ps, ctx, log) -> None:
    """Loss over the block-th run of --eval-iters global batches of `dataset`: each evaluation of the
    validation split reads fresh samples (the k-th periodic one block k-1, the final one the last block).
    Printed as Megatron does ("validation loss at <label>", also for the test split)."""
    start = block * t.eval_iters * t.global_batch_size
    data = build_data_iterator(dataset, start, t.micro_batch_size, ps.dp_rank, ps.dp_size)
    loss = evaluate(engine, micro_batches_of(data, t.eval_iters * t.global_batch_size
                                             // (t.micro_batch_size * ps.dp_size)), ctx)
    ppl = math.exp(min(20.0, loss))
    log.print(f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |")
    log.scalars(iteration, {f"{split}/lm-loss": loss, f"{split}/lm-loss-ppl": ppl})
