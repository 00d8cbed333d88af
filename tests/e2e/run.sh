#!/usr/bin/env bash
# Browser end-to-end test of the chat page (CI entry, called by .ci/run).
# Installs what it needs when missing (Debian's chromium and redis-server,
# playwright-core and ws from package-lock.json), builds the server, then runs
# tests/e2e/chat.test.mjs (the page in Chromium), tests/e2e/presence.test.mjs
# (presence events and room member lists on the page, across three instances,
# one of them SIGKILLed) and tests/e2e/client.test.mjs (the reference client
# web/client.mjs under Node, through a fault-injecting proxy) under node's
# test runner. Never skips: a browser that cannot start is a failure.
#
# Screenshots: written to target/e2e/screenshots (untracked), so a run never
# modifies the committed docs/img/*.png. To refresh the README's pictures,
# run with SB_E2E_UPDATE_SCREENSHOTS=1: they then replace docs/img/*.png.
# (SCREENSHOT_DIR=DIR sends them elsewhere instead.)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
started=$SECONDS

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v node >/dev/null 2>&1 || { echo "node (>= 20) is required" >&2; exit 1; }
node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error(`node >= 20 required, found ${process.version}`); process.exit(1) }'
# Chromium's launcher script prints harmless shell noise on some machines.
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"

# Every package pinned in package-lock.json, at its pinned version?
stale=$(node -e '
  const lock = require("./tests/e2e/package-lock.json");
  const stale = [];
  for (const [dir, pkg] of Object.entries(lock.packages)) {
    if (!dir) continue;
    let have = "";
    try { have = require(`./tests/e2e/${dir}/package.json`).version } catch {}
    if (have !== pkg.version) stale.push(`${dir.replace(/^node_modules\//, "")} ${pkg.version}`);
  }
  console.log(stale.join(", "));
')
if [ -n "$stale" ]; then
  echo "== npm ci ($stale)"
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== cargo build --bin switchboard"
cargo build --locked --bin switchboard
echo "(set-up and build: $((SECONDS - started)) s)"

status=0
test_started=$SECONDS
node --test tests/e2e/chat.test.mjs || status=$?
echo "(browser e2e: $((SECONDS - test_started)) s)"
test_started=$SECONDS
node --test tests/e2e/presence.test.mjs || status=$?
echo "(presence events e2e: $((SECONDS - test_started)) s)"
test_started=$SECONDS
node --test tests/e2e/client.test.mjs || status=$?
echo "(reference client: $((SECONDS - test_started)) s)"
exit "$status"
