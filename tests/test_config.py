"""The command line: the frozen flag set, --help, Megatron compatibility, one-line config errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_sp.arguments import build_parser, parse_args
from megatron_sp.errors import ConfigError
from megatron_sp.validation import validate
from megatron_sp.data.indexed import IndexedDatasetWriter

# Changing this set breaks users' recipes: add flags deliberately, never drop or rename one.
FROZEN_FLAGS = """
    --DDP-impl --adam-beta1 --adam-beta2 --adam-eps --apply-query-key-layer-scaling
    --attention-backend --attention-dropout --bf16 --check-for-nan-in-loss-and-grad --checkpoint-activations
    --checkpoint-in-cpu --checkpoint-in-cpu-keep-layers --checkpoint-num-layers --clip-grad --compile-layers
    --contigious-checkpointing --data-cache-path --data-impl
    --data-path --deepspeed --deepspeed-activation-checkpointing --deepspeed-config
    --deepspeed_config --disable-bias-linear --distributed-backend --distributed-timeout-minutes
    --dry-run --ds-sequence-parallel-fpdt --ds-sequence-parallel-fpdt-chunk-size
    --ds-sequence-parallel-fpdt-offloading --ds-sequence-parallel-size
    --empty-unused-memory-level --eod-mask-loss --eval-interval --eval-iters
    --exit-duration-in-mins --exit-interval --exit-signal-handler --ffn-hidden-size --finetune --fp16
    --fused-grad-norm
    --fp16-lm-cross-entropy
    --global-batch-size --gpu-memory-gb --group-query-attention --help --hidden-dropout --hidden-size
    --host-memory-gb --hysteresis --init-method-std --initial-loss-scale --keep-checkpoints --kv-channels
    --layernorm-epsilon --load --load-hf
    --local-rank --local_rank --log-batch-size-to-tensorboard --log-interval
    --log-memory-to-tensorboard --log-num-zeros-in-grad --log-optimizer-states-to-tensorboard --log-params-norm
    --log-timers-to-tensorboard --log-world-size-to-tensorboard
    --log-validation-ppl-to-tensorboard --loss-scale --loss-scale-window --lr --lr-decay-iters
    --lr-decay-samples --lr-decay-style --lr-decay-tokens --lr-warmup-fraction --lr-warmup-iters
    --lr-warmup-samples --lr-warmup-tokens --make-vocab-size-divisible-by
    --max-nonfinite-iterations --max-position-embeddings --merge-file --micro-batch-size --min-loss-scale
    --min-lr --mlp-tile-tokens --no-check-for-nan-in-loss-and-grad --no-position-embedding
    --mock-data --no-async-tensor-model-parallel-allreduce --no-bias-dropout-fusion
    --no-bias-gelu-fusion --no-fused-elementwise --no-fused-grad-norm --no-gradient-accumulation-fusion --no-load-optim --no-load-rng
    --no-masked-softmax-fusion --no-pipeline-parallel --no-query-key-layer-scaling
    --norm-epsilon --normalization --num-attention-heads --num-key-value-heads --num-layers
    --num-query-groups --num-workers --optimizer --override-opt_param-scheduler --partition-activations
    --pipeline-model-parallel-size --position-embedding-type --recompute-activations
    --recompute-granularity --recompute-method --recompute-num-layers --reset-attention-mask --reset-position-ids
    --rope-scaling-factor --rotary-base --rotary-percent --rotary-position-embeddings-theta --save --save-interval
    --seed --seq-length --sequence-parallel --sequence-parallel-size
    --sequence-parallel-strategy --split --swiglu --synchronize-each-layer
    --tensor-model-parallel-size --tensorboard-dir --tensorboard-log-interval
    --tensorboard-queue-size --test-data-path --timing-log-level --tokenizer-model
    --tokenizer-type --train-data-path --train-iters --train-samples --train-tokens
    --ulysses-degree --ulysses-head-groups --universal-checkpoint --untie-embeddings-and-output-weights
    --use-cpu-initialization
    --use-distributed-optimizer --use-flash-attn --use-flash-attn-triton --use-flash-attn-v1
    --use-flash-attn-v2 --use-rope-scaling --use-rotary-position-embeddings --valid-data-path --vocab-file
    --vocab-size --weight-decay --zero-stage -h
