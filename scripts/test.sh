#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
python3 -m pytest -q -p no:cacheprovider "$@"
