"""End-to-end training on forked CPU ranks: learning, ZeRO stages, exact resume, SP == single device."""
import numpy as np
import pytest

from megatron_sp.data.indexed import IndexedDatasetWriter
from tests.distributed import run_ranks

VOCAB = 64  # NullTokenizer: ids 0..63, eod = 64


def write_corpus(prefix: str, seed: int, eod_heavy: bool = False) -> None:
    """Learnable documents: arithmetic progressions mod VOCAB (the next id follows from the last two).

    eod_heavy: each document is followed by a long run of eod ids, so with --eod-mask-loss the
    unmasked tokens are spread very unevenly over the sequence-parallel ranks.
    """
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(300):
            length, start, step = rng.integers(40, 200), rng.integers(0, VOCAB), rng.integers(1, 4)
            doc = (start + step * np.arange(length)) % VOCAB
            if eod_heavy:
                doc = np.concatenate([doc[: rng.integers(5, 30)], np.full(rng.integers(20, 90), VOCAB)])
            writer.add_document(doc)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root / "arith_text_document"), seed=0)
    write_corpus(str(root / "eodheavy_text_document"), seed=1, eod_heavy=True)
    return root


def flags(corpus, *extra, name="arith", iters=20, seq=32):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
            "--seq-length", str(seq), "--micro-batch-size", "2", "--train-iters", str(iters),
            "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "2e-3", "--lr-warmup-iters", "2",
            "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--clip-grad", "1.0", "--attention-backend", "torch",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "8",
            "--data-path", str(corpus / f"{name}_text_document"), "--split", "90,10,0",
            "--data-cache-path", str(corpus / "cache"), "--eval-interval", "1000", "--log-interval", "1000",
            *extra]


def _train(rank, world, argv):
    from pretrain_gpt import configure
    from megatron_sp.training.trainer import run
    cfg, tokenizer = configure(argv, world)
    return run(cfg, tokenizer)["losses"]


def train(world, argv) -> list[float]:
    losses = run_ranks(world, _train, argv)
    assert all(other == losses[0] for other in losses[1:]), "ranks disagree on the loss"
    return losses[0]


def test_loss_falls_by_a_third_on_two_ranks_and_is_logged(corpus, tmp_path):
    losses = train(2, flags(corpus, "--sequence-parallel-size", "2", "--zero-stage", "1", "--log-interval", "10",
                            "--tensorboard-dir", str(tmp_path / "tb"), iters=100, seq=64))
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    logged = events.Scalars("lm-loss")
    assert [e.step for e in logged] == list(range(10, 101, 10))
    assert {"learning-rate", "grad-norm", "tokens-per-sec", "model-tflops"} <= set(events.Tags()["scalars"])


def test_zero_stages_give_the_same_losses(corpus):
    base = train(2, flags(corpus, "--zero-stage", "0", iters=10))
    for stage in ("1", "2", "3"):
        np.testing.assert_allclose(train(2, flags(corpus, "--zero-stage", stage, iters=10)), base, rtol=1e-5,
                                   err_msg=f"ZeRO {stage}")


def test_resume_is_bit_exact(corpus, tmp_path):
    common = flags(corpus, "--sequence-parallel-size", "2", "--zero-stage", "2", "--global-batch-size", "4")
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    first = train(2, [*common, "--save", ckpt, "--exit-interval", "4"])
    second = train(2, [*common, "--save", ckpt, "--load", ckpt, "--exit-interval", "6"])  # Megatron's: at 6, not 10
    third = train(2, [*common, "--save", ckpt, "--load", ckpt])
    assert first == uninterrupted[:4]
    assert second == uninterrupted[4:6]
    assert third == uninterrupted[6:]


# (strategy, SP, DP, Ulysses degree) runs that must reproduce the SP=1 run with the same DP.
SP_RUNS = [("ulysses", 2, 1, None), ("ring", 2, 1, None), ("ulysses", 4, 1, None), ("ring", 4, 1, None),
           ("hybrid", 4, 1, 2), ("ulysses", 2, 2, None), ("ring", 2, 2, None)]


@pytest.mark.parametrize("zero", ["1", "3"])
def test_sequence_parallel_training_equals_single_device(corpus, zero):
    references = {}
    for strategy, sp, dp, u in SP_RUNS:
        if dp not in references:
            references[dp] = train(dp, flags(corpus, "--zero-stage", zero, "--global-batch-size", "4"))
        extra = ["--sequence-parallel-size", str(sp), "--sequence-parallel-strategy", strategy,
                 "--zero-stage", zero, "--global-batch-size", "4"] + (["--ulysses-degree", str(u)] if u else [])
        np.testing.assert_allclose(train(sp * dp, flags(corpus, *extra)), references[dp], rtol=1e-5,
                                   err_msg=f"{strategy} SP={sp} DP={dp} ZeRO {zero}")


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_uneven_loss_masks_over_sequence_ranks(corpus, strategy):
    """Masked eod runs leave SP ranks with very different token counts; the loss must not care."""
    common = ["--eod-mask-loss", "--zero-stage", "1", "--global-batch-size", "4"]
    reference = train(1, flags(corpus, *common, name="eodheavy", iters=8))
    sharded = train(2, flags(corpus, *common, "--sequence-parallel-size", "2", "--sequence-parallel-strategy",
                             strategy, name="eodheavy", iters=8))
    np.testing.assert_allclose(sharded, reference, rtol=1e-5)


