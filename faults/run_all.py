#!/usr/bin/env python3
"""Run the fault scenarios (all, or the numbers given), one process each, each bounded in time.

    .venv/bin/python faults/run_all.py          # all eleven
    .venv/bin/python faults/run_all.py 1 8      # scenarios 1 and 8

Prints each scenario's one line, then "N passed, M failed"; exits 1 if any scenario failed.
Logs: faults/logs/NN-name/ (the service's, PgBouncer's, nginx's, and the scenario's own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULTS = Path(__file__).resolve().parent
sys.path.insert(0, str(FAULTS))

from harness import PYTHON, drop_stale_databases  # noqa: E402

# number: (script, time limit in seconds; each script also bounds itself a little below this)
SCENARIOS = {
    1: ("s01_db_outage.py", 200),
    2: ("s02_idle_drop.py", 150),
    3: ("s03_pgbouncer.py", 450),
    4: ("s04_cold_start.py", 180),
    5: ("s05_load_isolation.py", 210),
    6: ("s06_lost_updates.py", 150),
    7: ("s07_scale_out.py", 150),
    8: ("s08_fuzz.py", 450),
    9: ("s09_token_attacks.py", 270),
    10: ("s10_secrets_leaks.py", 150),
    11: ("s11_slow_clients.py", 150),
}


def run(number: int) -> tuple[bool, str]:
    script, limit = SCENARIOS[number]
    started = time.monotonic()
    process = subprocess.Popen(
        [PYTHON, str(FAULTS / script)],
        cwd=FAULTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    output: list[str] = []
    try:
        out, _ = process.communicate(timeout=limit)
        output = out.splitlines()
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the scenario unwinds and cleans up
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
        output = (out or "").splitlines() + [f"scenario {number:02d}: killed after {limit}s FAIL"]
    line = next(
        (text for text in reversed(output) if text.startswith("scenario ")),
        f"scenario {number:02d} {script}: no result line (exit {process.returncode}) FAIL",
    )
    for text in output:
        if text.startswith("  FAIL"):
            print(text, flush=True)
    print(f"{line}  [{time.monotonic() - started:.0f}s]", flush=True)
    return line.endswith("PASS") and process.returncode == 0, line


def main(argv: list[str]) -> int:
    numbers = [int(arg) for arg in argv] or list(SCENARIOS)
    try:
        stale = drop_stale_databases()
        if stale:
            print(f"dropped {len(stale)} databases left by earlier killed runs", flush=True)
    except Exception as error:  # noqa: BLE001 - the scenarios will say what is wrong
        print(f"cannot reach PostgreSQL: {error}", flush=True)
    started = time.monotonic()
    results = [run(number) for number in numbers]
    passed = sum(ok for ok, _ in results)
    failed = len(results) - passed
    print(f"fault scenarios: {time.monotonic() - started:.0f}s", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
