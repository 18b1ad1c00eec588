"""Tokenizers behind Megatron's --tokenizer-type names, with the same ids, vocab sizes and eod tokens.

    SentencePieceTokenizer     sentencepiece model + Megatron's special tokens (<CLS> <SEP> <EOD> <MASK>
                               and pad/bos/eos pieces) appended after the model's pieces when missing
    GPTSentencePieceTokenizer  sentencepiece model as is; eod is the model's eos id
    GPT2BPETokenizer           GPT-2 byte-level BPE from vocab.json + merges.txt (HF tokenizers); eod <|endoftext|>
    HFTokenizer                a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json), e.g.
                               Llama 3's; ids as transformers' fast tokenizer encodes (its bos included); eod
                               its eos token; vocab_size counts the added special tokens
    NullTokenizer              text is whitespace-separated ids; vocab_size = --vocab-size + 1, eod = --vocab-size
"""
import json
import os

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer", "HFTokenizer",
                   "NullTokenizer")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built from the given options; one readable line."""


def _need_file(flag: str, path: str | None, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: no such file")
    return path


class _SentencePiece:
    """GPTSentencePieceTokenizer: the sentencepiece model's own ids; eod = its eos id."""

    def __init__(self, model_file: str):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({e})") from None
        self._vocab = {self._sp.id_to_piece(i): i for i in range(len(self._sp))}
        self._eod = self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def special_tokens(self) -> dict[str, int]:
        """Pieces matched whole in text (Megatron's specials), by id; none for the model as is."""
        return {}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.decode_ids(list(ids))


class _SentencePieceWithSpecials(_SentencePiece):
    """SentencePieceTokenizer: Megatron adds special tokens after the model's pieces (when the model
    lacks them), and cuts them out of text before encoding so that "<EOD>" in text becomes one id."""

    def __init__(self, model_file: str):
        super().__init__(model_file)
        self._special: dict[str, int] = {}

        def add(piece: str) -> int:
            if piece not in self._vocab:
                self._vocab[piece] = len(self._vocab)
            self._special[piece] = self._vocab[piece]
            return self._vocab[piece]

        for piece in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(piece)
        # Megatron adds the pad/bos/eos pieces too, with a fallback name when the model has no such id.
        for model_id, fallback in ((self._sp.pad_id(), "<PAD>"), (self._sp.bos_id(), "<BOS>"),
                                   (self._sp.eos_id(), "<EOS>")):
            add(self._sp.id_to_piece(model_id) if 0 <= model_id < len(self._sp) else fallback)
        self._eod = self._special["<EOD>"]
        self._special_ids = {i: piece for piece, i in self._special.items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        while True:  # split at the earliest special token; encode the plain text between them
            hits = [(text.find(p, pos), p) for p in self._special]
            hits = [(at, p) for at, p in hits if at >= 0]
            if not hits:
                break
            at, piece = min(hits, key=lambda h: h[0])  # ties: first special added, as Megatron
            ids += self._sp.encode_as_ids(text[pos:at]) + [self._special[piece]]
            pos = at + len(piece)
        return ids + self._sp.encode_as_ids(text[pos:])

    def detokenize(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                out += [self._sp.decode_ids(run), self._special_ids[i]]
                run = []
            else:
                run.append(i)
        return " ".join(out + [self._sp.decode_ids(run)]) if out else self._sp.decode_ids(run)


class _TokenizersLibrary:
    """What the tokenizers library's Tokenizer (self._tok) gives every tokenizer built on it; self._eod is set
    by the subclass. vocab_size counts added tokens (such as <|endoftext|>) with the base vocabulary."""

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class _GPT2BPE(_TokenizersLibrary):
    """GPT-2 byte-level BPE (what Megatron's GPT2Tokenizer implements), through HF tokenizers."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{vocab_file} / {merge_file}: not a GPT-2 vocab.json + merges.txt ({e})") from None
        self._tok = Tokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        eod = self._tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise TokenizerError(f"{vocab_file}: GPT-2 vocab has no <|endoftext|> token")
        self._eod = eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class _HuggingFace(_TokenizersLibrary):
    """HFTokenizer through the tokenizers library (no transformers, nothing downloaded): tokenize() applies the
    tokenizer's post-processor as transformers' encode() does, so Llama 3's <|begin_of_text|> starts every
    document. vocab_size includes the added special tokens: Megatron-DeepSpeed counts the base vocabulary
    only, which leaves e.g. Llama 3's special ids (128000 and up) outside its embedding."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"--tokenizer-model {path}: no tokenizer.json (HFTokenizer reads a local "
                                 "tokenizer directory or its tokenizer.json; nothing is downloaded)")
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({str(e)[:120]})") from None
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if not os.path.isfile(config_file):
            raise TokenizerError(f"{config_file}: not there; HFTokenizer reads the eos token (its "
                                 "end-of-document id) from it")
        try:
            with open(config_file) as f:
                eos = json.load(f).get("eos_token")
        except (ValueError, AttributeError) as e:
            raise TokenizerError(f"{config_file}: not a tokenizer config ({str(e)[:80]})") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos  # a plain string or an AddedToken dict
        if eos is None or self._tok.token_to_id(eos) is None:
            raise TokenizerError(f"{config_file}: names no eos_token of the tokenizer (HFTokenizer's "
                                 f"end-of-document id), got {eos!r}")
        self._eod = self._tok.token_to_id(eos)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


class _Null:
    """Ids given as text ("12 7 3"). Megatron's NullTokenizer: eod = --vocab-size, one past the ids."""

    def __init__(self, vocab_size: int):
        self._eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            raise TokenizerError(f"NullTokenizer expects whitespace-separated integers, got {text[:40]!r}") from None

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None):
    """The tokenizer Megatron builds for --tokenizer-type; has .vocab_size .eod .tokenize() .detokenize()."""
    if tokenizer_type == "SentencePieceTokenizer":
        return _SentencePieceWithSpecials(_need_file("--tokenizer-model", tokenizer_model, tokenizer_type))
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return _SentencePiece(_need_file("--tokenizer-model", tokenizer_model, tokenizer_type))
    if tokenizer_type == "GPT2BPETokenizer":
        return _GPT2BPE(_need_file("--vocab-file", vocab_file, tokenizer_type),
                        _need_file("--merge-file", merge_file, tokenizer_type))
    if tokenizer_type == "HFTokenizer":
        if not tokenizer_model:
            raise TokenizerError("--tokenizer-type HFTokenizer needs --tokenizer-model (a tokenizer directory)")
        return _HuggingFace(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size (a positive integer)")
        return _Null(vocab_size)
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