def _zero3_build(rank, world, argv):
    """ZeRO-3 construction: what each rank holds right after build_model, before deepspeed.initialize."""
    import deepspeed
    import torch.distributed as dist
    from pretrain_gpt import configure
    from megatron_sp.attention import LocalAttention
    from megatron_sp.model.gpt import GPTModel
    from megatron_sp.parallel.state import ParallelState
    from megatron_sp.training import engine as ds_engine
    from megatron_sp.training.trainer import init_distributed
    cfg, _ = configure(argv, world)
    init_distributed(cfg)
    ps = ParallelState.build(1)
    self_group = [dist.new_group([r]) for r in range(world)][rank]
    ds_config, _ = ds_engine.deepspeed_config(cfg, ps.dp_size)
    model = ds_engine.build_model(lambda: GPTModel(cfg.model, LocalAttention, cfg.padded_vocab_size), ds_config,
                                  ds_engine.DeepSpeedMPU(ps, self_group), rank)
    qkv = model.layers[0].attention.qkv.weight
    with deepspeed.zero.GatheredParameters([qkv]):
        full_std = qkv.detach().double().std().item()
    return {"holds": qkv.numel(), "shard": qkv.ds_tensor.numel(), "full": qkv.ds_numel, "std": full_std}


def test_zero3_never_materialises_the_whole_model(corpus):
    """Under ZeRO-3 parameters are partitioned as they are built (deepspeed.zero.Init), before
    DeepSpeed's engine exists, and still get the Megatron init (gathered one at a time)."""
    argv = flags(corpus, "--zero-stage", "3", "--hidden-size", "64", "--init-method-std", "0.05")
    for r in run_ranks(2, _zero3_build, argv):
        assert r["holds"] == 0 and 0 < r["shard"] <= r["full"] // 2 + 1
        assert abs(r["std"] - 0.05) < 0.005


def test_eval_interval_zero_means_no_evaluation(corpus):
    """--eval-interval 0 turns evaluation off (it divided by zero while sizing the validation set)."""
    assert train(1, flags(corpus, "--eval-interval", "0", iters=3)) == train(1, flags(corpus, iters=3))


def _train_until_rank1_gets_sigterm(rank, world, argv, at_step):
    """Rank 1 alone receives SIGTERM during its step `at_step`, as when a launcher signals ranks one by one."""
    import os
    import signal
    from megatron_sp.training import trainer
    real_step, steps = trainer.train_step, []

    def step_then_signal(*args):
        steps.append(None)
        if rank == 1 and len(steps) == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    trainer.train_step = step_then_signal  # this forked rank's copy of the module only
    return _train(rank, world, argv)


def test_early_exits_save_and_resume_exactly(corpus, tmp_path):
    """--exit-duration-in-mins and --exit-signal-handler (a job's time limit) stop every rank after the same step,
    with a checkpoint; rerunning the command resumes as if never stopped."""
    common = flags(corpus, "--sequence-parallel-size", "2", "--zero-stage", "1", "--global-batch-size", "4", iters=6)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    by_time = train(2, [*common, "--save", ckpt, "--exit-duration-in-mins", "1e-9"])  # out of time after one step
    assert by_time == uninterrupted[:1]
    per_rank = run_ranks(2, _train_until_rank1_gets_sigterm, [*common, "--save", ckpt, "--load", ckpt,
                                                               "--exit-signal-handler"], at_step=2)
    assert per_rank[0] == per_rank[1] == uninterrupted[1:3]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*")) == ["global_step1", "global_step3"]
    assert train(2, [*common, "--save", ckpt, "--load", ckpt]) == uninterrupted[3:]


