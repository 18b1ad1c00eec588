"""Small training runs on forked CPU ranks, shared by the training and checkpoint tests: a learnable corpus,
the flags of a tiny model over it, and train() that runs megatron_sp.configure + trainer.run on N ranks."""
import deepspeed.ops
import numpy as np
# What a run imports on its way (the trainer; DeepSpeed's optimizer set-up reaches torch.compile), imported once
# here so that the forked ranks of every run inherit it instead of each importing it again (seconds of CPU each)
import torch._dynamo  # noqa: F401
import torch._inductor.compile_fx  # noqa: F401

from megatron_sp.data.indexed import IndexedDatasetWriter
from megatron_sp.training import trainer  # noqa: F401
from tests.distributed import run_ranks

deepspeed.ops.__compatible_ops__  # noqa: B018 - the first read probes DeepSpeed's C++ ops (compiling test programs)

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
    from megatron_sp.configure import configure
    from megatron_sp.training.trainer import run
    cfg, tokenizer = configure(argv, world)
    return run(cfg, tokenizer)["losses"]


def train(world, argv) -> list[float]:
    losses = run_ranks(world, _train, argv)
    assert all(other == losses[0] for other in losses[1:]), "ranks disagree on the loss"
    return losses[0]
