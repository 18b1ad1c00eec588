"""Tokenize a jsonl corpus into Megatron's indexed format: <output-prefix>_<key>_document.{bin,idx}.

Same flags and same output bytes as Megatron-DeepSpeed's tools/preprocess_data.py (without
--split-sentences): one document per input line, one sequence per document, empty documents
skipped, eod appended with --append-eod. Streams: N worker processes tokenize chunks of lines while
the main process writes their tokens to .bin in input order; at most a few chunks are in flight, so
memory stays flat however large the corpus (only 12 bytes per document are kept, for the .idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
"""
import argparse
import collections
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sp.data.cli import InputError, OneLineParser, document_texts, run_tool  # noqa: E402
from megatron_sp.data.indexed import IndexedDatasetWriter, token_dtype  # noqa: E402
from megatron_sp.data.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer  # noqa: E402

CHUNK_LINES = 256          # lines per task handed to a worker
CHUNK_BYTES = 4 << 20      # ... or fewer, when the lines are long
IN_FLIGHT_PER_WORKER = 4   # bound on queued chunks: keeps memory flat and workers busy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="jsonl file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys of each line to tokenize")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="sentencepiece model (SentencePiece/GPTSentencePiece), or a "
                                             "Hugging Face tokenizer directory (HFTokenizer)")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are < this; eod = this")
    g.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx}; files already there are replaced only "
                        "when the run succeeds")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="accepted for compatibility")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    args = p.parse_args(argv)
    if args.workers < 1 or args.log_interval < 1:
        raise InputError(f"--workers and --log-interval must be >= 1, got {args.workers} and {args.log_interval}")
    if not os.path.isfile(args.input):
        raise InputError(f"--input {args.input}: no such file")
    return args


# ---- worker side -------------------------------------------------------------------------------
_tok = None
_opts: dict = {}


def _init_worker(tokenizer, keys: list[str], append_eod: bool, dtype: type) -> None:
    global _tok, _opts
    _tok = tokenizer  # the main process's, inherited through fork
    _opts = dict(keys=keys, append_eod=append_eod, dtype=dtype)


def _encode_chunk(chunk: tuple[int, list[bytes]]) -> tuple[dict, int, int] | str:
    """(first line number, raw lines) -> ({key: (tokens concatenated, lengths)}, docs, bytes), or an error line."""
    first_line, lines = chunk
    ids: dict[str, list[list[int]]] = {k: [] for k in _opts["keys"]}
    n_docs = 0
    for lineno, raw in enumerate(lines, first_line):
        try:
            texts = document_texts(raw, lineno, _opts["keys"])
        except InputError as e:
            return str(e)
        if texts is None:
            continue
        n_docs += 1
        for key, text in zip(_opts["keys"], texts):
            try:
                seq = _tok.tokenize(text)
            except TokenizerError as e:
                return f"line {lineno}: {e}"
            if seq and _opts["append_eod"]:
                seq.append(_tok.eod)
            if seq:  # Megatron skips empty documents
                ids[key].append(seq)
    out = {}
    for key, seqs in ids.items():
        flat = np.fromiter((t for s in seqs for t in s), np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= _tok.vocab_size):
            return f"lines {first_line}-{first_line + len(lines) - 1}: token id out of range [0, {_tok.vocab_size})"
        out[key] = (flat.astype(_opts["dtype"]), np.array([len(s) for s in seqs], np.int32))
    return out, n_docs, sum(len(r) for r in lines)


# ---- main side ---------------------------------------------------------------------------------
def _chunks(path: str) -> Iterator[tuple[int, list[bytes]]]:
    with open(path, "rb") as f:
        lines, size, first = [], 0, 1
        for lineno, line in enumerate(f, 1):
            lines.append(line)
            size += len(line)
            if len(lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
                yield first, lines
                lines, size, first = [], 0, lineno + 1
        if lines:
            yield first, lines


def _ordered_results(args: argparse.Namespace, tokenizer, dtype: type) -> Iterator:
    """Encoded chunks in input order; with workers > 1 at most workers*IN_FLIGHT_PER_WORKER are queued."""
    init = (tokenizer, args.json_keys, args.append_eod, dtype)
    if args.workers == 1:
        _init_worker(*init)
        yield from map(_encode_chunk, _chunks(args.input))
        return
    with mp.get_context("fork").Pool(args.workers, _init_worker, init) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(args.input):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= args.workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(args: argparse.Namespace) -> dict[str, str]:
    """Write one indexed dataset per json key; returns {key: output prefix}."""
    tokenizer = build_tokenizer(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                vocab_file=args.vocab_file, merge_file=args.merge_file,
                                vocab_size=args.vocab_size)  # fail here, before any worker or output file
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    writers = {k: IndexedDatasetWriter(p, dtype) for k, p in prefixes.items()}
    start = time.time()
    docs = nbytes = logged = 0
    try:
        for result in _ordered_results(args, tokenizer, dtype):
            if isinstance(result, str):
                raise InputError(f"{args.input}: {result}")
            encoded, n, b = result
            for key, (tokens, lengths) in encoded.items():
                writers[key].add_documents(tokens, lengths)
            docs, nbytes = docs + n, nbytes + b
            if docs // args.log_interval > logged:  # a line each time another log-interval is passed
                logged = docs // args.log_interval
                _progress(docs, nbytes, time.time() - start)
        if empty := [key for key, w in writers.items() if w.num_sequences == 0]:  # a 0-document dataset trains nothing
            raise InputError(f"{args.input}: no document with text under {', '.join(map(repr, empty))} "
                             f"({docs} documents read); nothing written")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    _progress(docs, nbytes, time.time() - start, done=True)
    for key, prefix in prefixes.items():
        print(f"wrote {prefix}.bin/.idx ({writers[key].num_sequences} documents, {dtype.__name__})", file=sys.stderr)
    return prefixes


def _progress(docs: int, nbytes: int, elapsed: float, done: bool = False) -> None:
    elapsed = max(elapsed, 1e-9)
    print(f"{'done: ' if done else ''}processed {docs} documents ({docs / elapsed:.1f} docs/s, "
          f"{nbytes / elapsed / 1e6:.2f} MB/s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda a: preprocess(parse_args(a)), argv, expected=(TokenizerError,))


if __name__ == "__main__":
    sys.exit(main())
