"""gunicorn settings for production (Procfile, Dockerfile) and the benchmark (README: Performance)."""

import gc
import os
import sys
from pathlib import Path

# Refuse to start, in one sentence, rather than boot workers that would all fail the same way.
if not (os.environ.get("BETTER_AUTH_SECRET") or os.environ.get("BETTER_AUTH_URL") or os.environ.get("JWKS_URL")):
    sys.exit("Refusing to start: set BETTER_AUTH_SECRET (the secret your Better Auth frontend signs tokens "
             "with) or BETTER_AUTH_URL (to verify its jwt plugin's tokens with its JWKS).")

# server.py sits beside this file; gunicorn reads this file before it puts its folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
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
# and forks the workers from it: 59 MB RSS per worker instead of 69 (README, Performance). No database
# connection crosses the fork: the master closes its own before forking (models.py).
preload_app = True
# Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new connections evenly.
# On a shared socket, the worker that wakes first accepts a whole burst of keep-alive connections
# (measured: 32 of 32, or 24/4/3/1) and serves them on one core while the others idle. The costs:
# connections still queued on a worker's socket are reset when that worker exits (timeout, HUP); a
# stalled worker keeps getting its share of new connections; and a second server started by the same
# user on the same port shares the traffic instead of failing. GUNICORN_REUSE_PORT=0 turns it off.
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "1") != "0"
timeout = 30
graceful_timeout = 25
keepalive = 5
# The access log is the app's own line per request on stdout (method, path, status, ms, request id,
# user id: README, Logs); a second line from gunicorn would only repeat it.
accesslog = None
errorlog = "-"
loglevel = (os.environ.get("LOG_LEVEL") or "info").lower()
# gunicorn 27's control socket lives in $HOME, which the container's user does not have.
control_socket_disable = True


# Python's recipe for forking servers (gc.freeze() documentation): no collection while the master
# builds the app, its objects frozen just before the workers are forked. A worker's collections then
# never walk (nor write to) the pages it shares with the master, so they stay shared: with preload,
# 17 MB of a worker's 59 are its own (46 of 69 before). A SIGHUP runs this file again in the master:
# by then the app is frozen, and the collector stays on.
if gc.get_freeze_count() == 0:
    gc.disable()


def when_ready(_server):
    """In the master, after the app is loaded and before the first worker is forked."""
    gc.freeze()
    gc.enable()


def post_fork(_server, _worker):
    """In each new worker: the collector on, whatever the master's state at the fork."""
    gc.enable()
