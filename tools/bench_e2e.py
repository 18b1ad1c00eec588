"""End-to-end training benchmark of the 1.3B Llama-style benchmark model (SP=2 by default) through our real training stack.

    torchrun --nproc_per_node 2 tools/bench_e2e.py --seq-length 32768 --zero-stage 3 --out e2e.json
    torchrun --nproc_per_node 2 tools/bench_e2e.py --seq-length 65536 --zero-stage 3 --checkpoint-activations
    torchrun --nproc_per_node 4 tools/bench_e2e.py --seq-length 65536 --zero-stage 1 --pp 2 --sp 2 --micro-batches 8
    torchrun --nproc_per_node 2 tools/bench_e2e.py --model tiny --device cpu --seq-length 256 --steps 2   # CI
    torchrun --nproc_per_node 1 tools/bench_e2e.py --sp 1 --seq-length 131072 --checkpoint-activations --doc-len 4096

The model is built by megatron_sp.configure.configure from the same Megatron flags a user types, and each step is
megatron_sp.training.loop.train_step on a DeepSpeed engine (ZeRO 0-3) with --mock-data batches: only the
logging/eval/checkpoint parts of trainer.run are left out. Reported: median ms/step over --steps after
--warmup steps, tokens/s, model TFLOP/s per GPU (megatron_sp/flops.py: causal attention at half, recompute
not counted; 3*(L*(8h^2 + 6hf + 2hs) + 2hV) per token for this shape), and the peak of torch.cuda.max_memory_allocated over the whole run and all ranks.
--doc-len packs the mock samples with documents (an EOD ending each; tools/doc_lengths.py) and trains with
--reset-attention-mask --reset-position-ids --eod-mask-loss; its model FLOPs count attention inside documents
only (s in 2hs becomes sum(L^2)/s).
Also the last step's own peak over what it starts with, per token a rank holds (the activations' working set),
and host memory (max over ranks): the process's peak RSS and, with --checkpoint-in-cpu, the pinned bytes its
activation checkpoints hold; beside both, the planner's estimate of GPU and host memory for the same flags.
--profile adds one profiled step and splits its GPU kernel time into attention, matmul, communication, other, and
the step into its forward, backward and optimizer phases (GPU busy/idle, top kernels, host syncs);
--memory-breakdown adds one step whose memory is split by what holds it (tools/memory_breakdown.py).
--memory-snapshot records the allocator during the last step (torch.cuda.memory) and writes each rank's
snapshot as OUT.rankN.memory.pickle beside --out (open it in pytorch.org/memory_viz).
"""
import argparse
import datetime
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_sp.training.allocator import use_expandable_segments  # noqa: E402
from tools.doc_lengths import document_lengths, eod_positions, parse_doc_len  # noqa: E402

