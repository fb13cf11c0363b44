#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_*.py, atheris/libFuzzer) for $FUZZ_SECONDS seconds each
# (default 60), after writing the seed corpora (fuzz/seeds.py -> fuzz/corpus-<target>/,
# gitignored). Bounded: each input gets $FUZZ_INPUT_TIMEOUT seconds (default 10, a slower input
# is reported as a hang) and the process $FUZZ_RSS_MB MiB (default 2048). Exits nonzero when any
# target crashes, hangs or runs out of memory; the reproducer is left in
# fuzz/corpus-crashes/<target>-* (replay: .venv/bin/python fuzz/fuzz_<target>.py <file>).
# FUZZ_SEED fixes libFuzzer's seed (make test sets 1, so CI explores the same inputs on every
# run and cannot turn red by chance; make fuzz leaves it random to explore further).
# Usage: FUZZ_SECONDS=20 bash scripts/fuzz.sh [target ...]   (targets: index chunk export criuimg oci http)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
SECS=${FUZZ_SECONDS:-60}
INPUT_TIMEOUT=${FUZZ_INPUT_TIMEOUT:-10}
RSS_MB=${FUZZ_RSS_MB:-2048}
LOGS=fuzz/corpus-logs
CRASHES=fuzz/corpus-crashes

if [ $# -gt 0 ]; then targets=("$@"); else
  targets=(); for f in fuzz/fuzz_*.py; do t=${f#fuzz/fuzz_}; targets+=("${t%.py}"); done
fi
"$PY" fuzz/seeds.py >/dev/null || { echo "fuzz.sh: writing seed corpora failed" >&2; exit 1; }
mkdir -p "$LOGS" "$CRASHES"
failed=0
for t in "${targets[@]}"; do
  script=fuzz/fuzz_$t.py
  [ -f "$script" ] || { echo "fuzz.sh: no target $script" >&2; failed=1; continue; }
  log=$LOGS/$t.log
  # libFuzzer stops itself after -max_total_time; the outer timeout only guards a wedged run
  timeout --kill-after=30 $((SECS + 120)) "$PY" "$script" "fuzz/corpus-$t" \
    -max_total_time="$SECS" -timeout="$INPUT_TIMEOUT" -rss_limit_mb="$RSS_MB" \
    -artifact_prefix="$CRASHES/$t-" -print_final_stats=1 ${FUZZ_SEED:+-seed="$FUZZ_SEED"} >"$log" 2>&1
  rc=$?
  runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
  if [ $rc -eq 0 ]; then
    echo "fuzz $t: ok (${runs:-no summary}; $cov; ${SECS}s)"
  else
    failed=1
    echo "fuzz $t: FAILED (exit $rc); log $log" >&2
    grep -A25 -E 'Uncaught Python exception|ERROR: libFuzzer' "$log" | head -60 >&2
  fi
done
exit $failed
