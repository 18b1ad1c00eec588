"""Time one AdamW update of an n-element ZeRO partition on a GPU, two ways:

- deepspeed: what DeepSpeed's bf16 ZeRO-1/2 step runs: the bf16 gradient cast to an fp32 copy, torch's fused AdamW
  dividing by the clipping factor (grad_scale) with the skip flag (found_inf), the fp32 -> bf16 copy of the weights;
- ours: megatron_sp.kernels.adamw.adamw_step, one pass.

    python tools/bench_adamw.py --numel 1350000000 --out adamw.json
    python tools/bench_adamw.py --numel 1350000000 --sweep    # ours at other tilings (BLOCK x warps)

Prints ms per update and the bytes each moves per element over that time (GB/s); --out appends one JSON line."""
import argparse
import json
import sys
import time

import torch

from megatron_sp.kernels import adamw
from megatron_sp.kernels.adamw import adamw_state, adamw_step

BYTES = {"deepspeed": 2 + 4 + 4 * 4 + 4 * 4 + 4 + 2, "ours": 2 + 3 * 4 + 3 * 4 + 2}  # read + written per element


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1_350_000_000, help="elements of the partition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    parser.add_argument("--sweep", action="store_true", help="also time ours at other elements per program and warps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_adamw needs a CUDA GPU")
    n, device = args.numel, torch.device("cuda")
    master = torch.randn(n, device=device) * 0.02
    grad = (torch.randn(n, device=device) * 1e-3).to(torch.bfloat16)
    weights = torch.empty(n, dtype=torch.bfloat16, device=device)
    skip, clip = torch.zeros((), device=device), torch.full((), 1.5, device=device)
    optimizer = torch.optim.AdamW([master], lr=1e-4, weight_decay=0.1, fused=True)
    group, state = optimizer.param_groups[0], adamw_state(optimizer, master)

    def deepspeed_step():
        master.grad = grad.to(torch.float32)
        optimizer.grad_scale, optimizer.found_inf = clip, skip
        optimizer.step()
        weights.copy_(master)

    def ours():
        adamw_step(master, grad, state, group, weights, skip, clip)

    result = {"numel": n, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:]}
    for name, fn in (("deepspeed", deepspeed_step), ("ours", ours)):
        ms = time_ms(fn, args.warmup, args.reps)
        result[name] = {"ms": round(ms, 3), "GB/s": round(BYTES[name] * n / ms / 1e6, 1)}
        print(f"{name:>9}: {ms:8.3f} ms  {BYTES[name] * n / ms / 1e6:7.1f} GB/s ({BYTES[name]} B per element)")
    if args.sweep:
        result["sweep"] = {}
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                adamw.BLOCK, adamw.NUM_WARPS = block, warps
                ms = time_ms(ours, args.warmup, args.reps)
                result["sweep"][f"{block}x{warps}"] = round(ms, 3)
                rate = BYTES["ours"] * n / ms / 1e6
                print(f"     ours BLOCK {block:5d} warps {warps:2d}: {ms:8.3f} ms  {rate:7.1f} GB/s")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
