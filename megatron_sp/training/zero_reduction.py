"""When DeepSpeed's ZeRO gradient reduction changes no value. One predicate for the two places that ask: the fused-norm
optimizer (training/fused_norm.py), from DeepSpeed's optimizer, and the memory planner (plan/memory.py), from the
config. Pure, so the planner imports it without DeepSpeed."""


def reduction_changes_nothing(*, partitioned: bool, data_parallel_ranks: int, overlap_comm: bool,
                              fp32_accumulation_attribute: bool, predivide_factor: float) -> bool:
    """True for one rank in the data-parallel group, gradients reduced once at the boundary (not partitioned,
    ZeRO-1; no overlapped reduction), no fp32 accumulation attribute, and no pre-division (which would divide and
    multiply back, with a rounding each way). DeepSpeed then only copies the gradients around."""
    return (not partitioned and data_parallel_ranks == 1 and not overlap_comm and not fp32_accumulation_attribute
            and predivide_factor == 1.0)
