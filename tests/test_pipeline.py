"""Pipeline parallelism: the rank grid, stages as slices of the model, the 1F1B order, one-line refusals of
bad layouts, and training on forked CPU ranks equal to the run without a pipeline (also with SP, recompute,
across a checkpoint, and with the opt-in fast paths)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_sp.attention import LocalAttention
from megatron_sp.config import ModelConfig
from megatron_sp.model.gpt import GPTModel
from megatron_sp.model.stage import GPTStage
from megatron_sp.parallel.pipeline import bubble_fraction, stage_layers
from megatron_sp.parallel.state import rank_grid
from tests.runs import flags, train


def test_rank_grid_puts_sp_innermost_and_stages_outermost():
    grid = rank_grid(8, sp_size=2, pp_size=2)
    assert grid["stage"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert grid["sp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_grid(4, sp_size=1, pp_size=4)["embedding"] == [[0, 3]]
    assert rank_grid(4, sp_size=2)["embedding"] == []  # no pipeline: nothing to tie across stages
    with pytest.raises(ValueError, match="not divisible by pipeline-parallel size 2 x sequence-parallel size 2"):
        rank_grid(6, sp_size=2, pp_size=2)


def test_stage_layers_and_bubble():
    assert [stage_layers(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert bubble_fraction(4, 12) == 3 / 15 and bubble_fraction(1, 5) == 0


def _model_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, seq_length=16,
                      max_position_embeddings=16, ffn_hidden_size=48, hidden_dropout=0.0, attention_dropout=0.0,
                      use_rotary_position_embeddings=True, swiglu=True, normalization="rmsnorm")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("untie", [False, True])
def test_stages_are_slices_of_the_model(untie):
    """Stages hold the whole model's parameters under its names and values (the tied word embedding on both
    ends), and chained they compute its loss and gradients (float64)."""
    cfg = _model_cfg(untie_embeddings_and_output_weights=untie)
    attention = lambda: LocalAttention(causal=True, backend="torch")  # noqa: E731
    model = GPTModel(cfg, attention, 64, init_seed=7).double()
    stages = [GPTStage(cfg, attention, 64, init_seed=7, pp_size=2, pp_rank=r).double() for r in range(2)]
    whole = dict(model.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            assert torch.equal(p, whole[name]), name
    names = set(whole) | {"word_embeddings.weight"} if not untie else set(whole)
    assert {n for s in stages for n in dict(s.named_parameters())} == names
    assert [len(s.tied_parameters()) for s in stages] == ([0, 0] if untie else [1, 1])

    tokens, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    model(tokens, positions, labels).sum().backward()
    hidden = stages[0](tokens, positions, labels)
    received = hidden.detach().requires_grad_(True)
    loss = stages[1](received, positions, labels)
    loss.sum().backward()
    hidden.backward(received.grad)
    torch.testing.assert_close(loss, model(tokens, positions, labels), rtol=0, atol=1e-12)
    for stage in stages:
        for name, p in stage.named_parameters():
            if name == "word_embeddings.weight" and not untie:
                continue  # each copy holds one end's share; the pipeline sums them
            torch.testing.assert_close(p.grad, whole[name].grad, rtol=0, atol=1e-12, msg=name)
    tied_sum = stages[0].word_embeddings.weight.grad + (0 if untie else stages[1].word_embeddings.weight.grad)
    torch.testing.assert_close(tied_sum, model.word_embeddings.weight.grad, rtol=0, atol=1e-12)


class _RecordingLink:
    """A StageLink stand-in for one process: receives ones, records what is sent."""

    def __init__(self, first: bool, last: bool):
        self.first, self.last, self.sent = first, last, []

    def _ones(self, none: bool):
        return None if none else torch.ones(())

    def recv_forward(self):
        return self._ones(self.first)

    def send_forward(self, output):
        self.sent.append("act")

    def send_forward_recv_backward(self, output):
        self.sent.append("act")
        return self._ones(self.last)

    def send_backward_recv_forward(self, grad):
        self.sent.append("grad")
        return self._ones(self.first)

    def recv_backward(self):
        return self._ones(self.last)

    def send_backward(self, grad):
        self.sent.append("grad")


@pytest.mark.parametrize("pp_rank, micro, expected", [
    (0, 4, "F0 F1 F2 B0 F3 B1 B2 B3"),  # stage 0 of 3: 2 warm-up forwards, at most 3 micro batches in flight
    (1, 4, "F0 F1 B0 F2 B1 F3 B2 B3"),
    (2, 4, "F0 B0 F1 B1 F2 B2 F3 B3"),  # the last stage alternates
    (0, 1, "F0 B0")])                   # fewer micro batches than stages
def test_one_f_one_b_order(pp_rank, micro, expected):
    from megatron_sp.training.pipeline_schedule import one_f_one_b
    events = []

    def forward(i, inputs):
        events.append(f"F{i}")
        x = torch.ones((), requires_grad=True) if inputs is None else inputs
        return x * 2

    def backward(i, output, output_grad):
        events.append(f"B{i}")
        output.backward(torch.ones(()) if output_grad is None else output_grad)

    link = _RecordingLink(first=pp_rank == 0, last=pp_rank == 2)
    one_f_one_b(link, micro, 3, pp_rank, forward, backward)
    assert " ".join(events) == expected
    assert link.sent.count("act") == micro and link.sent.count("grad") == micro


BASE = ["--mock-data", "--train-iters", "2", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--zero-stage", "1"]


@pytest.mark.parametrize("argv, world, message", [
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "8"], 8, "--pipeline-model-parallel-size 8 is more than --num-layers 4"),
    (["--pipeline-model-parallel-size", "2", "--sequence-parallel-size", "2"], 6,
     "world size 6 is not divisible by --pipeline-model-parallel-size 2 x --sequence-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 2, "ZeRO stage 3 does not combine"),
    (["--pipeline-model-parallel-size", "2", "--fp16"], 2, "--fp16 does not combine"),
    (["--pipeline-model-parallel-size", "2", "--universal-checkpoint"], 2, "--universal-checkpoint does not combine"),
    (["--pipeline-model-parallel-size", "0"], 1, "--pipeline-model-parallel-size must be positive"),
])
def test_bad_pipeline_layouts_are_one_line(argv, world, message):
    from megatron_sp.arguments import parse_args
    from megatron_sp.errors import ConfigError
    from megatron_sp.validation import validate
    with pytest.raises(ConfigError) as err:
        validate(parse_args([*BASE, *argv]), world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dry_run_prints_each_ranks_coordinates_and_warns_of_a_pipeline_that_never_fills():
    from megatron_sp.configure import configure, dry_run_lines
    cfg, _ = configure([*BASE, "--pipeline-model-parallel-size", "2", "--sequence-parallel-size", "2",
                        "--global-batch-size", "2"], 8)
    text = "\n".join(dry_run_lines(cfg, 8, 8))
    assert "world 8 = PP 2 x DP 2 x SP 2" in text and "pipeline groups (p2p):    [[0, 4], [1, 5], [2, 6], [3, 7]]" in text
    assert "stage 0 [0, 1, 2, 3]: layers 0-1 + embedding; stage 1 [4, 5, 6, 7]: layers 2-3 + output layer and loss" in text
    assert "5: stage 1 DP 0 SP 1" in text and "bubble (PP - 1) / (m + PP - 1) = 50%" in text
    assert "WARNING: 1 micro batches per step for 2 pipeline stages" in text
    cfg, _ = configure([*BASE, "--pipeline-model-parallel-size", "2", "--global-batch-size", "8"], 2)
    assert "WARNING" not in "\n".join(dry_run_lines(cfg, 2, 2))


@pytest.mark.parametrize("untie", [False, True])
def test_planner_counts_each_stages_parameters_exactly(untie):
    from megatron_sp.configure import configure
    from megatron_sp.plan.memory import stage_parameters
    cfg, _ = configure([*BASE, "--pipeline-model-parallel-size", "2", "--tokenizer-type", "NullTokenizer",
                        "--vocab-size", "300"] + (["--untie-embeddings-and-output-weights"] if untie else []), 2)
    for rank in range(2):
        stage = GPTStage(cfg.model, LocalAttention, cfg.padded_vocab_size, init_seed=0, pp_size=2, pp_rank=rank)
        assert stage_parameters(cfg, rank) == sum(p.numel() for p in stage.parameters())


def _run_flags(corpus, *extra, iters=5):
    """4 layers, global batch 8 of micro batches of 2: 4 micro batches per step at DP 1, 2 at DP 2. Gradients
    are clipped at every step (their norm is ~1), so the norm must cover every stage's parameters exactly once,
    and an Adam epsilon near the clipped gradients' size lets the clipping show in the losses (Adam alone
    would mostly cancel a wrong clipping factor)."""
    return flags(corpus, "--num-layers", "4", "--global-batch-size", "8", "--zero-stage", "1", "--eval-iters", "0",
                 "--clip-grad", "0.05", "--adam-eps", "1e-4", *extra, iters=iters)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The run without a pipeline, on one rank: its losses, and from TensorBoard its gradient norms and the
    validation loss of its end-of-training evaluation."""
    tb = tmp_path_factory.mktemp("reference_tb")
    losses = train(1, _run_flags(corpus, "--eval-iters", "1", "--log-interval", "1", "--tensorboard-dir", str(tb)))
    return losses, *_logged(tb)


