#!/usr/bin/env bash
# Creates (or reuses) the project's Python environment and installs megatron_sp into it, editable.
# Prints the interpreter to use on its last line. Usage: python=$(bash tools/install.sh | tail -n 1)
#   PYTHON=/path/to/python  install into that interpreter instead of ./.venv (e.g. a cluster's conda env)
#   EXTRAS=test             pip extras to install (default: none)
# On a machine without a GPU and without torch, torch==2.13.0 (a CPU build) is installed first:
# an unpinned torch would pull a multi-GB CUDA build. With a GPU, pip picks torch as usual.
# The recipes (examples_deepspeed/) use the same environment: $PYTHON, else ./.venv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
else
  [ -x .venv/bin/python ] || python3 -m venv .venv >&2
  py=$root/.venv/bin/python
fi
extras=${EXTRAS:-}
spec="."; [ -n "$extras" ] && spec=".[$extras]"
prefix=$("$py" -c 'import sys; print(sys.prefix)')
# one stamp per setup.py version and extras; an install with extras also counts as the plain one
stamp="$prefix/.venv-stamp-$(cksum < setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp-${extras:-none}" ] && ! { [ -z "$extras" ] && compgen -G "$stamp-*" >/dev/null; }; then
  if ! "$py" -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$py" -m pip install -q torch >&2
    else
      echo "installing torch==2.13.0 (CPU build)" >&2
      "$py" -m pip install -q torch==2.13.0 >&2
    fi
  fi
  echo "installing megatron_sp ($spec) into $prefix" >&2
  DS_BUILD_OPS=0 "$py" -m pip install -q -e "$spec" >&2
  touch "$stamp-${extras:-none}"
fi
echo "$py"
