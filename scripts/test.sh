#!/usr/bin/env bash
# The whole test suite: pytest (unit, property, real FUSE/S3/nginx tests) plus a short bounded
# fuzz run of every fuzz target. pytest's exit code 5 ("no tests ran") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
"$PY" -m pytest -q -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; exit 1; fi
[ $rc -eq 0 ] || exit $rc
if [ -f scripts/fuzz.sh ]; then FUZZ_SECONDS=${FUZZ_SECONDS:-20} FUZZ_SEED=${FUZZ_SEED:-1} bash scripts/fuzz.sh || exit 1; fi
