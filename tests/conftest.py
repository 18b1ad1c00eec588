"""pytest setup shared by every test: CPU-friendly defaults set before any test imports triton."""
import os
import sys

# Triton kernels run on CPU tensors under the interpreter; it must be chosen before `import triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
