#!/usr/bin/env bash
# The test suite: installs megatron_sp with its test extras (tools/install.sh) and runs pytest.
# Extra arguments go to pytest, e.g. bash tests/run.sh -k attention -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=$(EXTRAS=test bash tools/install.sh | tail -n 1)
exec "$python" -m pytest -q tests "$@"