def test_the_end_of_training_evaluates_validation_and_test_data(corpus, tmp_path):
    """As Megatron: after the last step, one more evaluation of the validation split (fresh samples) and one
    of the test split; none when a run stops early."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = flags(corpus, "--split", "80,10,10", "--eval-interval", "2", "--eval-iters", "2", iters=4)
    train(1, [*common, "--tensorboard-dir", str(tmp_path / "done")])
    events = EventAccumulator(str(tmp_path / "done")).Reload()
    assert [e.step for e in events.Scalars("validation/lm-loss")] == [2, 4, 4]
    assert [e.step for e in events.Scalars("test/lm-loss")] == [4]
    periodic, final = [e.value for e in events.Scalars("validation/lm-loss")][1:]
    assert periodic != final  # another block of validation samples
    train(1, [*common, "--tensorboard-dir", str(tmp_path / "stopped"), "--exit-interval", "3"])
    events = EventAccumulator(str(tmp_path / "stopped")).Reload()
    assert [e.step for e in events.Scalars("validation/lm-loss")] == [2]
    assert "test/lm-loss" not in events.Tags()["scalars"]


def _module_weights(step_dir) -> dict:
    import torch
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_finetune_starts_a_new_run_from_the_weights_alone(corpus, tmp_path):
    """Context extension: a model trained at 32 tokens continues at 64 tokens on 2 SP ranks, from its
    weights only (iteration 0, fresh optimizer and schedule), into another --save directory."""
    from pretrain_gpt import configure
    from megatron_sp.arguments import ConfigError
    from megatron_sp.training.trainer import run
    base, extended = str(tmp_path / "base"), str(tmp_path / "extended")
    train(1, flags(corpus, "--zero-stage", "1", "--save", base, iters=4, seq=32))

    def longer(load, save):  # lr 0: the new run's weights stay those it loaded
        return flags(corpus, "--zero-stage", "1", "--sequence-parallel-size", "2", "--finetune", "--load", load,
                     "--save", save, "--lr", "0", "--lr-warmup-iters", "0", "--min-lr", "0", iters=1, seq=64)
    train(2, longer(base, extended))
    assert sorted(p.name for p in tmp_path.glob("extended/global_step*")) == ["global_step1"]  # counted from 0
    trained = _module_weights(tmp_path / "base" / "global_step4")
    carried = _module_weights(tmp_path / "extended" / "global_step1")
    assert trained.keys() == carried.keys() and all(trained[k].equal(carried[k]) for k in trained)
    for argv, message in ((longer(base, base), "a --finetune run starts again at iteration 0"),
                          (longer(str(tmp_path / "none"), str(tmp_path / "new")), "holds no checkpoint to start from"),
                          (longer(base, extended), f"resume with --load {extended} without --finetune")):
        with pytest.raises(ConfigError, match=message):
            run(*configure(argv, 2))


def test_checkpoints_deepspeed_cannot_load_are_one_line(corpus, tmp_path):
    """Another ZeRO stage or DP size at resume: what DeepSpeed loads works, the rest is one line naming the
    way out (DeepSpeed failed with an AssertionError, FileNotFoundError or AttributeError)."""
    ckpt = {stage: str(tmp_path / f"zero{stage}") for stage in "013"}
    for stage, path in ckpt.items():
        train(2, flags(corpus, "--zero-stage", stage, "--save", path, iters=2))

    def resume(world, stage, load, *extra):
        return train(world, flags(corpus, "--zero-stage", stage, "--load", load, *extra, iters=3))
    assert len(resume(2, "2", ckpt["1"])) == 1  # the optimizer state of stage 1 loads under stage 2
    assert len(resume(1, "0", ckpt["1"], "--no-load-optim")) == 1  # weights alone: any stage 0-2, any DP size
    for world, stage, load, extra, message in (
            (2, "1", ckpt["3"], ["--finetune", "--save", str(tmp_path / "new")],
             "saved under ZeRO stage 3, and DeepSpeed loads a stage-3 checkpoint only under stage 3 and others only "
             "under stages 0-2 (this run: 1); use --zero-stage 3"),
            (2, "1", ckpt["0"], [], "saved under ZeRO stage 0, whose optimizer state does not load under stage 1; "
                                    "resume with --zero-stage 0, or add --no-load-optim"),
            (1, "1", ckpt["1"], [], "saved under ZeRO stage 1 by 2 data-parallel ranks; its optimizer state is "
                                    "split 2 ways and DeepSpeed cannot re-split it for this run's 1")):
        with pytest.raises(AssertionError) as failed:
            resume(world, stage, load, *extra)
        assert f"ConfigError: --load {load}: {message}" in str(failed.value)


def test_a_damaged_or_incomplete_checkpoint_is_one_line(corpus, tmp_path):
    """A model-states file cut short (a copy or a save interrupted after `latest` was written) is named, with
    the way out, before DeepSpeed's own load fails with a traceback."""
    ckpt = tmp_path / "ckpt"
    argv = flags(corpus, "--zero-stage", "1", "--save", str(ckpt), "--load", str(ckpt), iters=1)
    train(1, argv)
    states = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    with pytest.raises(AssertionError) as failed:
        train(1, [*argv, "--train-iters", "2"])
    said = str(failed.value)
    assert f"ConfigError: {states} cannot be read (" in said
    assert f"this checkpoint is damaged; point {ckpt / 'latest'} at an earlier step directory" in said
    states.unlink()  # a copy that left the file out
    with pytest.raises(AssertionError) as failed:
        train(1, [*argv, "--train-iters", "2"])
    assert (f"ConfigError: {ckpt / 'global_step1'} holds no DeepSpeed model states (mp_rank_00_model_states.pt or "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt): this checkpoint is incomplete") in str(failed.value)
