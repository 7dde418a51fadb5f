#!/usr/bin/env bash
# What the fault scenarios need beyond the service's own requirements: Debian's pgbouncer and nginx
# (installed only when missing; their Debian services are never started: the scenarios run them as
# their own processes, with their own config files, on loopback ports), and hypothesis in the venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

missing=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v ps >/dev/null 2>&1 || missing+=(procps)       # the harness finds gunicorn's workers with ps
command -v ss >/dev/null 2>&1 || missing+=(iproute2)     # and who holds a connection with ss
if [ "${#missing[@]}" -gt 0 ]; then
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    # Deny service starts for the length of this install only.
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python="$root/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
"$python" -m pip install -q --require-hashes -r "$here/requirements.txt"
