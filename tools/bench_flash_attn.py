"""Benchmark our Triton flash attention against SDPA cuDNN and SDPA flash (FA2) on one GPU, per head dim.

    python tools/bench_flash_attn.py --head-dims 64,96,128 --seqlens 4096,16384 --out bench.json   # the table
    python tools/bench_flash_attn.py --doc-len 4096 --seqlens 131072 --out docs.json   # document masks
    python tools/bench_flash_attn.py --auto-table --out auto.json   # prints kernels/choice.py's MEASURED
    python tools/bench_flash_attn.py --sweep --head-dims 128 --seqlens 16384 --out sweep.json   # tilings
    python tools/bench_flash_attn.py --resources --head-dims 96,256 --causal yes   # no GPU: regs, spills, smem

--tma / --no-tma run (with --resources: compile) ours with TMA tensor descriptors (FwdConfig.tma, BwdConfig.tma)
turned on / off in the default tilings, and with --sweep in every candidate; without either, as the defaults have
it. A sweep also times the defaults with TMA flipped; --sweep-kernels dkdv also times each dk/dv tiling with dq
added up inside it (BwdConfig.dq_atomic).

Shapes: b=1, 16 heads (--batch, --heads), bf16, q/k/v [b, s, h, d]; SDPA gets its own contiguous [b, h, s, d].
FLOPs (model FLOPs, as the FlashAttention papers count them): fwd = 4*b*h*s^2*d, halved when causal;
bwd = 2.5 * fwd; fwd+bwd = 3.5 * fwd. With --doc-len N a sample of s tokens holds s/N documents and its FLOPs
are the sum over documents of these per-document FLOPs (the work a document mask leaves). Timing: CUDA events,
median of --reps after --warmup calls, each call on an idle GPU; --back-to-back: the mean of --reps calls queued
back to back, so launch time hidden behind earlier calls does not count (tools/timing.py). A provider that fails
(a head dim cuDNN lacks, out of memory) is a row with an error, not a crash.
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from megatron_sp.kernels.flash_attn import (  # noqa: E402
    BwdConfig, FwdConfig, block_d, default_configs, flash_attn_backward, flash_attn_forward)
from megatron_sp.flops import ATTENTION_MODE_FACTORS as MODE_FLOPS, attention_fwd_flops  # noqa: E402
from tools.doc_lengths import document_ids_of  # noqa: E402
from tools.timing import back_to_back_ms, time_ms  # noqa: E402


def inputs(b, s, h, d, device):
    """q, k, v, dout [b, s, h, d]: bf16 on a GPU, fp32 on CPU (the interpreter gets bf16 wrong)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return tuple(torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(4))


def ours_configs(d, dtype, device, tma=None):
    """Our default (forward, backward) configs; tma True / False: with TMA tensor descriptors turned on / off
    (--tma / --no-tma), None: as the defaults have it."""
    fcfg, bcfg = default_configs(d, dtype, torch.device(device))
    if tma is None:
        return fcfg, bcfg
    return dataclasses.replace(fcfg, tma=tma), dataclasses.replace(bcfg, tma=tma)


def ours_fns(q, k, v, dout, causal, fcfg=None, bcfg=None, docs=None):
    """{mode: closure} for our kernels; bwd reuses one saved forward. docs: (q_docs, k_docs) or None."""
    scale = q.shape[-1] ** -0.5
    mask = dict(q_docs=docs[0], k_docs=docs[1]) if docs is not None else {}
    out, lse = flash_attn_forward(q, k, v, causal, scale, config=fcfg, **mask)

    def both():
        o, lse_ = flash_attn_forward(q, k, v, causal, scale, config=fcfg, **mask)
        flash_attn_backward(dout, q, k, v, o, lse_, causal, scale, config=bcfg, **mask)
    return {"fwd": lambda: flash_attn_forward(q, k, v, causal, scale, config=fcfg, **mask),
            "bwd": lambda: flash_attn_backward(dout, q, k, v, out, lse, causal, scale, config=bcfg, **mask),
            "fwd_bwd": both}


