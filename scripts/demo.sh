#!/usr/bin/env bash
# `make demo`: build an image of a real directory (this Python's standard library) into the
# embedded local store, list it, read from it, export it and prove it byte-identical, then
# (where FUSE works) mount it lazily and import a module from the mount. Then the main job
# (where vLLM's CPU build, CRIU and root are at hand): a model replica booted cold with a
# snapshot taken, stopped, restored from the snapshot, a request answered by each, and the two
# boot times side by side. DEMO_REPLICA=0 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CASFS="$VENV/bin/casfs"
PY="$VENV/bin/python"
SRC=${DEMO_SRC:-$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
WORK=$(mktemp -d /tmp/casfs-demo.XXXXXX)
SERVE_PID=
cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true
  fi
  if mountpoint -q "$WORK/mnt" 2>/dev/null; then "$CASFS" umount "$WORK/mnt" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

echo "store: $("$PY" -c 'import casfs; print(casfs.default_store_url())')"
say casfs build "$SRC" --tag demo-stdlib
"$CASFS" build "$SRC" --tag demo-stdlib --no-progress
say casfs images
"$CASFS" images
say casfs ls demo-stdlib json
"$CASFS" ls demo-stdlib json
say "casfs cat demo-stdlib json/__init__.py | head -5"
"$CASFS" cat demo-stdlib json/__init__.py | head -5
say casfs export demo-stdlib "$WORK/export"
"$CASFS" export demo-stdlib "$WORK/export" --no-progress
say python scripts/compare_trees.py "$SRC" "$WORK/export"
"$PY" scripts/compare_trees.py "$SRC" "$WORK/export"

if "$CASFS" mount --help >/dev/null 2>&1 && [ -e /dev/fuse ]; then
  mkdir -p "$WORK/mnt"
  say casfs mount demo-stdlib "$WORK/mnt"
  "$CASFS" mount demo-stdlib "$WORK/mnt"
  say "python -c 'import textwrap' with the lazily mounted stdlib first on sys.path"
  "$PY" -c "import sys; sys.path.insert(0, '$WORK/mnt'); import textwrap; print(textwrap.__file__); print(textwrap.fill('served lazily from a casfs mount: only the chunks this import touched were read', 40))"
  say casfs umount "$WORK/mnt"
  "$CASFS" umount "$WORK/mnt"
else
  echo "(casfs mount unavailable here: skipping the lazy-mount step)"
fi

# -- a replica: cold boot with a snapshot, then a restore -----------------------------------------
VPY=${VLLM_VENV:-.venv-vllm}/bin/python
why_not=
if [ "${DEMO_REPLICA:-1}" = 0 ]; then why_not="DEMO_REPLICA=0"
elif [ ! -x "$VPY" ]; then why_not="$VPY is missing (scripts/setup_vllm.sh installs vLLM's CPU build)"
elif [ "$(id -u)" != 0 ]; then why_not="CPU snapshots need root (CRIU)"
elif ! "$VPY" -c 'from serve.snapshots import open_backend; open_backend()' >/dev/null 2>&1; then
  why_not="CPU snapshots are unavailable here: $("$VPY" -c 'from serve.snapshots import open_backend; open_backend()' 2>&1 | tail -1)"
fi
if [ -n "$why_not" ]; then
  echo; echo "(skipping the replica demo: $why_not)"; echo; echo "demo done."; exit 0
fi
STORE="$WORK/store"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CASFS_SNAPSHOT_CACHE="$WORK/snapshot-cache"
serve() {  # casfs serve in the background until its boot report (one JSON line) is printed
  "$VPY" -m casfs.cli.main --store "$STORE" serve tiny --listen "127.0.0.1:$PORT" --workdir "$WORK/serve" \
    --no-gpu-check "$@" >"$WORK/report.json" 2>"$WORK/serve.log" &
  SERVE_PID=$!
  while [ "$(wc -l <"$WORK/report.json")" -lt 1 ]; do  # the whole first line: the boot report
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "casfs serve failed:"; tail -20 "$WORK/serve.log"; exit 1; }
    sleep 0.2
  done
}
ask() {  # one greedy completion; prints the answer (or what came back instead)
  curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}' \
    | "$PY" -c 'import json, sys
raw = sys.stdin.read()
try:
    print(repr(json.loads(raw)["choices"][0]["text"]))
except (ValueError, KeyError, IndexError):
    sys.exit(f"the replica answered {raw[:300]!r}")'
}
mode() { "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["mode"], "yes" if r.get("snapshot_create") else "no")' "$1"; }
stop() { kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true; SERVE_PID=; }
say "python scripts/make_tiny_model.py $WORK/model && casfs build $WORK/model --tag tiny"
"$VPY" scripts/make_tiny_model.py "$WORK/model" >/dev/null 2>&1
"$CASFS" --store "$STORE" build "$WORK/model" --tag tiny --no-progress >"$WORK/build.txt"
head -1 "$WORK/build.txt"
say "casfs serve tiny --eager --fast-boot --snapshot tiny-replica --create   # cold boot, snapshot, serve"
serve --eager --fast-boot --snapshot tiny-replica --create
cp "$WORK/report.json" "$WORK/cold.json"
if [ "$(mode "$WORK/cold.json")" != "cold yes" ]; then
  echo "the snapshot could not be made:"; grep -i "snapshot" "$WORK/serve.log" | tail -3; exit 1
fi
say "curl .../v1/completions   # answered by the replica that booted cold"
ask | tee "$WORK/cold.answer"
say "kill -TERM <casfs serve>   # the replica stops"
stop
say "casfs serve tiny --snapshot tiny-replica   # restored from the snapshot in the store"
serve --snapshot tiny-replica
cp "$WORK/report.json" "$WORK/restored.json"
if [ "$(mode "$WORK/restored.json")" != "restore no" ]; then
  echo "the replica did not restore from its snapshot:"; tail -3 "$WORK/serve.log"; exit 1
fi
say "curl .../v1/completions   # answered by the restored replica"
ask | tee "$WORK/restored.answer"
stop
echo
"$PY" - "$WORK" <<'PYEOF'
import json, sys
w = sys.argv[1]
cold, rest = (json.load(open(f"{w}/{n}.json")) for n in ("cold", "restored"))
a, b = (open(f"{w}/{n}.answer").read().strip() for n in ("cold", "restored"))
snap = cold.get("snapshot_create") or {}
boot_cold = cold["total"] - cold["phases"].get("snapshot", 0) - cold["phases"].get("restore", 0)
cp, rp = cold["phases"], rest["phases"]
rows = [("boot to first token", f"{boot_cold:.1f} s", f"{rest['total']:.2f} s"),
        ("where the time went", f"init {cp.get('init', 0):.1f} s (imports, engine)",
         f"restore {rp.get('restore', 0):.2f} s"),
        ("", f"mount {cp.get('mount', 0):.2f} s, warmup {cp.get('warmup', 0):.2f} s",
         f"mount {rp.get('mount', 0):.2f} s, first token {rp.get('first_token', 0):.2f} s"),
        ("answer", a, b)]
print(f"{'':22}{'cold boot':38}restored from the snapshot")
for name, x, y in rows:
    print(f"{name:22}{x:38}{y}")
print(f"\nrestored {boot_cold / rest['total']:.0f}x faster; same answer: {a == b}. The snapshot: "
      f"{snap.get('pages_bytes', 0) / 2**20:.0f} MiB of memory pages, taken in "
      f"{cold['phases'].get('snapshot', 0):.1f} s ({rest['details']['restore'].get('source')} restore: "
      "pages come from the casfs store as the replica touches them).")
PYEOF
echo
echo "demo done."
