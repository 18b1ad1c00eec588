"""The sequence-parallel recipes: the documented commands as printed, tiny CPU runs, resume, the launch
commands they build, their dry-run plan (which writes nothing), and their one-line errors."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from megatron_sp.arguments import parse_args
from megatron_sp.configure import default_ulysses_degree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(ROOT, "examples_deepspeed", "sequence_parallel")
RECIPES = {name: os.path.join(RECIPE_DIR, f"ds_pretrain_gpt_{name}_seq_parallel.sh") for name in ("1.3B", "30B")}
DOCS = ("README.md", "examples_deepspeed/sequence_parallel/README.md")
CPU_MARK = re.compile(r"\s#\s*CPU\b")  # a documented command that runs without a GPU
NO_GPU = "error: no GPU on this machine: TINY=1 runs the recipe on 2 CPU ranks, DRY_RUN=1 prints its plan " \
         "(GPUS_PER_NODE=N launches other nodes from here)"


def has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def recipe(name: str, tmp_path, timeout=240, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / name), **env}
    return subprocess.run(["bash", RECIPES[name]], capture_output=True, text=True, env=full, timeout=timeout)


def pretrain_flags(stdout: str) -> list[str]:
    """The pretrain_gpt.py arguments from a launcher command echoed by a fake launcher."""
    words = shlex.split(stdout.strip().splitlines()[-1])
    return words[words.index("pretrain_gpt.py") + 1:]


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", stdout)]


def files_under(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names}


# ---- the commands of README.md and the recipe README, parsed from the markdown ----

def documented_commands() -> list[tuple[str, str, bool]]:
    """(directory relative to the repository root, command, runs on CPU) for each line of the docs' bash
    blocks. A block starts at the root and follows its `cd` lines; backslash-continued lines are one command."""
    commands = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as fh:
            blocks = re.findall(r"```bash\n(.*?)```", fh.read(), re.S)
        for block in blocks:
            cwd = "."
            for line in block.replace("\\\n", " ").splitlines():
                if line.startswith("cd "):
                    cwd = os.path.normpath(os.path.join(cwd, line[3:].strip()))
                elif line.strip():
                    commands.append((cwd, line, bool(CPU_MARK.search(line))))
    return commands


# not run here: the suite itself, and the quickstart rerun with more iterations (resuming is
# test_tiny_recipe_trains_resumes_and_finetunes's; another quickstart would cost CI a minute)
NOT_RUN_HERE = ("bash tests/run.sh", "ITERS=80 bash examples_deepspeed/sequence_parallel/quickstart.sh")
CPU_COMMANDS = [(cwd, cmd) for cwd, cmd, cpu in documented_commands() if cpu and not cmd.startswith(NOT_RUN_HERE)]
GPU_COMMANDS = [(cwd, cmd) for cwd, cmd, cpu in documented_commands()
                if not cpu and re.match(r"([A-Z_]+=\S+\s+)*(bash ds_pretrain|bash examples_deepspeed/\S+/ds_pretrain|python tools/)", cmd)]


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The repository's files as a fresh clone has them (plus the sample corpus if built), whose .venv is
    this interpreter's environment: the commands run there as printed, and write there."""
    copy = tmp_path_factory.mktemp("clone") / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "cache"))
    link_this_environment(copy / ".venv")
    return copy


def link_this_environment(venv) -> None:
    """Make `venv`/bin/python this interpreter, with its packages."""
    if sys.prefix != sys.base_prefix:  # a virtual environment: link all of it (its pyvenv.cfg finds the packages)
        os.symlink(sys.prefix, venv)
    else:
        (venv / "bin").mkdir(parents=True)
        os.symlink(sys.executable, venv / "bin" / "python")


