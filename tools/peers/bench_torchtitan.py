"""torchtitan 0.2.2's Llama trained on random tokens: the same-run peer of tools/bench_e2e.py (one GPU).

    python tools/peers/bench_torchtitan.py --seq-length 32768 --out torchtitan.json
    python tools/peers/bench_torchtitan.py --model tiny --device cpu --seq-length 64 --no-compile --steps 1  # smoke

Needs torchtitan==0.2.2 (0.3.0 does not import with torch 2.11) and what it imports: tyro, torchdata,
docstring_parser. Not a dependency of megatron_sp and not run in CI.

The model is bench_e2e's (--model 1.3b: 24 layers, hidden 2048, 16 heads, SwiGLU FFN 5504, RMSNorm, rotary,
no biases, untied output, vocab 32000) written as torchtitan's TransformerModelArgs: FFN = multiple_of-rounded
2/3 of 4h, which gives 5504 with multiple_of=128 (checked against our flags when built). The step is
torchtitan's own, assembled from its pieces rather than its CLI trainer (which needs a dataset and a
tokenizer): the model built on the meta device, each block compiled whole (its apply_compile, fullgraph),
--mode fsdp: FSDP2 over one GPU (its apply_fsdp: bf16 parameters for compute, fp32 gradient reduction and
master weights), or --mode amp: fp32 weights under torch.autocast(bf16), which is what torchtitan's trainer
itself does on one GPU; then to_empty + init_weights, its compiled sum cross-entropy over the full logits,
its clip_grad_norm_ (foreach, max norm 1), fused AdamW (its defaults: lr 8e-4, betas 0.9/0.95, weight decay
0.1), SDPA preferring cuDNN (its ScaledDotProductAttentionWrapper), no activation checkpointing. One
optimizer step per iteration; each timed as bench_e2e times ours: wall clock from the step's start to its
loss on the host. Reported in bench_e2e's fields; FLOPs by megatron_sp/flops.py for the same flags.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

MULTIPLE_OF = {"1.3b": 128, "tiny": 16}  # torchtitan's FFN rounding that gives bench_e2e's FFN sizes (5504, 176)


def stub_datasets() -> None:
    """torchtitan.models.llama3 imports its Hugging Face dataloader, which imports `datasets`; the GPU image
    lacks it and the benchmark reads no dataset, so a placeholder module stands in for it."""
    if "datasets" in sys.modules:
        return
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub, distributed = types.ModuleType("datasets"), types.ModuleType("datasets.distributed")
        stub.Dataset, stub.load_dataset, distributed.split_dataset_by_node = object, None, None
        stub.distributed = distributed
        sys.modules.update({"datasets": stub, "datasets.distributed": distributed})


def our_config(model: str, seq_length: int):
    """bench_e2e's flags for this model and length -> our RunConfig (its FLOPs and the shape to match)."""
    from megatron_sp.configure import configure
    from tools.bench_e2e import MODELS, SHAPE
    cfg, _ = configure(MODELS[model] + SHAPE + ["--seq-length", str(seq_length), "--max-position-embeddings",
                                                 str(seq_length), "--train-iters", "1"], 1)
    return cfg


def build(args, cfg, device: torch.device):
    """torchtitan's Transformer for cfg's shape, parallelized and initialised as its trainer does."""
    stub_datasets()
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile, apply_fsdp
    m = cfg.model
    model_args = TransformerModelArgs(dim=m.hidden_size, n_layers=m.num_layers, n_heads=m.num_attention_heads,
                                      vocab_size=cfg.padded_vocab_size, multiple_of=MULTIPLE_OF[args.model],
                                      norm_eps=m.layernorm_epsilon, rope_theta=m.rotary_position_embeddings_theta,
                                      max_seq_len=args.seq_length)
    with torch.device("meta"):
        model = Transformer(model_args)
    ffn = model.layers["0"].feed_forward.w1.out_features
    if ffn != m.ffn_hidden_size:
        raise SystemExit(f"bench_torchtitan: error: torchtitan's FFN is {ffn}, ours {m.ffn_hidden_size}")
    if not args.no_compile:
        apply_compile(model, Compile(enable=True, backend="inductor"))
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("fsdp",))
        apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, pp_enabled=False)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    return model


