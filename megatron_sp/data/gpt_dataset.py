"""Megatron-style GPT datasets: fixed-length samples cut across document boundaries, shuffled, cached.

For one indexed dataset and a range of its documents (a split) three arrays define every sample,
built exactly as Megatron(-DeepSpeed) builds them from `np.random.RandomState(seed)`:
    doc_idx      int32 [epochs * docs]  documents in reading order: each epoch's documents shuffled
                                        (a short final epoch is shuffled apart, so it is not mixed in)
    sample_idx   int64 [samples + 1, 2] (position in doc_idx, token offset) where sample i starts;
                                        sample i spans up to and including the start of sample i+1,
                                        so it has seq_length + 1 tokens (inputs and shifted labels)
    shuffle_idx  int64 [samples]        sample order
They are cached as .npy files named by a hash of everything that determines them; rank 0 builds
and saves them, the other ranks wait on `barrier` and load them (memory-mapped).
"""
import hashlib
import json
import logging
import os

import numpy as np

from megatron_sp.training.durable import temp_file_beside

from .blended import BlendedDataset, blending_indices, parse_blend, split_ranges
from .indexed import IndexedDataset, index_file_path

log = logging.getLogger(__name__)
_CACHE_FORMAT = 1  # bump when the index arrays' meaning changes, so old caches are not reused
SPLIT_NAMES = ("train", "valid", "test")


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give num_samples samples (consecutive samples share one token)."""
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def build_index_mappings(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) as Megatron builds them; see the module docstring."""
    tokens_per_epoch = int(sizes[documents].sum())
    if tokens_per_epoch <= 1:
        raise ValueError(f"{len(documents)} documents hold {tokens_per_epoch} tokens; need at least 2")
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    # A final epoch used for < 80 % of its samples is shuffled on its own (as Megatron).
    from_full_epochs = ((epochs - 1) * tokens_per_epoch - 1) // seq_length  # samples before the last epoch
    per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_last = epochs > 1 and num_samples - from_full_epochs < int(0.80 * per_epoch)

    def shuffled_docs(n_epochs: int) -> np.ndarray:
        out = np.tile(documents.astype(np.int32), n_epochs)
        rng.shuffle(out)
        return out

    if separate_last:
        doc_idx = np.concatenate([shuffled_docs(epochs - 1), shuffled_docs(1)])
    else:
        doc_idx = shuffled_docs(epochs)

    # Sample s starts at global token s * seq_length of the concatenated doc_idx documents; find the
    # document holding that token (searchsorted on the documents' end positions; right side skips
    # empty documents) and the offset in it. Equals Megatron's C++ build_sample_idx loop.
    total = (epochs * tokens_per_epoch - 1) // seq_length
    doc_sizes = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    starts = np.arange(total + 1, dtype=np.int64) * seq_length
    where = np.searchsorted(ends, starts, side="right")
    sample_idx = np.stack([where, starts - (ends[where] - doc_sizes[where])], axis=1)  # [total + 1, 2]
    sample_idx[0] = 0  # Megatron starts at (0, 0) even when doc_idx[0] is empty; same tokens either way

    first = from_full_epochs if separate_last else total
    head = np.arange(first, dtype=np.int64)
    rng.shuffle(head)
    if first == total:
        return doc_idx, sample_idx, head
    tail = np.arange(first, total, dtype=np.int64)
    rng.shuffle(tail)
    return doc_idx, sample_idx, np.concatenate([head, tail])


def default_cache_dir(prefix: str) -> str:
    """`index-cache/` beside the data when that folder is writable, else the user's cache folder."""
    data_dir = os.path.dirname(os.path.abspath(prefix))
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, "index-cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_sp", "index-cache")


class GPTDataset:
    """Samples of seq_length + 1 tokens from documents [start, end) of an indexed dataset."""

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], num_samples: int, seq_length: int,
                 seed: int, name: str, cache_dir: str | None, build: bool = True):
        self.indexed, self.name, self.seq_length = indexed, name, seq_length
        documents = np.arange(*doc_range, dtype=np.int64)
        key = dict(format=_CACHE_FORMAT, prefix=os.path.realpath(indexed.prefix), sequences=len(indexed),
                   idx_bytes=os.path.getsize(index_file_path(indexed.prefix)),
                   idx_mtime=os.stat(index_file_path(indexed.prefix)).st_mtime_ns, documents=list(doc_range),
                   num_samples=num_samples, seq_length=seq_length, seed=seed)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache_dir = cache_dir or default_cache_dir(indexed.prefix)
        stem = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}_{name}_{digest}")
        paths = [f"{stem}_{part}.npy" for part in ("doc_idx", "sample_idx", "shuffle_idx")]
        if all(os.path.isfile(p) for p in paths):
            self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(p, mmap_mode="r") for p in paths)
        else:
            arrays = build_index_mappings(indexed.sizes, documents, num_samples, seq_length, seed)
            if build:  # rank 0 saves; other ranks only get here when the cache is not shared
                _save_atomically(paths, arrays)
                log.info("built %s index for %s: %d samples, cached in %s", name, indexed.prefix,
                         len(arrays[2]), cache_dir)
            self.doc_idx, self.sample_idx, self.shuffle_idx = arrays

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> dict:
        j = int(self.shuffle_idx[i])
        (doc_f, off_f), (doc_l, off_l) = self.sample_idx[j], self.sample_idx[j + 1]
        get, docs = self.indexed.get, self.doc_idx
        if doc_f == doc_l:
            parts = [get(int(docs[doc_f]), int(off_f), int(off_l - off_f + 1))]
        else:  # rest of the first document, whole middle documents, head of the last one
            parts = ([get(int(docs[doc_f]), int(off_f))] + [get(int(docs[d])) for d in range(doc_f + 1, doc_l)]
                     + [get(int(docs[doc_l]), 0, int(off_l + 1))])
        return {"text": np.concatenate(parts, dtype=np.int64, casting="unsafe")}  # [seq_length + 1]


