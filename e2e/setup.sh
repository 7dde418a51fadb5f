#!/usr/bin/env bash
# Installs what the e2e tests need, when missing: Debian's chromium and chromium-driver, and the
# Python packages of e2e/requirements.txt into the project's venv (or the active python).
# Idempotent; run as root (CI and the dev machines are root), or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q chromium chromium-driver
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q -r e2e/requirements.txt

chromium --version 2>/dev/null
chromedriver --version
