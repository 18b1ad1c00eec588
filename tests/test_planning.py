"""The planner: exact parameter and optimizer bytes, the ZeRO split, activations, auto SP, the CLIs."""
import subprocess
import sys

import pytest
import torch

from megatron_sp.arguments import parse_args
from megatron_sp.errors import ConfigError
from megatron_sp.validation import validate
from megatron_sp.attention import LocalAttention
from megatron_sp.model.gpt import GPTModel
from megatron_sp.plan import ZeroSetup, count_parameters, estimate_memory
from megatron_sp.plan.memory import model_state_bytes
from megatron_sp.configure import configure, dry_run_lines

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
        "--mock-data", "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300"]
SHAPES = [[], ["--swiglu", "--normalization", "rmsnorm", "--use-rotary-position-embeddings", "--disable-bias-linear",
               "--num-key-value-heads", "2"], ["--untie-embeddings-and-output-weights", "--ffn-hidden-size", "100"],
          ["--no-position-embedding"]]
BIG = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "65536",
       "--bf16", "--mock-data", "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
       "--hidden-dropout", "0"]


def tiny_cfg(*extra, world=1):
    cfg, _ = configure([*TINY, *extra], world)
    return cfg


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_and_optimizer_bytes_are_exact(shape):
    cfg = tiny_cfg(*shape)
    model = GPTModel(cfg.model, LocalAttention, cfg.padded_vocab_size)
    numel = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == numel
    # fp32, no ZeRO: AdamW keeps exp_avg and exp_avg_sq per parameter (torch's AdamW, as DeepSpeed runs it)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = model_state_bytes(count_parameters(cfg), 1, 0, 4)
    assert states == {"parameters": 4 * numel, "gradients": grads, "optimizer": state}
    step = estimate_memory(cfg, 1, 1, "local", None, ZeroSetup(stage=0))
    assert {k: step.parts.get(k) for k in ("parameters", "optimizer")} == {"parameters": 4 * numel, "optimizer": state}


