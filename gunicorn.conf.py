"""gunicorn settings for production (Procfile, Dockerfile) and the benchmark; the measurements behind
them are in bench/README.md."""

import gc
import logging
import os
import sys
from pathlib import Path

# server.py sits beside this file; gunicorn reads this file before it puts its folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from logs import ClientBytesRedacted, gunicorn_logconfig  # noqa: E402
from server import default_workers  # noqa: E402

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# 2 x the CPUs this process may use (affinity, cgroup quota), not the host's, and at most 8: each worker
# holds up to DB_POOL_SIZE + DB_MAX_OVERFLOW database connections (README: Configuration).
workers = int(os.environ.get("WEB_CONCURRENCY") or default_workers())
# gthread, except that a thread only ever gets a whole request: slow clients wait on the worker's
# poller, each under a deadline, instead of holding a thread (server.py, README: Production).
worker_class = "server.RequestBufferingWorker"
threads = int(os.environ.get("GUNICORN_THREADS") or 4)
# The master builds the app once (configuration checked, schema created, before any worker starts)
# and forks the workers from it, which share its memory. No database connection crosses the fork:
# the master closes its own before forking (db.py).
preload_app = True
# Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new connections evenly; on
# a shared socket the worker that wakes first accepts whole bursts of keep-alive connections. The
# costs: connections still queued on a worker's socket are reset when that worker exits (timeout,
# HUP); a stalled worker keeps getting its share of new connections; a second server started by the
# same user on the same port shares the traffic instead of failing. GUNICORN_REUSE_PORT=0 turns it off.
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "1") != "0"
timeout = 30
graceful_timeout = 25
keepalive = 5
# The access log is the app's own line per request on stdout (method, path, status, ms, request id,
# user id: README, Logs); a second line from gunicorn would only repeat it.
accesslog = None
errorlog = "-"
loglevel = (os.environ.get("LOG_LEVEL") or "info").lower()
# gunicorn's records about a request it cannot parse quote the client's bytes: never a token or a query.
logging.getLogger("gunicorn.error").addFilter(ClientBytesRedacted())
# LOG_FORMAT=json: gunicorn's own records are JSON lines on stdout too, like the app's (logs.py).
_json_logging = gunicorn_logconfig((os.environ.get("LOG_FORMAT") or "text").strip().lower(), loglevel)
if _json_logging is not None:
    logconfig_dict = _json_logging
# gunicorn 27's control socket lives in $HOME, which the container's user does not have.
control_socket_disable = True


# Python's recipe for forking servers (gc.freeze() documentation): no collection while the master
# builds the app, its objects frozen just before the workers are forked, so that a worker's collections
# never write to the pages it shares with the master. A SIGHUP runs this file again in the master: by
# then the app is frozen, and the collector stays on.
if gc.get_freeze_count() == 0:
    gc.disable()


def when_ready(server):
    """In the master, after the app is loaded and before the first worker is forked."""
    gc.freeze()
    gc.enable()
    # A pool smaller than the threads that share it makes requests wait for connections (or churn
    # overflow ones) under load.
    config = getattr(server.app.wsgi(), "config", {})
    pool = config.get("DB_POOL_SIZE")
    if isinstance(pool, int) and pool < server.cfg.threads:
        server.log.warning(
            "DB_POOL_SIZE (%d) is smaller than the %d threads of each worker that share its pool: "
            "set DB_POOL_SIZE to at least GUNICORN_THREADS.",
            pool,
            server.cfg.threads,
        )


def post_fork(_server, _worker):
    """In each new worker: the collector on, whatever the master's state at the fork."""
    gc.enable()
