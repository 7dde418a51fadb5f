#!/usr/bin/env bash
# Installs what the e2e tests and the TypeScript client's tests need, when missing: Debian's chromium
# and chromium-driver, Node.js 20 or later and npm (from the machine's apt sources), the Python
# packages of e2e/requirements.txt into the project's venv (or the active python), and the client's
# npm packages from its lock file.
# Idempotent; run as root (CI and the dev machines are root), or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q "${missing[@]}"
fi
# Debian's own nodejs package leaves npm to a package of its own; NodeSource's includes it.
if ! command -v npm >/dev/null 2>&1; then
    $SUDO apt-get install -y -q npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "e2e/setup.sh: Node.js 20 or later is needed (this machine's apt sources give $(node --version))." >&2
    exit 1
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --require-hashes -r e2e/requirements.txt
npm --prefix clients/typescript ci --no-audit --no-fund --loglevel=error

chromium --version 2>/dev/null
chromedriver --version
echo "node $(node --version), npm $(npm --version)"
