"""Megatron-style iteration lines on rank 0, and the same scalars in TensorBoard."""
import resource
import time

import torch

from megatron_sp.config import RunConfig
from megatron_sp.flops import flops_per_token


def max_memory_gib(device: torch.device) -> tuple[str, float]:
    """('max memory allocated', GiB) for a run on a GPU; ('max RSS', GiB) of this process for a CPU run (also one
    on a machine whose GPUs it leaves alone)."""
    if device.type == "cuda":
        return "max memory allocated", torch.cuda.max_memory_allocated() / 2 ** 30
    return "max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


class Logger:
    """print() on global rank 0 only; TensorBoard scalars when a directory is given."""

    def __init__(self, rank: int, tensorboard_dir: str | None):
        self.enabled = rank == 0
        self.writer = None
        if self.enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def print(self, *parts) -> None:
        if self.enabled:
            print(*parts, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def iteration_line(iteration: int, total: int, stats: dict) -> str:
    """One line in the format Megatron users grep for."""
    parts = [f" iteration {iteration:8d}/{total:8d}",
             f"consumed samples: {stats['consumed_samples']:12d}",
             f"consumed tokens: {stats['consumed_tokens']:14d}",
             f"elapsed time per iteration (ms): {stats['ms_per_iter']:.1f}",
             f"learning rate: {stats['lr']:.3E}",
             f"global batch size: {stats['global_batch_size']:5d}",
             f"lm loss: {stats['loss']:.6E}",
             f"grad norm: {stats['grad_norm']:.3f}",
             f"number of skipped iterations: {stats.get('skipped_iterations', 0):3d}",
             f"number of nan iterations: {stats.get('nan_iterations', 0):3d}"]
    if "loss_scale" in stats:
        parts.append(f"loss scale: {stats['loss_scale']:.1f}")
    parts += [f"tokens/s: {stats['tokens_per_sec']:.0f}",
              f"TFLOP/s per GPU (model/hardware): {_num(stats['model_tflops'])}/{_num(stats['hardware_tflops'])}",
              f"{stats['memory_name']} (GiB): {stats['memory_gib']:.2f}"]
    return " | ".join(parts) + " |"


def _num(x: float) -> str:
    """1 decimal for real GPU rates, 3 significant digits for the tiny ones of CPU runs."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


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
        mem_name, mem = max_memory_gib(device)
        per_gpu = self.tokens_per_step / seconds / self.world / 1e12
        stats = dict(consumed_samples=consumed, consumed_tokens=consumed * self.cfg.model.seq_length,
                     ms_per_iter=seconds * 1e3, lr=lr, global_batch_size=self.cfg.training.global_batch_size,
                     loss=(self.loss_sum / self.count).item(),
                     grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                     tokens_per_sec=self.tokens_per_step / seconds, model_tflops=per_gpu * self.model_flops,
                     hardware_tflops=per_gpu * self.hw_flops, memory_name=mem_name, memory_gib=mem)
        self._reset()
        return stats
