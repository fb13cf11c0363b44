#!/usr/bin/env bash
# Build CRIU 4.2.x from Debian sid's source package into a project-local cached prefix.
#
# Why: bookworm's criu 3.17 fails on this kernel (vDSO) and 4.1 cannot dump a process with an
# inet socket; snapshot.cpu needs criu >= 4.2. Debian sid carries 4.2.x as a source package.
#
# Contract:
#   - does nothing (and is fast) when a usable criu >= 4.2 already exists: $CASFS_CRIU, the
#     project prefix .cache/criu-*/bin/criu, or a `criu` on PATH;
#   - otherwise installs the build dependencies with apt (when root), downloads the sid
#     .orig.tar.xz with apt-get source through a private sources list (the system's apt
#     configuration is not touched), builds `make -j2 criu` (~100 s on 2 cores) and installs
#     the binary as .cache/criu-<version>/bin/criu;
#   - idempotent: re-running after a success prints the binary and exits 0;
#   - exits non-zero with a message when it cannot build (no apt, no network).
# Env: CASFS_CRIU_CACHE (default: <repo>/.cache), CASFS_CRIU_JOBS (default: 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=${CASFS_CRIU_CACHE:-$ROOT/.cache}
JOBS=${CASFS_CRIU_JOBS:-2}

# Print "major minor" of a criu binary, or nothing if it does not run.
criu_version() {
  "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1
}
usable() {
  [ -x "$1" ] || return 1
  local v; v=$(criu_version "$1")
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 4 ] || { [ "$1" -eq 4 ] && [ "$2" -ge 2 ]; }
}

for c in "${CASFS_CRIU:-}" "$CACHE"/criu-*/bin/criu "$(command -v criu 2>/dev/null || true)"; do
  if [ -n "$c" ] && usable "$c"; then
    echo "casfs setup: criu $("$c" --version | sed -n 's/^Version: *//p') at $c"
    exit 0
  fi
done

echo "casfs setup: no criu >= 4.2 found; building CRIU 4.2.x from Debian sid's source package (~2 min)"
BUILD_DEPS="build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
  libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler
  python3-protobuf uuid-dev libaio-dev xz-utils"
. scripts/apt_ensure.sh
apt_ensure "CRIU build dependencies" $BUILD_DEPS

SRC="$CACHE/criu-src"
mkdir -p "$SRC"
tarball=$(ls "$SRC"/criu_4.[2-9]*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$tarball" ]; then
  # A private apt state: one deb-src line for sid, lists kept under $SRC/apt.
  APT="$SRC/apt"
  mkdir -p "$APT/lists/partial" "$APT/archives/partial"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian sid main" > "$APT/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=-"
           -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache::Archives=$APT/archives"
           -o "Acquire::Languages=none" -o "APT::Sandbox::User=root")
  apt-get "${aptopts[@]}" update -qq
  # The .debian.tar.xz may fail to download; the .orig tarball is what we build from.
  (cd "$SRC" && apt-get "${aptopts[@]}" source --download-only -qq criu) || true
  tarball=$(ls "$SRC"/criu_4.[2-9]*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$tarball" ]; then
    echo "casfs setup: could not download CRIU's source (criu_4.2*.orig.tar.xz from Debian sid)." >&2
    echo "  Install criu >= 4.2 yourself and set CASFS_CRIU=/path/to/criu." >&2
    exit 1
  fi
fi
version=$(basename "$tarball" | sed -n 's/^criu_\([0-9.]*\)\.orig\.tar\..*/\1/p')
work="$SRC/criu-$version"
if [ ! -f "$work/Makefile" ]; then
  rm -rf "$work" "$work.tmp"
  mkdir -p "$work.tmp"
  tar -xf "$tarball" -C "$work.tmp" --strip-components=1
  mv "$work.tmp" "$work"
fi
echo "casfs setup: make -j$JOBS criu (CRIU $version)"
make -C "$work" -j"$JOBS" criu >"$work/build.log" 2>&1 || {
  tail -n 30 "$work/build.log" >&2
  echo "casfs setup: CRIU build failed; full log: $work/build.log" >&2
  exit 1
}
prefix="$CACHE/criu-$version"
mkdir -p "$prefix/bin"
install -m 0755 "$work/criu/criu" "$prefix/bin/criu.tmp"
mv "$prefix/bin/criu.tmp" "$prefix/bin/criu"
echo "casfs setup: built $("$prefix/bin/criu" --version | sed -n 's/^Version: *//p') at $prefix/bin/criu"
