#!/usr/bin/env bash
# Builds the release `uhmm` CLI and runs its demo: manages a 1 GiB buffer,
# migrates it to the simulated device and back, and prints figures.
# Extra arguments are passed to `uhmm demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh >&2
cmake --preset release >&2
cmake --build --preset release -j2 --target uhmm_cli >&2

exec "$ROOT/build/release/tools/uhmm/uhmm" demo "$@"
