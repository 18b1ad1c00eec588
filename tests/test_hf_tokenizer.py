"""The run's tokenizer in Hugging Face form: AutoTokenizer.from_pretrained on the exported files gives the ids the
run trained on, for sentencepiece models (with and without Megatron's special tokens, on the shipped corpus) and
for Hugging Face tokenizer directories (copied); a tokenizer file that moved is one line naming the flag."""
import json
import os

import pytest

from megatron_sp.data.tokenizer import build_tokenizer
from megatron_sp.hf.tokenizer import TokenizerExport, tokenizer_export
from tests.test_data_preprocess import hf_tokenizer_dir  # noqa: F401  (a fixture: a Llama-3-shaped tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGES = ["", "  spaces   around  ", "tab\tand\nnewline", "ﬁne Ｆull width", "émoji 🙂 ✓ 中文", "x<EOD>y",
         "the house<EOD> her sister", "<CLS><SEP>"]


@pytest.fixture(scope="module")
def austen():
    """The quickstart's tokenizer (tools/train_tokenizer.py: BPE, byte fallback, 8000 pieces) and 40 documents."""
    import subprocess
    import sys
    import tempfile
    corpus = os.path.join(ROOT, "data", "sample", "austen.jsonl")
    prefix = os.path.join(tempfile.mkdtemp(), "sample")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
                    "--vocab-size", "8000", "--model-prefix", prefix], check=True, capture_output=True)
    with open(corpus) as f:
        return prefix + ".model", [json.loads(line)["text"] for line in f][:40]


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer"])
def test_sentencepiece_exports_encode_to_the_training_ids(kind, austen, tmp_path):
    from transformers import AutoTokenizer
    model, texts = austen
    ours = build_tokenizer(kind, tokenizer_model=model)
    bos = TokenizerExport(kind, {"tokenizer_model": model}, ours.eod).write(str(tmp_path), 256)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts + EDGES:
        assert theirs.encode(text) == ours.tokenize(text), text[:80]
    assert (theirs.eos_token_id, theirs.bos_token_id, bos) == (ours.eod, 1, 1)
    assert theirs.decode(ours.tokenize("Emma wrote a letter.")) == "Emma wrote a letter."


def test_a_hugging_face_tokenizer_directory_is_copied(hf_tokenizer_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer
    ours = build_tokenizer("HFTokenizer", tokenizer_model=str(hf_tokenizer_dir))
    TokenizerExport("HFTokenizer", {"tokenizer_model": str(hf_tokenizer_dir)}, ours.eod).write(str(tmp_path), 64)
    assert (tmp_path / "tokenizer.json").read_bytes() == (hf_tokenizer_dir / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Emma and Anne, at the house!  Ünïcode ✓"
    assert theirs.encode(text) == ours.tokenize(text)  # <|begin_of_text|> first: the post-processor is kept
    assert theirs.eos_token_id == ours.eod


def test_a_tokenizer_file_that_moved_is_one_line(austen, tmp_path):
    from megatron_sp.errors import ConfigError
    model, _ = austen
    record = {"type": "SentencePieceTokenizer", "tokenizer_model": str(tmp_path / "gone.model"), "eod": 8002}
    with pytest.raises(ConfigError, match=f"^the run's tokenizer file {tmp_path / 'gone.model'} is not there; give "
                                          "its place with --tokenizer-model, or pass --no-tokenizer to export the "
                                          "model alone$"):
        tokenizer_export(record, {})
    assert tokenizer_export(record, {"tokenizer_model": model}).files == {"tokenizer_model": model}
    assert tokenizer_export({"type": "NullTokenizer", "eod": 64}, {}).startswith("no tokenizer files: NullTokenizer")
