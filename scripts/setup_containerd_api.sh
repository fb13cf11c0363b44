#!/usr/bin/env bash
# containerd's snapshots API for casfs's snapshotter (casfs.containerd.api): unpack the .proto
# files of Debian's golang-github-containerd-containerd-dev and golang-github-gogo-protobuf-dev
# into .cache/containerd-api/src (apt-get download + dpkg-deb -x: the two packages' files only,
# not the ~80 Go library packages installing them would pull in), then generate the Python stubs
# with grpcio-tools into .cache/containerd-api/gen/<hash>. Nothing generated is committed.
# Idempotent: a no-op once both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
dest=.cache/containerd-api/src
gocode=$dest/usr/share/gocode/src
if [ ! -f "$gocode/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto" ] \
   || [ ! -f "$gocode/github.com/gogo/protobuf/gogoproto/gogo.proto" ]; then
  echo "casfs setup: fetching containerd's API definitions (Debian packages, ~1.5 MB)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root \
      golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev >/dev/null)
  mkdir -p "$dest"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
fi
"$VENV/bin/python" -m casfs.containerd.api >/dev/null
echo "casfs setup: containerd API stubs ready"
