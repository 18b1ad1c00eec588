"""Benchmark our Triton flash attention against SDPA flash (FA2) and SDPA cuDNN on one GPU; optional tile sweep.

    python tools/bench_flash_attn.py --out bench.json                 # table: TFLOP/s, causal and not, 4k/16k/32k
    python tools/bench_flash_attn.py --sweep --seqlens 16384 --out sweep.json   # time candidate tilings

FLOPs (model FLOPs, as anchors.md): fwd = 4*b*h*s^2*d, halved when causal; bwd = 2.5 * fwd; fwd+bwd = 3.5 * fwd.
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from megatron_sp.kernels.flash_attn import (  # noqa: E402
    FwdConfig, default_configs, flash_attn_backward, flash_attn_forward)
from tools.timing import attention_fwd_flops, time_ms  # noqa: E402


def inputs(b, s, h, d, dtype):
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(4))
    return q, k, v, dout


def ours_fns(q, k, v, dout, causal, fcfg=None, bcfg=None):
    """(fwd, bwd, fwd+bwd) closures for our kernels; bwd reuses one saved forward."""
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attn_forward(q, k, v, causal, scale, config=fcfg)

    def fwd():
        flash_attn_forward(q, k, v, causal, scale, config=fcfg)

    def bwd():
        flash_attn_backward(dout, q, k, v, out, lse, causal, scale, config=bcfg)

    def both():
        o, l = flash_attn_forward(q, k, v, causal, scale, config=fcfg)
        flash_attn_backward(dout, q, k, v, o, l, causal, scale, config=bcfg)
    return fwd, bwd, both


def sdpa_fns(q, k, v, dout, causal, backend):
    """SDPA in its own [b, h, s, d] layout (contiguous), so layout copies are not charged to it."""
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    attn = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with sdpa_kernel(backend):
            attn(qt, kt, vt, is_causal=causal)

    def both():
        with sdpa_kernel(backend):
            attn(qt, kt, vt, is_causal=causal).backward(dt)
    return fwd, None, both


def bench(args):
    rows = []
    for s in args.seqlens:
        for causal in (True, False):
            q, k, v, dout = inputs(args.batch, s, args.heads, args.head_dim, torch.bfloat16)
            f = attention_fwd_flops(args.batch, args.heads, s, args.head_dim, causal)
            providers = {"triton": lambda: ours_fns(q, k, v, dout, causal),
                         "sdpa_flash": lambda: sdpa_fns(q, k, v, dout, causal, SDPBackend.FLASH_ATTENTION),
                         "sdpa_cudnn": lambda: sdpa_fns(q, k, v, dout, causal, SDPBackend.CUDNN_ATTENTION)}
            for name, make in providers.items():
                row = {"provider": name, "seqlen": s, "causal": causal}
                try:
                    fwd, bwd, both = make()
                    for mode, fn, flops in (("fwd", fwd, f), ("bwd", bwd, 2.5 * f), ("fwd_bwd", both, 3.5 * f)):
                        if fn is not None:
                            ms = time_ms(fn, args.warmup, args.reps, cuda=True)
                            row[mode + "_ms"] = ms
                            row[mode + "_tflops"] = flops / ms / 1e9
                except Exception as exc:  # a backend SDPA lacks here is a row with an error, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    print(f"\n{'seqlen':>7} {'causal':>6} {'provider':>11} {'fwd':>7} {'bwd':>7} {'fwd+bwd':>8}  (TFLOP/s)")
    for r in rows:
        cell = lambda key: f"{r[key]:7.1f}" if key in r else f"{'-':>7}"  # noqa: E731
        print(f"{r['seqlen']:>7} {str(r['causal']):>6} {r['provider']:>11} {cell('fwd_tflops')} "
              f"{cell('bwd_tflops')} {cell('fwd_bwd_tflops'):>8}")
    return rows


def sweep(args):
    """Time candidate tilings at each seqlen (causal): forward configs, then backward kernel 1 with kernel 2
    fixed, then kernel 2 with kernel 1 fixed."""
    d = args.head_dim
    fdef, bdef = default_configs(d, torch.bfloat16, torch.device("cuda"))
    # candidates around the defaults, from the first sweep (docs/kernels.md); 4-warp 128-wide bwd tiles spill
    fwd_cands = [FwdConfig(*c) for c in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3),
                                         (64, 64, 4, 4))]
    k1 = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 4), (32, 64, 4, 4)]
    k2 = [(128, 64, 8, 4), (128, 32, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4)]
    bwd_cands = [dataclasses.replace(bdef, block_m1=m, block_n1=n, num_warps1=w, num_stages1=st) for m, n, w, st in k1]
    bwd_cands += [dataclasses.replace(bdef, block_m2=m, block_n2=n, num_warps2=w, num_stages2=st) for m, n, w, st in k2]
    rows = []
    for s in args.seqlens:
        q, k, v, dout = inputs(args.batch, s, args.heads, d, torch.bfloat16)
        f = attention_fwd_flops(args.batch, args.heads, s, d, True)
        for kind, cands in (("fwd", fwd_cands), ("bwd", bwd_cands)):
            for cfg in cands:
                row = {"kind": kind, "seqlen": s, "config": dataclasses.asdict(cfg)}
                try:
                    fwd, bwd, _ = ours_fns(q, k, v, dout, True, cfg if kind == "fwd" else fdef,
                                           cfg if kind == "bwd" else bdef)
                    ms = time_ms(fwd if kind == "fwd" else bwd, 2, max(3, args.reps // 2), cuda=True)
                    row.update(ms=ms, tflops=(f if kind == "fwd" else 2.5 * f) / ms / 1e9)
                except Exception as exc:  # e.g. out of shared memory for this tiling
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=lambda x: [int(t) for t in x.split(",")], default=[4096, 16384, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="time candidate tilings instead of the provider table")
    p.add_argument("--out", default="bench_flash_attn.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_flash_attn needs a CUDA GPU")
    rows = sweep(args) if args.sweep else bench(args)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": datetime.date.today().isoformat(),
            "argv": sys.argv, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "bf16"}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
