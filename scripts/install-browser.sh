#!/usr/bin/env bash
# Install Debian's chromium and chromedriver for the browser tests (tests/integration/test_ui_browser.py).
# Idempotent: returns at once when both are present. Uses sudo only when not run as root.
# Exits non-zero (and the browser tests skip, saying why) when they cannot be installed.
set -euo pipefail

CHROMIUM=${CONVEYOR_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${CONVEYOR_CHROMEDRIVER:-/usr/bin/chromedriver}

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get on this machine: install chromium and chromedriver yourself" \
         "(or set CONVEYOR_CHROMIUM / CONVEYOR_CHROMEDRIVER); the browser tests will be skipped" >&2
    exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-browser: not root and no sudo: run 'apt-get install chromium chromium-driver' as root;" \
             "the browser tests will be skipped" >&2
        exit 1
    fi
    # Ask for a password only when someone can type it.
    if [[ -t 0 ]]; then SUDO=(sudo); else SUDO=(sudo -n); fi
fi

echo "==> Installing Debian's chromium and chromium-driver for the browser tests"
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -o DPkg::Lock::Timeout=300)
if ! { "${SUDO[@]}" "${APT[@]}" update >/dev/null \
       && "${SUDO[@]}" "${APT[@]}" install -y --no-install-recommends chromium chromium-driver >/dev/null; }; then
    echo "install-browser: apt-get could not install chromium and chromium-driver;" \
         "the browser tests will be skipped" >&2
    exit 1
fi
if [[ ! -x "$CHROMIUM" || ! -x "$CHROMEDRIVER" ]]; then
    echo "install-browser: installed, but $CHROMIUM or $CHROMEDRIVER is still missing" >&2
    exit 1
fi
"$CHROMIUM" --version 2>/dev/null || true
