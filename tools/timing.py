"""Timing shared by the benchmarks (tools/bench_attention.py, tools/bench_flash_attn.py, tools/bench_adamw.py)."""
import statistics
import time

import torch


def _warm_up(fn, warmup: int, cuda: bool) -> None:
    """`warmup` calls (compilation, autotuning, allocator), then an idle GPU to start timing on."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()


def time_ms(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn() over `iters` calls after `warmup` calls. cuda: each call timed by its own
    pair of CUDA events, waiting for the end event before the next call; else wall-clock time.perf_counter."""
    _warm_up(fn, warmup, cuda)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def back_to_back_ms(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Mean milliseconds per call of `iters` calls issued back to back, as a training step issues its layers:
    the CPU runs ahead of the GPU, so launch time that overlaps earlier calls' GPU work does not count,
    as it does in time_ms, whose every call starts on an idle GPU. cuda: one pair of CUDA events around
    all calls; else wall-clock time.perf_counter."""
    _warm_up(fn, warmup, cuda)
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


