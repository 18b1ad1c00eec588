#!/usr/bin/env bash
# The test suite: installs megatron_sp with its test extras (tools/install.sh) and runs pytest.
# Extra arguments go to pytest, e.g. bash tests/run.sh -k attention -x, or bash tests/run.sh tests/test_model.py
# (a test file or directory among them replaces the default tests/).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=$(EXTRAS=test bash tools/install.sh | tail -n 1)
where=tests
for arg in "$@"; do
  case "$arg" in tests/*|*.py|*.py::*) where= ;; esac
done
exec "$python" -m pytest -q $where "$@"
