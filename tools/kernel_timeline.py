"""What the GPU did during a profiled step, from the kernels' start and end times in a torch.profiler trace.

Summing kernel times (profiler key_averages) cannot tell communication hidden behind compute from
communication the step waits for, nor show idle gaps. This module takes the chrome trace's device
events (kernels, memcpys, memsets), each an interval on some stream, and measures unions of them:

    busy     = |union of all device intervals|              the GPU ran something
    compute  = |union of non-communication intervals|
    exposed communication = busy - compute                  only NCCL ran: on the critical path
    idle     = span - busy                                  nothing ran (host overhead, waits, launches)
"""
from collections import defaultdict
from collections.abc import Callable, Iterable

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


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
