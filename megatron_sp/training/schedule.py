"""Megatron's learning-rate schedule: linear warmup, then constant / linear / cosine decay to min_lr.

Warmup and decay are measured in steps, samples or tokens (whichever flags the user gave), so the
schedule is a pure function of how much has been trained; resuming needs only the step count.
"""
import math

from megatron_sp.config import RunConfig


class LRSchedule:
    """lr(step) for step = optimizer steps completed; call step() after each optimizer step."""

    def __init__(self, optimizer, cfg: RunConfig):
        t = cfg.training
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.style = t.lr, t.min_lr, t.lr_decay_style
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        # Everything in tokens: a step is global_batch_size * seq_length of them.
        if t.lr_decay_tokens is not None:
            self.decay_tokens = t.lr_decay_tokens
        elif t.lr_decay_samples is not None:
            self.decay_tokens = t.lr_decay_samples * cfg.model.seq_length
        else:
            self.decay_tokens = (t.lr_decay_iters or t.train_iters) * tokens_per_step
        if t.lr_warmup_tokens is not None:
            self.warmup_tokens = t.lr_warmup_tokens
        elif t.lr_warmup_samples:
            self.warmup_tokens = t.lr_warmup_samples * cfg.model.seq_length
        elif t.lr_warmup_fraction is not None:
            self.warmup_tokens = int(t.lr_warmup_fraction * self.decay_tokens)
        else:
            self.warmup_tokens = t.lr_warmup_iters * tokens_per_step
        self.tokens_per_step = tokens_per_step
        self.steps_done = 0
        self.apply()

    def lr_at(self, tokens: int) -> float:
        if self.warmup_tokens and tokens <= self.warmup_tokens:
            return self.max_lr * tokens / self.warmup_tokens
        if self.style == "constant":
            return self.max_lr
        if tokens >= self.decay_tokens:
            return self.min_lr
        progress = (tokens - self.warmup_tokens) / max(1, self.decay_tokens - self.warmup_tokens)
        if self.style == "linear":
            coeff = 1.0 - progress
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.steps_done * self.tokens_per_step)] * len(self.optimizer.param_groups)

    def apply(self) -> None:
        """Set every param group's lr from this run's flags (also after loading an optimizer state, whose
        param groups carry the lr of the run that saved it)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def step(self) -> None:
        self.steps_done += 1
        self.apply()

    def undo_step(self) -> None:
        """Take back the newest step() (its update turned out to be skipped)."""
        self.steps_done -= 1
        self.apply()

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = state["steps_done"]
        self.apply()
