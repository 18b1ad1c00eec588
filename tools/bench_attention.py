"""Sequence-parallel attention benchmark: our strategies x backends beside DeepSpeed-Ulysses, torch context_parallel and single-GPU kernels.

    torchrun --nproc_per_node 2 tools/bench_attention.py --out bench_attention.json          # 16k, 64k, 128k
    torchrun --nproc_per_node 2 tools/bench_attention.py --device cpu --seqs 64,128 --out x.json   # CI: gloo, tiny
    python tools/bench_attention.py --seqs 131072 --doc-len 4096 --skip deepspeed,cp --out docs.json  # packed, 1 GPU

Ulysses runs once per --ulysses-head-groups entry (default 1,2: unpipelined and two head groups, so one run
shows the overlap's effect; `--ulysses-head-groups 1,2,4` compares more group counts).

Shapes: batch 1, 16 heads, head_dim 128, bf16, causal (CPU mode: 4 heads, head_dim 16, fp32, torch kernels).
On one process the strategy is `local` (nothing to split).
FLOPs as the FlashAttention papers count them: fwd = 4*b*h*S^2*d / 2 (causal), fwd+bwd = 3.5 * fwd; the rate is
per GPU, so a sequence-parallel run divides by N GPUs and a single-GPU kernel does not. Perfect sequence
parallelism keeps the single-GPU kernel's rate.

--doc-len packs each sample with documents (a fixed length, or an indexed dataset's document lengths:
tools/doc_lengths.py) and runs our strategies with the document mask (--reset-attention-mask), each beside the
same run without documents. Their FLOPs count only pairs inside a document (S^2 -> sum of L^2), and each such row
reports its speed-up over the full causal run of the same strategy and kernel. The peers have no document mask
and always run full causal. Timing, two ways: each call alone (CUDA events around every call, which waits
for the last before the next starts; the median of --iters), and back to back (--iters calls issued without
waiting, as a training step issues its layers, so CPU launch time hidden behind earlier GPU work does not
count; the mean). For multi-rank runs the slowest rank counts. Every measurement is guarded: a failure
(OOM, an API this torch lacks) becomes a row with an error and the rest go on. Failures must be symmetric
across ranks (same shapes, same code), else a rank left inside a collective would wait for its peer.
"""
import argparse
import datetime
from functools import partial
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_sp.attention import build_inner_attention  # noqa: E402
from megatron_sp.attention.backends import BACKENDS  # noqa: E402
from megatron_sp.parallel.sharding import layout_for  # noqa: E402
from megatron_sp.parallel.state import ParallelState  # noqa: E402
from megatron_sp.attention.documents import Documents  # noqa: E402
from megatron_sp.flops import ATTENTION_MODE_FACTORS, attention_fwd_flops  # noqa: E402
from tools.doc_lengths import document_ids_of, document_lengths, parse_doc_len  # noqa: E402
from tools.timing import back_to_back_ms, time_ms  # noqa: E402


