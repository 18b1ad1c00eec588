"""Time one AdamW update of an n-element ZeRO partition on a GPU, two ways:

- deepspeed: what DeepSpeed's bf16 ZeRO-1/2 step runs: the bf16 gradient cast to an fp32 copy, torch's fused AdamW
  dividing by the clipping factor (grad_scale) with the skip flag (found_inf), the fp32 -> bf16 copy of the weights;
- ours: megatron_sp.kernels.adamw.adamw_step, one pass.

    python tools/bench_adamw.py --numel 1350000000 --out adamw.json
    python tools/bench_adamw.py --numel 1350000000 --sweep    # ours at other tilings (BLOCK x warps)
    TRITON_INTERPRET=1 python tools/bench_adamw.py --device cpu --numel 5000   # checks this tool, times nothing real

Prints ms per update and the bytes each moves per element over that time (GB/s); --out appends one JSON line."""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_sp.kernels import adamw  # noqa: E402
from megatron_sp.kernels.adamw import adamw_state, adamw_step  # noqa: E402
from tools.timing import time_ms  # noqa: E402

BYTES = {"deepspeed": 2 + 4 + 4 * 4 + 4 * 4 + 4 + 2, "ours": 2 + 3 * 4 + 3 * 4 + 2}  # read + written per element


def sweep(ours, n: int, warmup: int, reps: int, cuda: bool) -> dict:
    """ms of ours at each elements-per-program x warps tiling; the module's default is restored after."""
    default, times = (adamw.BLOCK, adamw.NUM_WARPS), {}
    try:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                adamw.BLOCK, adamw.NUM_WARPS = block, warps
                ms = time_ms(ours, warmup, reps, cuda)
                times[f"{block}x{warps}"] = round(ms, 3)
                print(f"     ours BLOCK {block:5d} warps {warps:2d}: {ms:8.3f} ms  "
                      f"{BYTES['ours'] * n / ms / 1e6:7.1f} GB/s")
    finally:
        adamw.BLOCK, adamw.NUM_WARPS = default
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1_350_000_000, help="elements of the partition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    parser.add_argument("--sweep", action="store_true", help="also time ours at other elements per program and warps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: Triton's interpreter (TRITON_INTERPRET=1), for checking this tool at tiny sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_adamw needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench_adamw --device cpu runs Triton's interpreter: set TRITON_INTERPRET=1")
    n, device, cuda = args.numel, torch.device(args.device), args.device == "cuda"
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

    result = {"numel": n, "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
              "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else argv}
    for name, fn in (("deepspeed", deepspeed_step), ("ours", ours)):
        ms = time_ms(fn, args.warmup, args.reps, cuda)
        result[name] = {"ms": round(ms, 3), "GB/s": round(BYTES[name] * n / ms / 1e6, 1)}
        print(f"{name:>9}: {ms:8.3f} ms  {BYTES[name] * n / ms / 1e6:7.1f} GB/s ({BYTES[name]} B per element)")
    if args.sweep:
        result["sweep"] = sweep(ours, n, args.warmup, args.reps, cuda)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
