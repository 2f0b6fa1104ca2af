#!/usr/bin/env bash
# Install a headless browser for the token-page test (tests/integration/test_token_page.py): Debian's
# `chromium` package (/usr/bin/chromium). Idempotent; it never fails its caller: when chromium cannot
# be installed (not Debian/apt, not root and no sudo, no network) it says why and exits 0, and the test
# skips with that reason.
#   bash scripts/setup_browser.sh
#   BROWSER_INSTALL=0 bash scripts/setup_browser.sh   # never install, only report
set -uo pipefail
: "${BROWSER_INSTALL:=1}"

say() { echo "setup_browser.sh: $*" >&2; }

for candidate in chromium chromium-browser google-chrome; do
  if command -v "$candidate" >/dev/null 2>&1; then
    say "found $(command -v "$candidate")"
    exit 0
  fi
done
if [[ "$BROWSER_INSTALL" != "1" ]]; then
  say "no chromium and BROWSER_INSTALL=$BROWSER_INSTALL: not installing (the page test will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "no chromium and no apt-get on this machine: install chromium yourself (the page test will skip)"
  exit 0
fi
if [[ "$(id -u)" == "0" ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  say "no chromium, and installing it needs root (no passwordless sudo): the page test will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1; then
  "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed (offline?)"
fi
if "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
  say "installed $(command -v chromium || echo chromium)"
else
  say "apt-get install chromium failed (offline, or no such package on this distribution): the page test will skip"
fi
exit 0