def _logged(tb) -> tuple[list[float], float]:
    """(gradient norm of each step, final validation loss) from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb)).Reload()
    return [e.value for e in events.Scalars("grad-norm")], events.Scalars("validation/lm-loss")[-1].value


# (ranks, flags): each run's losses equal the reference's; ZeRO stages, recompute and SP strategies vary
PIPELINE_RUNS = [
    (2, ["--pipeline-model-parallel-size", "2", "--zero-stage", "0", "--recompute-granularity", "selective"]),
    (4, ["--pipeline-model-parallel-size", "4", "--zero-stage", "2", "--checkpoint-activations"]),
    (4, ["--pipeline-model-parallel-size", "2", "--sequence-parallel-size", "2", "--sequence-parallel-strategy", "ulysses"]),
    (4, ["--pipeline-model-parallel-size", "2", "--sequence-parallel-size", "2", "--sequence-parallel-strategy", "ring"]),
    # several micro batches in flight per stage, each with its own chain of host checkpoints
    (2, ["--pipeline-model-parallel-size", "2", "--checkpoint-activations", "--checkpoint-in-cpu",
         "--checkpoint-in-cpu-keep-layers", "1", "--mlp-tile-tokens", "24"]),
]


@pytest.mark.parametrize("world, extra", PIPELINE_RUNS, ids=lambda v: "-".join(v) if isinstance(v, list) else str(v))
def test_pipeline_training_equals_single_device(corpus, reference, tmp_path, world, extra):
    tb = tmp_path / "tb"
    losses = train(world, _run_flags(corpus, *extra, "--eval-iters", "1", "--log-interval", "1",
                                     "--tensorboard-dir", str(tb)))
    grad_norms, validation = _logged(tb)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(grad_norms, reference[1], rtol=1e-5)  # over all stages, the tied copy once
    np.testing.assert_allclose(validation, reference[2], rtol=1e-5)  # evaluation through the stages


def test_pipeline_with_compiled_layers_and_the_fused_gradient_norm_equals_single_device(corpus, reference,
                                                                                       tmp_path, monkeypatch):
    """--compile-layers compiles each stage's layers; --fused-grad-norm counts the tied copy once over the
    stages, as DeepSpeed's norm does (counting it on both ends makes every clipped step's norm too large)."""
    from megatron_sp.kernels import compiled
    monkeypatch.setattr(compiled, "LAYER_BACKEND", "aot_eager")  # the forked ranks inherit it
    tb = tmp_path / "tb"
    losses = train(2, _run_flags(corpus, "--pipeline-model-parallel-size", "2", "--compile-layers",
                                 "--fused-grad-norm", "--eval-iters", "1", "--log-interval", "1",
                                 "--tensorboard-dir", str(tb)))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(_logged(tb)[0], reference[1], rtol=1e-5)


def test_pipeline_with_data_parallel_resumes_exactly_and_keeps_the_tied_copies_equal(corpus, reference, tmp_path):
    """PP 2 x DP 2 saves at step 3 (each stage its own files, one `latest`) and resumes bit for bit; the same
    checkpoint resumes as PP 2 x SP 2 (the stage's 2 ranks split the other way). The word embedding's copies
    on the first and the last stage are bit-equal in every checkpoint."""
    import torch
    common = _run_flags(corpus, "--pipeline-model-parallel-size", "2")
    uninterrupted = train(4, common)
    np.testing.assert_allclose(uninterrupted, reference[0], rtol=1e-5)
    ckpt = tmp_path / "ckpt"
    assert train(4, [*common, "--save", str(ckpt), "--exit-interval", "3"]) == uninterrupted[:3]
    resumed_as_sp = train(4, [*common, "--load", str(ckpt), "--sequence-parallel-size", "2"])
    np.testing.assert_allclose(resumed_as_sp, uninterrupted[3:], rtol=1e-5)
    assert train(4, [*common, "--save", str(ckpt), "--load", str(ckpt)]) == uninterrupted[3:]
    assert (ckpt / "latest").read_text() == "global_step5"
    with pytest.raises(AssertionError, match="saved by a pipeline of 2 stage"):  # the ranks' one-line ConfigError
        train(2, [*_run_flags(corpus), "--load", str(ckpt)])
    convert = subprocess.run([sys.executable, "tools/universal_checkpoint.py", "--load", str(ckpt)],
                             capture_output=True, text=True)
    assert convert.returncode == 2 and "was saved by a pipeline" in convert.stderr
    assert convert.stderr.strip().count("\n") == 0
    for step in ("global_step3", "global_step5"):
        first, last = (torch.load(ckpt / step / f"mp_rank_0{r}_model_states.pt", weights_only=False)["module"]
                       for r in (0, 1))
        assert torch.equal(first["word_embeddings.weight"], last["word_embeddings.weight"])
        assert "final_norm.weight" in last and "final_norm.weight" not in first and "layers.2.mlp.fc1.weight" in last


def test_pipeline_with_packed_documents_equals_single_device(corpus):
    """--reset-attention-mask: every stage builds the documents from the micro batch it reads (nothing about
    them travels between stages); PP 2 x ring SP 2 gives the losses of one rank."""
    common = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss", "--zero-stage", "1",
              "--global-batch-size", "4"]
    reference = train(1, flags(corpus, *common, name="eodheavy", iters=3, seq=64))
    pipelined = ["--pipeline-model-parallel-size", "2", "--sequence-parallel-strategy", "ring",
                 "--sequence-parallel-size", "2"]
    np.testing.assert_allclose(train(4, flags(corpus, *common, *pipelined, name="eodheavy", iters=3, seq=64)),
                               reference, rtol=1e-5)
