"""The sequence-parallel recipes: tiny CPU runs, resume, the commands they build, their dry-run plan."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from megatron_sp.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {name: os.path.join(ROOT, "examples_deepspeed", "sequence_parallel", f"ds_pretrain_gpt_{name}_seq_parallel.sh")
           for name in ("1.3B", "30B")}


def recipe(name: str, tmp_path, timeout=240, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / name), **env}
    return subprocess.run(["bash", RECIPES[name]], capture_output=True, text=True, env=full, timeout=timeout)


def pretrain_flags(stdout: str) -> list[str]:
    """The pretrain_gpt.py arguments from a launcher command echoed by a fake launcher."""
    words = shlex.split(stdout.strip().splitlines()[-1])
    return words[words.index("pretrain_gpt.py") + 1:]


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_recipe_trains_two_iterations_on_cpu(name, tmp_path):
    out = recipe(name, tmp_path, TINY="1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "iteration        2/       2" in out.stdout and "saved checkpoint at iteration 2" in out.stdout
    ds_json = json.load(open(next((tmp_path / name).glob("ds_config_*.json"))))
    assert ds_json["train_batch_size"] == 2 and ds_json["zero_optimization"]["stage"] == (1 if name == "1.3B" else 3)
    if name == "1.3B":  # a rerun resumes from <output>/checkpoint/latest
        again = recipe(name, tmp_path, TINY="1", TRAIN_ITERS="3")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout and "iteration        3/       3" in again.stdout
        base = str(tmp_path / name / "checkpoint")  # FINETUNE_FROM: a new run from those weights, then resumed
        for expected in ("--finetune: training starts at iteration 0", "resumed from"):
            longer = recipe(name, tmp_path / "longer", TINY="1", FINETUNE_FROM=base)
            assert longer.returncode == 0 and expected in longer.stdout, longer.stderr[-3000:]


@pytest.mark.parametrize("name", RECIPES)
def test_gpu_command_flags_are_accepted(name, tmp_path):
    """The real (non-tiny) command through the planner: every flag parsed and validated."""
    out = recipe(name, tmp_path, DRY_RUN="1", NUM_GPUS="8", GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout and "memory per GPU" in out.stdout


@pytest.mark.parametrize("recompute", ["true", "selective", "false"])
def test_dry_run_without_gpus_or_nvidia_smi(recompute, tmp_path):
    """GPU count unknown (no GPUS_PER_NODE, no nvidia-smi here): the recipe still plans; each
    ACTIVATION_CHECKPOINT choice reaches the planner."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    env.update(PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path), DRY_RUN="1", NUM_GPUS="2", SP_SIZE="2",
               ACTIVATION_CHECKPOINT=recompute)
    out = subprocess.run(["bash", RECIPES["1.3B"]], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = {"true": "checkpointing on", "selective": "checkpointing selective", "false": "checkpointing off"}
    assert expected[recompute] in out.stdout


def test_30b_dry_run_on_32_gpus(tmp_path):
    """The plan of a 32-GPU run on a CPU machine (that it builds nothing: tests/test_planning.py)."""
    out = recipe("30B", tmp_path, DRY_RUN="1", NUM_GPUS="32", GPUS_PER_NODE="8", SP_SIZE="8", SEQ_LEN="32768")
    assert out.returncode == 0, out.stderr
    assert "world 32 = DP 4 x SP 8" in out.stdout and "4 x 8 ranks: [0..7] [8..15]" in out.stdout
    assert "total" in out.stdout and "FLOPs per iteration" in out.stdout


def test_pipeline_stages_from_pp_size(tmp_path):
    """PP_SIZE reaches pretrain_gpt.py and the planner: 8 GPUs = PP 2 x DP 1 x SP 4, a stage per 4 adjacent ranks."""
    out = recipe("1.3B", tmp_path, DRY_RUN="1", NUM_GPUS="8", GPUS_PER_NODE="8", PP_SIZE="2", SP_SIZE="4")
    assert out.returncode == 0, out.stderr
    assert "8 GPUs = PP 2 x DP 1 x SP 4" in out.stdout and "world 8 = PP 2 x DP 1 x SP 4" in out.stdout
    assert "stage 0 [0, 1, 2, 3]: layers 0-11 + embedding" in out.stdout and "_g8_pp2_sp4_ulysses" in out.stdout


@pytest.mark.parametrize("env, expected", [
    ({"HF_TOKENIZER": "/tok/llama3"}, ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", "/tok/llama3"]),
    ({"VOCAB_FILE": "v.json", "MERGE_FILE": "m.txt"},
     ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json", "--merge-file", "m.txt"]),
    ({"TOKENIZER_MODEL": "/tok/l2.model", "TOKENIZER_TYPE": "GPTSentencePieceTokenizer"},
     ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "/tok/l2.model"]),
])
def test_your_corpus_with_the_tokenizer_that_made_it(env, expected, tmp_path):
    out = recipe("1.3B", tmp_path, DEEPSPEED="echo", GPUS_PER_NODE="8", DATA_PATH="/data/c_text_document", **env)
    assert out.returncode == 0, out.stderr
    flags = pretrain_flags(out.stdout)
    assert " ".join(expected) in " ".join(flags) and "/data/c_text_document" in flags


def test_multi_node_launch_commands(tmp_path):
    """HOSTFILE -> deepspeed --hostfile/--num_nodes/--num_gpus; LAUNCHER=srun under SLURM -> srun."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nworker-0 slots=8\nworker-1 slots=8\n")
    out = recipe("1.3B", tmp_path, DEEPSPEED="echo", HOSTFILE=str(hostfile), GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    assert "--hostfile " + str(hostfile) in out.stdout and "--num_nodes 2 --num_gpus 8" in out.stdout
    cfg = parse_args(pretrain_flags(out.stdout))
    assert cfg.parallel.sequence_parallel_size == 8 and cfg.model.checkpoint_activations and cfg.training.bf16
    assert cfg.training.load == cfg.training.save

    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/sh\necho srun "$@"\n')
    (shims / "scontrol").write_text("#!/bin/sh\necho node-a; echo node-b\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    out = recipe("30B", tmp_path, LAUNCHER="srun", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="node-[a-d]", GPUS_PER_NODE="8",
                 PATH=f"{shims}:{os.environ['PATH']}")
    assert out.returncode == 0, out.stderr
    assert "srun --nodes 4 --ntasks-per-node 8" in out.stdout and "MASTER_ADDR=node-a" in out.stdout
    cfg = parse_args(pretrain_flags(out.stdout))
    assert cfg.training.zero_stage == 3 and cfg.model.num_layers == 64


@pytest.mark.parametrize("env, message", [
    ({"PRECISION": "fp8"}, "error: PRECISION must be bf16 or fp32, got 'fp8'"),
    ({"OFFLOAD_OPTIMIZER": "nvme"}, "error: OFFLOAD_OPTIMIZER must be none or cpu, got 'nvme'"),
    ({"SEQ_LEN": "64k"}, "error: SEQ_LEN must be a whole number, got '64k'"),
    ({"SP_SIZE": "x"}, "error: SP_SIZE must be a positive whole number or auto, got 'x'"),
    ({"PP_SIZE": "0"}, "error: PP_SIZE must be a positive whole number, got '0'"),
    ({"PP_SIZE": "3", "SP_SIZE": "2"}, "error: 8 GPUs are not divisible by PP_SIZE=3 x SP_SIZE=2"),
    ({"ACTIVATION_CHECKPOINT": "maybe"}, "error: ACTIVATION_CHECKPOINT must be true, selective or false, got 'maybe'"),
    ({"DATA_PATH": "/data/c_text_document"}, "error: DATA_PATH needs the tokenizer that made it: VOCAB_FILE and "
     "MERGE_FILE (GPT-2 BPE), TOKENIZER_MODEL (SentencePiece) or HF_TOKENIZER (a Hugging Face tokenizer directory)"),
    ({"VOCAB_FILE": "gpt2-vocab.json", "MERGE_FILE": "gpt2-merges.txt"}, "error: VOCAB_FILE, TOKENIZER_MODEL and "
     "HF_TOKENIZER need DATA_PATH, a corpus they tokenized (the shipped sample is tokenized with its own "
     "SentencePiece model)"),
    ({"DATA_PATH": "/data/c_text_document", "VOCAB_FILE": "v.json"}, "error: VOCAB_FILE needs MERGE_FILE (GPT-2 BPE)"),
])
def test_a_bad_recipe_setting_is_one_line_before_anything_is_written(env, message, tmp_path):
    out = recipe("1.3B", tmp_path, DRY_RUN="1", NUM_GPUS="8", GPUS_PER_NODE="8", **env)
    assert out.returncode == 2 and out.stderr.strip() == message
    assert not (tmp_path / "1.3B").exists()
