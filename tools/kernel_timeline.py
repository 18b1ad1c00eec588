"""What the GPU did during a profiled step, from the kernels' start and end times in a torch.profiler trace.

Summing kernel times (profiler key_averages) cannot tell communication hidden behind compute from
communication the step waits for, nor show idle gaps. This module takes the chrome trace's device
events (kernels, memcpys, memsets), each an interval on some stream, and measures unions of them:

    busy     = |union of all device intervals|              the GPU ran something
    compute  = |union of non-communication intervals|
    exposed communication = busy - compute                  only NCCL ran: on the critical path
    idle     = span - busy                                  nothing ran (host overhead, waits, launches)

phases() splits the step at the host-side profiler ranges a training step opens (forward, backward,
optimizer; megatron_sp/training/loop.py): see its docstring.
"""
from collections import defaultdict
from collections.abc import Callable, Iterable

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")  # the host calls that start device work
# host calls that block until the device has caught up: each drains the GPU's queue of launched work
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH")


def device_intervals(trace: dict, categorize: Callable[[str], str]) -> list[tuple[float, float, str, str]]:
    """(start us, end us, category, name) of every device event in a chrome trace dict."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and e.get("dur", 0) > 0:
            name = e.get("name", "")
            out.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), categorize(name), name))
    return out


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def summarize(trace: dict, categorize: Callable[[str], str], top: int = 25) -> dict | None:
    """Busy, idle, compute and exposed-communication ms of a trace, the union per category, and the
    `top` kernel names of the "other" category by summed time. None when the trace has no device events."""
    events = device_intervals(trace, categorize)
    if not events:
        return None
    span = max(e for _, e, _, _ in events) - min(s for s, _, _, _ in events)
    busy = union_length((s, e) for s, e, _, _ in events)
    compute = union_length((s, e) for s, e, c, _ in events if c != "communication")
    per_category = {c: union_length((s, e) for s, e, cc, _ in events if cc == c)
                    for c in sorted({c for _, _, c, _ in events})}
    other = defaultdict(lambda: [0.0, 0])
    for s, e, c, name in events:
        if c == "other":
            other[name][0] += e - s
            other[name][1] += 1
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return {"span_ms": ms(span), "busy_ms": ms(busy), "idle_ms": ms(span - busy), "compute_ms": ms(compute),
            "exposed_communication_ms": ms(busy - compute),
            "union_ms": {c: ms(v) for c, v in per_category.items()},
            "top_other": [{"ms": ms(t), "count": n, "name": name[:140]}
                          for name, (t, n) in sorted(other.items(), key=lambda kv: -kv[1][0])[:top]]}


def _ranges(trace: dict, names: Iterable[str], cat: str) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of the `cat` events named in `names`, in time order."""
    names = set(names)
    return sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
                  for e in trace.get("traceEvents", [])
                  if e.get("ph") == "X" and e.get("cat") == cat and e.get("name") in names)


def _phase_at(ranges: list[tuple[float, float, str]], ts: float) -> int | None:
    """Index of the range holding host time `ts` (ranges do not overlap), None outside all of them."""
    for i, (start, end, _) in enumerate(ranges):
        if start <= ts <= end:
            return i
    return None


