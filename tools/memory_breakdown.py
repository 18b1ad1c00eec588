"""Where one training step's memory goes: model states read from the DeepSpeed engine and optimizer objects,
the rest from the CUDA allocator, at four moments of the step (tools/bench_e2e.py --memory-breakdown).

    parameters               the model's weights (bf16 under --bf16): engine.module's parameters, their storage
                             (DeepSpeed's flat bf16 groups), ZeRO-3's partitions (ds_tensor)
    fp32 master weights      the tensors the torch optimizer updates: DeepSpeed's fp32 partition (ZeRO 1-3)
    optimizer states         AdamW's exp_avg and exp_avg_sq (and its step counters)
    fp32 gradient partition  the .grad of those master weights: DeepSpeed makes it from the bf16 gradients
                             inside engine.step (ZeRO 1/2: flatten, then cast), beside them; the sync-free
                             step (training/fused_norm.py) makes none: its flat bf16 copy counts as other
    gradients + buffers      the model parameters' .grad and every other tensor DeepSpeed's optimizer object
                             holds: bf16 gradient partitions, reduce buckets, flat copies (on one data-parallel
                             rank the sync-free step's gradients are views of one flat buffer, counted here)
    other                    allocated - the above: activations, autograd and kernel workspace, caches
Each tensor is counted once, by its storage (views into one flat buffer count the buffer once), in the
order above. The moments: after forward (activations held), after backward (gradients held), inside the
optimizer step (at the torch optimizer's step, or the sync-free step's AdamW: the step's flat gradient
copies exist), after the step.
"peak since previous" is torch.cuda.max_memory_allocated over the phase that ends at that moment (forward,
backward, optimizer step).
"""
import contextlib

import torch

from megatron_sp.training import fused_norm

CATEGORIES = ("parameters", "fp32 master weights", "optimizer states", "fp32 gradient partition",
              "gradients + buffers")
MOMENTS = ("after forward", "after backward", "in optimizer step", "after step")
GIB = 2 ** 30


def _reachable_tensors(obj, seen: set, depth: int = 5):
    """Tensors (and their .grad) inside `obj`: lists, tuples, dicts and DeepSpeed's own helper objects,
    not modules, not torch optimizers (counted through their states), not process groups."""
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for value in list(obj.values()):
            yield from _reachable_tensors(value, seen, depth - 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in list(obj):
            yield from _reachable_tensors(value, seen, depth - 1)
    elif (type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__")
          and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))):
        yield from _reachable_tensors(vars(obj), seen, depth - 1)


def model_state_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """The tensors of each category, as the engine holds them now (gradients come and go within a step)."""
    params = list(engine.module.parameters())
    wrapper = engine.optimizer  # DeepSpeed's ZeRO/bf16 optimizer, or the torch optimizer itself
    base = getattr(wrapper, "optimizer", wrapper)
    # what the torch optimizer updates; its state's keys too, as ZeRO steps one parameter group at a time
    # with the others taken out of param_groups
    masters = [p for group in base.param_groups for p in group["params"]] + list(base.state)
    # the wrapper's own attributes whatever its class (the fused-norm optimizer subclasses DeepSpeed's)
    holders = [] if wrapper is base else list(_reachable_tensors(vars(wrapper), {id(base)}))
    return {
        "parameters": params + [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None],
        "fp32 master weights": masters,
        "optimizer states": [t for state in base.state.values() for t in state.values() if torch.is_tensor(t)],
        "fp32 gradient partition": [p.grad for p in masters if p.grad is not None],
        "gradients + buffers": [p.grad for p in params if p.grad is not None] + holders,
    }


def count_bytes(tensors: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes per category, each storage counted once, by the first category (in CATEGORIES order) that holds it."""
    seen, out = set(), {}
    for category in CATEGORIES:
        total = 0
        for t in tensors[category]:
            if t.device.type == "meta":  # shapes only (DeepSpeed keeps some), no memory
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        out[category] = total
    return out


def _snapshot(engine, cuda: bool, ends_phase: bool) -> dict:
    """The categories now; on CUDA also the allocator's view and, if this moment ends a phase, the phase's peak."""
    row = count_bytes(model_state_tensors(engine))
    if cuda:
        allocated = torch.cuda.memory_allocated()
        row.update({"other": allocated - sum(row.values()), "allocated": allocated,
                    "reserved": torch.cuda.memory_reserved()})
        if ends_phase:
            row["peak since previous"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    return row


@contextlib.contextmanager
def _calling(obj, name: str, before=None, after=None):
    """obj.<name> replaced, while the block runs, by a call to it with before() and after() around it."""
    own = name in vars(obj)  # an instance attribute already (a scheduler's step counter wraps optimizer.step)
    original = getattr(obj, name)

    def call(*args, **kwargs):
        before and before()
        out = original(*args, **kwargs)
        after and after()
        return out
    setattr(obj, name, call)
    try:
        yield
    finally:
        setattr(obj, name, original) if own else delattr(obj, name)


def measure(engine, step, cuda: bool) -> dict:
    """Run step() once and record the categories at the four MOMENTS ("in optimizer step": the torch
    optimizer's step call holding the most memory; ZeRO calls it once per parameter group). On CUDA,
    resets the peak-memory statistics: call it after reading any peak the caller reports."""
    moments = {}

    def record(moment):
        row = _snapshot(engine, cuda, ends_phase=moment != MOMENTS[2])
        if moment not in moments or row.get("allocated", 0) > moments[moment].get("allocated", 0):
            moments[moment] = row
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_calling(engine, "forward", after=lambda: record(MOMENTS[0])))
        stack.enter_context(_calling(engine, "backward", after=lambda: record(MOMENTS[1])))
        stack.enter_context(_calling(base, "step", before=lambda: record(MOMENTS[2])))
        # the sync-free ZeRO step calls no torch optimizer: its one-pass AdamW instead
        stack.enter_context(_calling(fused_norm, "adamw_step", before=lambda: record(MOMENTS[2])))
        stack.enter_context(_calling(engine, "step", after=lambda: record(MOMENTS[3])))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step()
    result = {"moments": {m: moments[m] for m in MOMENTS if m in moments}}
    if cuda:
        result.update(peak_allocated=max(r.get("peak since previous", 0) for r in result["moments"].values()),
                      peak_reserved=torch.cuda.max_memory_reserved(),
                      # what the allocator did, whatever PYTORCH_CUDA_ALLOC_CONF said
                      expandable_segments=any(s.get("is_expandable", False) for s in torch.cuda.memory_snapshot()))
    return result


def table(result: dict) -> list[str]:
    """A markdown table of measure()'s result in GiB, one column per moment."""
    moments = result["moments"]
    rows = [*CATEGORIES, "other", "allocated", "peak since previous", "reserved"]
    lines = ["| GiB | " + " | ".join(moments) + " |", "| --- |" + " --- |" * len(moments)]
    for row in rows:
        if any(row in m for m in moments.values()):
            lines.append(f"| {row} | " + " | ".join(f"{m[row] / GIB:.2f}" if row in m else "-"
                                                    for m in moments.values()) + " |")
    return lines
