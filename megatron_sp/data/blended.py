"""Weighted blends of datasets (--data-path 0.3 a 0.7 b) and the --split string, parsed the Megatron way."""
import math

import numpy as np


def parse_blend(paths: list[str], flag: str = "--data-path") -> tuple[list[str], list[float]]:
    """["a"] -> (["a"], [1.0]); ["0.3", "a", "0.7", "b"] -> (["a", "b"], [0.3, 0.7]) (weights normalised)."""
    if not paths:
        raise ValueError(f"{flag} is empty")
    if len(paths) == 1:
        return [paths[0]], [1.0]
    if len(paths) % 2:
        raise ValueError(f"{flag} blend must be 'weight prefix' pairs ('0.3 a 0.7 b'), got {len(paths)} "
                         f"entries: {' '.join(paths)}")
    weights, prefixes = [], []
    for w, p in zip(paths[0::2], paths[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"{flag} blend must be 'weight prefix' pairs ('0.3 a 0.7 b'); {w!r} is not a weight") from None
        if not weight >= 0 or math.isinf(weight):
            raise ValueError(f"{flag} weight {w!r} must be a finite number >= 0")
        weights.append(weight)
        prefixes.append(p)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{flag} weights add up to 0")
    return prefixes, [w / total for w in weights]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """--split "949,50,1" -> [(0, a), (a, b), (b, num_documents)]: train/valid/test document ranges.

    Same rounding as Megatron: each share is rounded, then every boundary is shifted so the last
    one lands exactly on num_documents."""
    parts = split.replace("/", ",").split(",")
    try:
        shares = [float(s) for s in parts if s.strip()]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers like 949,50,1") from None
    if not shares or len(shares) > 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers like 949,50,1")
    shares = (shares + [0.0, 0.0])[:3]
    total = sum(shares)
    bounds = [0]
    for s in shares:
        bounds.append(bounds[-1] + int(round(s / total * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [0] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset (int16 [size]) and which of its samples (int64 [size]) each blended sample is.

    Dataset d's k-th sample is "due" at k / w_d; all samples are ordered by when they are due (ties:
    lower d first). Every prefix of the result holds each dataset within one sample of its share,
    and the order depends only on the weights, never on the reader (DP rank, restart)."""
    caps = [int(math.ceil(w * size)) + 2 if w > 0 else 0 for w in weights]
    due = np.concatenate([np.arange(c, dtype=np.float64) / w for c, w in zip(caps, weights) if c])
    ds = np.concatenate([np.full(c, d, np.int16) for d, c in enumerate(caps) if c])
    k = np.concatenate([np.arange(c, dtype=np.int64) for c in caps if c])
    order = np.lexsort((ds, due))[:size]  # primary key: due time; secondary: dataset id
    return ds[order], k[order]


class BlendedDataset:
    """Sample i is sample dataset_sample_index[i] of datasets[dataset_index[i]] (see blending_indices).

    A dataset never drawn (weight 0) may be None."""

    def __init__(self, datasets: list, dataset_index: np.ndarray, dataset_sample_index: np.ndarray):
        self.datasets, self.dataset_index, self.dataset_sample_index = datasets, dataset_index, dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
