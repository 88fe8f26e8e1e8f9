#!/usr/bin/env bash
# Checks the clang thread-safety annotations (UHMM_GUARDED_BY, UHMM_REQUIRES,
# ...) of every library source: clang -Wthread-safety, syntax only, as errors.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CLANG=${CLANG:-$(command -v clang++ || true)}
if [[ -z "$CLANG" ]]; then
  echo "thread-safety: clang++ not found" >&2
  exit 1
fi
status=0
while IFS= read -r -d '' f; do
  if ! "$CLANG" -std=c++20 -fsyntax-only -Wthread-safety -Werror=thread-safety -Iinclude -Isrc "$f"; then
    status=1
  fi
done < <(find src -name '*.cpp' -print0 | sort -z)
if [[ $status -eq 0 ]]; then echo "thread-safety: clean"; fi
exit $status
