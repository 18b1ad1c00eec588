"""The pretraining run: process groups, model, data, DeepSpeed engine, the train/eval/save loop."""
import contextlib
import math
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_sp.attention import build_inner_attention
from megatron_sp.attention.backends import resolve_backend
from megatron_sp.config import RunConfig
from megatron_sp.data.gpt_dataset import build_gpt_datasets
from megatron_sp.data.loader import build_data_iterator
from megatron_sp.errors import ConfigError, RankError
from megatron_sp.kernels.compiled import compile_layers
from megatron_sp.model.gpt import GPTModel
from megatron_sp.model.stage import GPTStage
from megatron_sp.parallel.layout import gpus_per_node_from_env, layout_lines
from megatron_sp.parallel.pipeline import StageLink, schedule_lines
from megatron_sp.parallel.sharding import effective_strategy, ulysses_degree_of
from megatron_sp.parallel.state import ParallelState
from megatron_sp.training import checkpoint, engine as ds_engine, fused_norm
from megatron_sp.training.checkpoint_files import set_rng_state
from megatron_sp.training.durable import writable_dir_problem
from megatron_sp.training.early_exit import EarlyExit
from megatron_sp.training.guard import NonFiniteGuard, weights_are_finite
from megatron_sp.training.logger import Logger, LogWindow, iteration_line
from megatron_sp.training.loop import PipelinePlace, StepContext, evaluate, train_step
from megatron_sp.training.run_lock import lock_save_dir


def training_device(accelerator: str, local_rank: int, gpus: int) -> torch.device:
    """The device a rank trains on: the CPU when DeepSpeed's accelerator is the CPU (DS_ACCELERATOR=cpu, as the
    quickstart sets on a machine with fewer GPUs than ranks, or no GPU at all), else GPU `local_rank` of the
    node's `gpus`; a rank past the node's last GPU is one error line."""
    if accelerator == "cpu" or gpus == 0:
        return torch.device("cpu")
    if local_rank >= gpus:
        raise RankError(f"local rank {local_rank} has no GPU: this node has {gpus}; launch at most {gpus} "
                        "rank(s) per node, or set DS_ACCELERATOR=cpu for CPU ranks")
    return torch.device("cuda", local_rank)


def init_distributed(cfg: RunConfig) -> torch.device:
    """torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU); env defaults for one process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op; skips a 35 s build
    accelerator = get_accelerator().device_name()
    # GPUs counted only for a GPU run: a CPU rank forked from a process that uses CUDA must not touch it
    device = training_device(accelerator, int(os.environ["LOCAL_RANK"]),
                             0 if accelerator == "cpu" else torch.cuda.device_count())
    backend = cfg.parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = cfg.parallel.distributed_timeout_minutes
    deepspeed.init_distributed(dist_backend=backend,
                               **({"timeout": timedelta(minutes=minutes)} if minutes is not None else {}))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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
    record: dict  # what each checkpoint saves about the run (checkpoint.run_record)


def build(cfg: RunConfig, tokenizer) -> Setup:
    """Process groups, seeded model with its inner attention, DeepSpeed engine, step context."""
    device = init_distributed(cfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    m, p, d = cfg.model, cfg.parallel, cfg.data
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    try:  # a kernel this device lacks is one error line now, not a traceback at the first forward
        resolve_backend(p.attention_backend, device, dtype, documents=d.reset_attention_mask)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    strategy = effective_strategy(p.sequence_parallel_strategy, p.sequence_parallel_size)
    ps = ParallelState.build(p.sequence_parallel_size,
                             ulysses_degree_of(strategy, p.sequence_parallel_size, p.ulysses_degree),
                             pp_size=p.pipeline_model_parallel_size)
    self_group = [dist.new_group([r]) for r in range(world)][rank]  # DeepSpeed's "tensor parallel" group
    seed_everything(cfg.training.seed)

    def make_model():
        def attention():
            return build_inner_attention(strategy, ps, causal=True, backend=p.attention_backend,
                                         ulysses_head_groups=p.ulysses_head_groups, fused=m.fused_elementwise)
        if ps.pp_size == 1:
            model = GPTModel(m, attention, cfg.padded_vocab_size, init_seed=cfg.training.seed)
        else:
            model = GPTStage(m, attention, cfg.padded_vocab_size, init_seed=cfg.training.seed, pp_size=ps.pp_size,
                             pp_rank=ps.pp_rank)
        if m.compile_layers:
            compile_layers(model.layers)  # a stage's layers only
        return model

    weights = None
    if cfg.training.load_hf and not checkpoint.has_checkpoint(cfg.training.load):  # a checkpoint resumes instead
        from megatron_sp.hf.start import hf_weights
        weights = hf_weights(cfg.training.load_hf, m)
    engine, scheduler, ds_config, notes = ds_engine.initialize(make_model, cfg, ps, self_group, weights)
    n_params = model_parameters(engine.module, ps.pipeline_group, device)
    ctx = StepContext(ps.sequence_layout(), ps.sp_rank, ps.stage_size, tokenizer.eod, d.reset_position_ids,
                      d.eod_mask_loss, device, cfg.padded_vocab_size, pipeline_place(cfg, ps, engine, dtype, device),
                      reset_attention_mask=d.reset_attention_mask, stage_group=ps.stage_group)
    return Setup(device, ps, engine, scheduler, ds_config, notes, n_params, ctx, checkpoint.run_record(cfg, tokenizer))


def model_parameters(module: torch.nn.Module, pipeline_group, device: torch.device) -> int:
    """Parameters of the whole model: this stage's, summed over the pipeline (a tied copy counted once)."""
    count = sum(math.prod(ds_engine.full_shape(q)) for q in module.parameters()
                if fused_norm.counted_once(q))
    total = torch.tensor(count, dtype=torch.int64, device=device)
    dist.all_reduce(total, group=pipeline_group)
    return int(total)