class Bench:
    """The run's settings, process groups and rows; every timing goes through `measure`."""

    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.rows = []
        # one ParallelState per strategy: groups are built once, collectively, in the same order on every rank
        if self.world == 1:
            self.states = {"local": ParallelState.build(1)}
        else:
            self.states = {"ulysses": ParallelState.build(self.world), "ring": ParallelState.build(self.world, 1)}
        if self.world >= 4 and self.world % 2 == 0:
            self.states["hybrid"] = ParallelState.build(self.world, 2)  # Ulysses pairs x ring across them

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def measure(self, row: dict, make, work: float, unit: str, all_ranks: bool = True):
        """Time make()'s closure and append `row` with ms and value = work/ms in `unit` (TFLOP/s or GB/s), each
        call alone, and ms_b2b, value_b2b back to back (tools/timing.py).

        all_ranks: every rank runs it and the slowest median counts (an error anywhere is an error
        everywhere); otherwise rank 0 alone runs it while the others wait at a barrier."""
        ms, ms_b2b, err = float("inf"), float("inf"), None
        if all_ranks or self.rank == 0:
            try:
                fn = make()
                ms = time_ms(fn, self.args.warmup, self.args.iters, self.cuda)
                ms_b2b = back_to_back_ms(fn, 1, self.args.iters, self.cuda)
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the run
                err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if self.cuda:
                torch.cuda.empty_cache()
        if all_ranks:
            t = torch.tensor([ms, ms_b2b], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms, ms_b2b = t.tolist()
        else:
            dist.barrier()
        ms, ms_b2b = max(ms, 1e-6), max(ms_b2b, 1e-6)  # a tiny CPU op can read 0 ms
        if err is None and float("inf") in (ms, ms_b2b):
            err = "failed on another rank"
        if err is None:
            scale = 1e9 if unit == "TFLOP/s" else 1e6
            row.update(ms=ms, value=work / ms / scale, ms_b2b=ms_b2b, value_b2b=work / ms_b2b / scale, unit=unit)
        else:
            row.update(error=err, unit=unit)
        self.rows.append(row)
        shown = (f"{row['value']:.4g} {unit} ({row['ms']:.3g} ms), back to back {row['value_b2b']:.4g}"
                 if err is None else f"FAILED {err}")
        self.log(f"  {row.get('seq', ''):>7} {row['name']:<42} {shown}")

    # --- inputs -----------------------------------------------------------------------------------
    def full_inputs(self, s: int):
        """q, k, v, dout [b, S, h, d], identical on every rank (same seed); random, never zeros (a kernel on
        zeros can read faster than on real data)."""
        g = torch.Generator(device=self.device).manual_seed(1234 + s)
        a = self.args
        return [torch.randn(a.batch, s, a.heads, a.head_dim, device=self.device, dtype=self.dtype, generator=g)
                for _ in range(4)]

    def shards(self, full, strategy: str, sp_rank: int, u: int | None = None):
        layout = layout_for(strategy, self.world, u)
        q, k, v, dout = (layout.shard(x, sp_rank).contiguous() for x in full)
        return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout

    def documents(self, s: int):
        """(Documents of the packed samples at S, their lengths), or (None, None) without --doc-len."""
        if self.args.doc_len is None:
            return None, None
        lengths = document_lengths(self.args.doc_len, s, seed=s)
        return Documents(document_ids_of(lengths, self.args.batch), self.device), lengths

    def flops(self, s: int, gpus: int, doc_lengths=None) -> float:
        """Causal forward+backward FLOPs (3.5 x forward) per GPU; with documents only pairs inside one."""
        a = self.args
        return (ATTENTION_MODE_FACTORS["fwd_bwd"]
                * attention_fwd_flops(a.batch, a.heads, s, a.head_dim, True, doc_lengths=doc_lengths) / gpus)

    # --- the providers ----------------------------------------------------------------------------
    def head_group_variants(self, strategy: str) -> list[tuple[int, str]]:
        """(G, name suffix) per distinct --ulysses-head-groups entry for Ulysses, [(1, "")] otherwise.
        G = 1 (unpipelined, the default) keeps the plain name; G > 1 adds " G=n"; an entry the heads
        cannot split is measured as an error."""
        if strategy != "ulysses":
            return [(1, "")]
        return [(g, "" if g == 1 else f" G={g}") for g in dict.fromkeys(self.args.ulysses_head_groups)]

    def ours(self, s, full):
        documents, lengths = self.documents(s)
        gpu_default = ["sdpa_flash", "triton"] if documents is not None else ["cudnn", "triton", "sdpa_flash"]
        backends = self.args.backends or (gpu_default if self.cuda else ["torch"])
        for strategy, ps in self.states.items():
            for backend in backends:
                for groups, suffix in self.head_group_variants(strategy):
                    def make(strategy=strategy, ps=ps, backend=backend, groups=groups, docs=None):
                        q, k, v, dout = self.shards(full, strategy, ps.sp_rank, ps.ulysses_degree)
                        attn = build_inner_attention(strategy, ps, causal=True, backend=backend,
                                                     ulysses_head_groups=groups)
                        extra = {} if docs is None else {"documents": docs}
                        return lambda: torch.autograd.grad(attn(q, k, v, **extra), (q, k, v), dout)
                    row = {"seq": s, "name": f"ours {strategy}/{backend}{suffix}", "gpus": self.world,
                           "group": "ours", "strategy": strategy, "backend": backend}
                    if strategy == "ulysses":
                        row["head_groups"] = groups
                    self.measure(row, make, self.flops(s, self.world), "TFLOP/s")
                    if documents is not None:
                        self.measure_documents(row, partial(make, docs=documents), lengths)

    def measure_documents(self, full_row: dict, make, lengths: list[int]):
        """The row's run again under the document mask; its speed-up over the full causal run."""
        row = {**{k: v for k, v in full_row.items() if k in ("seq", "gpus", "group", "strategy", "backend",
                                                            "head_groups")},
               "name": f"{full_row['name']} docs", "documents": len(lengths), "doc_len_mean": sum(lengths) / len(lengths)}
        self.measure(row, make, self.flops(row["seq"], self.world, lengths), "TFLOP/s")
        if "value" in row and "value" in full_row:
            row["speedup"] = full_row["ms"] / row["ms"]
            row["speedup_b2b"] = full_row["ms_b2b"] / row["ms_b2b"]
            self.log(f"  {'':>7} {'':<42} {row['speedup']:.3g}x the full causal run "
                     f"(back to back {row['speedup_b2b']:.3g}x)")

    def sdpa_bshd(self, q, k, v):
        """SDPA on [b, s, h, d] (the layout DeepSpeed hands its local attention), cuDNN on GPU."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernels = [SDPBackend.CUDNN_ATTENTION] if self.cuda else [SDPBackend.MATH]
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return out.transpose(1, 2)

    def deepspeed_ulysses(self, s, full):
        def make():
            import deepspeed
            from deepspeed.sequence.layer import DistributedAttention
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op; skips its build
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")  # DS layers need it
            ps = self.states["ulysses"]
            attn = DistributedAttention(self.sdpa_bshd, ps.sp_group, scatter_idx=2, gather_idx=1)  # ALST's [b, s, h, d]
            q, k, v, dout = self.shards(full, "ulysses", ps.sp_rank)
            return lambda: torch.autograd.grad(attn(q, k, v, 0), (q, k, v), dout)
        kernel = "cudnn" if self.cuda else "math"
        self.measure({"seq": s, "name": f"deepspeed ulysses/{kernel}", "gpus": self.world, "group": "peer"},
                     make, self.flops(s, self.world), "TFLOP/s")

    def context_parallel(self, s, full, rotate: str):
        """torch's CP ring (monkey-patched SDPA over DTensor), head-tail load balanced as torch does it.
        rotate: 'allgather' (torch's default: k/v all-gathered once) or 'alltoall' (k/v passed around)."""
        if not self.cuda:  # CP dispatches only the CUDA SDPA ops; on CPU it fails deep inside DTensor
            reason = "torch context_parallel handles only the CUDA SDPA kernels"
            self.rows.append({"seq": s, "name": f"torch context_parallel {rotate}/math", "gpus": self.world,
                              "group": "peer", "error": reason, "unit": "TFLOP/s"})
            self.log(f"  {s:>7} torch context_parallel {rotate}: not measured on CPU ({reason})")
            return
        state = {}

        def make():
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.experimental import context_parallel
            try:  # the module moved between torch releases
                from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
            except ImportError:
                from torch.distributed.tensor.experimental._attention import set_rotate_method
            from torch.nn.attention import SDPBackend, sdpa_kernel
            mesh = init_device_mesh(self.device.type, (self.world,))
            set_rotate_method(rotate)
            q, k, v, dout = (x.transpose(1, 2).contiguous() for x in full)  # SDPA's [b, h, S, d]
            cm = context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2] * 4,
                                  no_restore_buffers={q, k, v, dout})
            cm.__enter__()  # shards the buffers in place to [b, h, S/N, d] and patches SDPA
            state["cm"] = cm
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(out, (q, k, v), dout)
            return step
        try:
            self.measure({"seq": s, "name": f"torch context_parallel {rotate}/cudnn", "gpus": self.world,
                          "group": "peer"}, make, self.flops(s, self.world), "TFLOP/s")
        finally:
            if "cm" in state:
                state["cm"].__exit__(None, None, None)  # restore the unpatched SDPA

    def single(self, s):
        """The kernels alone on rank 0 at the full S: what perfect sequence parallelism would keep."""
        a = self.args
        need = 14 * a.batch * s * a.heads * a.head_dim * 2  # q k v dout out dq dk dv + kernel scratch, bf16
        if self.cuda and need > torch.cuda.mem_get_info()[0]:
            self.log(f"  {s:>7} single-GPU kernels skipped: need ~{need / 2**30:.0f} GiB")
            return
        providers = ["cudnn", "sdpa_flash", "triton"] if self.cuda else ["torch"]
        for provider in providers:
            def make(provider=provider):
                q, k, v, dout = self.full_inputs(s)
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                if provider in ("cudnn", "sdpa_flash"):  # SDPA in its own contiguous [b, h, S, d], as peers call it
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    q, k, v, dout = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, dout))
                    q, k, v = (x.requires_grad_() for x in (q, k, v))
                    kern = SDPBackend.CUDNN_ATTENTION if provider == "cudnn" else SDPBackend.FLASH_ATTENTION

                    def step():
                        with sdpa_kernel([kern]):
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        torch.autograd.grad(out, (q, k, v), dout)
                    return step
                attn = build_inner_attention("local", None, causal=True, backend=provider)
                return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), dout)
            name = {"cudnn": "single SDPA cuDNN", "sdpa_flash": "single SDPA flash (FA2)"}.get(provider,
                                                                                             f"single ours {provider}")
            self.measure({"seq": s, "name": name, "gpus": 1, "group": "single", "backend": provider},
                         make, self.flops(s, 1), "TFLOP/s", all_ranks=False)

    def ceilings(self):
        a = self.args
        n = a.matmul_n

        def mm():
            x, y = (torch.randn(n, n, device=self.device, dtype=self.dtype) for _ in range(2))
            return lambda: x @ y
        self.measure({"name": f"matmul {n}^3 {str(self.dtype)[6:]}", "group": "ceiling"}, mm, 2 * n ** 3, "TFLOP/s")
        if self.world == 1:
            return
        numel = a.comm_mb * 2 ** 20 // 2

        def a2a():
            x = torch.randn(numel, device=self.device, dtype=torch.bfloat16)
            y = torch.empty_like(x)
            return lambda: dist.all_to_all_single(y, x)
        # bytes leaving each GPU (the part of the buffer not kept locally): "out per GPU"
        out_bytes = numel * 2 * (self.world - 1) / self.world
        self.measure({"name": f"all_to_all_single {a.comm_mb} MB (out/GPU)", "group": "ceiling"}, a2a, out_bytes, "GB/s")

        def ring():
            x = torch.randn(numel, device=self.device, dtype=torch.bfloat16)
            y = torch.empty_like(x)
            nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world

            def step():
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt), dist.P2POp(dist.irecv, y, prv)]):
                    w.wait()
            return step
        self.measure({"name": f"ring send/recv {a.comm_mb} MB (out/GPU)", "group": "ceiling"}, ring, numel * 2, "GB/s")


