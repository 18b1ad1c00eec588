"""One AdamW update of a ZeRO partition in a single pass over memory (Triton).

DeepSpeed's bf16 ZeRO-1/2 step makes an fp32 copy of the bf16 gradient partition, runs torch's fused AdamW on
the fp32 master weights (which, given a clipping factor, also writes the divided gradient back), then copies the
master weights into the bf16 partition: per parameter 2+4 (cast), 16+16 (AdamW) and 4+2 (copy) bytes, 44 in
all. `adamw_step` reads the bf16 gradient, the master weight and both moments, and writes the weight, the
moments and the bf16 copy: 28 bytes, and no fp32 gradient partition in memory.

The update is torch.optim.AdamW's (decoupled weight decay, no amsgrad, no maximize), in fp32 with IEEE square
root and division; its state (`step`, `exp_avg`, `exp_avg_sq`, as torch's fused AdamW keeps them) stays
interchangeable with torch's, so checkpoints do not depend on which of the two ran. The clipping factor and the
inf/NaN skip are device scalars, read by the kernel: the host never waits for the gradient norm."""
import torch
import triton
import triton.language as tl

# elements per program (4 per thread at 8 warps: one 128-bit fp32 load each) and warps: the fastest tiling of
# tools/bench_adamw.py --sweep on an H200 (9.8 ms for 1.35 B elements; 4096 x 8 took 10.7)
BLOCK, NUM_WARPS = 1024, 8


@triton.jit
def _to_bfloat16(x):
    """fp32 -> bf16, rounded to nearest even by integer arithmetic: the same bits as torch's cast on a GPU and
    under Triton's interpreter (whose own cast truncates). NaN stays NaN; beyond bf16's range becomes inf."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, scalars_ptr, n, decay, beta1, beta2,
                  eps, BLOCK: tl.constexpr):
    # scalars: [skip (1.0: leave everything as it is), clipping factor, lr / bias_correction1,
    #           sqrt(bias_correction2)], float32, computed on the device by adamw_step
    if tl.load(scalars_ptr) != 0.0:
        return
    clip = tl.load(scalars_ptr + 1)
    step_size = tl.load(scalars_ptr + 2)
    bias_correction2_sqrt = tl.load(scalars_ptr + 3)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    grad = tl.div_rn(tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32), clip)
    weight = tl.load(master_ptr + offsets, mask=inside, other=0.0)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=inside, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=inside, other=0.0)
    weight = weight - decay * weight  # decay = lr * weight_decay
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    denominator = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    weight = weight - tl.div_rn(step_size * exp_avg, denominator)
    tl.store(master_ptr + offsets, weight, mask=inside)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=inside)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=inside)
    tl.store(out_ptr + offsets, _to_bfloat16(weight), mask=inside)


def adamw_state(optimizer: torch.optim.AdamW, master: torch.Tensor) -> dict:
    """`optimizer`'s state of `master`, made as torch's fused AdamW makes it if the parameter has none yet; a step
    count loaded elsewhere (torch keeps a non-fused AdamW's on the CPU) is moved beside the weights."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    elif state["step"].device != master.device or state["step"].dtype != torch.float32:
        state["step"] = state["step"].to(master.device, torch.float32)
    return state


def supports(optimizer) -> bool:
    """Whether adamw_step can stand in for `optimizer`'s step: torch's fused AdamW (its state format) without
    amsgrad, maximize or a tensor lr."""
    return type(optimizer) is torch.optim.AdamW and all(
        group.get("fused") and not group["amsgrad"] and not group["maximize"] and not torch.is_tensor(group["lr"])
        for group in optimizer.param_groups)


def adamw_step(master: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, out: torch.Tensor,
               skip: torch.Tensor, clip: torch.Tensor | None) -> None:
    """One AdamW update of the fp32 vector `master` [n] by `grad` [n] (any float dtype), with `state`
    (adamw_state) and the hyper-parameters of param group `group`; the new weights also go to `out` [n], bf16.

    skip: float32 device scalar, 1.0 to leave master, moments, step count and out unchanged (an inf/NaN norm).
    clip: float32 device scalar the gradient is divided by (>= 1), or None."""
    if not (master.is_contiguous() and grad.is_contiguous() and out.is_contiguous()):
        raise ValueError("adamw_step needs contiguous vectors")
    if master.dtype != torch.float32 or out.dtype != torch.bfloat16:
        raise ValueError(f"adamw_step updates fp32 weights into a bf16 copy, not {master.dtype} into {out.dtype}")
    if not master.numel() == grad.numel() == out.numel():
        raise ValueError(f"adamw_step: {master.numel()} weights, {grad.numel()} gradients, {out.numel()} outputs")
    beta1, beta2 = group["betas"]
    step = state["step"]
    step.add_(1.0 - skip)  # a skipped update does not count, as with torch's found_inf
    steps = step.double()  # as torch's AdamW: 1 - 0.999 ** step in fp32 would be off by ~1e-5 relative
    scalars = torch.stack([skip.double(), torch.ones_like(steps) if clip is None else clip.double(),
                           group["lr"] / (1.0 - torch.pow(beta1, steps)),
                           torch.sqrt(1.0 - torch.pow(beta2, steps))]).float()
    n = master.numel()
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        master, grad, state["exp_avg"], state["exp_avg_sq"], out, scalars, n,
        group["lr"] * group["weight_decay"], beta1, beta2, group["eps"], BLOCK=BLOCK, num_warps=NUM_WARPS)
