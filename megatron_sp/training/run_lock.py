"""One run per --save directory: a lock file (host, pid, start time) that rank 0 creates atomically at start and
removes at exit. Two runs writing one directory would mix their step directories and their `latest`.

A second run finds the lock and is refused, unless the lock is stale: its process no longer runs on this host (a
run killed with SIGKILL, or whose node rebooted, leaves its lock behind); then the lock is taken over with a note.
A lock from another host cannot be checked from here, so it is refused with the way out: delete it if that run is
over. (Two runs that find the same stale lock at the same instant can both take it over; a takeover is atomic,
the check before it is not.)"""
import contextlib
import json
import os
import socket
import time

import torch.distributed as dist

from megatron_sp.errors import ConfigError
from megatron_sp.training.durable import temp_file_beside

LOCK = "run.lock"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None where unknown: a pid
    reused by an unrelated process after a crash has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or _process_start(pid) in (None, started)


class RunLock:
    """The lock of one --save directory, held by this process (rank 0) from take() to release() (or to the end
    of a `with` block)."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK)
        self.mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "process_start": _process_start(os.getpid())})

    def take(self) -> str | None:
        """Create the lock -> None, or a note when a stale one was taken over; a ConfigError when another run
        holds it."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over()
        with os.fdopen(fd, "w") as f:
            f.write(self.mine)
        return None

    def _take_over(self) -> str:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            host, pid, started = holder["host"], int(holder["pid"]), holder.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"its lock {self.path} cannot be read (another run may be writing it); if no other "
                               "run uses this directory, delete it") from None
        who = f"pid {pid} on {host}, started {started}"
        if host != socket.gethostname():
            raise ConfigError(f"another run uses it ({who}, per {self.path}); if that run is over, delete "
                               f"{self.path} and rerun")
        if _running(pid, holder.get("process_start")):
            raise ConfigError(f"another run uses it ({who}); wait for it to end, or choose another --save")
        fd, tmp = temp_file_beside(self.path)
        with os.fdopen(fd, "w") as f:
            f.write(self.mine)
        os.replace(tmp, self.path)
        return f"took over {self.path} from a run that is no longer running ({who})"

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        try:
            with open(self.path) as f:
                if f.read() != self.mine:
                    return
            os.remove(self.path)
        except OSError:
            pass


def lock_save_dir(save_dir: str, rank: int):
    """Rank 0 takes --save's lock and tells the others: every rank raises the same ConfigError when another run
    holds it. Returns a context manager: on rank 0 the lock, released at its end; elsewhere nothing."""
    lock, outcome = RunLock(save_dir), [None]
    if rank == 0:
        try:
            outcome[0] = ("note", lock.take())
        except ConfigError as err:
            outcome[0] = ("refused", str(err))
        except OSError as err:  # e.g. a full disk
            outcome[0] = ("refused", f"cannot create its lock {lock.path} ({err.strerror or err})")
    dist.broadcast_object_list(outcome, src=0)
    kind, text = outcome[0]
    if kind == "refused":
        raise ConfigError(f"--save {save_dir}: {text}")
    if text and rank == 0:
        print(f"note: {text}", flush=True)
    return lock if rank == 0 else contextlib.nullcontext()