def _launches(trace: dict, ranges: list) -> tuple[dict, dict]:
    """({correlation id: index of the range its launch call fell in, or None},
    {range index or None: [host syncs, blocked us]}) from the host's CUDA runtime/driver calls."""
    launch_phase, syncs = {}, defaultdict(lambda: [0, 0.0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in LAUNCH_CATEGORIES:
            continue
        i = _phase_at(ranges, float(e["ts"]))
        if "correlation" in e.get("args", {}):
            launch_phase[e["args"]["correlation"]] = i
        if e.get("name") in HOST_SYNCS:
            syncs[i][0] += 1
            syncs[i][1] += float(e.get("dur", 0))
    return launch_phase, syncs


def _windows(device: list) -> dict:
    """{range index: (start, end) us}: from the range's first device event to the next range's first."""
    first = {}
    for start, _, _, i in device:
        if i is not None:
            first.setdefault(i, start)
    starts = sorted((t, i) for i, t in first.items())
    last_end = max((end for _, end, _, _ in device), default=0.0)
    return {i: (t, starts[k + 1][0] if k + 1 < len(starts) else last_end) for k, (t, i) in enumerate(starts)}


def phases(trace: dict, names: Iterable[str], top: int = 3) -> list[dict]:
    """Per phase of a step: host ms, then on the GPU its window, busy and idle ms, the kernels it launched
    (summed ms and the `top` names) and the host syncs inside it.

    A phase is a host-side profiler range (record_function; chrome trace category "user_annotation").
    A device event belongs to the phase whose range holds the host call that launched it (matched by
    the trace's "correlation" id), whichever thread made that call: the autograd engine launches the
    backward's kernels from its own thread, outside the main thread's range. (The trace's own
    "gpu_user_annotation" spans rest on per-thread correlation and may leave those kernels out; their
    ms are kept as gpu_annotation_ms to compare.) A phase's GPU window runs from its first device event to the next phase's first one
    (the last phase: to the last device event), so the windows tile the step and idle time at a
    boundary is charged to the phase before it. Ranges with the same name (one per micro batch) add
    up. The row "outside" collects what was launched outside all ranges (input copies, the loss
    all-reduce). Host syncs are HOST_SYNCS calls; blocked ms is the host time spent inside them."""
    ranges = _ranges(trace, names, "user_annotation")
    launch_phase, syncs = _launches(trace, ranges)
    device = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", ""),
                     launch_phase.get(e.get("args", {}).get("correlation")))
                    for e in trace.get("traceEvents", [])
                    if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and e.get("dur", 0) > 0)
    window = _windows(device)
    annotated = defaultdict(float)
    for start, end, name in _ranges(trace, names, "gpu_user_annotation"):
        annotated[name] += end - start
    rows = {}
    for i, (start, end, name) in [*enumerate(ranges), (None, (0.0, 0.0, "outside"))]:
        row = rows.setdefault(name, {"name": name, "host_ms": 0.0, "gpu_window_ms": 0.0, "gpu_busy_ms": 0.0,
                                     "kernels_ms": 0.0, "host_syncs": 0, "host_sync_ms": 0.0,
                                     "gpu_annotation_ms": annotated[name], "top": defaultdict(float)})
        row["host_ms"] += end - start
        row["host_syncs"] += syncs[i][0]
        row["host_sync_ms"] += syncs[i][1]
        if i in window:
            w0, w1 = window[i]
            row["gpu_window_ms"] += w1 - w0
            row["gpu_busy_ms"] += union_length((max(s, w0), min(e, w1)) for s, e, _, _ in device if s < w1 and e > w0)
        for s, e, kernel, j in device:
            if j == i:
                row["kernels_ms"] += e - s
                row["top"][kernel] += e - s
    return [_rounded(row, top) for row in rows.values()
            if row["name"] != "outside" or row["kernels_ms"] or row["host_syncs"]]


def _rounded(row: dict, top: int) -> dict:
    """A phases() row in ms (3 decimals), with its idle ms and its `top` kernels by summed time."""
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    kernels = sorted(row.pop("top").items(), key=lambda kv: -kv[1])[:top]
    return {**{k: ms(v) if k.endswith("_ms") else v for k, v in row.items()},
            "gpu_idle_ms": ms(row["gpu_window_ms"] - row["gpu_busy_ms"]),
            "top": [{"ms": ms(t), "name": n[:100]} for n, t in kernels]}


def phase_table(rows: list[dict]) -> list[str]:
    """A markdown table of phases() rows, as docs/benchmarks.md prints it."""
    lines = ["| phase | host ms | GPU window ms | GPU busy ms | GPU idle ms | kernels ms | host syncs (blocked ms) | top kernels (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        top = "; ".join(f"{t['name'][:48]} {t['ms']:.1f}" for t in r["top"])
        lines.append(f"| {r['name']} | {r['host_ms']:.1f} | {r['gpu_window_ms']:.1f} | {r['gpu_busy_ms']:.1f} | "
                     f"{r['gpu_idle_ms']:.1f} | {r['kernels_ms']:.1f} | {r['host_syncs']} ({r['host_sync_ms']:.1f}) | {top} |")
    return lines
