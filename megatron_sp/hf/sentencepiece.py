"""A sentencepiece .model as a Hugging Face tokenizer.json that encodes text to the same ids.

sentencepiece's encode: normalize (the model's precompiled character map, e.g. NFKC), drop leading, trailing
and repeated spaces, put one '▁' before the text, turn spaces into '▁', then BPE (merge the adjacent pair whose
merged piece scores highest, again and again) or Unigram (the most likely segmentation), bytes <0xNN> for
characters outside the vocabulary. The tokenizers library has each of these steps; BPE becomes merges ranked
by the merged piece's score. Special pieces (Megatron's <EOD> & co.) are added tokens: text is split at them
first and every piece between them is encoded on its own, as SentencePieceTokenizer does.
Measured on the shipped corpus (4 M characters): BPE models give the same ids everywhere; Unigram models
differ where two segmentations score exactly the same (2 places), and on control pieces written out in text
("<s>", which sentencepiece never matches).
"""
from megatron_sp.hf import ConfigError

NORMAL, USER_DEFINED = 1, 4  # sentencepiece piece types
UNIGRAM, BPE = 1, 2  # sentencepiece model types


def read_model(model_file: str):
    """The sentencepiece ModelProto of a .model file (protobuf comes with tensorboard)."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the merges of higher-scoring pieces first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = sorted((-score, i, piece[:cut], piece[cut:]) for piece, (score, i) in normal.items()
                    for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
    return [(left, right) for _, _, left, right in ranked]


def check_model_type(model_file: str) -> None:
    """One ConfigError line for a model type without a tokenizer.json form here (word, char)."""
    if read_model(model_file).trainer_spec.model_type not in (UNIGRAM, BPE):
        raise ConfigError(f"{model_file}: a sentencepiece word or char model has no tokenizer.json form here "
                          "(BPE and Unigram models do); pass --no-tokenizer")


def _model(proto):
    from tokenizers import models
    spec = proto.trainer_spec
    if spec.model_type == UNIGRAM:
        return models.Unigram([(p.piece, p.score) for p in proto.pieces], spec.unk_id, spec.byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    return models.BPE(vocab, _bpe_merges(proto), unk_token=spec.unk_piece, fuse_unk=True,
                      byte_fallback=spec.byte_fallback)


def _normalizer(spec):
    from tokenizers import Regex, normalizers
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # spaces only: sentencepiece keeps newlines and tabs
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _decoder(proto):
    from tokenizers import decoders
    steps = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def spm_tokenizer(model_file: str, special_tokens: dict[str, int]):
    """tokenizers.Tokenizer encoding like sentencepiece (+ `special_tokens` {piece: id} matched whole in text,
    as Megatron's SentencePieceTokenizer appends them; ids past the model's pieces must follow on in order)."""
    from tokenizers import AddedToken, Tokenizer
    proto = read_model(model_file)
    tokenizer = Tokenizer(_model(proto))
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    tokenizer.decoder = _decoder(proto)
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in user])
    for piece, token_id in sorted(special_tokens.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)])
        if tokenizer.token_to_id(piece) != token_id:
            raise ConfigError(f"{model_file}: special token {piece!r} is id {token_id} in training but would be "
                              f"{tokenizer.token_to_id(piece)} in tokenizer.json")
    return tokenizer