def sdpa_fns(q, k, v, dout, causal, backend):
    """{mode: closure} for SDPA in its own [b, h, s, d] layout (contiguous), so layout copies are not charged."""
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    attn = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with sdpa_kernel(backend):
            attn(qt, kt, vt, is_causal=causal)

    def both():
        with sdpa_kernel(backend):
            attn(qt, kt, vt, is_causal=causal).backward(dt)
    return {"fwd": fwd, "fwd_bwd": both}


def ours_default_fns(q, k, v, dout, causal, tma):
    """ours_fns at the default tiling, TMA as ours_configs."""
    return ours_fns(q, k, v, dout, causal, *ours_configs(q.shape[-1], q.dtype, q.device, tma))


PROVIDERS = {  # make(q, k, v, dout, causal, tma) -> {mode: closure}; tma: ours' TMA (--tma/--no-tma)
    "triton": ours_default_fns,
    "sdpa_cudnn": lambda q, k, v, dout, causal, tma: sdpa_fns(q, k, v, dout, causal, SDPBackend.CUDNN_ATTENTION),
    "sdpa_flash": lambda q, k, v, dout, causal, tma: sdpa_fns(q, k, v, dout, causal, SDPBackend.FLASH_ATTENTION)}


def measure(row, make, flops, modes, args):
    """Time each of `modes` that make() offers into row (<mode>_ms, <mode>_tflops); an exception -> row["error"]."""
    try:
        fns = make()
        for mode in modes:
            if mode in fns:
                timer = back_to_back_ms if args.back_to_back else time_ms
                ms = timer(fns[mode], args.warmup, args.reps, cuda=args.device == "cuda")
                row[mode + "_ms"], row[mode + "_tflops"] = ms, MODE_FLOPS[mode] * flops / ms / 1e9
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run the shape is a row, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(json.dumps(row), flush=True)
    return row


def shapes(args):
    """(d, s, causal, (q, k, v, dout)) for every requested shape; tensors are freed as the loop moves on."""
    for d in args.head_dims:
        for s in args.seqlens:
            for causal in args.causal:
                yield d, s, causal, inputs(args.batch, s, args.heads, d, args.device)
                if args.device == "cuda":
                    torch.cuda.empty_cache()


def bench(args):
    """Every provider at every (d, s, causal); prints TFLOP/s and ours / cuDNN."""
    rows = []
    for d, s, causal, (q, k, v, dout) in shapes(args):
        flops = attention_fwd_flops(args.batch, args.heads, s, d, causal)
        for name, make in PROVIDERS.items():
            row = dict(provider=name, head_dim=d, seqlen=s, causal=causal)
            rows.append(measure(row, lambda: make(q, k, v, dout, causal, args.tma), flops, args.modes, args))
    print(f"\n{'d':>4} {'seqlen':>7} {'causal':>6} {'ours':>7} {'cuDNN':>7} {'FA2':>7} {'ours/cuDNN':>10}"
          "   (fwd+bwd TFLOP/s)")
    rate = {(r["provider"], r["head_dim"], r["seqlen"], r["causal"]): r.get("fwd_bwd_tflops") for r in rows}
    for d, s, causal in sorted({(r["head_dim"], r["seqlen"], r["causal"]) for r in rows}):
        ours, cudnn, fa2 = (rate[(p, d, s, causal)] for p in PROVIDERS)
        cell = lambda x: f"{x:7.1f}" if x else f"{'-':>7}"  # noqa: E731
        ratio = f"{ours / cudnn:10.2f}" if ours and cudnn else f"{'-':>10}"
        print(f"{d:>4} {s:>7} {str(causal):>6} {cell(ours)} {cell(cudnn)} {cell(fa2)} {ratio}")
    return rows


