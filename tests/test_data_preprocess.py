"""Tokenizers, tools/train_tokenizer.py and tools/preprocess_data.py: ids, determinism across workers, memory, errors."""
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from megatron_sp.data.indexed import IndexedDataset
from megatron_sp.data.tokenizer import TokenizerError, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to a in that was her it his she which you had for as with be he not but at on "
         "Elizabeth Darcy Emma Anne Bennet sister mother letter house evening morning").split()


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args],
                          capture_output=True, text=True, cwd=ROOT)


def write_jsonl(path, n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (0, 300)) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            text = " ".join(np.array(WORDS)[rng.integers(0, len(WORDS), rng.integers(*words_per_doc))])
            f.write(json.dumps({"text": text + ".\n\nÉ ü" * int(rng.integers(0, 2)), "id": 1}) + "\n")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    write_jsonl(d / "train.jsonl", 400, seed=1)
    r = _run("train_tokenizer.py", "--input", str(d / "train.jsonl"), "--vocab-size", "400",
             "--model-prefix", str(d / "tok"))
    assert r.returncode == 0, r.stderr
    return str(d / "tok.model")


def test_gpt_sentencepiece_round_trip(spm_model):
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    text = "Elizabeth wrote a letter to her sister."
    ids = tok.tokenize(text)
    assert tok.vocab_size == 400 and tok.eod == 2 and ids and max(ids) < 400
    assert tok.detokenize(ids) == text


def test_sentencepiece_megatron_specials(spm_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    # <CLS> <SEP> <EOD> <MASK> are appended after the model's 400 pieces; bos/eos exist, no pad -> <PAD>.
    assert tok.vocab_size == 405 and tok.eod == 402
    ids = tok.tokenize("the house<EOD>her sister")
    assert ids.count(402) == 1 and tok.detokenize(ids) == "the house <EOD> her sister"


def test_gpt2_bpe_round_trip(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([" ".join(WORDS)] * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                          merge_file=str(tmp_path / "merges.txt"))
    text = "Emma and Anne, at the house!  Ünïcode ✓"
    ids = tok.tokenize(text)
    assert tok.eod == 0 and tok.vocab_size == len(json.load(open(tmp_path / "vocab.json")))
    assert tok.detokenize(ids) == text
    assert tok.tokenize(" the") != tok.tokenize("the")  # GPT-2: no prefix space added


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A Llama-3-shaped Hugging Face tokenizer directory: byte-level BPE, special tokens added after the base
    vocabulary, a post-processor that puts <|begin_of_text|> first, the eos named in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|end_of_text|>"}}))
    return d


def test_hf_tokenizer_directory(hf_tokenizer_dir, tmp_path):
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(hf_tokenizer_dir))
    text = "Emma and Anne, at the house!  Ünïcode ✓"
    ids = tok.tokenize(text)
    base = json.load(open(hf_tokenizer_dir / "tokenizer.json"))["model"]["vocab"]
    assert ids[0] == len(base) and tok.eod == len(base) + 1  # <|begin_of_text|>, <|end_of_text|> after the base
    assert tok.vocab_size == len(base) + 2 > max(ids)  # the embedding must hold the special ids
    assert tok.detokenize(ids[1:]) == text
    write_jsonl(tmp_path / "in.jsonl", 50, words_per_doc=(1, 40))
    r = _run("preprocess_data.py", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "hf"),
             "--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(hf_tokenizer_dir), "--append-eod",
             "--workers", "2")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line)["text"] for line in open(tmp_path / "in.jsonl")]
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod] for t in docs]


def test_hf_tokenizer_errors(hf_tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json .*nothing is downloaded"):
        build_tokenizer("HFTokenizer", tokenizer_model="meta-llama/Meta-Llama-3-8B")
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not there; HFTokenizer reads the eos token"):
        build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="names no eos_token of the tokenizer .*got '</s>'"):
        build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path))


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.vocab_size == 1001 and tok.eod == 1000  # Megatron: eod one past the given ids
    assert tok.tokenize("5 17 999") == [5, 17, 999] and tok.detokenize([5, 17]) == "5 17"


@pytest.mark.parametrize("kwargs,words", [
    (dict(tokenizer_type="GPTSentencePieceTokenizer"), "needs --tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope.model"), "/nope.model: no such file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/v.json"), "/v.json: no such file"),
    (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
    (dict(tokenizer_type="Bogus"), "unknown --tokenizer-type"),
])
def test_tokenizer_errors(kwargs, words):
    with pytest.raises(TokenizerError, match=words):
        build_tokenizer(**kwargs)


def _preprocess(inp, prefix, workers: int, *extra: str, model: str | None = None) -> subprocess.CompletedProcess:
    tok = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model] if model else \
        ["--tokenizer-type", "NullTokenizer", "--vocab-size", "70000"]
    return _run("preprocess_data.py", "--input", str(inp), "--output-prefix", str(prefix), "--workers",
                str(workers), "--append-eod", *tok, *extra)