def _save_atomically(paths: list[str], arrays: tuple) -> None:
    """Write each array to a temporary file and rename it, so no reader ever sees a partial .npy."""
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    for path, arr in zip(paths, arrays):
        fd, tmp = temp_file_beside(path, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)


class MockGPTDataset:
    """--mock-data: num_samples samples of random tokens; sample i depends only on (seed, split, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed, self.split = (
            num_samples, seq_length, vocab_size, seed, split)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split, int(i)])
        return {"text": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)}


def _open(prefix: str, opened: dict[str, IndexedDataset]) -> IndexedDataset:
    if prefix not in opened:
        opened[prefix] = IndexedDataset(prefix)
    return opened[prefix]


def _build_split(paths: list[str], flag: str, ranges_of, num_samples: int, split: int,
                 opened: dict[str, IndexedDataset], common: dict):
    """One split (train/valid/test) over one prefix or a weighted blend; None when it is empty."""
    prefixes, weights = parse_blend(paths, flag)
    datasets = [_open(p, opened) for p in prefixes]
    if num_samples <= 0:
        return None
    name = SPLIT_NAMES[split]
    if len(prefixes) == 1:
        start, end = ranges_of(datasets[0])
        return GPTDataset(datasets[0], (start, end), num_samples, name=name, **common) if end > start else None
    # Blend: each part gets its share plus 0.5 % slack (as Megatron), and at least what blending draws.
    ds_index, ds_sample = blending_indices(weights, num_samples)
    draws = np.bincount(ds_index, minlength=len(datasets))  # [len(datasets)]; 0 for a weight of 0
    parts = []
    for indexed, w, drawn in zip(datasets, weights, draws.tolist()):
        start, end = ranges_of(indexed)
        if drawn and end <= start:
            raise ValueError(f"{flag}: {indexed.prefix} has no documents in the {name} split but weight {w:.3g}")
        need = max(int(np.ceil(w * num_samples * 1.005)), drawn)
        parts.append(GPTDataset(indexed, (start, end), need, name=name, **common) if drawn else None)
    return BlendedDataset(parts, ds_index, ds_sample)


def build_gpt_datasets(*, data_path: list[str] | None, split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], data_cache_path: str | None = None,
                       train_data_path: list[str] | None = None, valid_data_path: list[str] | None = None,
                       test_data_path: list[str] | None = None, mock: bool = False, vocab_size: int | None = None,
                       is_rank_zero: bool = True, barrier=lambda: None) -> tuple:
    """(train, valid, test) datasets; each may be None (no documents in its split, or 0 samples asked).

    Every rank calls this and `barrier` is called exactly once on every rank: all ranks first check
    the options and files (so a mistake is the same ValueError everywhere, before anyone waits), then
    rank 0 builds and caches the index arrays, then the others load them.
    ds[i] -> {"text": np.ndarray int64 [seq_length + 1]}.
    """
    if seq_length < 1:
        raise ValueError(f"--seq-length must be positive, got {seq_length}")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    if mock:
        if not vocab_size or vocab_size < 1:
            raise ValueError("--mock-data needs the vocabulary size (from --vocab-size or the tokenizer)")
        barrier()
        return tuple(MockGPTDataset(n, seq_length, vocab_size, seed, s) if n > 0 else None
                     for s, n in enumerate(num_samples))
    separate = (train_data_path, valid_data_path, test_data_path)
    if data_path and any(separate):
        raise ValueError("give either --data-path or --train/valid/test-data-path, not both")
    if not data_path and not any(separate):
        raise ValueError("no data: give --data-path, --train-data-path (with optional valid/test) or --mock-data")
    plans = []  # per split: (paths, flag, documents range of an indexed dataset) or None
    for s, name in enumerate(SPLIT_NAMES):
        if data_path:
            split_ranges(split, 1)  # a bad --split string fails here, before any file is read
            plans.append((data_path, "--data-path", lambda ds, s_=s: split_ranges(split, len(ds))[s_]))
        elif separate[s]:
            plans.append((separate[s], f"--{name}-data-path", lambda ds: (0, len(ds))))
        else:
            plans.append(None)
    opened: dict[str, IndexedDataset] = {}
    for plan in plans:  # every rank checks every file before the barrier
        if plan:
            for prefix in parse_blend(plan[0], plan[1])[0]:
                _open(prefix, opened)

    def build_all(build: bool) -> tuple:
        common = dict(seq_length=seq_length, seed=seed, cache_dir=data_cache_path, build=build)
        return tuple(_build_split(*plan, n, s, opened, common) if plan else None
                     for s, (plan, n) in enumerate(zip(plans, num_samples)))

    result = build_all(build=True) if is_rank_zero else None
    barrier()
    return result if is_rank_zero else build_all(build=False)