def doc_bench(args):
    """Our kernel with documents of --doc-len tokens vs without, at each length; and dense at --doc-len itself.
    Rates count only the FLOPs the document mask leaves (s / doc_len documents of doc_len tokens)."""
    rows, n = [], args.doc_len
    for d, s, causal, (q, k, v, dout) in shapes(args):
        if s % n:
            raise SystemExit(f"--doc-len {n} must divide every --seqlens entry ({s})")
        lengths = [n] * (s // n)
        docs = document_ids_of(lengths, args.batch).to(q.device)
        doc_flops = attention_fwd_flops(args.batch, args.heads, s, d, causal, doc_lengths=lengths)
        dense_flops, one_doc_flops = (attention_fwd_flops(args.batch, args.heads, x, d, causal) for x in (s, n))
        cfgs = ours_configs(d, q.dtype, q.device, args.tma)
        dense = measure(dict(kind="dense", head_dim=d, seqlen=s, causal=causal),
                        lambda: ours_fns(q, k, v, dout, causal, *cfgs), dense_flops, args.modes, args)
        with_docs = measure(dict(kind="documents", doc_len=n, head_dim=d, seqlen=s, causal=causal),
                            lambda: ours_fns(q, k, v, dout, causal, *cfgs, docs=(docs, docs)), doc_flops, args.modes,
                            args)
        qn, kn, vn, dn = (x[:, :n] for x in (q, k, v, dout))
        one_doc = measure(dict(kind="dense", head_dim=d, seqlen=n, causal=causal),
                          lambda: ours_fns(qn, kn, vn, dn, causal, *cfgs), one_doc_flops, args.modes, args)
        rows += [dense, with_docs, one_doc]
        for mode in args.modes:
            if all(mode + "_ms" in r for r in (dense, with_docs, one_doc)):
                print(f"d={d} s={s} causal={causal} {mode}: documents of {n} {with_docs[mode + '_tflops']:.1f} "
                      f"TFLOP/s (document FLOPs), {dense[mode + '_ms'] / with_docs[mode + '_ms']:.1f}x faster than "
                      f"no mask at {s}; dense at {n}: {one_doc[mode + '_tflops']:.1f} TFLOP/s "
                      f"(ratio {with_docs[mode + '_tflops'] / one_doc[mode + '_tflops']:.2f})", flush=True)
    return rows


def auto_table(args):
    """fwd+bwd of ours and cuDNN at each (d, s, causal); prints the MEASURED dict of megatron_sp/kernels/choice.py."""
    rows, table = [], {}
    for d, s, causal, (q, k, v, dout) in shapes(args):
        flops = attention_fwd_flops(args.batch, args.heads, s, d, causal)
        ms = {}
        for name in ("triton", "sdpa_cudnn"):
            row = measure(dict(provider=name, head_dim=d, seqlen=s, causal=causal),
                          lambda: PROVIDERS[name](q, k, v, dout, causal, args.tma), flops, ["fwd_bwd"], args)
            rows.append(row)
            ms[name] = row.get("fwd_bwd_ms", float("inf"))
        faster = "cudnn" if ms["sdpa_cudnn"] < ms["triton"] else "triton"
        entries = table.setdefault((d, str(q.dtype).removeprefix("torch."), causal), [])
        if not entries or entries[-1][1] != faster:  # keep only the lengths where the winner changes
            entries.append((s, faster))
    print("\nMEASURED = {  # python tools/bench_flash_attn.py " + " ".join(sys.argv[1:]))
    for key, entries in sorted(table.items()):
        print(f"    {key!r}: {tuple(entries)!r},")
    print("}")
    return rows


# Tilings timed by --sweep, keyed by block_d: forward (block_m, block_n, warps, stages); dk/dv kernel
# (block_m1, block_n1, warps, stages); dq kernel (block_m2, block_n2, warps, stages). From docs/kernels.md.
SWEEP = {
    32: dict(fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)], dkdv=[(64, 128, 8, 3), (64, 64, 4, 3),
             (32, 64, 4, 3)], dq=[(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]),
    64: dict(fwd=[(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             dkdv=[(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)], dq=[(128, 64, 8, 3), (128, 32, 8, 3),
                                                                       (64, 64, 4, 3)]),
    128: dict(fwd=[(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
              dkdv=[(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 4), (32, 64, 4, 4)],
              dq=[(128, 64, 8, 4), (128, 32, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4)]),
    256: dict(fwd=[(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
              dkdv=[(32, 64, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (16, 32, 4, 2)],
              dq=[(64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2)]),
}


SWEEP_KERNELS = ("fwd", "dkdv", "dq")


def sweep_configs(d, tma=None, kernels=SWEEP_KERNELS):
    """(kind, config) candidates around the defaults, for the kernels named: "fwd", forward tilings; "dkdv", the dk/dv
    kernel's tilings with the dq kernel at its default, each also with dq_atomic (dq added up inside the dk/dv
    kernel, no dq kernel); "dq", the dq kernel's tilings with the dk/dv kernel at its default. Last the defaults
    with TMA flipped. tma: as ours_configs, every candidate with TMA on (True) or off (False)."""
    fdef, bdef = ours_configs(d, torch.bfloat16, "cuda", tma)  # the GPU's defaults, also on CPU
    cands = SWEEP[block_d(d)]
    if "fwd" in kernels:
        yield from (("fwd", FwdConfig(*c, tma=fdef.tma)) for c in cands["fwd"])
    if "dkdv" in kernels:
        for m, n, w, st in cands["dkdv"]:
            cfg = dataclasses.replace(bdef, block_m1=m, block_n1=n, num_warps1=w, num_stages1=st)
            yield "bwd", dataclasses.replace(cfg, dq_atomic=False)
            yield "bwd", dataclasses.replace(cfg, dq_atomic=True)
    if "dq" in kernels:
        yield from (("bwd", dataclasses.replace(bdef, block_m2=m, block_n2=n, num_warps2=w, num_stages2=st))
                    for m, n, w, st in cands["dq"])
    yield "fwd", dataclasses.replace(fdef, tma=not fdef.tma)
    yield "bwd", dataclasses.replace(bdef, tma=not bdef.tma)


def sweep(args):
    """Time candidate tilings (causal) of each head dim at each length."""
    rows = []
    for d, s, causal, (q, k, v, dout) in shapes(args):
        fdef, bdef = ours_configs(d, torch.bfloat16, "cuda", args.tma)
        flops = attention_fwd_flops(args.batch, args.heads, s, d, causal)
        for kind, cfg in sweep_configs(d, args.tma, args.sweep_kernels):
            row = dict(kind=kind, head_dim=d, seqlen=s, causal=causal, config=dataclasses.asdict(cfg))
            fcfg, bcfg = (cfg, bdef) if isinstance(cfg, FwdConfig) else (fdef, cfg)
            rows.append(measure(row, lambda: ours_fns(q, k, v, dout, causal, fcfg, bcfg), flops, [kind], args))
    return rows


def resources(args):
    """Compile the default tilings for sm_90 on this machine (no GPU needed), without and with document masks,
    and report what each kernel uses: registers per thread, stack (register spills) and shared memory per block
    (H200: at most 227 KB)."""
    rows = []
    for d in args.head_dims:
        for dtype in (torch.bfloat16, torch.float32):
            fcfg, bcfg = ours_configs(d, dtype, "cuda", args.tma)
            for causal, docs in itertools.product(args.causal, (False, True)):
                for kernel, usage in kernel_resources(d, dtype, causal, docs, fcfg, bcfg).items():
                    rows.append(dict(head_dim=d, dtype=str(dtype).removeprefix("torch."), causal=causal,
                                     documents=docs, tma=fcfg.tma, kernel=kernel, **usage))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dkd", "stride_dqd", "stride_ls"}


def kernel_resources(d, dtype, causal, docs, fcfg, bcfg):
    """{kernel: {regs, stack, smem_kb} or {error}} of the forward, dk/dv and dq kernels compiled for sm_90;
    docs: the variant with document masks."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_sp.kernels import flash_attn_bwd, flash_attn_fwd
    from megatron_sp.kernels.flash_attn_tiles import head_dim_chunks
    elem = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    shape = dict(HEAD_DIM=d, D0=head_dim_chunks(d)[0], CAUSAL=causal, HAS_DOCS=docs, PREC="ieee" if elem == "fp32" else
                 "tf32", DQ_ATOMIC=bcfg.dq_atomic)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernels = {"fwd": (flash_attn_fwd._fwd_kernel, dict(BLOCK_M=fcfg.block_m, BLOCK_N=fcfg.block_n, TMA=fcfg.tma),
                       fcfg.num_warps, fcfg.num_stages),
               "dkdv": (flash_attn_bwd._bwd_dkdv_kernel, dict(BLOCK_M=bcfg.block_m1, BLOCK_N=bcfg.block_n1,
                                                              TMA=bcfg.tma), bcfg.num_warps1, bcfg.num_stages1),
               "dq": (flash_attn_bwd._bwd_dq_kernel, dict(BLOCK_M=bcfg.block_m2, BLOCK_N=bcfg.block_n2, TMA=bcfg.tma),
                      bcfg.num_warps2, bcfg.num_stages2)}
    out = {}
    for name, (fn, blocks, warps, stages) in kernels.items():
        signature, constants, attrs = {}, {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in shape or arg in blocks or arg in UNIT_STRIDES:
                signature[arg] = "constexpr"
                constants[arg] = {**shape, **blocks}.get(arg, 1)  # Triton specialises unit strides at run time too
            elif arg.isupper() and arg not in ("H", "H_KV", "GROUP"):  # tensors: 16-byte aligned, as torch allocates
                fp32 = arg in ("LSE", "DELTA") or arg == "DQ" and bcfg.dq_atomic  # dq_atomic: an fp32 sum
                signature[arg] = "*" + ("fp32" if fp32 else "i32" if "DOCS" in arg or arg == "RANGES" else elem)
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if "scale" in arg else "i32"
                if arg.startswith("stride"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                      text=True, check=True).stdout
            out[name] = dict(regs=int(re.search(r"REG:(\d+)", dump)[1]), stack=int(re.search(r"STACK:(\d+)", dump)[1]),
                             smem_kb=compiled.metadata.shared / 1024)
        except Exception as exc:  # noqa: BLE001 - a tiling that does not compile is a finding, not a crash
            out[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return out


def int_list(text):
    return [int(t) for t in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int_list, default=[128], help="comma-separated head dims (default 128)")
    p.add_argument("--seqlens", type=int_list, default=[4096, 16384, 32768])
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--modes", default="fwd,bwd,fwd_bwd", help="comma-separated of fwd, bwd, fwd_bwd")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--doc-len", type=int, help="documents of this many tokens: ours with vs without the mask")
    group.add_argument("--auto-table", action="store_true", help="ours vs cuDNN fwd+bwd, printed as kernels.choice.MEASURED")
    group.add_argument("--sweep", action="store_true", help="time candidate tilings instead of the provider table")
    group.add_argument("--resources", action="store_true",
                       help="no GPU needed: compile the default tilings for sm_90, print registers, spills, smem")
    p.add_argument("--sweep-kernels", default=",".join(SWEEP_KERNELS),
                   help="--sweep: comma-separated of fwd, dkdv, dq (default all); dkdv also times dq_atomic")
    p.add_argument("--tma", action=argparse.BooleanOptionalAction, default=None,
                   help="ours with TMA tensor descriptors (Hopper) on / off in the default tilings (default: as the "
                        "defaults have it); --resources compiles them so")
    p.add_argument("--back-to-back", action="store_true",
                   help="time --reps calls queued back to back (the mean; launches overlap the GPU's work, as in "
                        "training) instead of each call on an idle GPU (the median)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: Triton's interpreter (TRITON_INTERPRET=1), fp32, for checking this tool at tiny sizes")
    p.add_argument("--out", default="bench_flash_attn.json")
    args = p.parse_args(argv)
    args.causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    args.modes = args.modes.split(",")
    args.sweep_kernels = args.sweep_kernels.split(",")
    if set(args.sweep_kernels) - set(SWEEP_KERNELS):
        p.error(f"--sweep-kernels takes {', '.join(SWEEP_KERNELS)}; got {','.join(args.sweep_kernels)}")
    if set(args.modes) - set(MODE_FLOPS):
        p.error(f"--modes takes {', '.join(MODE_FLOPS)}; got {','.join(args.modes)}")
    return args


def main():
    args = parse_args()
    if args.resources:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("--resources compiles for a GPU: unset TRITON_INTERPRET")
        rows = resources(args)
        with open(args.out, "w") as fh:
            # spills differ by Triton release, so the JSON names the one that compiled
            meta = {"target": "sm_90", "triton": triton.__version__, "argv": sys.argv}
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_flash_attn needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs Triton's interpreter: set TRITON_INTERPRET=1")
    run = sweep if args.sweep else auto_table if args.auto_table else doc_bench if args.doc_len else bench
    rows = run(args)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "argv": sys.argv,
            "timing": "back to back, mean" if args.back_to_back else "idle GPU per call, median",
            "batch": args.batch, "heads": args.heads,
            "dtype": "bf16" if args.device == "cuda" else "fp32",
            "flops": "fwd = 4*b*h*s^2*d (halved when causal), bwd = 2.5x, fwd+bwd = 3.5x"}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
