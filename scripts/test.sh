#!/usr/bin/env bash
# Installs what is missing, then configures, builds and tests each preset
# (release, asan, tsan by default; override with UHMM_PRESETS="release tsan").
# Exits non-zero if any preset fails to configure, build or pass its tests.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }

read -r -a PRESETS <<< "${UHMM_PRESETS:-release asan tsan}"
if [[ ${#PRESETS[@]} -eq 0 ]]; then
  echo "test: UHMM_PRESETS selects no preset" >&2
  exit 2
fi

any_failed=0
if ! scripts/thread-safety.sh; then
  echo "test: clang thread-safety analysis failed" >&2
  any_failed=1
fi

LOGDIR="$ROOT/build/logs"
mkdir -p "$LOGDIR"

declare -A RESULT=()
declare -A FAILED_TESTS=()
total_passed=0
total_failed=0

for preset in "${PRESETS[@]}"; do
  echo "=================================================================="
  echo "== preset: $preset"
  echo "=================================================================="
  start=$SECONDS
  log="$LOGDIR/ctest-$preset.log"
  : > "$log"

  if ! cmake --preset "$preset"; then
    RESULT[$preset]="FAIL (configure)"; any_failed=1; continue
  fi
  if ! cmake --build --preset "$preset" -j2; then
    RESULT[$preset]="FAIL (build)"; any_failed=1; continue
  fi

  ctest --preset "$preset" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}

  # ctest closes with "NN% tests passed, F tests failed out of T".
  line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1 || true)
  passed=0; failed=0
  if [[ $line =~ ([0-9]+)\ tests?\ failed\ out\ of\ ([0-9]+) ]]; then
    failed=${BASH_REMATCH[1]}
    passed=$(( BASH_REMATCH[2] - failed ))
  fi
  total_passed=$(( total_passed + passed ))
  total_failed=$(( total_failed + failed ))
  secs=$(( SECONDS - start ))

  # CI keeps only the tail of this output: name each failed test and the
  # assertion lines it printed, so a flake can be chased from the summary.
  FAILED_TESTS[$preset]=$(awk '/tests? FAILED:/ {on=1; next} on && /^[[:space:]]*[0-9]+ - / {print} on && !/^[[:space:]]*[0-9]+ - / {on=0}' "$log")
  if [[ -n ${FAILED_TESTS[$preset]} ]]; then
    FAILED_TESTS[$preset]+=$'\n'$(grep -E 'Failure|FAILED  \]|ERROR: |SUMMARY: |Exception:' "$log" | head -n 40)
  fi

  if [[ $rc -ne 0 ]]; then
    RESULT[$preset]="FAIL (ctest rc=$rc; $passed passed, $failed failed; ${secs}s)"; any_failed=1
  else
    RESULT[$preset]="PASS ($passed passed, $failed failed; ${secs}s)"
  fi
done

echo "=================================================================="
echo "== summary"
for preset in "${PRESETS[@]}"; do
  echo "preset $preset: ${RESULT[$preset]}"
  if [[ -n ${FAILED_TESTS[$preset]:-} ]]; then
    sed 's/^/    /' <<< "${FAILED_TESTS[$preset]}"
  fi
done
echo "total: $total_passed passed, $total_failed failed"
exit $any_failed