""".split()

MINIMAL = ["--mock-data", "--train-iters", "2"]


def test_flag_set_is_frozen():
    flags = sorted(o for a in build_parser()._actions for o in a.option_strings)
    assert flags == sorted(FROZEN_FLAGS)


def test_help_documents_every_flag():
    undocumented = [a.option_strings for a in build_parser()._actions if not (a.help or "").strip()]
    assert undocumented == []
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--help"], capture_output=True, text=True, check=True)
    assert "--sequence-parallel-size" in out.stdout and "--ds-sequence-parallel-size" in out.stdout


# The flag lines of Megatron-DeepSpeed's sequence-parallel recipes (1.3B and 30B, and the 6.7B FPDT one).
MEGATRON_DS_RECIPE = """
--override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 --tensor-model-parallel-size 1
--ds-sequence-parallel-size 2 --init-method-std 0.013 --lr-decay-tokens 300000000000
--lr-warmup-tokens 3000000000 --micro-batch-size 1 --exit-duration-in-mins 30000000
--global-batch-size 2 --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128
--max-position-embeddings 128 --train-tokens 300000000000 --train-samples 2000 --lr 2.0e-4
--min-lr 1.0e-6 --lr-decay-style cosine --split 949,50,1 --log-interval 10 --eval-interval 100
--eval-iters 10 --save-interval 100 --weight-decay 0.1 --attention-dropout 0.0 --hidden-dropout 0.0
--clip-grad 1.0 --hysteresis 2 --num-workers 0 --bf16 --seed 1234 --no-async-tensor-model-parallel-allreduce
--use-flash-attn-triton --use-flash-attn-v2 --tensorboard-queue-size 1 --log-timers-to-tensorboard
--log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard --checkpoint-activations
--deepspeed --zero-stage 3 --pipeline-model-parallel-size 1 --no-pipeline-parallel
--deepspeed-activation-checkpointing --checkpoint-in-cpu --data-impl mmap --tokenizer-type GPT2BPETokenizer
--use-rotary-position-embeddings --rotary-percent 0.25 --rotary-position-embeddings-theta 100000000
--ds-sequence-parallel-fpdt --ds-sequence-parallel-fpdt-chunk-size 65536 --local_rank=0 --mock-data
""".split()


def test_megatron_deepspeed_recipe_flags_are_accepted():
    cfg = parse_args(MEGATRON_DS_RECIPE)
    validate(cfg, world_size=2)
    assert cfg.parallel.sequence_parallel_size == 2
    assert cfg.model.checkpoint_activations and cfg.model.use_rotary_position_embeddings
    assert cfg.parallel.attention_backend == "auto"  # --use-flash-attn-v2 came last
    assert any(note.startswith("--data-impl") for note in cfg.ignored)
    assert any(note.startswith("--use-flash-attn-triton") for note in cfg.ignored)
    # FPDT maps to its nearest working behaviour, said in one note each
    assert cfg.model.checkpoint_in_cpu and cfg.model.mlp_tile_tokens == 65536
    assert any(note.startswith("--ds-sequence-parallel-fpdt -> --mlp-tile-tokens 65536") for note in cfg.ignored)


def test_fpdt_flags_map_to_tiles_and_host_checkpoints():
    cfg = parse_args([*MINIMAL, "--ds-sequence-parallel-fpdt", "--ds-sequence-parallel-fpdt-chunk-size", "8192",
                      "--ds-sequence-parallel-fpdt-offloading", "--checkpoint-activations"])
    validate(cfg, world_size=1)
    assert cfg.model.mlp_tile_tokens == 8192 and cfg.model.checkpoint_in_cpu
    assert [n.split()[0] for n in cfg.ignored] == ["--ds-sequence-parallel-fpdt", "--ds-sequence-parallel-fpdt-offloading"]
    alone = parse_args([*MINIMAL, "--ds-sequence-parallel-fpdt-chunk-size", "8192"])
    assert alone.model.mlp_tile_tokens == 0
    assert alone.ignored == ["--ds-sequence-parallel-fpdt-chunk-size (only read with --ds-sequence-parallel-fpdt)"]


# The flag lines of Megatron-DeepSpeed's Llama 2 recipe (examples_deepspeed/pretrain_llama2_distributed.sh).
MEGATRON_DS_LLAMA_RECIPE = """
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --num-layers 2 --hidden-size 64
--ffn-hidden-size 172 --num-attention-heads 4 --micro-batch-size 1 --global-batch-size 2 --seq-length 128
--max-position-embeddings 128 --train-iters 10 --data-impl mmap --split 949,50,1 --distributed-backend nccl
--lr 3e-4 --lr-decay-style cosine --min-lr 3e-5 --weight-decay 0.1 --clip-grad 1 --lr-warmup-iters 2
--optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --log-interval 1 --save-interval 100 --eval-interval 100
--eval-iters 10 --bf16 --no-query-key-layer-scaling --attention-dropout 0 --hidden-dropout 0
--use-rotary-position-embeddings --untie-embeddings-and-output-weights --swiglu --normalization rmsnorm
--disable-bias-linear --num-key-value-heads 2 --deepspeed --zero-stage 1 --deepspeed-activation-checkpointing
--no-position-embedding --use-flash-attn-v2 --mock-data
""".split()


def test_megatron_deepspeed_llama_recipe_flags_are_accepted():
    cfg = parse_args(MEGATRON_DS_LLAMA_RECIPE)
    validate(cfg, world_size=2)
    m = cfg.model
    assert m.use_rotary_position_embeddings and not m.learned_positions and m.num_key_value_heads == 2
    assert m.swiglu and m.normalization == "rmsnorm" and m.untie_embeddings_and_output_weights
    assert cfg.training.optimizer == "adam" and cfg.training.train_iters == 10


def test_defaults_are_filled():
    cfg = parse_args(["--swiglu", "--hidden-size", "2048", "--num-attention-heads", "16", *MINIMAL])
    validate(cfg, world_size=4)
    assert cfg.model.ffn_hidden_size == 5504  # 8h/3 rounded up to 64, as Megatron-DeepSpeed
    assert cfg.model.num_key_value_heads == 16 and cfg.training.global_batch_size == 4


@pytest.mark.parametrize("argv, world, message", [
    (["--num-attention-heads", "3"], 1, "not divisible by --num-attention-heads"),
    (["--num-key-value-heads", "3"], 1, "not divisible by --num-key-value-heads"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel-size", "2"], 4, "--tensor-model-parallel-size 2"),
    (["--global-batch-size", "3", "--micro-batch-size", "1"], 2, "not divisible by --micro-batch-size"),
    (["--sequence-parallel-size", "4"], 2, ""),
    (["--sequence-parallel-size", "2"], 3, ""),
    (["--sequence-parallel-size", "3", "--num-attention-heads", "4"], 3, ""),
    (["--seq-length", "100", "--sequence-parallel-size", "8", "--num-attention-heads", "8", "--hidden-size", "64"], 8, "100"),
    (["--ulysses-degree", "2", "--sequence-parallel-size", "2"], 2, "--ulysses-degree"),
    (["--bf16", "--fp16"], 1, "mutually exclusive"),
    (["--attention-dropout", "0.1"], 1, "--attention-dropout"),
    (["--reset-attention-mask", "--attention-backend", "cudnn"], 1,
     "attention backend 'cudnn' has no document mask (--reset-attention-mask); use sdpa_flash"),
    (["--data-path", "/nonexistent/corpus_text_document"], 1, "data file not found"),
    (["--data-path", "0.5", "a", "b"], 1, "weight prefix"),
    (["--attention-backend", "triton", "--hidden-size", "96", "--num-attention-heads", "4"], 1,
     "--attention-backend triton supports head dimensions 32, 64, 80, 96, 128, 192 and 256; this model's is 24"),
    (["--lr", "-1"], 1, "--lr must not be negative, got -1.0"),
    (["--weight-decay", "-0.1"], 1, "--weight-decay must not be negative"),
    (["--clip-grad", "-1"], 1, "--clip-grad must not be negative"),
    (["--eval-iters", "-1"], 1, "--eval-iters must not be negative"),
    (["--ffn-hidden-size", "0"], 1, "--ffn-hidden-size must be positive, got 0"),
    (["--exit-duration-in-mins", "0"], 1, "--exit-duration-in-mins must be positive, got 0.0"),
    (["--distributed-timeout-minutes", "-5"], 1, "--distributed-timeout-minutes must be positive, got -5.0"),
    (["--data-path", "any/corpus_text_document", "--split", "a,b,c"], 1, "--split 'a,b,c'"),
    (["--checkpoint-in-cpu"], 1, "--checkpoint-in-cpu moves activation checkpoints to host memory and needs some"),
    (["--checkpoint-in-cpu-keep-layers", "1", "--checkpoint-activations"], 1, "only applies with --checkpoint-in-cpu"),
    (["--checkpoint-in-cpu", "--checkpoint-activations", "--checkpoint-in-cpu-keep-layers", "3"], 1,
     "--checkpoint-in-cpu-keep-layers must be between 0 and --num-layers 2, got 3"),
    (["--mlp-tile-tokens", "-1"], 1, "--mlp-tile-tokens must not be negative"),
])
def test_impossible_configurations_are_one_line(argv, world, message):
    argv = [*argv, "--train-iters", "2"] + ([] if "--data-path" in argv else ["--mock-data"])
    with pytest.raises(ConfigError) as err:
        validate(parse_args(argv), world_size=world)
    text = str(err.value)
    assert message in text and "\n" not in text and len(text) < 300


def test_cli_reports_one_line_and_exit_code_2():
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--num-attention-heads", "3", *MINIMAL],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr


def test_an_unknown_flag_is_one_line_pointing_at_help():
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--num-layerz", "2", *MINIMAL],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: unrecognized arguments: --num-layerz 2 "
                                  "(see pretrain_gpt.py --help)")


def test_compatibility_flags_are_one_mechanism():
    """Every accepted-and-ignored flag is in IGNORED_FLAGS (no config field that nothing reads), and each is
    reported at start unless a launcher sets it."""
    cfg = parse_args(["--deepspeed", "--no-pipeline-parallel", "--num-workers", "4", "--local_rank=1", *MINIMAL])
    assert sorted(note.split()[0] for note in cfg.ignored) == ["--deepspeed", "--no-pipeline-parallel", "--num-workers"]
    fields = {f for section in (cfg.model, cfg.parallel, cfg.data, cfg.training, cfg.logging) for f in vars(section)}
    assert not fields & {"deepspeed", "no_pipeline_parallel", "num_workers", "local_rank"}


def test_a_kernel_the_device_lacks_is_one_line_and_exit_code_2():
    """Checked once the device is known, before the model is built: not a traceback at the first step."""
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *MINIMAL, "--attention-backend", "cudnn"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: attention backend 'cudnn' is unavailable on cpu: "
                                                   "it needs a CUDA device")


def test_a_save_directory_that_cannot_be_made_is_one_line_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *MINIMAL, "--save", str(blocker / "ckpt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "iteration" not in out.stdout
    assert out.stderr.strip().splitlines()[-1] == f"error: --save {blocker / 'ckpt'}: Not a directory"
    assert blocker.read_text() == "not a directory"


TINY_RUN = [*MINIMAL, "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "1"]


def test_a_fresh_run_never_overwrites_another_runs_checkpoints(tmp_path):
    """--save holding checkpoints is refused unless the run resumes from it (--load the same directory)."""
    save = str(tmp_path / "ckpt")
    first = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--save", save],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("*")}
    again = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--save", save],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: --save {save}: already holds checkpoints (latest global_step2) that this run would overwrite; "
        f"resume with --load {save}, or choose an empty --save directory")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("*")} == saved
    resumed = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--train-iters", "3",
                              "--save", save, "--load", save], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (tmp_path / "ckpt" / "global_step3").is_dir()


def test_resuming_a_checkpoint_of_another_model_shape_is_one_line(tmp_path):
    save = str(tmp_path / "ckpt")
    first = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--save", save],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    other = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--hidden-size", "128", "--train-iters", "3",
                            "--save", save, "--load", save], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --load {save}: its checkpoint does not fit this model (size mismatch for ")
    assert last.endswith("use the model flags of the run that saved it") and len(last) < 400
    assert not (tmp_path / "ckpt" / "global_step3").exists()


@pytest.fixture(scope="module")
def ids_corpus(tmp_path_factory) -> str:
    """A small indexed dataset written here, so these tests need no prepared sample data (CI has none):
    200 documents of token ids 0..999, the prefix returned."""
    prefix = str(tmp_path_factory.mktemp("corpus") / "ids_text_document")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(200):
            writer.add_document(rng.integers(0, 1000, rng.integers(50, 150)))
    return prefix


def test_broken_data_files_and_misplaced_directories_are_one_line_at_start(ids_corpus, tmp_path):
    """A truncated .idx (e.g. a copy cut short) fails validation, not dataset building after the model is
    made; so does a --tensorboard-dir or --data-cache-path that names a file."""
    (tmp_path / "cut.bin").write_bytes(open(ids_corpus + ".bin", "rb").read())
    (tmp_path / "cut.idx").write_bytes(open(ids_corpus + ".idx", "rb").read()[:100])
    with pytest.raises(ConfigError, match="cut.idx: truncated index"):
        validate(parse_args(["--data-path", str(tmp_path / "cut"), "--train-iters", "2"]), world_size=1)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for flag in ("--tensorboard-dir", "--data-cache-path"):
        with pytest.raises(ConfigError, match=f"{flag} .*notes.txt is a file, not a directory"):
            validate(parse_args([*MINIMAL, flag, str(a_file)]), world_size=1)
    assert a_file.read_text() == "mine"


def test_data_tokenized_for_another_vocabulary_is_one_line(ids_corpus, tmp_path):
    """Token ids past the embedding (here: ids up to 999 read with a 10-token vocabulary, padded to 128)
    stop the run with one line, not an IndexError (a device-side assert on GPU)."""
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN[len(MINIMAL):], "--train-iters", "2",
                          "--data-path", ids_corpus, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
                          "--data-cache-path", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the data holds token id ") and "outside this model's vocabulary of 128" in last


def test_a_train_split_without_documents_is_one_line(ids_corpus, tmp_path):
    """--split 0,100,0 leaves training nothing (as does an empty corpus): one line, not a TypeError."""
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN[len(MINIMAL):], "--train-iters", "2",
                          "--data-path", ids_corpus, "--split", "0,100,0", "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "1000", "--data-cache-path", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: no training data: the train split of {ids_corpus} "
                                                    "holds no documents (--split 0,100,0)")


def test_a_config_error_of_a_multi_rank_run_is_said_once_per_node():
    """The ranks of a node read the same flags and files: its first rank says what is wrong, the others
    just exit 2 (each node's first rank says it, in case only that node lacks a file)."""
    import os
    said = {}
    for rank in ("0", "1"):
        env = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2"}
        out = subprocess.run([sys.executable, "pretrain_gpt.py", "--num-attention-heads", "3", *MINIMAL],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 2
        said[rank] = out.stderr.strip()
    assert said["0"].startswith("error: ") and "\n" not in said["0"] and said["1"] == ""


def test_a_latest_that_names_a_missing_step_is_one_line(tmp_path):
    save = tmp_path / "ckpt"
    first = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--save", str(save)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (save / "latest").write_text("global_step9")  # e.g. a step directory deleted to free space
    again = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--save", str(save), "--load", str(save)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: --load {save}: its 'latest' names 'global_step9', which is not there (step directories: "
        "global_step2); point 'latest' at one of them")


def test_sigterm_with_the_exit_signal_handler_saves_and_exits_0(tmp_path):
    """What a SLURM job sees at its time limit: the run finishes its step, saves, says why, exits 0."""
    import signal
    save = str(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "pretrain_gpt.py", *TINY_RUN, "--train-iters", "100000",
                             "--log-interval", "1", "--exit-signal-handler", "--save", save],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(" iteration "):  # training has begun
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    saved = [int(p.name.removeprefix("global_step")) for p in (tmp_path / "ckpt").glob("global_step*")]
    assert len(saved) == 1 and f"saved checkpoint at iteration {saved[0]} to " in rest
    assert rest.strip().splitlines()[-1] == (f"exiting at iteration {saved[0]} of 100000: "
                                             "a rank received SIGTERM (--exit-signal-handler)")


def test_distributed_timeout_minutes_reaches_the_process_group():
    """Megatron's flag sets how long a collective waits (it was accepted and ignored before)."""
    code = ("import torch, torch.distributed as dist; from megatron_sp.configure import configure; "
            "from megatron_sp.training.trainer import init_distributed; "
            "cfg, _ = configure(['--mock-data', '--train-iters', '1', '--distributed-timeout-minutes', '42'], 1); "
            "init_distributed(cfg); print(dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0:42:00"


def test_a_bad_sample_is_said_once_per_sequence_parallel_group(ids_corpus, tmp_path):
    """Both ranks of an SP group read the sample with the bad token id; the group's first rank says so."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "pretrain_gpt.py",
                          *TINY_RUN[len(MINIMAL):], "--train-iters", "2", "--sequence-parallel-size", "2",
                          "--data-path", ids_corpus, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
                          "--data-cache-path", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300)
    said = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and len(said) == 1 and said[0].startswith("error: rank 0: the data holds token id "), \
        out.stderr[-3000:]


def test_runs_start_with_expandable_segments_unless_the_user_chose():
    from megatron_sp.training.allocator import use_expandable_segments
    assert use_expandable_segments(env := {}) == "expandable_segments:True" == env["PYTORCH_CUDA_ALLOC_CONF"]
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert use_expandable_segments(env) == "max_split_size_mb:512,expandable_segments:True"
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert use_expandable_segments(env) == "expandable_segments:False"  # the user's choice stands
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}  # newer torch's name
    assert use_expandable_segments(env) == "" and "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_pretrain_gpt_sets_the_allocator_mode_before_cuda(monkeypatch, capsys):
    import pretrain_gpt
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    assert pretrain_gpt.main(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                              "--seq-length", "64", "--max-position-embeddings", "64", "--mock-data",
                              "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--train-iters", "1",
                              "--micro-batch-size", "1", "--global-batch-size", "1", "--dry-run"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("sp, gpus_per_node, heads, expected", [(16, 8, 16, 8), (6, 4, 12, 3), (4, 8, 16, 4),
                                                                 (8, 8, 4, 4)])
def test_hybrid_defaults_to_ulysses_inside_a_node(sp, gpus_per_node, heads, expected):
    """No --ulysses-degree: the largest divisor of the SP size that fits in a node and divides the heads,
    said in the start-up lines; a degree the user gave stands."""
    from megatron_sp.configure import configure
    argv = ["--mock-data", "--train-iters", "1", "--num-layers", "2", "--hidden-size", str(16 * heads),
            "--num-attention-heads", str(heads), "--seq-length", "96", "--max-position-embeddings", "96",
            "--sequence-parallel-strategy", "hybrid", "--sequence-parallel-size", str(sp)]
    cfg, _ = configure(argv, sp, gpus_per_node=gpus_per_node)
    assert cfg.parallel.ulysses_degree == expected
    assert cfg.sp_choice == [f"hybrid: --ulysses-degree {expected} (Ulysses inside a node of {gpus_per_node} GPUs, "
                             f"the ring over {sp // expected} such groups)"]
    cfg, _ = configure(argv + ["--ulysses-degree", "1"], sp, gpus_per_node=gpus_per_node)
    assert cfg.parallel.ulysses_degree == 1 and cfg.sp_choice == []
