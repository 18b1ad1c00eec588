"""Checkpoints on forked CPU ranks: exact resume (also with more iterations, or on another number of ranks
through a universal checkpoint), early exits for time limits, --finetune, and every checkpoint DeepSpeed
cannot load reported as one line."""
import numpy as np
import pytest

from tests.distributed import run_ranks
from tests.runs import _train, flags, train


@pytest.mark.parametrize("sp, zero", [("1", "1"), ("2", "1"), ("1", "3"), ("2", "3")])
def test_resume_is_bit_exact_with_dropout(corpus, tmp_path, sp, zero):
    """At the default --hidden-dropout 0.1: each rank's random state is saved and restored once the data iterator
    is built (building one drew from it), and iterators draw from their own generator (an evaluation's did too)."""
    common = flags(corpus, "--sequence-parallel-size", sp, "--zero-stage", zero, "--global-batch-size", "4",
                   "--hidden-dropout", "0.1", "--eval-interval", "3", "--eval-iters", "1", iters=8)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    first = train(2, [*common, "--save", ckpt, "--exit-interval", "4"])
    second = train(2, [*common, "--save", ckpt, "--load", ckpt, "--exit-interval", "3"])  # Megatron's: at 6, not 7
    third = train(2, [*common, "--save", ckpt, "--load", ckpt])
    assert first == uninterrupted[:4]
    assert second == uninterrupted[4:6]
    assert third == uninterrupted[6:]


def test_a_resume_with_more_iterations_follows_this_runs_schedule(corpus, tmp_path):
    """Extending a run (--train-iters 3, then 6) trains steps 4-6 as an uninterrupted 6-step run: the lr
    comes from this run's flags, not from the optimizer state saved by the shorter run (whose last lr,
    --min-lr, DeepSpeed restored after the schedule had been applied). The two schedules agree on steps
    1-3 (2 warmup steps, then the peak)."""
    common = flags(corpus, "--zero-stage", "1", "--global-batch-size", "4", iters=6)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    train(2, [*common, "--save", ckpt, "--train-iters", "3"])
    assert train(2, [*common, "--save", ckpt, "--load", ckpt]) == uninterrupted[3:]


def test_a_checkpoint_resumes_under_another_dp_x_sp_split(corpus, tmp_path):
    """DeepSpeed splits ZeRO state over all ranks, so DP 2 x SP 1 resumes as DP 1 x SP 2 (same 2 ranks)."""
    common = flags(corpus, "--zero-stage", "1", "--global-batch-size", "4", iters=6)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    train(2, [*common, "--save", ckpt, "--exit-interval", "3"])
    resumed = train(2, [*common, "--load", ckpt, "--sequence-parallel-size", "2"])
    np.testing.assert_allclose(resumed, uninterrupted[3:], rtol=1e-5)


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


def _module_weights(step_dir) -> dict:
    import torch
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_finetune_starts_a_new_run_from_the_weights_alone(corpus, tmp_path):
    """Context extension: a model trained at 32 tokens continues at 64 tokens on 2 SP ranks, from its
    weights only (iteration 0, fresh optimizer and schedule), into another --save directory."""
    from megatron_sp.configure import configure
    from megatron_sp.errors import ConfigError
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
            (1, "1", ckpt["1"], [], "saved under ZeRO stage 1 by 2 ranks; its optimizer state is split 2 ways and "
                                    "DeepSpeed cannot re-split it for this run's 1: resume on as many (any DP x SP), "
                                    "convert it with tools/universal_checkpoint.py and add --universal-checkpoint")):
        with pytest.raises(AssertionError) as failed:
            resume(world, stage, load, *extra)
        assert f"ConfigError: --load {load}: {message}" in str(failed.value)


def test_a_damaged_or_incomplete_checkpoint_is_one_line(corpus, tmp_path):
    """A model-states file cut short is named, with the way out, before DeepSpeed's own load fails with a
    traceback; with a manifest (every step saved now) it makes the step incomplete, and this run has no other.
    The steps of older versions, which have no manifest, are read as before."""
    ckpt = tmp_path / "ckpt"
    argv = flags(corpus, "--zero-stage", "1", "--save", str(ckpt), "--load", str(ckpt), iters=1)
    train(1, argv)
    states = ckpt / "global_step1" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    with pytest.raises(AssertionError) as failed:
        train(1, [*argv, "--train-iters", "2"])
    assert f"ConfigError: --load {ckpt}: no complete checkpoint (global_step1 and every step" in str(failed.value)
    (ckpt / "global_step1" / "manifest.json").unlink()
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


def test_a_universal_checkpoint_resumes_on_another_number_of_ranks(corpus, tmp_path):
    """2 ranks save at step 3; tools/universal_checkpoint.py converts; 1 rank resumes with --universal-checkpoint
    and trains on as if never stopped (same global batch). Keeping the flag once newer checkpoints exist, or
    asking it of ZeRO-3, is one line."""
    import subprocess
    import sys
    common = flags(corpus, "--zero-stage", "1", "--global-batch-size", "4", iters=6)
    uninterrupted = train(2, common)
    ckpt = str(tmp_path / "ckpt")
    train(2, [*common, "--save", ckpt, "--exit-interval", "3"])

    def tool(*args):
        return subprocess.run([sys.executable, "tools/universal_checkpoint.py", *args], capture_output=True, text=True)
    converted = tool("--load", ckpt, "--workers", "2")
    assert converted.returncode == 0, converted.stderr
    assert tool("--load", ckpt).stderr.strip() == (f"error: {ckpt}/global_step3_universal exists already; remove it "
                                                   "to convert global_step3 again")
    assert tool("--load", str(tmp_path / "none")).stderr.startswith("error: --load ")
    with pytest.raises(AssertionError, match="cannot re-split it for this run's 1: resume on as many"):
        train(1, [*common, "--save", ckpt, "--load", ckpt])
    with pytest.raises(AssertionError, match="--universal-checkpoint is supported for ZeRO stages 1 and 2"):
        train(1, [*common, "--load", ckpt, "--universal-checkpoint", "--zero-stage", "3"])
    resumed = train(1, [*common, "--save", ckpt, "--load", ckpt, "--universal-checkpoint", "--exit-interval", "5"])
    np.testing.assert_allclose(resumed, uninterrupted[3:5], rtol=1e-6)
    with pytest.raises(AssertionError, match="latest_universal names global_step3_universal, older than global_step5"):
        train(1, [*common, "--save", ckpt, "--load", ckpt, "--universal-checkpoint"])
    np.testing.assert_allclose(train(1, [*common, "--save", ckpt, "--load", ckpt]), uninterrupted[5:], rtol=1e-6)
