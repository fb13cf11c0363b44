#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: system packages (when root), a venv in .venv,
# and casfs with its extras. Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${CASFS_EXTRAS:-s3,fuse,dev,weights,containerd}

# gcc: casfs.blocktree (verified sub-chunk reads) compiles its BLAKE3 tree code with it; fio and
# rsync: benchmarks/bench_random_read.py and bench_cold_start_root.py (no test needs them); tini:
# the init of a snapshotted process's PID namespace (signal forwarding, reaping: snapshot.spawning)
APT_PKGS="fuse3 libfuse3-dev pkg-config erofs-utils nginx-light runc skopeo busybox-static docker-registry containerd debootstrap gcc fio rsync tini"
. scripts/apt_ensure.sh
apt_ensure "system packages" $APT_PKGS

if [ ! -x "$VENV/bin/python" ]; then
  echo "casfs setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.casfs-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "casfs setup: installing casfs[$EXTRAS] into $VENV (first run builds pyfuse3, ~2 min)"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi

# casfs.blocktree's BLAKE3 tree library (compiled once into ~/.cache/casfs; without it block
# reads are off and reads verify whole chunks)
"$VENV/bin/python" -m casfs.blocktree || echo "casfs setup: WARNING: no blocktree library (block reads off)" >&2

# containerd's snapshots API (.proto files from Debian, Python stubs generated here; not committed)
# for `casfs snapshotter`. A failure does not stop setup: the containerd tests then fail and say why.
bash scripts/setup_containerd_api.sh || echo "casfs setup: WARNING: no containerd API stubs (casfs snapshotter tests will fail)" >&2

# CRIU >= 4.2 for snapshot.cpu (built once into .cache/criu-<version>/; a no-op when present).
# A failed build does not stop setup: the CRIU tests then fail and say how to get one.
bash scripts/build_criu.sh || echo "casfs setup: WARNING: no usable CRIU (snapshot.cpu tests will fail)" >&2

# vLLM's CPU build for serve/, in its own venv (.venv-vllm: ~5 min and 3.4 GB the first time, a
# no-op after). SKIP_VLLM=1 skips it (the vLLM tests then skip). A failed install does not stop
# setup: the vLLM tests then fail and say how to get it.
bash scripts/setup_vllm.sh || echo "casfs setup: WARNING: vLLM is not installed (serve's vLLM tests will fail)" >&2