def test_zero_stages_split_model_states_over_every_rank():
    psi, world = 1_000_003, 8
    shard = lambda n: -(-n // world)  # noqa: E731
    s0, s1, s2, s3 = (model_state_bytes(psi, world, stage, 2) for stage in range(4))
    assert s0 == {"parameters": 2 * psi, "gradients": 2 * psi, "optimizer": 12 * psi}
    assert s1 == {"parameters": 2 * psi, "gradients": 2 * psi, "optimizer": shard(12 * psi)}
    assert s2 == {"parameters": 2 * psi, "gradients": shard(2 * psi), "optimizer": shard(12 * psi)}
    assert s3 == {"parameters": shard(2 * psi), "gradients": shard(2 * psi), "optimizer": shard(12 * psi)}
    assert model_state_bytes(psi, world, 0, 4)["optimizer"] == 8 * psi  # fp32: Adam on the weights, no master
    cfg = tiny_cfg("--sequence-parallel-size", "2", world=8)
    offloaded = estimate_memory(cfg, 8, 2, "ulysses", None, ZeroSetup(stage=3, offload_optimizer=True, offload_param=True))
    assert "optimizer" not in offloaded.parts and "parameters" not in offloaded.parts
    assert offloaded.host["optimizer"] == shard(12 * count_parameters(cfg))


def test_activations_follow_sp_size_and_checkpointing():
    plain, _ = configure([*BIG], 8)
    ckpt, _ = configure([*BIG, "--checkpoint-activations"], 8)
    zero = ZeroSetup(stage=3)
    full = {sp: estimate_memory(plain, 8, sp, "ulysses", None, zero).parts["activations"] for sp in (2, 4, 8)}
    assert full[2] == pytest.approx(2 * full[4], rel=1e-3) and full[4] == pytest.approx(2 * full[8], rel=1e-3)
    assert estimate_memory(ckpt, 8, 8, "ulysses", None, zero).parts["activations"] < full[8] / 10
    # Ulysses keeps the attention output twice (kernel layout and out-projection input), the ring once
    ring = estimate_memory(plain, 8, 8, "ring", None, zero).parts["activations"]
    hq_d = 2048 * 2 * 24 * 65536 // 8  # bytes of one [tokens, hq * d] bf16 tensor per layer
    assert full[8] - ring == pytest.approx(hq_d, rel=1e-6)


def test_selective_recompute_drops_the_mlp_share():
    plain, _ = configure([*BIG, "--swiglu"], 8)
    selective, _ = configure([*BIG, "--swiglu", "--recompute-granularity", "selective"], 8)
    zero = ZeroSetup(stage=3)
    full = estimate_memory(plain, 8, 2, "ulysses", None, zero).parts["activations"]
    kept = estimate_memory(selective, 8, 2, "ulysses", None, zero).parts["activations"]
    h, f, tokens = 2048, plain.model.ffn_hidden_size, 65536 // 2
    dropped = 24 * tokens * (8 + 2 * h + 3 * 2 * f)  # LayerNorm stats, norm output, SwiGLU fc1 and fc2 inputs
    assert full - kept == pytest.approx(dropped, rel=1e-9)


def test_auto_picks_a_valid_size_and_explains():
    cfg, _ = configure([*BIG, "--sequence-parallel-size", "auto", "--zero-stage", "3", "--checkpoint-activations"], 8, 8)
    sp = cfg.parallel.sequence_parallel_size
    assert isinstance(sp, int) and 8 % sp == 0 and 16 % sp == 0
    assert any(line.startswith("  picked ") for line in cfg.sp_choice)
    tight, _ = configure([*BIG, "--sequence-parallel-size", "auto", "--zero-stage", "3", "--gpu-memory-gb", "24"], 8, 8)
    assert tight.parallel.sequence_parallel_size > sp  # less memory -> the sequence is split further
    none, _ = configure([*BIG, "--sequence-parallel-size", "auto", "--gpu-memory-gb", "1"], 8, 8)
    assert "nothing fits" in none.sp_choice[-1]


def test_dry_run_allocates_nothing_and_reports():
    import torch.distributed as dist
    cfg = tiny_cfg("--sequence-parallel-size", "2", "--zero-stage", "2", world=4)
    text = "\n".join(dry_run_lines(cfg, 4, 4))
    assert "sequence-parallel groups: [[0, 1], [2, 3]]" in text and "data-parallel groups:     [[0, 2], [1, 3]]" in text
    assert "memory per GPU" in text and "bytes per local token per layer" in text and "WARNING" not in text
    assert not dist.is_initialized()
    cfg, _ = configure([*BIG, "--gpu-memory-gb", "10"], 1)
    assert "WARNING: the estimate" in "\n".join(dry_run_lines(cfg, 1, 1))


# Runs tools/plan.py in this child and reports the child's own peak RSS on stderr, however it exits.
PEAK_RSS = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
            "    runpy.run_path('tools/plan.py', run_name='__main__')\nfinally:\n"
            "    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def test_plan_cli_32_gpus_builds_nothing():
    """The 30B plan for 32 GPUs comes from arithmetic alone: the process stays near the size of its imports
    (the model would be ~60 GB in bf16). How fast it runs is a benchmark's business, not CI's."""
    argv = [sys.executable, "-c", PEAK_RSS, "tools/plan.py", "--world-size", "32", "--num-layers", "64",
            "--hidden-size", "6144", "--num-attention-heads", "64", "--seq-length", "32768",
            "--sequence-parallel-size", "8", "--bf16", "--zero-stage", "3", "--checkpoint-activations",
            "--global-batch-size", "4"]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    peak_kib = int(out.stderr.strip().splitlines()[-1].split()[-1])
    assert peak_kib < 4 * 2**20, f"tools/plan.py peaked at {peak_kib / 2**20:.1f} GiB"
    assert "data-parallel groups:     8 x 4 ranks: [0, 8, 16, 24] [1, 9, 17, 25] ... [7, 15, 23, 31]" in out.stdout


@pytest.mark.parametrize("argv", [["--world-size", "0"], ["--world-size", "32", "--sequence-parallel-size", "3"]])
def test_plan_cli_bad_input_is_one_line(argv):
    out = subprocess.run([sys.executable, "tools/plan.py", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    bad = subprocess.run([sys.executable, "tools/plan.py", "--sequence-parallel-size", "many"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sequence-parallel-size" in bad.stderr and "Traceback" not in bad.stderr


def test_validate_refuses_unresolved_auto():
    with pytest.raises(ConfigError, match="auto"):
        validate(parse_args([*TINY, "--sequence-parallel-size", "auto"]), 2)


@pytest.mark.parametrize("world,zero,bucket", [
    (1, ZeroSetup(stage=1), False),  # one rank: the sync-free step copies each gradient once, no reduce bucket
    (1, ZeroSetup(stage=1, overlap_comm=True), True),
    (1, ZeroSetup(stage=1, predivide_factor=2.0), True),
    (2, ZeroSetup(stage=1), True),
    (1, ZeroSetup(stage=2), True)])
def test_the_reduce_bucket_is_planned_where_deepspeeds_reduction_runs(world, zero, bucket):
    cfg = tiny_cfg("--bf16", world=world)
    assert ("ZeRO buckets" in estimate_memory(cfg, world, 1, "local", None, zero).parts) == bucket
    assert ZeroSetup.from_config(cfg, {"gradient_predivide_factor": 4}).predivide_factor == 4.0
