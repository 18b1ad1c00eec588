"""GPT dataset: Megatron's index mappings, splits, blends, caching across ranks, sampler resume and DP layouts."""
import numpy as np
import pytest
import torch

from megatron_sp.data.blended import parse_blend, split_ranges
from megatron_sp.data.gpt_dataset import build_gpt_datasets, build_index_mappings
from megatron_sp.data.indexed import IndexedDatasetWriter
from megatron_sp.data.loader import PretrainingSampler, build_data_iterator


def megatron_sample_idx(sizes, doc_idx, seq_length, total):
    """Megatron's build_sample_idx loop (helpers.cpp), transcribed as the reference."""
    out = np.zeros((total + 1, 2), np.int64)
    di = off = 0
    for s in range(1, total + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_len = sizes[doc_idx[di]] - off
            remaining -= doc_len
            if remaining <= 0:
                off += remaining + doc_len - 1
                remaining = 0
            else:
                di, off = di + 1, 0
        out[s] = (di, off)
    return out


def make_corpus(path, n_docs: int, seed: int, tag: int = 0, max_len: int = 40) -> str:
    """Documents whose tokens encode (tag, document, position) so every sample can be traced back."""
    rng = np.random.default_rng(seed)
    prefix = str(path)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in range(n_docs):
            n = int(rng.integers(1, max_len))
            w.add_document(tag * 10**8 + d * 1000 + np.arange(n))
    return prefix


def test_index_mappings_match_megatron_loop():
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = rng.integers(0, 30, int(rng.integers(2, 40))).astype(np.int32)
        sizes[0] = max(sizes[0], 2)
        seq, want = int(rng.integers(1, 25)), int(rng.integers(1, 200))
        doc_idx, sample_idx, shuffle_idx = build_index_mappings(sizes, np.arange(len(sizes)), want, seq, 1234)
        epochs = len(doc_idx) // len(sizes)
        total = (epochs * int(sizes.sum()) - 1) // seq
        np.testing.assert_array_equal(sample_idx, megatron_sample_idx(sizes, doc_idx, seq, total))
        assert total >= want and sorted(shuffle_idx.tolist()) == list(range(total))
        # every epoch holds each document exactly once
        np.testing.assert_array_equal(np.bincount(doc_idx, minlength=len(sizes)), np.full(len(sizes), epochs))


def test_samples_are_contiguous_token_runs(tmp_path):
    prefix = make_corpus(tmp_path / "c", 50, seed=1)
    train, valid, test = build_gpt_datasets(data_path=[prefix], split="1", seq_length=16, seed=7,
                                            num_samples=(300, 0, 0), data_cache_path=str(tmp_path / "cache"))
    assert valid is None and test is None and len(train) >= 300
    seen = set()
    for i in range(len(train)):
        text = train[i]["text"]
        assert text.dtype == np.int64 and text.shape == (17,)
        seen.add(int(text[0]))
        steps = np.diff(text)
        assert np.all((steps == 1) | (text[1:] % 1000 == 0))  # within a document +1, else a new document starts
    assert len(seen) > 200  # shuffled, not the same sample over and over


def test_splits_disjoint_by_document(tmp_path):
    prefix = make_corpus(tmp_path / "c", 400, seed=2)
    assert split_ranges("949,50,1", 400) == [(0, 380), (380, 400), (400, 400)]
    assert split_ranges("80,10,10", 400) == [(0, 320), (320, 360), (360, 400)]
    datasets = build_gpt_datasets(data_path=[prefix], split="80,10,10", seq_length=32, seed=3,
                                  num_samples=(500, 100, 100), data_cache_path=str(tmp_path / "cache"))
    docs = [{int(t) // 1000 for i in range(len(ds)) for t in ds[i]["text"]} for ds in datasets]
    assert docs[0] <= set(range(320)) and docs[1] <= set(range(320, 360)) and docs[2] <= set(range(360, 400))
    assert len(docs[0]) == 320  # every training document is used


def test_blend_proportions(tmp_path):
    a = make_corpus(tmp_path / "a", 100, seed=3, tag=1)
    b = make_corpus(tmp_path / "b", 100, seed=4, tag=2)
    c = make_corpus(tmp_path / "c", 100, seed=5, tag=3)
    assert parse_blend(["3", a, "6", b, "1", c])[1] == [0.3, 0.6, 0.1]
    train, _, _ = build_gpt_datasets(data_path=["3", a, "6", b, "1", c], split="100,0,0", seq_length=8, seed=1,
                                     num_samples=(10000, 0, 0), data_cache_path=str(tmp_path / "cache"))
    assert len(train) == 10000
    tags = np.array([int(train[i]["text"][0]) // 10**8 for i in range(10000)])
    shares = np.bincount(tags, minlength=4)[1:] / 10000
    np.testing.assert_allclose(shares, [0.3, 0.6, 0.1], atol=0.01)
    first = np.bincount(tags[:1000], minlength=4)[1:] / 1000  # interleaved, not one dataset after another
    np.testing.assert_allclose(first, [0.3, 0.6, 0.1], atol=0.01)


def test_blend_zero_weight_is_never_drawn(tmp_path):
    a = make_corpus(tmp_path / "a", 50, seed=3, tag=1)
    b = make_corpus(tmp_path / "b", 50, seed=4, tag=2)
    train, _, _ = build_gpt_datasets(data_path=["1", a, "0", b], split="100,0,0", seq_length=8, seed=1,
                                     num_samples=(500, 0, 0), data_cache_path=str(tmp_path / "cache"))
    assert len(train) == 500
    assert {int(train[i]["text"][0]) // 10**8 for i in range(500)} == {1}

def test_cache_built_by_rank_zero_and_loaded_by_others(tmp_path):
    prefix = make_corpus(tmp_path / "c", 60, seed=6)
    kw = dict(data_path=[prefix], split="90,10,0", seq_length=12, seed=9, num_samples=(200, 20, 0),
              data_cache_path=str(tmp_path / "cache"))
    calls = []
    r0 = build_gpt_datasets(**kw, is_rank_zero=True, barrier=lambda: calls.append("r0"))
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 6 and all(f.endswith(".npy") for f in files)

    def other_barrier():  # rank 1 must not have built anything before the barrier
        calls.append("r1")
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files

    r1 = build_gpt_datasets(**kw, is_rank_zero=False, barrier=other_barrier)
    assert calls == ["r0", "r1"]
    assert isinstance(r1[0].shuffle_idx, np.memmap)  # loaded, not rebuilt
    for a, b in zip(r0[:2], r1[:2]):
        for i in (0, 5, len(a) - 1):
            np.testing.assert_array_equal(a[i]["text"], b[i]["text"])
    other = build_gpt_datasets(**{**kw, "seed": 10})  # a different seed is a different cache entry
    assert len(list((tmp_path / "cache").iterdir())) == 12
    assert not np.array_equal(other[0][0]["text"], r0[0][0]["text"])


def test_default_cache_next_to_data(tmp_path):
    prefix = make_corpus(tmp_path / "c", 20, seed=8)
    build_gpt_datasets(data_path=[prefix], split="1", seq_length=8, seed=1, num_samples=(10, 0, 0))
    assert len(list((tmp_path / "index-cache").glob("c_train_*.npy"))) == 3


def test_separate_paths_and_mock(tmp_path):
    a = make_corpus(tmp_path / "a", 30, seed=1, tag=1)
    b = make_corpus(tmp_path / "b", 30, seed=2, tag=2)
    train, valid, test = build_gpt_datasets(data_path=None, split="949,50,1", seq_length=8, seed=1,
                                            num_samples=(50, 10, 10), train_data_path=[a], valid_data_path=[b],
                                            data_cache_path=str(tmp_path / "cache"))
    assert test is None and int(train[0]["text"][0]) // 10**8 == 1 and int(valid[0]["text"][0]) // 10**8 == 2
    m1 = build_gpt_datasets(data_path=None, split="1", seq_length=8, seed=1, num_samples=(5, 5, 0), mock=True,
                            vocab_size=100)
    m2 = build_gpt_datasets(data_path=None, split="1", seq_length=8, seed=1, num_samples=(5, 5, 0), mock=True,
                            vocab_size=100)
    assert m1[2] is None and len(m1[0]) == 5
    np.testing.assert_array_equal(m1[0][3]["text"], m2[0][3]["text"])
    assert not np.array_equal(m1[0][3]["text"], m1[1][3]["text"])
    assert m1[0][3]["text"].shape == (9,) and m1[0][3]["text"].max() < 100


@pytest.mark.parametrize("kwargs,words", [
    (dict(data_path=["/no/such/prefix"]), "/no/such/prefix"),
    (dict(data_path=["0.3", "a", "0.7"]), "3 entries"),
    (dict(data_path=["x", "a", "0.7", "b"]), "'x' is not a weight"),
    (dict(data_path=None), "no data"),
    (dict(data_path=None, mock=True), "--mock-data needs"),
    (dict(data_path=["a"], split="90,x"), "--split"),
])
def test_clear_errors(kwargs, words):
    base = dict(split="949,50,1", seq_length=8, seed=1, num_samples=(10, 1, 1))
    with pytest.raises(ValueError) as e:
        build_gpt_datasets(**{**base, **kwargs})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sampler_resume_and_dp_layouts():
    def batches(consumed, micro, dp_rank, dp, total=100):
        return list(PretrainingSampler(total, consumed, micro, dp_rank, dp))

    full = batches(0, 4, 0, 1)
    assert full[5] == [20, 21, 22, 23] and len(full) == 25
    assert batches(12, 4, 0, 1) == full[3:]  # resume at a consumed count
    assert batches(0, 3, 0, 1, total=10)[-1] == [6, 7, 8]  # drop last incomplete batch
    # DP=2, micro 2: each global batch of 4 is split [r0, r0, r1, r1]; the union equals DP=1's batch of 4
    r0, r1 = batches(8, 2, 0, 2), batches(8, 2, 1, 2)
    assert [a + b for a, b in zip(r0, r1)] == batches(8, 4, 0, 1)
    with pytest.raises(ValueError):
        PretrainingSampler(10, 0, 2, 2, 2)


def test_iterator_same_samples_for_dp1_and_dp2(tmp_path):
    prefix = make_corpus(tmp_path / "c", 80, seed=3)
    train, _, _ = build_gpt_datasets(data_path=[prefix], split="1", seq_length=16, seed=5, num_samples=(64, 0, 0),
                                     data_cache_path=str(tmp_path / "cache"))
    consumed = 24
    one = list(build_data_iterator(train, consumed, 4, 0, 1))
    two = [list(build_data_iterator(train, consumed, 2, r, 2)) for r in range(2)]
    assert len(one) == len(two[0]) == (len(train) - consumed) // 4
    for step, batch in enumerate(one):
        assert batch["text"].dtype == torch.int64 and batch["text"].shape == (4, 17)
        torch.testing.assert_close(torch.cat([two[0][step]["text"], two[1][step]["text"]]), batch["text"])
    resumed = list(build_data_iterator(train, consumed + 8, 4, 0, 1))
    torch.testing.assert_close(resumed[0]["text"], one[2]["text"])


def test_cache_and_atomic_files_are_readable_by_the_team(tmp_path):
    """Index caches and atomically replaced files get open()'s permissions (0666 less the umask), not the 0600
    of the temporary file they are renamed from: a shared --data-cache-path or --save stays readable."""
    import os
    from megatron_sp.training.durable import write_atomically
    old = os.umask(0o022)
    try:
        prefix = make_corpus(tmp_path / "c", 50, seed=1)
        build_gpt_datasets(data_path=[prefix], split="1", seq_length=16, seed=7, num_samples=(30, 0, 0),
                           data_cache_path=str(tmp_path / "cache"))
        write_atomically(str(tmp_path / "latest"), "global_step7")
    finally:
        os.umask(old)
    cached = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]
    assert cached and not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp")]
    for path in [tmp_path / "cache" / f for f in cached] + [tmp_path / "latest"]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path