def print_table(bench: Bench):
    """Per sequence: each row's TFLOP/s per GPU, each call alone and back to back, and each one's ratio to the
    same measure of the single-GPU cuDNN kernel at that S; for a run with documents (--doc-len) its speed-up
    over the same run without them (x full)."""
    rows = bench.rows
    ref = {r["seq"]: r for r in rows if r.get("backend") in ("cudnn", "torch") and r.get("group") == "single"
           and "value" in r}
    bench.log(f"\n{'S':>7} {'what':<42} {'GPUs':>4} {'ms':>9} {'TFLOP/s/GPU':>11} {'back to back':>12} "
              f"{'vs 1-GPU ref':>12} {'(b2b)':>6} {'x full':>7}")
    for r in rows:
        if r["group"] == "ceiling":
            continue
        if "value" not in r:
            bench.log(f"{r['seq']:>7} {r['name']:<42} {r.get('gpus', 1):>4} {'-':>9} {'error':>11}")
            continue
        one = ref.get(r["seq"])
        ratios = (f"{r['value'] / one['value']:12.2f} {r['value_b2b'] / one['value_b2b']:6.2f}" if one
                  else f"{'-':>12} {'-':>6}")
        speedup = f"{r['speedup']:7.3g}" if "speedup" in r else f"{'-':>7}"
        bench.log(f"{r['seq']:>7} {r['name']:<42} {r.get('gpus', 1):>4} {r['ms']:9.4g} {r['value']:11.4g} "
                  f"{r['value_b2b']:12.4g} {ratios} {speedup}")
    for r in rows:
        if r["group"] == "ceiling":
            bench.log(f"ceiling: {r['name']}: " + (f"{r['value']:.4g} {r['unit']}" if "value" in r else r["error"]))


