"""Megatron .bin/.idx format: our writer and reader against an independent reader of the spec, and corrupt files."""
import struct

import numpy as np
import pytest

from megatron_sp.data.indexed import IndexedDataError, IndexedDataset, IndexedDatasetWriter, token_dtype


def spec_read(prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Independent reader written from the format description, not from our module."""
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8))[0] == 1
        dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                 6: np.float64, 7: np.float32, 8: np.uint16}[struct.unpack("<B", f.read(1))[0]]
        n_seq, n_doc = struct.unpack("<QQ", f.read(16))
        sizes = np.frombuffer(f.read(4 * n_seq), np.int32)
        pointers = np.frombuffer(f.read(8 * n_seq), np.int64)
        doc_idx = np.frombuffer(f.read(8 * n_doc), np.int64)
        assert f.read() == b""  # nothing after the document index
    data = open(prefix + ".bin", "rb").read()
    seqs = [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(sizes, pointers)]
    return sizes, pointers, doc_idx, seqs


def write_docs(prefix: str, docs: list[list[int]], dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs[: len(docs) // 2]:
            w.add_document(d)  # one at a time ...
        rest = docs[len(docs) // 2:]  # ... and in bulk, as preprocessing writes them
        w.add_documents(np.concatenate([np.asarray(d) for d in rest]), np.array([len(d) for d in rest]))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_matches_independent_reader(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(37)]
    prefix = str(tmp_path / "corpus")
    write_docs(prefix, docs, dtype)
    sizes, pointers, doc_idx, seqs = spec_read(prefix)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(doc_idx, np.arange(len(docs) + 1))  # leading 0, then one per document
    np.testing.assert_array_equal(ds.sizes, sizes)
    np.testing.assert_array_equal(ds.pointers, pointers)
    np.testing.assert_array_equal(ds.doc_idx, doc_idx)
    assert len(ds) == ds.num_documents == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(seqs[i], d)
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.get(i, 1, 3), d[1:4])
    assert not ds[0].flags.writeable  # a view of the mapped file, not a copy


def test_multi_sequence_documents_and_dtype_choice(tmp_path):
    prefix = str(tmp_path / "s")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_item([1, 2]), w.add_item([3]), w.end_document(), w.add_item([4, 5, 6]), w.end_document()
    _, pointers, doc_idx, _ = spec_read(prefix)
    np.testing.assert_array_equal(doc_idx, [0, 2, 3])
    np.testing.assert_array_equal(pointers, [0, 8, 12])
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32 and token_dtype(None) == np.int32


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetWriter(prefix, np.uint16):
        pass
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0


def _corrupt(tmp_path, how: str) -> tuple[str, str]:
    prefix = str(tmp_path / "c")
    write_docs(prefix, [[1, 2, 3], [4, 5], [6]])
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    raw = bytearray(open(idx, "rb").read())
    if how == "magic":
        raw[:9] = b"NOTMAGIC!"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 42
    elif how == "truncated_idx":
        raw = raw[:-5]
    elif how == "short_header":
        raw = raw[:20]
    elif how == "truncated_bin":
        open(bin_, "r+b").truncate(4)
        return prefix, bin_
    open(idx, "wb").write(bytes(raw))
    return prefix, idx


@pytest.mark.parametrize("how,words", [("magic", "magic"), ("version", "version"), ("dtype", "dtype code 42"),
                                       ("truncated_idx", "truncated"), ("short_header", "truncated"),
                                       ("truncated_bin", "does not match")])
def test_corrupt_files_give_one_line_error_naming_file(tmp_path, how, words):
    prefix, bad_file = _corrupt(tmp_path, how)
    with pytest.raises(IndexedDataError) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in msg and bad_file in msg and words in msg


def test_missing_file(tmp_path):
    with pytest.raises(IndexedDataError, match="no such file"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_writer_error_leaves_no_files(tmp_path):
    prefix = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(prefix)) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_writer_error_leaves_an_existing_dataset_untouched(tmp_path):
    prefix = str(tmp_path / "x")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_document([1, 2, 3])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.int32) as w:
            w.add_document([9] * 1000)
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
