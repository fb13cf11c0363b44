#!/usr/bin/env bash
# One device-machine call for issue 16 (needs an nvidia-h200-x2 or larger: two GPUs of one model).
# Run from the repository root on the GPU machine with $OUT set. Carry .whl (blake3, zstandard)
# and a CRIU 4.2.1 carry directory (criu + its shared libraries, built on the CPU box; the one
# issue 18 used is .wt/gpu/.criu-carry): CRIU_CARRY names it (default .criu-carry). Without CRIU
# the restore part fails and says so; the park and tp parts need none.
# Usage: bash benchmarks/gpu/device_multigpu.sh STEP...
#   env               machine facts (nvidia-smi topology, driver, bindings), criu check
#   tests             the GPU tests of issue 16 (and test_gpu.py's single-GPU ones; the CPU ones run in CI)
#   bench[:PARTS[:ARGS]]  benchmarks/gpu/bench_multigpu.py --parts PARTS (default restore,park,tp);
#                     commas in ARGS become spaces
# Env: T_TESTS, T_BENCH (per-step timeouts, seconds), PRESET (default 0.6b), WHL (default .whl).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl || exit 1
CRIU_CARRY=${CRIU_CARRY:-.criu-carry}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CASFS_CRIU=$PWD/$CRIU_CARRY/criu CASFS_HOME=/tmp/casfs-home
# NVLink multicast off in everything started from here (the machine's documentation requires it;
# serve.tp sets the same in every rank's environment)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset CUDA_VISIBLE_DEVICES  # a device map must name every GPU the processes saw
for s in "$@"; do
  case $s in
    env) { date; nvidia-smi; nvidia-smi topo -m; nvidia-smi -q | grep -iE "persistence|bus id|uuid" ; uname -r; nproc; free -g
           python3 -c "import torch, transformers, cuda.bindings; print('torch', torch.__version__, torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'transformers', transformers.__version__, 'cuda-bindings', cuda.bindings.__version__, 'gpus', torch.cuda.device_count())"
           timeout 60 "$CASFS_CRIU" check; echo "criu check: $?"; } > "$OUT/env.txt" 2>&1; tail -3 "$OUT/env.txt" ;;
    tests) timeout "${T_TESTS:-200}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_multi.py tests/test_tp_gpu.py \
             tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
    bench*) IFS=: read -r _ parts args <<< "$s"
           timeout "${T_BENCH:-420}" python3 benchmarks/gpu/bench_multigpu.py --preset "${PRESET:-0.6b}" --work /tmp/mg \
             --out "$OUT/multigpu.json" --parts "${parts:-restore,park,tp}" ${args//,/ } 2>&1 | tee "$OUT/bench.log" \
             | grep -v "^Loading" | tail -40 ;;
  esac
done
tar czf "$OUT/logs.tgz" --ignore-failed-read /tmp/mg/serve/logs /tmp/mg/tp-logs-* /tmp/casfs-restore-* 2>/dev/null
ls -la "$OUT"