# the 1.3B Llama-style benchmark model: 24 layers, hidden 2048, 16 heads, SwiGLU FFN 5504, RMSNorm, rotary, no biases,
# untied output layer, vocab 32000 (NullTokenizer adds eod to --vocab-size, so 31999 ids + eod = 32000)
MODELS = {
    "1.3b": ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
             "--ffn-hidden-size", "5504", "--vocab-size", "31999"],
    "tiny": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--ffn-hidden-size", "176", "--vocab-size", "255"],
}
SHAPE = ["--swiglu", "--normalization", "rmsnorm", "--use-rotary-position-embeddings", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "128",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--tokenizer-type", "NullTokenizer", "--mock-data"]


def flags(args, world: int) -> list[str]:
    """The Megatron flags of one benchmark configuration (global batch = --micro-batches samples per DP rank)."""
    dp = world // (args.sp * args.pp)
    argv = MODELS[args.model] + SHAPE + [
        "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
        "--micro-batch-size", "1", "--global-batch-size", str(dp * args.micro_batches),
        "--pipeline-model-parallel-size", str(args.pp),
        "--train-iters", str(args.warmup + args.steps + args.profile + args.memory_breakdown),
        "--lr", "1e-4", "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--clip-grad", "1.0",
        "--weight-decay", "0.1", "--zero-stage", str(args.zero_stage),
        "--sequence-parallel-size", str(args.sp), "--sequence-parallel-strategy", args.strategy,
        "--attention-backend", args.backend, "--eval-interval", "1000000", "--eval-iters", "0",
        "--distributed-backend", "nccl" if args.device == "cuda" else "gloo"]
    if args.strategy == "hybrid":
        argv += ["--ulysses-degree", str(args.ulysses_degree)]
    if args.device == "cuda":
        argv.append("--bf16")
    if args.checkpoint_activations:
        argv.append("--checkpoint-activations")
    if args.doc_len is not None:
        argv += ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
    return argv + args.extra


class PackedMock:
    """Mock samples packed with documents of `lengths`: an EOD ends each (the last input token ends the last),
    and no other token is an EOD."""

    def __init__(self, dataset, lengths: list[int], eod: int):
        self.dataset, self.eod, self.ends = dataset, eod, eod_positions(lengths)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        text = self.dataset[i]["text"].copy()  # int64 [s + 1]
        text[text == self.eod] = 0
        text[self.ends] = self.eod
        return {"text": text}


def categorize(name: str) -> str:
    """Kernel (GPU) or op (CPU) name -> attention | matmul | communication | other."""
    n = name.lower()
    if "nccl" in n or any(t in n for t in ("all_to_all", "alltoall", "allgather", "all_gather", "reduce_scatter",
                                           "allreduce", "all_reduce", "send", "recv", "gloo")):
        return "communication"
    if any(t in n for t in ("flash", "fmha", "sdpa", "cudnn", "attn", "attention", "_fwd_kernel", "_bwd_")):
        return "attention"
    if any(t in n for t in ("gemm", "nvjet", "cutlass", "xmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                            "sm90_", "cublas")):
        return "matmul"
    return "other"


def profile_step(step, device_is_cuda: bool, trace_path: str | None = None) -> dict:
    """Run step() once under torch.profiler; kernel self-time (GPU) or op self-time (CPU) per category, ms.
    GPU categories can sum past the step's wall time: NCCL kernels run on their own stream beside compute;
    "timeline" (kernel_timeline.summarize) says how much of the communication was exposed and how long
    the GPU idled. trace_path: also keep the chrome trace there, gzipped."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from tools import kernel_timeline
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_is_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        wall_ms = (time.perf_counter() - t0) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json"), "rb") as fh:
            raw = fh.read()
    if trace_path:
        with gzip.open(trace_path, "wb") as fh:
            fh.write(raw)
    from megatron_sp.training.loop import PHASES
    trace = json.loads(raw)
    timeline = kernel_timeline.summarize(trace, categorize)
    totals, top = {"attention": 0.0, "matmul": 0.0, "communication": 0.0, "other": 0.0}, []
    for evt in prof.key_averages():
        if device_is_cuda:
            # kernels only: a CPU op that launched a kernel also carries that kernel's time as its own
            # "self device time", so counting ops too would count every kernel twice
            # GPU user annotations ("nccl:all_to_all", "Optimizer.step#...") span kernels counted already
            if evt.device_type == DeviceType.CPU or getattr(evt, "is_user_annotation", False) \
                    or evt.key.startswith("nccl:"):
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = evt.self_cuda_time_total if us is None else us
        else:
            us = evt.self_cpu_time_total if evt.key.startswith("aten::") or "gloo" in evt.key else 0
        if us:
            totals[categorize(evt.key)] += us / 1e3
            top.append((us / 1e3, evt.key[:120]))
    top.sort(reverse=True)
    return {"ms": {k: round(v, 3) for k, v in totals.items()}, "step_wall_ms": round(wall_ms, 1),
            "timeline": timeline, "phases": kernel_timeline.phases(trace, PHASES), "top_kernels": [{"ms": round(ms, 3), "name": n, "category": categorize(n)} for ms, n in top[:15]]}


def run(args) -> dict:
    """Build the stack from the flags, train warmup + steps, return the measurements (identical on every rank)."""
    from megatron_sp.configure import configure
    from megatron_sp.data.gpt_dataset import build_gpt_datasets
    from megatron_sp.data.loader import build_data_iterator
    from megatron_sp.flops import flops_per_token
    from megatron_sp.training.loop import train_step
    from megatron_sp.training.trainer import build, micro_batches_of

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, tokenizer = configure(flags(args, world), world)
    setup = build(cfg, tokenizer)  # exactly what trainer.run builds: groups, model, engine, step context
    device, ps, engine, ds_config, ctx, n_params = (setup.device, setup.ps, setup.engine, setup.ds_config,
                                                    setup.ctx, setup.n_params)
    rank = dist.get_rank()
    m, p, t = cfg.model, cfg.parallel, cfg.training
    train_ds, _, _ = build_gpt_datasets(
        data_path=None, split=cfg.data.split, seq_length=m.seq_length, seed=t.seed,
        num_samples=(t.train_iters * t.global_batch_size, 0, 0), mock=True, vocab_size=tokenizer.vocab_size,
        is_rank_zero=rank == 0, barrier=dist.barrier)
    lengths = None
    if args.doc_len is not None:
        lengths = document_lengths(args.doc_len, m.seq_length)
        train_ds = PackedMock(train_ds, lengths, tokenizer.eod)
    batches = build_data_iterator(train_ds, 0, t.micro_batch_size, ps.dp_rank, ps.dp_size)
    grad_acc = ds_config["gradient_accumulation_steps"]
    cuda = device.type == "cuda"

    def step():
        loss, count, _ = train_step(engine, micro_batches_of(batches, grad_acc), ctx)
        return (loss / count).item()  # .item() waits for the step's GPU work

    times, losses = [], []
    run_peak = run_reserved = step_start = 0  # the peaks before the last step's reset
    for i in range(args.warmup + args.steps):
        dist.barrier()
        if cuda and i == args.warmup + args.steps - 1:  # the last step's own peak, over what it starts with
            run_peak, run_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            step_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            if args.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        if rank == 0:
            print(f"  step {i + 1}: {(time.perf_counter() - t0) * 1e3:.0f} ms, loss {losses[-1]:.4f}", flush=True)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank's median
    if args.memory_snapshot and cuda:
        torch.cuda.memory._dump_snapshot(f"{os.path.splitext(args.out)[0]}.rank{rank}.memory.pickle")
        torch.cuda.memory._record_memory_history(enabled=None)
    step_peak = torch.cuda.max_memory_allocated() if cuda else 0
    local_tokens = t.micro_batch_size * m.seq_length // p.sequence_parallel_size
    peak = torch.tensor([max(run_peak, step_peak) / 2 ** 30, (step_peak - step_start) / local_tokens],
                        dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak, step_bytes_per_token = peak.tolist()
    host = host_memory(engine.module, device)
    ms = ms.item()
    tokens = t.global_batch_size * m.seq_length
    per_token = flops_per_token(cfg, with_recompute=False, doc_lengths=lengths)
    result = {
        "seq_length": m.seq_length, "zero_stage": ds_config["zero_optimization"]["stage"],
        "checkpoint_activations": m.checkpoint_activations, "strategy": p.sequence_parallel_strategy,
        "backend": p.attention_backend, "sp": p.sequence_parallel_size, "pp": p.pipeline_model_parallel_size,
        "global_batch": t.global_batch_size, "gpus": world, "model": args.model,
        "parameters": n_params, "warmup": args.warmup, "steps": args.steps, "step_ms": [round(x, 2) for x in times],
        "ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3,
        "model_tflops_per_gpu": tokens * per_token / (ms / 1e3) / world / 1e12,
        "flops_per_token": per_token,
        "peak_memory_gib": peak, "last_step_bytes_per_local_token": step_bytes_per_token,
        **host, **planned_memory(cfg, world), "losses": losses,
        "doc_len": args.doc_len, "documents_per_sample": None if lengths is None else len(lengths),
        "peak_reserved_gib": max(run_reserved, torch.cuda.max_memory_reserved() if cuda else 0) / 2 ** 30,  # this rank
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "argv": sys.argv}
    if args.profile:
        trace = f"{args.trace}.rank{rank}.json.gz" if args.trace else None
        result["profile"] = profile_step(step, cuda, trace)
    if args.memory_breakdown:  # after the peak above was read: this resets the peak statistics
        result["memory"] = memory_report(cfg, setup, step, world)
    return result


def memory_report(cfg, setup, step, world: int) -> dict:
    """One more step with tools/memory_breakdown.py's four snapshots (this rank), beside the planner's estimate
    (for this rank's pipeline stage, its parts at the moment it predicts the peak)."""
    from megatron_sp.plan import configured_estimate
    from tools import memory_breakdown
    result = memory_breakdown.measure(setup.engine, step, setup.device.type == "cuda")
    est = configured_estimate(cfg, world, pp_rank=setup.ps.pp_rank)  # this rank's stage
    result["planner"], result["planner_phase"] = {k: int(v) for k, v in est.parts.items()}, est.phase
    return result


def host_memory(model, device) -> dict:
    """Host GiB, max over ranks: peak RSS of the process, and what --checkpoint-in-cpu holds (pinned on CUDA),
    uses at most at once and copies per step."""
    import resource
    from megatron_sp.model.recompute import host_memory_stats
    stats = host_memory_stats(model)
    keys = ("held", "peak_in_use", "offloaded_per_step")
    values = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30]
                          + [stats.get(k, 0) / 2 ** 30 for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    peak_rss, held, in_use, per_step = values.tolist()
    return {"host_peak_rss_gib": peak_rss, "host_checkpoints_gib": held, "host_checkpoints_in_use_gib": in_use,
            "host_copied_per_step_gib": per_step}


def planned_memory(cfg, world: int) -> dict:
    """The planner's GPU and host GiB per rank and the moment of the GPU peak."""
    from megatron_sp.plan import configured_estimate
    est = configured_estimate(cfg, world)
    return {"planned_gpu_gib": est.total / 2 ** 30, "planned_host_gib": est.host_total / 2 ** 30,
            "planned_peak_phase": est.phase}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3)
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--strategy", choices=("ulysses", "ring", "hybrid"), default="ulysses")
    p.add_argument("--ulysses-degree", type=int, default=None, help="hybrid only")
    p.add_argument("--backend", default=None,
                   help="attention kernel (cudnn, triton, sdpa_flash, torch, auto); default cudnn on cuda "
                        "(triton with --doc-len: cudnn has no document mask), torch on cpu")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel size")
    p.add_argument("--doc-len", type=parse_doc_len, default=None,
                   help="pack the mock samples with documents (N tokens each, or an indexed dataset prefix whose "
                        "document lengths to use) and train with --reset-attention-mask --reset-position-ids "
                        "--eod-mask-loss")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro batches (of one sample) per step per data-parallel rank: the pipeline's m")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="one more step under torch.profiler")
    p.add_argument("--trace", default=None, help="with --profile: keep each rank's chrome trace as TRACE.rankN.json.gz")
    p.add_argument("--memory-breakdown", action="store_true",
                   help="one more step with snapshots of its memory (parameters, fp32 master weights, optimizer "
                        "states, gradients and DeepSpeed's buffers, the rest) after forward, after backward, inside "
                        "the optimizer step and after it (tools/memory_breakdown.py), beside the planner's estimate")
    p.add_argument("--no-expandable-segments", action="store_true",
                   help="the CUDA allocator's fixed cached blocks instead of expandable segments, the mode "
                        "pretrain_gpt.py starts in (megatron_sp/training/allocator.py); to measure fragmentation")
    p.add_argument("--memory-snapshot", action="store_true",
                   help="record the CUDA allocator during the last step; OUT.rankN.memory.pickle beside --out")
    p.add_argument("--out", default="bench_e2e.json", help="JSON file; an existing list in it is appended to")
    p.add_argument("extra", nargs="*", help="more Megatron flags, after --")
    args = p.parse_args(argv)
    gpu_default = "triton" if args.doc_len is not None else "cudnn"
    args.backend = args.backend or (gpu_default if args.device == "cuda" else "torch")
    return args


def previous_results(path: str, tool: str = "bench_e2e") -> list:
    """The results list already in `path` (appended to), [] if there is none; SystemExit with one line
    (`tool`: error: ...) if the file holds something else, so a user's file is never overwritten."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as fh:
            previous = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{tool}: error: --out {path} exists but is not a JSON list of results "
                         f"({type(exc).__name__}); choose another --out") from None
    if not isinstance(previous, list):
        raise SystemExit(f"{tool}: error: --out {path} exists but is not a JSON list of results; "
                         "choose another --out")
    return previous


def main(argv=None) -> dict:
    args = parse_args(argv)
    previous_results(args.out)  # refuse a bad --out before the run, not after it
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_expandable_segments(on=not args.no_expandable_segments)  # before the first CUDA tensor, as pretrain_gpt.py
    from megatron_sp.errors import ConfigError
    from tools import kernel_timeline
    try:
        result = run(args)
    except ConfigError as err:  # flags, or a kernel this device lacks
        raise SystemExit(f"bench_e2e: error: {err}") from None
    if dist.get_rank() == 0:
        r = result
        print(f"bench_e2e: {r['model']} ({r['parameters'] / 1e9:.2f} B) seq {r['seq_length']} ZeRO-{r['zero_stage']} "
              f"ckpt {'on' if r['checkpoint_activations'] else 'off'} {r['strategy']}/{r['backend']} x{r['gpus']} "
              f"(PP {r['pp']}, SP {r['sp']}, global batch {r['global_batch']})"
              f"{'' if r['doc_len'] is None else ', documents --doc-len ' + str(r['doc_len'])}: "
              f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['model_tflops_per_gpu']:.1f} model TFLOP/s per GPU, peak {r['peak_memory_gib']:.1f} GiB", flush=True)
        print(f"  memory: GPU peak {r['peak_memory_gib']:.2f} GiB (planner {r['planned_gpu_gib']:.2f}, at "
              f"{r['planned_peak_phase']}), the last step's peak over its start "
              f"{r['last_step_bytes_per_local_token']:.0f} bytes per token; host: checkpoints "
              f"{r['host_checkpoints_gib']:.2f} GiB pinned "
              f"(planner {r['planned_host_gib']:.2f}), {r['host_copied_per_step_gib']:.2f} GiB copied per step, "
              f"process peak RSS {r['host_peak_rss_gib']:.2f} GiB", flush=True)
        if "profile" in r:
            print("  profile (kernel ms in one step): " + json.dumps(r["profile"]["ms"]), flush=True)
            timeline = r["profile"]["timeline"]
            if timeline:
                print("  timeline: " + json.dumps({k: v for k, v in timeline.items() if k != "top_other"}), flush=True)
            print("\n".join(["  phases of the profiled step:"] + kernel_timeline.phase_table(r["profile"]["phases"])),
                  flush=True)
        if "memory" in r:
            from tools import memory_breakdown
            print("\n".join(["  memory of one step (rank 0):"] + memory_breakdown.table(r["memory"])), flush=True)
            parts = ", ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in r["memory"]["planner"].items())
            print(f"  planner's estimate at {r['memory']['planner_phase']} (GiB): {parts}", flush=True)
            if "peak_reserved" in r["memory"]:
                mem = r["memory"]
                print(f"  in that step: peak allocated {mem['peak_allocated'] / 2 ** 30:.2f} GiB, peak reserved "
                      f"{mem['peak_reserved'] / 2 ** 30:.2f} GiB, expandable segments "
                      f"{'on' if mem['expandable_segments'] else 'off'}", flush=True)
        previous = previous_results(args.out)
        with open(args.out, "w") as fh:
            json.dump(previous + [result], fh, indent=1)
    return result


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
