#!/usr/bin/env bash
# One device-machine round for issue 7 (see docs/benchmarks.md): GPU tests, the weights
# benchmark and the GPU snapshot benchmark. Run from the repo root with $OUT set; carry .whl.
# Usage: bash benchmarks/gpu/device_run.sh [tests|weights|snap|probe ...]  (default: tests weights snap)
# Env: TESTS (test files), WEIGHTS_ARGS (extra bench_weights.py args), T_* (per-step timeouts).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
steps=${*:-tests weights snap}
{ date; nvidia-smi; uname -r; nproc; free -g; df -h /tmp
  python3 -c "import torch, safetensors, pynvml, cuda.bindings; print('torch', torch.__version__, torch.version.cuda, 'safetensors', safetensors.__version__, 'cuda-bindings', cuda.bindings.__version__)"
} > "$OUT/env.txt" 2>&1
for s in $steps; do
  case $s in
    tests) timeout ${T_TESTS:-150} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_weights.py tests/test_gpu.py} 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
    weights) timeout ${T_WEIGHTS:-240} python3 benchmarks/bench_weights.py --size-gib ${SIZE_GIB:-6} --drop-caches --out "$OUT/weights.json" ${WEIGHTS_ARGS:-} 2>&1 | tee "$OUT/weights.log" ;;
    snap) timeout ${T_SNAP:-300} python3 benchmarks/gpu_snapshot_bench.py --out "$OUT/gpu_snapshot.json" --log "$OUT/worker.log" ${SNAP_ARGS:---vmm} 2>&1 | tee "$OUT/snap.log" ;;
    probe) timeout ${T_PROBE:-150} python3 benchmarks/gpu/read_path_probe.py --dir /tmp/casfs-probe --out "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log"
           MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296 timeout ${T_PROBE:-150} python3 benchmarks/gpu/read_path_probe.py --dir /tmp/casfs-probe --reuse --out "$OUT/probe_malloc.json" 2>&1 | tee "$OUT/probe_malloc.log" ;;
  esac
done
