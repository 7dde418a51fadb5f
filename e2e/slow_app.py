"""The real app plus one slow route, for the graceful-shutdown test (app.py is not changed).

GET /slow?seconds=N sleeps N seconds (at most 10), then answers 200 {"slept": N}. When
E2E_SLOW_MARKER names a file, the route touches it on entry, so the test knows the request is in flight.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import jsonify, request

from app import create_app

app = create_app()


@app.get("/slow")
def slow():  # type: ignore[no-untyped-def]
    seconds = min(float(request.args.get("seconds", "2")), 10.0)
    marker = os.environ.get("E2E_SLOW_MARKER")
    if marker:
        Path(marker).touch()
    time.sleep(seconds)
    return jsonify(slept=seconds)
