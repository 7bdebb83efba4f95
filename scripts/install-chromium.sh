#!/usr/bin/env bash
# Browser-test prerequisites: Debian's Chromium (apt) and Playwright for Python (pip).
# Playwright only drives /usr/bin/chromium (executable_path); it never downloads a browser,
# so `playwright install` is never run. Idempotent: installs only what is missing.
# Needs root for apt-get (CI has it). The Python bin folder comes from RLHF_BIN (default .venv/bin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RLHF_BIN="${RLHF_BIN:-$ROOT/.venv/bin}"
CHROMIUM=/usr/bin/chromium

# 1. Chromium from Debian, with a font package so screenshots show readable text.
if [[ ! -x "$CHROMIUM" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-chromium: $CHROMIUM is missing and apt-get needs root: run 'sudo $0'" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi
"$CHROMIUM" --version

# 2. Playwright's Python client (its driver ships inside the wheel; no browser download).
if [[ ! -x "$RLHF_BIN/python" ]]; then
    echo "install-chromium: no Python at $RLHF_BIN/python: run 'make install' or set RLHF_BIN" >&2
    exit 1
fi
if ! "$RLHF_BIN/python" -c "import playwright" 2>/dev/null; then
    "$RLHF_BIN/python" -m pip install --quiet "playwright>=1.50,<2"
fi
"$RLHF_BIN/python" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
