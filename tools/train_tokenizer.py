"""Train a sentencepiece tokenizer model from a jsonl corpus (for the SentencePiece tokenizer types).

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 8000 \\
        --model-prefix data/processed/tok        # writes tok.model and tok.vocab

Documents are streamed to sentencepiece (one sentence per non-empty line of text), and at most
--input-sentence-size sentences are sampled, so training time and memory stay bounded.
The model gets the ids GPT pretraining expects: unk 0, bos 1, eos 2 (the eod token), no pad.
"""
import argparse
import os
import sys
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sp.data.cli import InputError, OneLineParser, document_texts, run_tool  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="jsonl file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys of each line to train on")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sentences sampled at most")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        raise InputError(f"--input {args.input}: no such file")
    if args.vocab_size < 16:
        raise InputError(f"--vocab-size must be at least 16, got {args.vocab_size}")
    return args


def sentences(path: str, keys: list[str]) -> Iterator[str]:
    """Non-empty lines of every document's texts; a malformed line is an InputError naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                texts = document_texts(raw, lineno, keys)
            except InputError as e:
                raise InputError(f"{path}: {e}") from None
            for text in texts or []:
                yield from (s for s in text.split("\n") if s.strip())


def train(args: argparse.Namespace) -> str:
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    bad_input: list[InputError] = []

    def guarded() -> Iterator[str]:  # sentencepiece turns an iterator's exception into a traceback string
        try:
            yield from sentences(args.input, args.json_keys)
        except InputError as e:
            bad_input.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(), model_prefix=args.model_prefix,
            vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage, input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True, num_threads=args.threads,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary larger than the corpus can support
        raise (bad_input[0] if bad_input else InputError(f"sentencepiece: {str(e).strip().splitlines()[-1]}")) from None
    if bad_input:
        raise bad_input[0]
    return args.model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    def body(a: list[str] | None) -> None:
        print(f"wrote {train(parse_args(a))}", file=sys.stderr)
    return run_tool(body, argv)


if __name__ == "__main__":
    sys.exit(main())
