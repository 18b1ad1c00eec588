"""Run a function on N CPU ranks (gloo) forked from the pytest process.

Forking costs well under a second because torch (and deepspeed) are already imported here;
starting torchrun per test would cost 5-15 s each. Usage:

    def body(rank, world, x):          # runs in every rank, process group already initialised
        return (x * rank).sum().item()  # picklable return value
    results = run_ranks(2, body, x)     # list of return values, index = rank

An exception in any rank fails the test with that rank's traceback, a rank that dies (a signal, os._exit) with
its exit code, and a hang after `timeout`.
"""
import multiprocessing as mp
import os
import queue as queues
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, kwargs, queue, env):
    import torch
    import torch.distributed as dist
    try:
        os.environ.update(env)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)  # N ranks share 2 cores; oversubscription makes gloo crawl
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 300.0, env: dict | None = None, **kwargs):
    """Fork `world` ranks that each run fn(rank, world, *args, **kwargs); return their results."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, kwargs, queue, env or {}))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queues.Empty:
                dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results]
                if dead:  # it cannot report; the others may wait for it in a collective
                    errors.append("; ".join(dead))
                elif time.monotonic() > deadline:
                    errors.append(f"ranks timed out after {timeout}s; finished: {sorted(results)}")
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")  # the others are probably blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
