# Tasks API: gunicorn (settings in gunicorn.conf.py) on a slim Python image, as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app

# Requirements first, so that a code change does not reinstall them: the lock (scripts/lock) pins every
# package, transitive ones too, and pip checks each download against its hash.
COPY requirements.txt .
RUN pip install --no-cache-dir --require-hashes -r requirements.txt

# The service's modules, its migrations, the OpenAPI document and the /docs page (its HTML and script);
# .dockerignore keeps tests, tools, databases and .env out of the build context.
COPY *.py openapi.json ./
COPY docs ./docs
COPY migrations ./migrations

# A numeric user and group, so that runtimes enforcing runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin app
USER 10001:10001

EXPOSE 8000
# No curl in the image: the health check is Python's own urllib against /health (liveness, no database).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: gunicorn is PID 1 and receives SIGTERM for a graceful shutdown (graceful_timeout 25 s).
CMD ["gunicorn", "app:app"]