def init_process_group(device: torch.device) -> None:
    """One process: FSDP2 needs a process group (nccl on a GPU, gloo on CPU)."""
    import torch.distributed as dist
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def train_steps(args, model, device: torch.device) -> tuple[list[float], list[float]]:
    """warmup + steps optimizer steps on random tokens -> (ms of the timed steps, every step's loss)."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.utils import clip_grad_norm_
    loss_fn = cross_entropy_loss if args.no_compile else torch.compile(cross_entropy_loss, backend="inductor")
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mode == "amp")
    generator = torch.Generator().manual_seed(0)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, model.vocab_size, (1, args.seq_length + 1), generator=generator)
        t0 = time.perf_counter()
        inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        optimizer.zero_grad()
        with autocast:
            pred = model(inputs)
            loss = loss_fn(pred, labels) / labels.numel()
        del pred  # as torchtitan: the logits go before backward
        loss.backward()
        clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizer.step()
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"  step {i + 1}: {(time.perf_counter() - t0) * 1e3:.0f} ms, loss {losses[-1]:.4f}", flush=True)
    return times, losses


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    from megatron_sp.flops import flops_per_token
    cfg = our_config(args.model, args.seq_length)
    init_process_group(device)
    model = build(args, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    times, losses = train_steps(args, model, device)
    ms = statistics.median(times)
    per_token = flops_per_token(cfg, with_recompute=False)
    import torchtitan
    cuda = device.type == "cuda"
    return {"peer": f"torchtitan {torchtitan.__version__}", "mode": args.mode, "compile": not args.no_compile,
            "seq_length": args.seq_length, "model": args.model, "parameters": n_params, "gpus": 1,
            "warmup": args.warmup, "steps": args.steps, "step_ms": [round(x, 2) for x in times],
            "ms_per_step": ms, "tokens_per_s": args.seq_length / ms * 1e3,
            "model_tflops_per_gpu": args.seq_length * per_token / (ms / 1e3) / 1e12, "flops_per_token": per_token,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else 0.0,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "losses": losses,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "argv": sys.argv}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MULTIPLE_OF), default="1.3b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--mode", choices=("fsdp", "amp"), default="fsdp",
                   help="fsdp: FSDP2 on one GPU, bf16 compute, fp32 master weights and reduction; amp: fp32 weights "
                        "under torch.autocast(bf16), torchtitan's trainer on one GPU")
    p.add_argument("--no-compile", action="store_true", help="eager blocks and loss (CPU smoke runs)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first ones compile)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="bench_torchtitan.json", help="JSON file; an existing list in it is appended to")
    args = p.parse_args(argv)
    if args.seq_length < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--seq-length must be at least 2, --steps at least 1, --warmup not negative")
    return args


def main(argv=None) -> dict:
    from tools.bench_e2e import previous_results
    args = parse_args(argv)
    previous = previous_results(args.out, "bench_torchtitan")  # not a results list: refused before the run
    result = run(args)
    print(f"bench_torchtitan: {result['peer']} {args.model} ({result['parameters'] / 1e9:.2f} B) seq {args.seq_length} "
          f"{args.mode}{'' if result['compile'] else ' eager'}: {result['ms_per_step']:.1f} ms/step, "
          f"{result['tokens_per_s']:.0f} tokens/s, {result['model_tflops_per_gpu']:.1f} model TFLOP/s, "
          f"peak {result['peak_memory_gib']:.1f} GiB", flush=True)
    with open(args.out, "w") as fh:
        json.dump(previous + [result], fh, indent=1)
    return result


if __name__ == "__main__":
    main()
