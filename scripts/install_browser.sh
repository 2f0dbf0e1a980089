#!/usr/bin/env bash
# psalm: the headless browser for the web demo's browser test (tests/test_browser.py): Debian's
# chromium and chromium-driver. Needs root (or sudo) and apt; .ci/run runs it before the tests.
# Idempotent: when both are installed it changes nothing and returns at once.
#
#   bash scripts/install_browser.sh
set -euo pipefail
log() { echo "[install_browser] $*"; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  log "chromium and chromedriver already installed ($(chromium --version 2>/dev/null | head -1)); nothing to do"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] apt-get not found: install chromium and its chromedriver with your package manager" \
       "(or point PSALM_CHROMIUM / PSALM_CHROMEDRIVER at them)" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[install_browser] needs root (or sudo) for apt-get" >&2; exit 1; }
  SUDO=(sudo)
fi
log "installing Debian's chromium + chromium-driver (apt; about a minute)"
"${SUDO[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver
log "done: $(chromium --version 2>/dev/null | head -1)"
