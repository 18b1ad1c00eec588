"""pytest setup shared by every test: CPU-friendly defaults set before any test imports triton, and the
learnable corpus the training and checkpoint tests run on."""
import os
import sys

import pytest

# Triton kernels run on CPU tensors under the interpreter; it must be chosen before `import triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers in tests reads local directories only, never the hub
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small indexed datasets of learnable documents (tests/runs.py), the directory returned."""
    from tests.runs import write_corpus
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root / "arith_text_document"), seed=0)
    write_corpus(str(root / "eodheavy_text_document"), seed=1, eod_heavy=True)
    return root
