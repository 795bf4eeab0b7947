#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the bundled video through the default model; events are
# published over ZeroMQ, a recording and an overlay replay are written, and their paths are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec groundwatch demo "$@"