def pipeline_place(cfg: RunConfig, ps: ParallelState, engine, dtype: torch.dtype, device: torch.device) -> PipelinePlace:
    """This rank's stage: its links to the neighbouring stages (activations [micro batch, s/SP, h] in the
    model dtype) and the tied embedding copy it keeps in sync with the other end of the pipeline."""
    m = cfg.model
    shape = (cfg.training.micro_batch_size, m.seq_length // ps.sp_size, m.hidden_size)
    link = StageLink(ps.pipeline_ranks, ps.pp_rank, ps.pipeline_group, shape, dtype, device)
    tied = engine.module.tied_parameters() if isinstance(engine.module, GPTStage) else []
    return PipelinePlace(link, ps.pp_size, ps.pp_rank, ps.pipeline_group, tied, ps.embedding_group)


def run(cfg: RunConfig, tokenizer) -> dict:
    """Train as configured; returns {"losses": [per-step loss], "iteration": last step} for tests."""
    t = cfg.training
    if t.finetune and not checkpoint.has_checkpoint(t.load):
        raise ConfigError(f"--finetune: --load {t.load} holds no checkpoint to start from" if t.load else
                          "--finetune needs --load: the checkpoint whose weights the run starts from")
    if t.save and (problem := checkpoint.prepare_save_dir(t.save, t.load, t.finetune)):
        raise ConfigError(f"--save {t.save}: {problem}")
    with EarlyExit(t.exit_duration_in_mins, t.exit_signal_handler) as early_exit:
        setup = build(cfg, tokenizer)
        with lock_save_dir(t.save, setup.ps.rank) if t.save else contextlib.nullcontext():  # before any write there
            job = Run(cfg, setup)
            try:
                job.print_header()
                job.resume()
                job.build_data(tokenizer)
                stop_reason = job.train(early_exit)
                if stop_reason is not None:
                    job.log.print(f"exiting at iteration {job.iteration} of {t.train_iters}: {stop_reason}")
                elif job.iteration == t.train_iters:
                    job.final_evaluation()
            finally:
                job.log.close()
        shut_down()
        return {"losses": job.losses, "iteration": job.iteration}


def shut_down() -> None:
    """End the process groups of a completed run before the interpreter does. Left to interpreter exit, a
    ProcessGroupGloo may never be destroyed and its worker threads die still joinable: rank 0 then aborted
    ('terminate called without an active exception') after a run that had completed. The ranks first wait for
    each other, so that none tears down what another still uses. A failed run does not get here: destroying a
    group while other ranks are inside one of its collectives can hang (NCCL), and it exits with an error anyway."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Run:
    """One training run over a built Setup: where it stands (iteration, consumed samples), its data and log."""

    def __init__(self, cfg: RunConfig, setup: Setup):
        self.cfg, self.s = cfg, setup
        self.log = Logger(setup.ps.rank, cfg.logging.tensorboard_dir)
        self.iteration, self.consumed = 0, 0
        self.rng_state = None  # a resumed run's saved random state, restored once the data is built (train)
        self.skipped_logged = 0  # DeepSpeed's count of skipped updates (kept in checkpoints) at the last log line
        self.losses: list[float] = []
        self.datasets = (None, None, None)  # train, validation, test
        t = cfg.training
        self.eval_runs = t.train_iters // t.eval_interval + 1 if t.eval_interval else 0  # 0: no evaluation
        self.guard = NonFiniteGuard(t.max_nonfinite_iterations, setup.device, loss_only=t.fp16,
                                    say=self.log.print) if t.check_for_nan_in_loss_and_grad else None

    def print_header(self) -> None:
        cfg, s = self.cfg, self.s
        m, t, world = cfg.model, cfg.training, s.ps.world_size
        for line in [f"model: {s.n_params / 1e6:.2f}M parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
                     f"heads {m.num_attention_heads}/{m.num_key_value_heads} (q/kv), vocab {cfg.padded_vocab_size}",
                     *layout_lines(cfg, world, gpus_per_node_from_env(world),
                                   "GPUs" if s.device.type == "cuda" else "CPU ranks"),
                     f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x grad-accumulation "
                     f"{s.ds_config['gradient_accumulation_steps']} x DP {s.ps.dp_size}; {m.seq_length} tokens/sample, "
                     f"{m.seq_length // s.ps.sp_size} per rank; ZeRO stage {s.ds_config['zero_optimization']['stage']}; "
                     f"{cfg.precision}",
                     *(schedule_lines(s.ps.pp_size, m.num_layers, s.ds_config["gradient_accumulation_steps"])
                       if s.ps.pp_size > 1 else []),
                     *[f"note: {n}" for n in s.notes + cfg.ignored]]:
            self.log.print(line)

    def resume(self) -> None:
        """--finetune: the weights of --load only; else the whole state of --load's latest step, if any (which
        a --load-hf run resumes too; without one it started from the Hugging Face weights, in build)."""
        t, engine, rank = self.cfg.training, self.s.engine, self.s.ps.rank
        if t.finetune:
            trained = checkpoint.load(engine, t.load, rank, load_optimizer=False, load_rng=False).iteration
            self.log.print(f"loaded the weights of {t.load} (iteration {trained} there); --finetune: training "
                           "starts at iteration 0 with a fresh optimizer")
        elif checkpoint.has_checkpoint(t.load):
            self.iteration, self.consumed, self.rng_state = checkpoint.load(engine, t.load, rank, not t.no_load_optim,
                                                                            not t.no_load_rng)
            self.log.print(f"resumed from {t.load} at iteration {self.iteration} ({self.consumed} samples consumed)")
        elif t.load_hf:
            self.log.print(f"started from the weights of {t.load_hf} (Hugging Face); iteration 0, fresh optimizer")
        elif t.load:
            self.log.print(f"no checkpoint in {t.load}: starting from scratch")

    def build_data(self, tokenizer) -> None:
        """The train/validation/test datasets. Every rank checks the options and files before rank 0 builds
        the index arrays, so a mistake is found (and said) the same way everywhere."""
        m, t, d = self.cfg.model, self.cfg.training, self.cfg.data
        if d.data_cache_path and not d.mock_data and (problem := writable_dir_problem(d.data_cache_path)):
            raise ConfigError(f"--data-cache-path {d.data_cache_path}: {problem} (rank 0 writes the sample index "
                              "arrays there)")
        try:
            self.datasets = build_gpt_datasets(
                data_path=d.data_path, split=d.split, seq_length=m.seq_length, seed=t.seed,
                num_samples=(t.train_iters * t.global_batch_size, self.eval_runs * t.eval_iters * t.global_batch_size,
                             t.eval_iters * t.global_batch_size),
                data_cache_path=d.data_cache_path, train_data_path=d.train_data_path,
                valid_data_path=d.valid_data_path, test_data_path=d.test_data_path, mock=d.mock_data,
                vocab_size=tokenizer.vocab_size, is_rank_zero=self.s.ps.rank == 0, barrier=dist.barrier)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.datasets[0] is None:
            raise ConfigError(f"no training data: the train split of {' '.join(d.train_data_path or d.data_path)} "
                              f"holds no documents (--split {d.split})")

    def last_iteration(self) -> int:
        """--train-iters, or the next multiple of --exit-interval (as Megatron: also after a resume)."""
        t = self.cfg.training
        if not t.exit_interval:
            return t.train_iters
        return min(t.train_iters, (self.iteration // t.exit_interval + 1) * t.exit_interval)

    def train(self, early_exit: EarlyExit) -> str | None:
        """Steps until the last iteration or an early exit (its reason is returned): log, evaluate, save."""
        s, t, log_interval = self.s, self.cfg.training, self.cfg.logging.log_interval
        train_iter = build_data_iterator(self.datasets[0], self.consumed, t.micro_batch_size, s.ps.dp_rank,
                                         s.ps.dp_size)
        if self.rng_state is not None:  # last: whatever was built before may have drawn random numbers
            set_rng_state(self.rng_state)
        self.skipped_logged = s.engine.skipped_steps
        first, last = self.iteration, self.last_iteration()
        # per-step losses stay on the device (no host sync per step); read once at the end
        losses = torch.zeros(last - first, dtype=torch.float64, device=s.device)
        window = LogWindow(self.cfg, s.ps.world_size)
        stop_reason = None
        while self.iteration < last and stop_reason is None:
            loss_sum, count, grad_norm = self.step(train_iter)
            losses[self.iteration - first - 1] = loss_sum / count
            window.add(loss_sum, count)
            stop_reason = early_exit.reason(s.device, dist.group.WORLD)
            final = self.iteration == last or stop_reason is not None
            log_now = bool(log_interval) and self.iteration % log_interval == 0 or final
            save_now = bool(t.save) and (bool(t.save_interval) and self.iteration % t.save_interval == 0 or final)
            self.check_finite(settle=log_now or save_now)
            if log_now:
                self.log_iteration(window.close(self.consumed, s.scheduler.get_lr()[0], grad_norm, s.device))
            if (self.datasets[1] is not None and t.eval_interval and self.iteration % t.eval_interval == 0
                    and t.eval_iters and stop_reason is None):  # a job near its time limit saves first
                self.evaluate(self.datasets[1], "validation", self.iteration // t.eval_interval - 1,
                              f"iteration {self.iteration}")
            if save_now:
                self.save()
        self.check_finite(settle=True)
        if self.guard is not None and self.guard.last_was_bad:
            raise ConfigError(f"training ended on a non-finite iteration ({self.iteration}); {self.newest_saved()}")
        self.losses = losses[:self.iteration - first].tolist()
        return stop_reason

    def step(self, train_iter) -> tuple:
        """One optimizer step -> (loss sum, token count, grad norm), not synced; its flags go to the guard."""
        s = self.s
        loss_sum, count, step_grad_norm = train_step(
            s.engine, micro_batches_of(train_iter, s.ds_config["gradient_accumulation_steps"]), s.ctx)
        self.iteration += 1
        self.consumed += self.cfg.training.global_batch_size
        grad_norm = s.engine.get_global_grad_norm() if step_grad_norm is None else step_grad_norm
        if self.guard is not None:
            self.guard.add(self.iteration, loss_sum, grad_norm)
        return loss_sum, count, grad_norm

    def check_finite(self, settle: bool) -> None:
        """Stop with one line (exit 2) once --max-nonfinite-iterations in a row were not finite. settle: read
        every flag the device still owes, the sync-free optimizer's skip too (its skip count and lr schedule are
        then those of the newest step), as a log line or a save needs."""
        if settle:
            fused_norm.account_skipped_step(self.s.engine.optimizer)
        if self.guard is None:
            return
        if reason := (self.guard.settle() if settle else self.guard.poll()):
            raise ConfigError(f"{reason}: training stopped, nothing of it saved; {self.newest_saved()}")

    def newest_saved(self) -> str:
        """Where to resume from after a stop: the step --save's `latest` names."""
        save = self.cfg.training.save
        if save and checkpoint.has_checkpoint(save):
            return (f"the newest checkpoint is {os.path.join(save, checkpoint.latest_tag(save))}: resume from it "
                    "with a lower --lr, or past the data that broke it")
        return "nothing was saved" if save else "--save was not given"

    def save(self) -> None:
        """A checkpoint of the state now, unless that state is not finite (a non-finite loss or gradient norm
        in the last iteration, or a nan among the weights): those are never saved."""
        t, s = self.cfg.training, self.s
        if self.guard is not None and self.guard.last_was_bad:
            self.log.print(f"warning: not saving at iteration {self.iteration}: its loss or gradient norm is not "
                           "finite")
            return
        if not weights_are_finite(s.engine):
            raise ConfigError(f"iteration {self.iteration}: the weights are not finite, so they are not saved; "
                              f"{self.newest_saved()}")
        path = checkpoint.save(s.engine, t.save, self.iteration, self.consumed, s.ps.rank, s.record,
                               t.keep_checkpoints)
        self.log.print(f"saved checkpoint at iteration {self.iteration} to {path}")

    def log_iteration(self, stats: dict) -> None:
        t = self.cfg.training
        if t.fp16:
            stats["loss_scale"] = self.s.engine.optimizer.cur_scale
        skipped = self.s.engine.skipped_steps  # DeepSpeed's count of updates not applied (inf/nan gradients)
        stats["skipped_iterations"], self.skipped_logged = skipped - self.skipped_logged, skipped
        stats["nan_iterations"] = self.guard.window_count() if self.guard is not None else 0
        self.log.print(iteration_line(self.iteration, t.train_iters, stats))
        self.log.scalars(self.iteration, {
            "lm-loss": stats["loss"], "learning-rate": stats["lr"], "grad-norm": stats["grad_norm"],
            "tokens-per-sec": stats["tokens_per_sec"], "model-tflops": stats["model_tflops"],
            "batch-size": t.global_batch_size, "memory-gib": stats["memory_gib"]})

    def final_evaluation(self) -> None:
        """As Megatron, after the last step: the validation split (its last block) and the test split."""
        t = self.cfg.training
        if not (t.eval_interval and t.eval_iters):
            return
        _, valid, test = self.datasets
        for dataset, split, block, label in ((valid, "validation", self.eval_runs - 1, "val"), (test, "test", 0, "test")):
            if dataset is not None:
                self.evaluate(dataset, split, block, f"the end of training for {label} data")

    def evaluate(self, dataset, split: str, block: int, label: str) -> None:
        """Loss over the block-th run of --eval-iters global batches of `dataset`: each evaluation of the
        validation split reads fresh samples (the k-th periodic one block k-1, the final one the last block).
        Printed as Megatron does ("validation loss at <label>", also for the test split)."""
        t, ps = self.cfg.training, self.s.ps
        start = block * t.eval_iters * t.global_batch_size
        data = build_data_iterator(dataset, start, t.micro_batch_size, ps.dp_rank, ps.dp_size)
        loss = evaluate(self.s.engine, micro_batches_of(data, t.eval_iters * t.micro_batches_per_step(ps.dp_size)),
                        self.s.ctx)
        ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else loss  # Megatron's cap at e^20; nan stays nan
        self.log.print(f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |")
        self.log.scalars(self.iteration, {f"{split}/lm-loss": loss, f"{split}/lm-loss-ppl": ppl})
