"""The service, running, for tests written in another language (the TypeScript client's).

    python -m tests.live_service [--setting NAME=VALUE ...]    (from the repository root)

starts, with the shared harness: a private PostgreSQL database, a proxy in front of it that can cut it,
the service under gunicorn on a free loopback port, and a control port. It prints one JSON line,
{"url": ..., "control": ..., "secret": ...}, then serves until its standard input closes (the test
runner that started it is done, or died) or it gets SIGTERM, and then stops everything and drops the
database. The control port answers POST /database/cut (every database connection is reset and new
ones are refused: the database is down) and POST /database/restore.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness import POSTGRES, Gunicorn, PrivateDatabase, TcpProxy, drop_stale_databases


def control_server(proxy: TcpProxy) -> ThreadingHTTPServer:
    """The control port: POST /database/cut and /database/restore, answered 204."""
    actions = {"/database/cut": proxy.cut, "/database/restore": proxy.restore}

    class Control(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            action = actions.get(self.path)
            if action is not None:
                action()
            self.send_response(204 if action else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the signature http.server calls
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=server.serve_forever, daemon=True, name="live-control").start()
    return server


def _wait_for_end_of_input(stop: threading.Event) -> None:
    """Set stop once standard input closes: whoever started this process is gone."""
    sys.stdin.read()
    stop.set()


def main(argv: list[str] | None = None) -> int:
    """Start everything, print where it is, serve until stdin closes or SIGTERM, clean up."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE", help="a service setting")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.setting)
    secret = secrets.token_urlsafe(32)
    drop_stale_databases("tasks_live", POSTGRES)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with PrivateDatabase("tasks_live") as database, tempfile.TemporaryDirectory(prefix="live-service-") as logs:
        host, port = database.address()
        proxy = TcpProxy(port, target_host=host)
        try:
            service = Gunicorn(
                {
                    "BETTER_AUTH_SECRET": secret,
                    "DATABASE_URL": database.url(port=proxy.port),
                    "DB_CONNECT_TIMEOUT": "2",
                    **settings,
                },
                Path(logs) / "gunicorn.log",
                workers=1,
                threads=4,
            )
            control = control_server(proxy)
            try:
                service.wait_healthy()
                where = {
                    "url": service.base_url,
                    "control": f"http://127.0.0.1:{control.server_port}",
                    "secret": secret,
                }
                print(json.dumps(where), flush=True)
                threading.Thread(target=_wait_for_end_of_input, args=(stop,), daemon=True).start()
                stop.wait()
            finally:
                control.shutdown()
                service.stop()
                if service.process.popen.returncode not in (0, None):
                    sys.stderr.write(service.process.tail(50) + "\n")
        finally:
            proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
