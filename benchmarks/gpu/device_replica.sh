#!/usr/bin/env bash
# One device-machine call for issues 18/12: GPU tests and the GPU replica benchmark.
# Run from the worktree root on the GPU machine with $OUT set; carry .whl and this worktree
# (with .criu-carry: CRIU 4.2.1 + its shared libraries, built on the CPU box).
# Usage: bash benchmarks/gpu/device_replica.sh STEP...
#   env      machine facts, criu check (and its userfaultfd feature)
#   tests    pytest of the GPU tests ($TESTS), in the foreground
#   tests&   the same in the background (while the next steps run); waited for at the end
#   bench:PRESET:ARGS  bench_gpu_replica.py --preset PRESET ARGS (commas in ARGS become spaces)
# Env: T_TESTS, T_BENCH (per-step timeouts, seconds), TESTS (test files).
# Every step writes under $OUT as it goes (pytest.log, bench-PRESET.json after every boot), so
# a step stopped by its timeout, or the call's, still leaves what it measured.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# SKIP_WHEELS=1: a dry run on a CPU box whose python already has them
[ "${SKIP_WHEELS:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CASFS_CRIU=$PWD/.criu-carry/criu CASFS_HOME=/tmp/casfs-home
TESTS=${TESTS:-tests/test_gpu_replica.py tests/test_shared_chunks.py tests/test_pinned_tier.py}
bg=""
for s in "$@"; do
  case $s in
    env) { date; nvidia-smi; uname -r; nproc; free -g; df -h /tmp
           python3 -c "import torch, transformers, cuda.bindings; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'cuda-bindings', cuda.bindings.__version__)"
           timeout 60 "$CASFS_CRIU" check; echo "criu check: $?"
           timeout 30 "$CASFS_CRIU" check --feature uffd-noncoop; echo "criu uffd-noncoop: $?"; } > "$OUT/env.txt" 2>&1 ;;
    tests) timeout "${T_TESTS:-240}" python3 -m pytest -v -x -p no:cacheprovider -rs $TESTS > "$OUT/pytest.log" 2>&1
           tail -15 "$OUT/pytest.log" ;;
    'tests&') ( timeout "${T_TESTS:-240}" python3 -m pytest -v -p no:cacheprovider -rs $TESTS > "$OUT/pytest.log" 2>&1
                echo "pytest exit $?" >> "$OUT/pytest.log" ) &
           bg=$! ;;
    bench:*) IFS=: read -r _ preset args <<< "$s"
           timeout "${T_BENCH:-420}" python3 benchmarks/gpu/bench_gpu_replica.py --preset "$preset" --work "/tmp/bench-$preset" \
             --out "$OUT/bench-$preset.json" ${args//,/ } > "$OUT/bench-$preset.log" 2>&1
           echo "bench exit $?" >> "$OUT/bench-$preset.log"
           grep -v "^Loading" "$OUT/bench-$preset.log" | tail -40 ;;
  esac
done
if [ -n "$bg" ]; then wait "$bg"; fi
tail -15 "$OUT/pytest.log" 2>/dev/null
find /tmp/bench-*/serve/logs /tmp/casfs-home/serve/logs /tmp/casfs-restore-* /dev/shm/casfs-restore-* \
  -name '*.log' -size -20M 2>/dev/null | tar czf "$OUT/logs.tgz" -T - 2>/dev/null
ls -la "$OUT"
