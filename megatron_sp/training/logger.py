"""Megatron-style iteration lines on rank 0, and the same scalars in TensorBoard."""
import resource

import torch


def max_memory_gib() -> tuple[str, float]:
    """('max memory allocated', GiB) on GPU; ('max RSS', GiB) of this process on CPU."""
    if torch.cuda.is_available():
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
             f"grad norm: {stats['grad_norm']:.3f}"]
    if "loss_scale" in stats:
        parts.append(f"loss scale: {stats['loss_scale']:.1f}")
    parts += [f"tokens/s: {stats['tokens_per_sec']:.0f}",
              f"TFLOP/s per GPU (model/hardware): {_num(stats['model_tflops'])}/{_num(stats['hardware_tflops'])}",
              f"{stats['memory_name']} (GiB): {stats['memory_gib']:.2f}"]
    return " | ".join(parts) + " |"


def _num(x: float) -> str:
    """1 decimal for real GPU rates, 3 significant digits for the tiny ones of CPU runs."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"

