"""End-to-end training on forked CPU ranks: learning, ZeRO stages, SP == single device, evaluation."""
import numpy as np
import pytest

from tests.distributed import run_ranks
from tests.runs import flags, train


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
    from megatron_sp.configure import configure
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


def test_the_training_device_follows_deepspeeds_accelerator():
    """DS_ACCELERATOR=cpu (the quickstart's choice with fewer GPUs than ranks) trains on the CPU even where torch
    sees GPUs; a GPU run puts local rank r on GPU r, and a rank past the node's last GPU is one error line."""
    import torch
    from megatron_sp.errors import RankError
    from megatron_sp.training.trainer import training_device
    assert training_device("cpu", 1, 1) == torch.device("cpu")
    assert training_device("cuda", 0, 0) == torch.device("cpu")
    assert training_device("cuda", 3, 4) == torch.device("cuda", 3)
    with pytest.raises(RankError, match=r"^local rank 1 has no GPU: this node has 1; launch at most 1 rank\(s\) per"):
        training_device("cuda", 1, 1)


def test_the_layout_line_counts_the_deepspeed_launchers_ranks_per_node(corpus, monkeypatch):
    """The deepspeed launcher says LOCAL_SIZE (torchrun LOCAL_WORLD_SIZE): 2 ranks launched one per node are 2
    nodes whatever this machine's GPU count, and a CPU run says what its ranks run on."""
    from megatron_sp.configure import configure
    from megatron_sp.parallel.layout import gpus_per_node_from_env, layout_lines
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "1")
    assert gpus_per_node_from_env(2) == 1
    cfg, _ = configure(flags(corpus, "--sequence-parallel-size", "2"), 2)
    assert "2 node(s) of 1 CPU ranks, each SP group spans 2 nodes" in layout_lines(cfg, 2, 1, "CPU ranks")[0]