def int_list(text: str) -> list[int]:
    """'16384,65536' -> [16384, 65536]; argparse turns the ValueError into one usage error line."""
    return [int(t) for t in text.split(",")]


def name_list(choices: tuple[str, ...]):
    """A comma-separated list type whose every name must be one of `choices`."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
        return names
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seqs", type=int_list, default=None,
                   help="comma-separated sequence lengths (default 16384,65536,131072; CPU 64,128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 16 (CPU 4)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (CPU 16)")
    p.add_argument("--backends", type=name_list(("auto", *BACKENDS)), default=None,
                   help="our kernels to run under each strategy (default cudnn,triton,sdpa_flash; CPU torch)")
    p.add_argument("--doc-len", type=parse_doc_len, default=None,
                   help="pack each sample with documents: N tokens each, or an indexed dataset prefix whose "
                        "document lengths to use (e.g. data/processed/sample_text_document); our strategies then "
                        "run with the document mask beside the same run without it")
    p.add_argument("--ulysses-head-groups", type=int_list, default=[1, 2],
                   help="Ulysses head-group counts to measure, comma-separated ints (default 1,2: "
                        "the default, unpipelined G=1, beside two pipelined head groups)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--matmul-n", type=int, default=None, help="default 8192 (CPU 256)")
    p.add_argument("--comm-mb", type=int, default=None, help="default 256 (CPU 1)")
    p.add_argument("--skip", type=name_list(("ours", "deepspeed", "cp", "single", "ceilings")), default=[],
                   help="groups to leave out: ours,deepspeed,cp,single,ceilings")
    p.add_argument("--out", default="bench_attention.json", help="JSON results file to create (never overwritten)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    for name, gpu, cpu_default in (("seqs", [16384, 65536, 131072], [64, 128]), ("heads", 16, 4),
                                   ("head_dim", 128, 16), ("matmul_n", 8192, 256), ("comm_mb", 256, 1)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu else gpu)
    return args


def main(argv=None) -> dict:
    """Run the benchmark (initialising torch.distributed from torchrun's environment unless a test did) -> results."""
    args = parse_args(argv)
    if os.path.exists(args.out):  # refuse before the run: a results file is never overwritten
        raise SystemExit(f"bench_attention: error: --out {args.out} already exists; choose another --out")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    bench = Bench(args)
    bench.log(f"bench_attention: {bench.world} x {torch.cuda.get_device_name() if bench.cuda else 'CPU'}, "
              f"torch {torch.__version__}, b={args.batch} h={args.heads} d={args.head_dim} {bench.dtype}, causal"
              + (f", documents --doc-len {args.doc_len}" if args.doc_len is not None else ""))
    if "ceilings" not in args.skip:
        bench.ceilings()
    for s in args.seqs:
        full = bench.full_inputs(s)
        if "ours" not in args.skip:
            bench.ours(s, full)
        if "deepspeed" not in args.skip:
            bench.deepspeed_ulysses(s, full)
        if "cp" not in args.skip:
            for rotate in ("allgather", "alltoall"):
                bench.context_parallel(s, full, rotate)
        del full
        if "single" not in args.skip:
            bench.single(s)
    print_table(bench)
    meta = {"device": torch.cuda.get_device_name() if bench.cuda else "cpu", "gpus": bench.world,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "argv": sys.argv,
            "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": str(bench.dtype),
            "causal": True, "warmup": args.warmup, "iters": args.iters, "doc_len": args.doc_len}
    result = {"meta": meta, "rows": bench.rows}
    if bench.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
