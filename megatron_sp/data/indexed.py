"""Megatron's memory-mapped indexed dataset (<prefix>.bin / <prefix>.idx): byte-compatible reader and writer.

Layout of <prefix>.idx (little endian), as Megatron-LM / Megatron-DeepSpeed write it:
    b"MMIDIDX\\x00\\x00"   magic, 9 bytes
    <Q 1                   version
    <B code                dtype of the tokens in .bin (DTYPES below)
    <Q S                   number of sequences
    <Q D + 1               length of the document index (it starts with a leading 0)
    int32[S]               sequence lengths, in tokens
    int64[S]               byte offset of each sequence in .bin
    int64[D + 1]           document index: sequence number where each document starts, then S
<prefix>.bin is every sequence's tokens back to back. With one sequence per document (how
tools/preprocess_data.py and Megatron's preprocess_data.py without --split-sentences write it)
sequence i is document i.
"""
import array
import os
import struct
from typing import BinaryIO, Iterable

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float64, 7: np.float32, 8: np.uint16}
CODES: dict[type, int] = {dtype: code for code, dtype in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index length
PARTIAL = ".partial"  # suffix of the files an IndexedDatasetWriter has not finished


class IndexedDataError(ValueError):
    """A .bin/.idx pair that cannot be read; the message names the file and what is wrong."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int | None) -> type:
    """The .bin dtype Megatron picks for a vocabulary: uint16 when it fits (< 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDataset:
    """Zero-copy reader: ds[i] is a read-only view of sequence i straight from the mapped .bin."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDataError(f"{path}: no such file (data prefix {prefix!r}; a data path is the prefix "
                                       f"of a .bin/.idx pair, e.g. my-corpus_text_document)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise IndexedDataError(f"{idx_path}: truncated index ({idx_size} bytes, header needs {_HEADER.size})")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(head)
        if magic != MAGIC:
            raise IndexedDataError(f"{idx_path}: not a Megatron indexed dataset index (magic {magic!r}, "
                                   f"expected {MAGIC!r})")
        if version != VERSION:
            raise IndexedDataError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPES:
            raise IndexedDataError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        need = _HEADER.size + n_seq * (4 + 8) + n_doc_idx * 8
        if idx_size < need:
            raise IndexedDataError(f"{idx_path}: truncated index ({idx_size} bytes, header says "
                                   f"{n_seq} sequences and {n_doc_idx} document entries = {need} bytes)")
        # The whole .idx is mapped once; the three arrays are views into it (no copy, no parse).
        self._idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sizes = np.frombuffer(self._idx_map, np.int32, n_seq, off)                 # [S]
        self.pointers = np.frombuffer(self._idx_map, np.int64, n_seq, off + 4 * n_seq)  # [S] bytes
        self.doc_idx = np.frombuffer(self._idx_map, np.int64, n_doc_idx, off + 12 * n_seq)  # [D+1]
        bin_size = os.path.getsize(bin_path)
        expect = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_size != expect:
            raise IndexedDataError(f"{bin_path}: size {bin_size} bytes does not match its index "
                                   f"{idx_path} ({expect} bytes for {n_seq} sequences of {self.dtype.name})")
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, a view into the mapped .bin."""
        size = int(self.sizes[i])
        length = size - offset if length is None else min(length, size - offset)  # never into sequence i+1
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


class IndexedDatasetWriter:
    """Streams tokens into <prefix>.bin as they come and keeps only sequence lengths; .idx on close.

    Both files are written under a ".partial" suffix and renamed into place by close(), so a run that
    fails (abort) leaves an existing dataset at <prefix> exactly as it was and no half-written one.

    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(ids)                        # one document of one sequence
        w.add_documents(tokens_concat, lengths)    # many documents at once (what preprocessing uses)
    Memory: 12 bytes per document (int32 length + int64 document-index entry), nothing per token.
    """

    def __init__(self, prefix: str, dtype: type = np.int32):
        if np.dtype(dtype).type not in CODES:
            raise ValueError(f"dtype {np.dtype(dtype).name} cannot be stored in an indexed dataset")
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin: BinaryIO = open(data_file_path(prefix) + PARTIAL, "wb")
        self._sizes = array.array("i")       # int32 [S] sequence lengths
        self._docs = array.array("q", [0])   # int64 [D + 1] document index, leading 0
        self.num_sequences = 0

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close the document with end_document)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)
        self.num_sequences += 1

    def end_document(self) -> None:
        self._docs.append(self.num_sequences)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) one-sequence documents whose tokens are concatenated in `tokens`."""
        lengths = np.asarray(lengths, np.int32)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, got {tokens.size}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.frombytes(lengths.tobytes())
        self._docs.frombytes((self.num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64)).tobytes())
        self.num_sequences += len(lengths)

    def close(self) -> None:
        """Finish .bin, write .idx, and move both into place (replacing a dataset already there)."""
        if self._bin.closed:
            return
        self._bin.close()
        write_index(index_file_path(self.prefix) + PARTIAL, self.dtype, np.frombuffer(self._sizes, np.int32),
                    np.frombuffer(self._docs, np.int64))
        for path in (data_file_path(self.prefix), index_file_path(self.prefix)):
            os.replace(path + PARTIAL, path)

    def abort(self) -> None:
        """Stop and delete what this writer wrote; a dataset already at the prefix is left untouched."""
        self._bin.close()
        for path in (data_file_path(self.prefix), index_file_path(self.prefix)):
            if os.path.exists(path + PARTIAL):
                os.remove(path + PARTIAL)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


def write_index(path: str, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write a .idx for sequences of `sizes` tokens stored back to back in dtype."""
    sizes = np.asarray(sizes, np.int32)
    pointers = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODES[np.dtype(dtype).type], len(sizes), len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, np.int64).tobytes(order="C"))

