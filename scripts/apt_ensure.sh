# Sourced by setup scripts. apt_ensure WHAT PKG...: installs the Debian packages that are missing
# (root with apt-get only; otherwise says which ones it assumes are there). Idempotent.
apt_ensure() {
  local what=$1; shift
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    local missing="" p
    for p in "$@"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
      echo "casfs setup: installing $what:$missing"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
  else
    echo "casfs setup: not root (or no apt-get); assuming $what are installed: $*" >&2
  fi
}
