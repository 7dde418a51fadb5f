"""gunicorn settings for production (Procfile, Dockerfile) and the benchmark. See README: Performance."""

import logging
import os
import sys

# Refuse to start, in one sentence, rather than boot workers that would all fail the same way.
if not os.environ.get("BETTER_AUTH_SECRET"):
    sys.exit("Refusing to start: BETTER_AUTH_SECRET is not set (the secret your Better Auth frontend "
             "signs tokens with).")

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS") or 4)
# Each worker builds its own engine after the fork (app:app is created lazily in the worker).
preload_app = False
timeout = 30
graceful_timeout = 25
keepalive = 5
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# The application logs to stdout next to the access log.
logging.basicConfig(stream=sys.stdout, level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
