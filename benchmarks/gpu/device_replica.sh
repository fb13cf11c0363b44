#!/usr/bin/env bash
# One device-machine call for issues 18/12: GPU tests and the GPU replica benchmark.
# Run from the worktree root on the GPU machine with $OUT set; carry .whl and this worktree
# (with .criu-carry: CRIU 4.2.1 + its shared libraries, built on the CPU box).
# Usage: bash benchmarks/gpu/device_replica.sh STEP...
#   env      machine facts, criu check          tests   pytest of the GPU tests
#   bench:PRESET:ARGS  bench_gpu_replica.py --preset PRESET ARGS (commas in ARGS become spaces)
# Env: T_TESTS, T_BENCH (per-step timeouts, seconds).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../../.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CASFS_CRIU=$PWD/.criu-carry/criu CASFS_HOME=/tmp/casfs-home
for s in "$@"; do
  case $s in
    env) { date; nvidia-smi; uname -r; nproc; free -g; df -h /tmp
           python3 -c "import torch, transformers, cuda.bindings; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'cuda-bindings', cuda.bindings.__version__)"
           timeout 60 "$CASFS_CRIU" check; echo "criu check: $?"; } > "$OUT/env.txt" 2>&1 ;;
    tests) timeout "${T_TESTS:-240}" python3 -m pytest -q -x -p no:cacheprovider -rs tests/test_gpu_replica.py tests/test_regions.py tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
    bench:*) IFS=: read -r _ preset args <<< "$s"
           timeout "${T_BENCH:-420}" python3 benchmarks/gpu/bench_gpu_replica.py --preset "$preset" --work "/tmp/bench-$preset" \
             --out "$OUT/bench-$preset.json" ${args//,/ } 2>&1 | tee "$OUT/bench-$preset.log" | grep -v "^Loading" | tail -30 ;;
  esac
done
tar czf "$OUT/logs.tgz" --ignore-failed-read /tmp/bench-*/serve/logs /tmp/casfs-restore-* /tmp/casfs-home/serve/logs 2>/dev/null
ls -la "$OUT"