def run_documented(copy, cwd: str, command: str, tmp_path) -> subprocess.CompletedProcess:
    bindir = os.path.dirname(sys.executable)  # what `source .venv/bin/activate` gives
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MASTER_PORT", "GPUS_PER_NODE")}
    env.update(PATH=f"{bindir}:{env['PATH']}", TMPDIR=str(tmp_path))
    return subprocess.run(["bash", "-c", command], cwd=copy / cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def installed_here() -> bool:
    """tools/install.sh has installed this version into this environment (so the quickstart installs nothing)."""
    cksum = subprocess.run("cksum < setup.py", shell=True, cwd=ROOT, capture_output=True, text=True).stdout.split()[0]
    return bool(glob.glob(os.path.join(sys.prefix, f".venv-stamp-{cksum}-*")))


@pytest.mark.parametrize("cwd, command", CPU_COMMANDS, ids=[c.split(" #")[0].strip()[:60] for _, c in CPU_COMMANDS])
def test_documented_cpu_command_runs_as_printed(cwd, command, fresh_copy, tmp_path):
    if "quickstart.sh" in command and not installed_here():
        pytest.skip("the quickstart would install megatron_sp into this environment: run through tests/run.sh")
    if command.startswith("source .venv/bin/activate") and not (fresh_copy / ".venv/bin/activate").exists():
        pytest.skip("this interpreter is not a virtual environment")
    before = files_under(fresh_copy)
    out = run_documented(fresh_copy, cwd, command, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if "DRY_RUN=1" in command or "--dry-run" in command or "tools/plan.py" in command:
        assert "configuration is valid" in out.stdout
        assert files_under(fresh_copy) == before and not os.listdir(tmp_path)  # a plan writes nothing
    trained = losses(out.stdout)
    if "TINY=1" in command or "quickstart.sh" in command:
        assert len(trained) >= 2 and trained[-1] < trained[0] - 0.2, trained  # it learns
    if "TINY=1" in command:
        assert trained[0] > 8.5 and trained[-1] < 8.0, trained  # from ln(8000) visibly down, in 20 iterations


@pytest.mark.skipif("not GPU_COMMANDS")
@pytest.mark.parametrize("cwd, command", GPU_COMMANDS, ids=[c.split(" #")[0].strip()[:60] for _, c in GPU_COMMANDS])
def test_documented_gpu_command_stops_with_one_line_here(cwd, command, fresh_copy, tmp_path):
    """Without GPUs (or the user's own files) a GPU command says why in one line and writes nothing."""
    if has_gpu():
        pytest.skip("this machine has a GPU")
    before = files_under(fresh_copy)
    out = run_documented(fresh_copy, cwd, command, tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ") and files_under(fresh_copy) == before


def test_the_docs_mark_the_commands_the_tests_run():
    """The parse finds what the docs promise: the recipes' plan and TINY run, the plan tools, the quickstart."""
    joined = "\n".join(command for _, command in CPU_COMMANDS)
    for expected in ("DRY_RUN=1 NUM_GPUS=32", "TINY=1 bash ds_pretrain_gpt_1.3B", "python tools/plan.py",
                     "--dry-run", "bash examples_deepspeed/sequence_parallel/quickstart.sh",
                     "python pretrain_gpt.py --help"):
        assert expected in joined
    assert len(GPU_COMMANDS) >= 5


# ---- the recipes' own behaviour ----

@pytest.mark.parametrize("name", RECIPES)
def test_tiny_recipe_trains_resumes_and_finetunes(name, tmp_path):
    out = recipe(name, tmp_path, TINY="1", TRAIN_ITERS="2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "iteration        2/       2" in out.stdout and "saved checkpoint at iteration 2" in out.stdout
    ds_json = json.load(open(next((tmp_path / name).glob("ds_config_*.json"))))
    assert ds_json["train_batch_size"] == 2 and ds_json["zero_optimization"]["stage"] == (1 if name == "1.3B" else 3)
    if name == "1.3B":  # a rerun resumes from <output>/checkpoint/latest
        again = recipe(name, tmp_path, TINY="1", TRAIN_ITERS="4")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout and "iteration        4/       4" in again.stdout
        base = str(tmp_path / name / "checkpoint")  # FINETUNE_FROM: a new run from those weights, then resumed
        for expected in ("--finetune: training starts at iteration 0", "resumed from"):
            longer = recipe(name, tmp_path / "longer", TINY="1", TRAIN_ITERS="2", FINETUNE_FROM=base)
            assert longer.returncode == 0 and expected in longer.stdout, longer.stderr[-3000:]


@pytest.mark.parametrize("name", RECIPES)
def test_gpu_command_flags_are_accepted(name, tmp_path):
    """The real (non-tiny) command through the planner: every flag parsed and validated."""
    out = recipe(name, tmp_path, DRY_RUN="1", NUM_GPUS="8", GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout and "memory per GPU" in out.stdout


@pytest.mark.parametrize("recompute", ["true", "selective", "false"])
def test_dry_run_without_gpus_or_nvidia_smi(recompute, tmp_path):
    """GPU count unknown (no GPUS_PER_NODE, no GPU here): the recipe still plans; each
    ACTIVATION_CHECKPOINT choice reaches the planner."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    env.update(PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path), DRY_RUN="1", NUM_GPUS="2", SP_SIZE="2",
               ACTIVATION_CHECKPOINT=recompute)
    out = subprocess.run(["bash", RECIPES["1.3B"]], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = {"true": "checkpointing on", "selective": "checkpointing selective", "false": "checkpointing off"}
    assert expected[recompute] in out.stdout


def test_30b_dry_run_plans_nodes_of_8_and_writes_nothing(tmp_path):
    """The plan of a 32-GPU run on a machine without GPUs: nodes of 8 GPUs unless GPUS_PER_NODE says
    otherwise, and no output directory, JSON or temporary file left behind."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    (tmp_path / "tmp").mkdir()
    env.update(PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / "run"), TMPDIR=str(tmp_path / "tmp"),
               DRY_RUN="1", NUM_GPUS="32", SP_SIZE="8", SEQ_LEN="32768")
    out = subprocess.run(["bash", RECIPES["30B"]], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "world 32 = DP 4 x SP 8" in out.stdout and "4 x 8 ranks: [0..7] [8..15]" in out.stdout
    assert "4 node(s) of 8 GPUs, each SP group inside one node" in out.stdout
    assert "total" in out.stdout and "FLOPs per iteration" in out.stdout
    assert os.listdir(tmp_path) == ["tmp"] and not os.listdir(tmp_path / "tmp")


def test_single_node_launch_takes_a_free_port_unless_master_port_is_given(tmp_path):
    """Two jobs on one machine must not both meet on 29500; an explicit MASTER_PORT wins."""
    ports = []
    for _ in range(2):
        out = recipe("1.3B", tmp_path, DEEPSPEED="echo", GPUS_PER_NODE="8")
        assert out.returncode == 0, out.stderr
        launch = shlex.split(out.stdout.strip().splitlines()[-1])
        ports.append(int(launch[launch.index("--master_port") + 1]))
        assert launch[launch.index("--num_gpus") + 1] == "8"
    assert 29500 not in ports
    out = recipe("1.3B", tmp_path, DEEPSPEED="echo", GPUS_PER_NODE="8", MASTER_PORT="12345")
    assert "--master_port 12345" in out.stdout


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
    """HOSTFILE -> deepspeed --hostfile/--num_nodes/--num_gpus (the launcher's port unless MASTER_PORT);
    LAUNCHER=srun under SLURM -> srun; hybrid's default Ulysses degree is the node's GPUs."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nworker-0 slots=8\nworker-1 slots=8\n")
    out = recipe("1.3B", tmp_path, DEEPSPEED="echo", HOSTFILE=str(hostfile), GPUS_PER_NODE="8",
                 SP_SIZE="16", SP_STRATEGY="hybrid")
    assert out.returncode == 0, out.stderr
    assert "--hostfile " + str(hostfile) in out.stdout and "--num_nodes 2 --num_gpus 8" in out.stdout
    assert "--master_port" not in out.stdout
    cfg = parse_args(pretrain_flags(out.stdout))
    assert cfg.parallel.sequence_parallel_size == 16 and cfg.parallel.ulysses_degree is None
    assert default_ulysses_degree(cfg, 8) and cfg.parallel.ulysses_degree == 8  # what pretrain_gpt.py picks
    assert cfg.model.checkpoint_activations and cfg.training.bf16 and cfg.training.load == cfg.training.save

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
    ({"DRY_RUN": "0", "LAUNCHER": "srun"}, "error: LAUNCHER=srun runs inside a SLURM allocation (salloc or sbatch); "
     "SLURM_JOB_ID is not set"),
    ({"DRY_RUN": "0", "LAUNCHER": "mpirun"}, "error: LAUNCHER must be deepspeed or srun, got 'mpirun'"),
    ({"DRY_RUN": "0", "HOSTFILE": "/no/hosts"}, "error: HOSTFILE /no/hosts not found (lines like 'worker-0 slots=8')"),
    ({"DRY_RUN": "0", "NUM_GPUS": "16"}, "error: NUM_GPUS=16 is more than this node's 8 GPUs: give HOSTFILE or "
     "LAUNCHER=srun for several nodes, or DRY_RUN=1 for a plan"),
    ({"PYTHON": "/no/python"}, "error: PYTHON=/no/python is not an executable file"),
])
def test_a_bad_recipe_setting_is_one_line_before_anything_is_written(env, message, tmp_path):
    out = recipe("1.3B", tmp_path, **{"DRY_RUN": "1", "NUM_GPUS": "8", "GPUS_PER_NODE": "8", **env})
    assert out.returncode == 2 and out.stderr.strip() == message
    assert not (tmp_path / "1.3B").exists()


def test_an_interpreter_without_torch_is_one_line(tmp_path):
    bare = tmp_path / "python"  # this interpreter without its site-packages: no torch, deepspeed, sentencepiece
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    out = recipe("1.3B", tmp_path, PYTHON=str(bare), DRY_RUN="1")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: {bare} cannot import torch deepspeed sentencepiece: run bash tools/install.sh (it makes .venv/), "
        "or set PYTHON to an environment where megatron_sp is installed")


@pytest.mark.skipif("has_gpu()")
def test_a_training_launch_without_gpus_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPUS_PER_NODE"}
    env.update(PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / "run"))
    out = subprocess.run(["bash", RECIPES["30B"]], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == NO_GPU and not (tmp_path / "run").exists()


def test_the_interpreter_is_python_else_the_projects_venv_else_python3(tmp_path):
    """launch_env.sh's project_python: the rule tools/install.sh follows, as an absolute path."""
    def project_python(root, python=""):
        script = f'source {RECIPE_DIR}/launch_env.sh; PYTHON={shlex.quote(python)} project_python {root}'
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
    (tmp_path / "with").mkdir()
    link_this_environment(tmp_path / "with" / ".venv")
    (tmp_path / "without").mkdir()
    assert project_python(tmp_path / "with") == str(tmp_path / "with" / ".venv" / "bin" / "python")
    venv_python = tmp_path / "with" / ".venv" / "bin" / "python"
    assert project_python(tmp_path, "./with/.venv/bin/python") == str(venv_python)  # relative: made absolute
    bindir = os.path.dirname(sys.executable)
    script = f'source {RECIPE_DIR}/launch_env.sh; PATH={bindir}:$PATH; PYTHON= project_python {tmp_path / "without"}'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "python3"
