"""Make the service's modules (app, auth, ...) and the e2e helpers importable from the e2e tests."""

import sys
from pathlib import Path

E2E = Path(__file__).resolve().parent
for path in (E2E.parent, E2E):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