def test_workers_give_identical_output(tmp_path, spm_model):
    write_jsonl(tmp_path / "in.jsonl", 3000, seed=2)  # includes empty documents (0 words)
    for w in (1, 2):
        r = _preprocess(tmp_path / "in.jsonl", tmp_path / f"w{w}", w, "--log-interval", "1000", model=spm_model)
        assert r.returncode == 0, r.stderr
        assert "docs/s" in r.stderr and "MB/s" in r.stderr
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1_text_document.{ext}").read_bytes() == (tmp_path / f"w2_text_document.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    docs = [json.loads(line)["text"] for line in open(tmp_path / "in.jsonl")]
    expect = [tok.tokenize(t) + [tok.eod] for t in docs if t]  # empty documents are skipped
    assert len(ds) == len(expect) < len(docs) and ds.dtype == np.uint16
    for i in (0, 1, len(expect) // 2, len(expect) - 1):
        assert ds[i].tolist() == expect[i]


def test_null_tokenizer_int32_and_multiple_keys(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"{i} 69999 5", "title": f"{i}"}) + "\n")
    r = _preprocess(tmp_path / "in.jsonl", tmp_path / "n", 2, "--json-keys", "text", "title")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds.dtype == np.int32 and ds[3].tolist() == [3, 69999, 5, 70000]
    assert IndexedDataset(str(tmp_path / "n_title_document"))[4].tolist() == [4, 70000]


@pytest.mark.parametrize("content,words", [
    ('{"text": "1 2"}\n{"text": 3\n', "line 2: not valid JSON"),
    ('{"text": "1 2"}\n{"body": "3"}\n', "line 2: key 'text' is missing"),
    ('{"text": "1 x 2"}\n', "whitespace-separated integers"),
    ('{"text": "1 70001"}\n', "out of range"),
])
def test_bad_input_one_line_error_exit_2(tmp_path, content, words):
    (tmp_path / "bad.jsonl").write_text(content)
    r = _preprocess(tmp_path / "bad.jsonl", tmp_path / "o", 2)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert not list(tmp_path.glob("o_*"))  # no half-written dataset left behind


def test_bad_options_one_line_error(tmp_path):
    for args in (["--input", str(tmp_path / "none.jsonl"), "--output-prefix", "x", "--tokenizer-type", "NullTokenizer"],
                 ["--output-prefix", "x"]):
        r = _run("preprocess_data.py", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    r = _run("train_tokenizer.py", "--input", str(tmp_path / "none.jsonl"), "--model-prefix", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no such file" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{"text": 5}\n')
    r = _run("train_tokenizer.py", "--input", str(tmp_path / "bad.jsonl"), "--model-prefix", str(tmp_path / "t"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "line 2: key 'text' is int" in r.stderr, r.stderr


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            pass
    return total


def test_memory_stays_flat_on_50mb(tmp_path, spm_model):
    path = tmp_path / "big.jsonl"
    write_jsonl(path, 4000, seed=3, words_per_doc=(1500, 3500))
    lines = path.read_bytes().splitlines(keepends=True)
    with open(path, "ab") as f:  # grow to 50 MB by repeating whole documents: fast to generate
        for i in range(len(lines)):
            if f.tell() >= 50e6:
                break
            f.write(lines[i])
    size_mb = path.stat().st_size / 1e6
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(path),
           "--output-prefix", str(tmp_path / "big"), "--workers", "2", "--append-eod", "--log-interval", "5000",
           "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", spm_model]
    start = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    err = proc.communicate()[1]
    done.set()
    poller.join()
    seconds = time.time() - start
    per_process = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"\npreprocessed {size_mb:.1f} MB in {seconds:.1f} s ({size_mb / seconds:.2f} MB/s) with 2 workers; "
          f"peak RSS: process tree {peak[0] / 2**20:.0f} MiB, largest process {per_process / 2**20:.0f} MiB")
    print(err.strip().splitlines()[-2])
    assert proc.returncode == 0, err
    assert peak[0] < 2**30 and per_process < 2**30
    assert IndexedDataset(str(tmp_path / "big_text_document")).sizes.sum() > 5e6


def test_a_failed_rerun_leaves_the_existing_dataset_as_it_was(tmp_path):
    """Writes go to .partial files renamed into place on success: a bad input never truncates or
    deletes the dataset a user already has at that prefix."""
    (tmp_path / "good.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    assert _preprocess(tmp_path / "good.jsonl", tmp_path / "o", 1).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("o_*")}
    assert set(before) == {"o_text_document.bin", "o_text_document.idx"}
    (tmp_path / "bad.jsonl").write_text('{"text": "7 8"}\n{"text": "1 x"}\n')
    assert _preprocess(tmp_path / "bad.jsonl", tmp_path / "o", 2).returncode == 2
    assert {p.name: p.read_bytes() for p in tmp_path.glob("o_*")} == before
