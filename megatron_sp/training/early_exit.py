"""Stopping a run before --train-iters, as cluster jobs need: --exit-duration-in-mins and --exit-signal-handler.

A job with a wall-clock limit (SLURM's --time) is killed when the limit comes, losing every step since the
last checkpoint. Given a duration, or told to listen for SIGTERM (which SLURM, torchrun and the deepspeed
launcher send before killing), the run instead finishes its step, saves, and exits 0, and the same command
resumes it. All ranks must stop at the same step, or the ones still training wait forever for the others;
so after every step the ranks agree by one all-reduce of two flags. That costs a host sync per step, so it
happens only when one of the two options is given.
"""
import signal
import time

import torch
import torch.distributed as dist


class EarlyExit:
    """Use as a context manager around the training loop (the SIGTERM handler lives only inside it);
    call reason() after each step."""

    def __init__(self, duration_mins: float | None, on_sigterm: bool):
        self.duration_mins, self.on_sigterm = duration_mins, on_sigterm
        self.start = time.monotonic()  # the run's own clock: setup counts, as it does against a job's limit
        self.sigterm = False
        self._previous_handler = None

    def __enter__(self) -> "EarlyExit":
        if self.on_sigterm:
            self._previous_handler = signal.signal(signal.SIGTERM, self._note_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self.on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _note_sigterm(self, signum, frame) -> None:
        self.sigterm = True  # acted on after the step in flight: a handler must not touch the collectives

    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def reason(self, device: torch.device, group) -> str | None:
        """Why every rank of `group` (all of them) stops now, the same answer on each, or None to go on."""
        if not self.on_sigterm and self.duration_mins is None:
            return None
        out_of_time = self.duration_mins is not None and self.minutes() >= self.duration_mins
        flags = torch.tensor([self.sigterm, out_of_time], dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)  # any rank's reason is everyone's
        sigterm, out_of_time = flags.tolist()
        if sigterm:
            return "a rank received SIGTERM (--exit-signal-handler)"
        if out_of_time:
            return f"--exit-duration-in-mins {self.duration_mins:g} reached after {self.minutes():.1f} minutes"
        return None
