"""Document lengths of the benchmarks' packed samples (--doc-len), shared by bench_attention and bench_e2e.

--doc-len N packs documents of N tokens (the last one cut to fit); --doc-len PREFIX takes the document
lengths of an indexed dataset (e.g. data/processed/sample_text_document from data/prepare_sample.sh:
the shipped novels' chapters, ~3.5k tokens on average), in corpus order from a seeded start, wrapping.
"""
import argparse

import numpy as np
import torch


def parse_doc_len(text: str):
    """--doc-len's argparse type: a positive int, or an indexed dataset prefix with documents (checked
    here, so a bad value is argparse's one usage error line)."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return int(text)
    from megatron_sp.data.indexed import IndexedDataset
    try:
        lengths = corpus_document_lengths(IndexedDataset(text))
    except ValueError as err:  # IndexedDataError: missing or damaged files
        raise argparse.ArgumentTypeError(str(err)) from None
    if not (lengths > 0).any():
        raise argparse.ArgumentTypeError(f"{text}: the dataset holds no documents")
    return text


def corpus_document_lengths(dataset) -> np.ndarray:
    """Tokens per document of an IndexedDataset (a document may span several sequences)."""
    per_sequence = np.concatenate([[0], np.cumsum(dataset.sizes, dtype=np.int64)])
    return np.diff(per_sequence[np.asarray(dataset.doc_idx)])


def document_lengths(spec, seq_length: int, seed: int = 0) -> list[int]:
    """Lengths of the documents that fill one sample of seq_length tokens under --doc-len `spec`."""
    if isinstance(spec, int):
        pool = np.array([spec])
        start = 0
    else:
        from megatron_sp.data.indexed import IndexedDataset
        pool = corpus_document_lengths(IndexedDataset(spec))
        pool = pool[pool > 0]
        start = int(np.random.default_rng(seed).integers(len(pool)))
    lengths, total = [], 0
    while total < seq_length:
        length = min(int(pool[(start + len(lengths)) % len(pool)]), seq_length - total)
        lengths.append(length)
        total += length
    return lengths


def document_ids_of(lengths: list[int], batch: int = 1) -> torch.Tensor:
    """int32 [batch, sum(lengths)]: the document index of every token (the same documents in every sample)."""
    ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    return ids.expand(batch, -1).contiguous()


def eod_positions(lengths: list[int]) -> np.ndarray:
    """Where each document's EOD goes in a sample: its last token (the token after starts the next one)."""
    return np.cumsum(lengths) - 1
