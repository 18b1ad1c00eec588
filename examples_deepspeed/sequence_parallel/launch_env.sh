# What every launch here shares (sourced by quickstart.sh, launch_common.sh and bench_llama_1.3B_seq_parallel.sh):
# the Python that runs megatron_sp, this machine's GPU count, and the port a single-node launch meets on.

# The interpreter, as an absolute path (the scripts cd to the repository root): $PYTHON, else the project's
# .venv (made by tools/install.sh, which quickstart.sh and tests/run.sh call), else python3. One error
# line when it cannot import what megatron_sp needs.
project_python() {  # $1: the repository root
  local py=${PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$1/.venv/bin/python" ]; then py=$1/.venv/bin/python; else py=python3; fi
  fi
  if [[ "$py" == */* ]]; then
    [ -x "$py" ] || { echo "error: PYTHON=$py is not an executable file" >&2; return 2; }
    py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")
  else
    command -v "$py" >/dev/null || { echo "error: $py not found: run bash tools/install.sh (it makes .venv/)" >&2; return 2; }
  fi
  local missing
  missing=$("$py" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "deepspeed", "sentencepiece") if u.find_spec(m) is None))')
  if [ -n "$missing" ]; then
    echo "error: $py cannot import $missing: run bash tools/install.sh (it makes .venv/)," \
         "or set PYTHON to an environment where megatron_sp is installed" >&2
    return 2
  fi
  echo "$py"
}

# GPUs torch sees on this machine (0 without any; torch also counts ROCm GPUs, which nvidia-smi would not).
visible_gpus() {  # $1: the interpreter
  "$1" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# The rendezvous port of a single-node launch: MASTER_PORT when given, else one that is free now, so that
# two jobs on one machine do not both meet on the launchers' default 29500 (the second would join the
# first's rendezvous and both would hang). Multi-node launches keep the user's or the launcher's port.
rendezvous_port() {  # $1: the interpreter
  if [ -n "${MASTER_PORT:-}" ]; then echo "$MASTER_PORT"; return; fi
  "$1" -c 'import socket
with socket.socket() as s:
    s.bind(("", 0))
    print(s.getsockname()[1])'
}
