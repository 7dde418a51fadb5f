"""The database connection: the engine, the scoped session, the one function that runs a view's
statement, the pool's hooks, fork safety, and the schema's creation."""

from __future__ import annotations

import logging
import os
import select as io_select
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from flask import Flask, current_app
from psycopg2 import extensions as pg_extensions
from sqlalchemy import (
    Engine,
    Executable,
    MetaData,
    Row,
    Table,
    create_engine,
    event,
    exc,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.pool import NullPool

import migrations
from errors import ConfigError, SchemaNotReady, classify_database_error
from models import UsersRef, insert_task, register_user, users_table

log = logging.getLogger(__name__)

# The views' unit of work. Unbound on purpose: each request's session is bound to its own app's
# engine when it first needs the database (run()), so importing this module opens no connection and
# reads no configuration, and a request that never touches the database creates no session at all.
Session = scoped_session(sessionmaker(expire_on_commit=False))
KNOWN_USERS_MAX = 100_000


@dataclass
class Database:
    """What one app owns of the database: its engine, its schema, and the users it has registered."""

    engine: Engine
    schema: SchemaState
    # The create's statement for its database (PostgreSQL and SQLite tell an insert from a replay apart differently).
    insert_task: Executable
    known_users: set[str] = field(default_factory=set)


def init_app(app: Flask) -> Database:
    """Give the app its engine and schema, and hand the request's connection back at teardown.

    The schema is migrated now (MIGRATE_ON_START), or checked; a database that is asleep (Neon scaled
    to zero) or down does not stop the service, which answers 503s and migrates on first use. A
    configuration mistake (a wrong password, a database that is not UTF8, ...) does stop it, in one
    sentence.
    """
    engine = make_engine(normalise_database_url(app.config["DATABASE_URL"]), app.config)
    database = Database(engine, SchemaState(engine, app.config), insert_task(engine.dialect.name))
    app.extensions["db"] = database
    app.extensions["user_id_acceptable"] = user_id_acceptable
    app.teardown_appcontext(_remove_session)
    try:
        database.schema.ensure()
    except SchemaNotReady as error:  # the release phase migrates; until then, 503s and readiness says why
        log.warning("%s Until then, task requests are answered 503.", error)
    except (exc.DBAPIError, exc.TimeoutError) as error:
        kind, reason = classify_database_error(error)
        if kind != "transient":  # no retry will fix it: refuse to start
            raise ConfigError(
                reason if kind == "configuration" else f"The database refused to set up the schema: {reason}"
            ) from None
        log.warning("database unreachable at startup (%s); the schema will be migrated on first use", reason)
    return database


def current() -> Database:
    """The database of the app handling this request."""
    database: Database = current_app.extensions["db"]
    return database


def run(statement: Executable, params: Mapping[str, Any]) -> Sequence[Row[Any]]:
    """Run one statement of a view on the request's connection and return all its rows (if it has any).

    The schema is ensured first (created on first use if the database was down at startup). The
    engine is in autocommit, so the statement is committed by the server as it runs: Session.commit()
    sends nothing and only hands the connection back to the pool. That is why this function commits,
    not the view: the view shapes its answer without holding a connection. A failed statement is
    rolled back (the connection handed back, or discarded if it is broken) and the error re-raised for
    the error handlers.
    """
    database = current()
    database.schema.ensure()
    session = Session() if Session.registry.has() else Session(bind=database.engine)
    try:
        result = session.connection().execute(statement, params)
        rows = result.all() if result.returns_rows else []
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return rows


def user_id_acceptable(user_id: str) -> bool:
    """Whether a token's sub can be an id of the users table (always, while its schema is not known yet)."""
    users = current().schema.users
    return users is None or migrations.accepts(users.ref, user_id)


def users() -> UsersTable:
    """The users table of this app's database (the schema ensured first)."""
    return current().schema.ensure()


def register(user_id: str, email: str | None, name: str | None) -> None:
    """Add the user to this service's own users table, once per process (a no-op when present)."""
    database = current()
    if user_id in database.known_users:
        return
    run(database.schema.ensure().register, {"id": user_id, "email": email, "name": name})
    if len(database.known_users) >= KNOWN_USERS_MAX:
        database.known_users.clear()  # a bound on memory; forgetting only costs one idempotent insert per user
    database.known_users.add(user_id)


def forget(user_id: str) -> None:
    """The user's row is gone (deleted behind the service's back): register it again on the next write."""
    current().known_users.discard(user_id)


def is_foreign_key_violation(error: exc.IntegrityError) -> bool:
    """Whether a write failed because the user it names is not in the users table."""
    pgcode = getattr(error.orig, "pgcode", None)
    return pgcode == "23503" or "FOREIGN KEY constraint failed" in str(error.orig)


def _remove_session(_error: BaseException | None) -> None:
    """Return the request's connection to the pool (nothing to do when it opened none)."""
    Session.remove()


# --- the engine -------------------------------------------------------------------------------------


def normalise_database_url(raw: str) -> str:
    """Accept postgres:// and postgresql:// URLs (Heroku and Neon give the first) for psycopg2.

    A URL that cannot be read is a configuration error, in one sentence that never repeats the URL
    (it holds the password).
    """
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ConfigError(
            "DATABASE_URL must look like postgresql://user:password@host/dbname "
            "(or sqlite:///file.db); it has no scheme."
        )
    url = f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else raw
    try:
        parsed = make_url(url)
    except (ValueError, exc.ArgumentError):
        raise ConfigError(
            "DATABASE_URL cannot be parsed: check the port (a number) and percent-encode "
            "special characters in the user and password (@ as %40, / as %2F, : as %3A)."
        ) from None
    if "@" in (parsed.host or ""):
        raise ConfigError("DATABASE_URL has a raw @ in its password: write it as %40.")
    return url


def display_url(url: str) -> str:
    """The database URL as it may be printed or logged: with its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, settings: Mapping[str, Any], *, pool: bool = True) -> Engine:
    """Build the engine from the DB_* settings: autocommit, so that each request is one statement and
    one round trip (pool=False: no pool, a connection per use, for the migrations).

    Every view issues a single self-contained statement, so there is no multi-statement
    transaction to protect; BEGIN and COMMIT would only add round trips to a remote database.
    """
    parsed: URL = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            isolation_level="AUTOCOMMIT",
            # Waiting for a writer's lock beats failing with "database is locked".
            connect_args={"timeout": 15, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        _ENGINES.add(engine)
        return engine

    connect_args: dict[str, Any] = {
        "connect_timeout": settings["DB_CONNECT_TIMEOUT"],
        # The deadlines _wait_with_deadline enforces, carried by this engine's connections.
        "connection_factory": _timed_connection_class(settings["DB_CONNECT_TIMEOUT"], settings["DB_QUERY_TIMEOUT"]),
        "application_name": "tasks-api",
        # A dead network path must surface as an error, not a hang: keepalives for idle sockets,
        # tcp_user_timeout for unacknowledged writes.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    if "gssencmode" not in parsed.query and "PGGSSENCMODE" not in os.environ:
        # Neon and most hosted PostgreSQL have no Kerberos: skip libpq's GSSAPI probe on every connect
        # (it loads Kerberos into each worker, about 1 MB, for nothing), unless the URL or PGGSSENCMODE
        # asks for something else.
        connect_args["gssencmode"] = "disable"
    pooling: dict[str, Any] = (
        {"poolclass": NullPool}
        if not pool
        else {
            "pool_size": settings["DB_POOL_SIZE"],
            "max_overflow": settings["DB_MAX_OVERFLOW"],
            "pool_timeout": settings["DB_POOL_TIMEOUT"],
            # A connection that a middlebox (NAT, load balancer) may have dropped in silence is replaced
            # before it is old enough to meet that; one the server closed (Neon's compute scaled to zero)
            # is caught by the checkout hook.
            "pool_recycle": 240,
            # Replaced by the checkout hook, which costs no round trip on a busy connection.
            "pool_pre_ping": False,
        }
    )
    engine = create_engine(parsed, isolation_level="AUTOCOMMIT", connect_args=connect_args, **pooling)
    pg_extensions.set_wait_callback(_wait_with_deadline)
    event.listen(engine, "checkout", _make_checkout_check(settings["DB_IDLE_CHECK_SECONDS"]))
    event.listen(engine, "checkin", _mark_checkin)
    _ENGINES.add(engine)
    return engine


def _timed_connection_class(connect_timeout: float, query_timeout: float) -> type:
    """A psycopg2 connection class whose connections carry the deadlines of the engine that opens them."""
    return type(
        "TimedConnection",
        (pg_extensions.connection,),
        {"connect_deadline": float(connect_timeout), "wait_deadline": float(query_timeout)},
    )


_CONNECTED = (pg_extensions.STATUS_READY, pg_extensions.STATUS_BEGIN, pg_extensions.STATUS_PREPARED)


def _wait_with_deadline(connection: Any) -> None:
    """psycopg2's wait callback: each wait on the server ends within the deadline, or the connection is lost.

    With a wait callback libpq connects asynchronously and no longer applies connect_timeout itself, so
    a connection that is still being set up gets DB_CONNECT_TIMEOUT here, and every later wait
    DB_QUERY_TIMEOUT. tcp_user_timeout bounds only unacknowledged bytes: neither it nor connect_timeout
    sees a pooler (PgBouncer, Neon's pooled endpoint) that accepts the connection and then queues the
    statement while it cannot reach the server, nor a server that stalls. Past the deadline the error
    reads as a lost connection ("could not receive data from server"), so SQLAlchemy discards the
    connection and the request answers 503 like any other outage.
    """
    connecting = connection.status not in _CONNECTED
    limit = getattr(connection, "connect_deadline" if connecting else "wait_deadline", 8.0)
    deadline = time.monotonic() + limit
    while True:
        state = connection.poll()
        if state == pg_extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise psycopg2.OperationalError(
                f"could not {'connect to' if connecting else 'receive data from'} server: no answer within {limit:g} s"
            )
        poller = io_select.poll()
        poller.register(
            connection.fileno(), io_select.POLLIN if state == pg_extensions.POLL_READ else io_select.POLLOUT
        )
        poller.poll(remaining * 1000)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Turn on foreign keys (and so ON DELETE CASCADE), which SQLite leaves off by default."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _mark_checkin(_dbapi_connection: Any, record: Any) -> None:
    """Remember when a connection went idle."""
    record.info["idle_since"] = time.monotonic()


def _make_checkout_check(idle_check_seconds: float) -> Callable[[Any, Any, Any], None]:
    """Build the pool checkout hook that replaces pool_pre_ping."""

    def check_on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """Refuse a connection the server has closed, without a round trip when it is busy.

        An idle PostgreSQL connection never has data waiting: if its socket is readable, the
        server has sent a FATAL message or closed it (pg_terminate_backend, Neon's compute scaled to
        zero). Only a connection idle for longer than idle_check_seconds, whose silent loss the
        socket cannot show, is pinged.
        """
        try:
            poller = io_select.poll()  # select() cannot watch a descriptor >= 1024 (FD_SETSIZE)
            poller.register(dbapi_connection.fileno(), io_select.POLLIN)
            readable = poller.poll(0)
        except (OSError, ValueError) as error:
            raise exc.DisconnectionError("connection socket is unusable") from error
        if readable:
            raise exc.DisconnectionError("server closed the idle connection")
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > idle_check_seconds:
            try:
                cursor = dbapi_connection.cursor()
                cursor.execute("SELECT 1")
                cursor.close()
            except Exception as error:  # any failure of the ping means: use another connection
                raise exc.DisconnectionError("idle connection failed its ping") from error

    return check_on_checkout


# Engines must not cross a fork: a gunicorn worker forked from a master that opened connections
# would otherwise share their sockets with its siblings.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _close_idle_connections_before_fork() -> None:
    """The forking process gives up its pooled connections: a gunicorn master (preload_app) has no use
    for the one that created the schema, and the child starts from an empty pool of its own."""
    for engine in list(_ENGINES):
        engine.dispose()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_idle_connections_before_fork)


# --- the schema -------------------------------------------------------------------------------------

# Migrations may wait for a sleeping Neon compute, and for a long DDL or another instance's migration
# (the lock); the app's own deadlines are seconds.
MIGRATION_CONNECT_TIMEOUT = 30
MIGRATION_WAIT_TIMEOUT = 900
# While the schema is behind (the release's migrations have not run), it is checked again at most this often.
SCHEMA_RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class UsersTable:
    """Which table holds the users, whether this service may write to it, and how it registers a user."""

    ref: UsersRef
    table: Table
    register: Executable

    @property
    def owned(self) -> bool:
        """Whether this service created the table (and so registers users in it)."""
        return self.ref.owned

    @property
    def name(self) -> str:
        """The table's name."""
        return self.table.name


def migration_engine(settings: Mapping[str, Any]) -> Engine:
    """An engine for migrations: over DATABASE_URL_UNPOOLED when set (Neon's direct, not pooled, URL),
    with deadlines long enough for a compute that wakes up and for a DDL that takes its time."""
    url = normalise_database_url(settings["DATABASE_URL_UNPOOLED"] or settings["DATABASE_URL"])
    if make_url(url).get_backend_name() == "sqlite":
        return make_engine(url, settings)
    return make_engine(
        url,
        {**settings, "DB_CONNECT_TIMEOUT": MIGRATION_CONNECT_TIMEOUT, "DB_QUERY_TIMEOUT": MIGRATION_WAIT_TIMEOUT},
        pool=False,
    )


def upgrade_schema(settings: Mapping[str, Any], to: str = "heads") -> UsersRef:
    """Run the migrations to `to` (the code's head), over the migration engine, under the schema lock."""
    engine = migration_engine(settings)
    try:
        return migrations.upgrade(engine, settings["USERS_TABLE"], jwks=bool(settings["JWKS_URL"]), to=to)
    finally:
        engine.dispose()


class SchemaState:
    """The schema as this process knows it: migrated to the code's head (MIGRATE_ON_START) or found there.

    Done once per process, and again on demand if the database was down at start (the first request
    tries). Behind the code's head (MIGRATE_ON_START off, the release's migrations not run yet), task
    requests are refused (503) rather than answered with errors, and the revision is read again at most
    every SCHEMA_RECHECK_SECONDS.
    """

    def __init__(self, engine: Engine, settings: Mapping[str, Any]) -> None:
        self._engine = engine
        self._settings = settings
        self._lock = threading.Lock()
        self.users: UsersTable | None = None
        self._attempts = 0
        self._failure: Exception | None = None
        self._not_ready: tuple[float, migrations.SchemaNotReady] | None = None

    def ensure(self) -> UsersTable:
        """Return the users table, migrating (or checking) the schema first if that has not succeeded yet."""
        users = self.users
        if users is not None:
            return users
        attempt = self._attempts
        with self._lock:
            if self.users is None:
                if self._attempts != attempt and self._failure is not None:
                    raise self._failure  # it failed while we waited: 503 now, not after one more timeout
                if self._not_ready and time.monotonic() < self._not_ready[0]:
                    raise self._not_ready[1]
                self._attempts += 1
                try:
                    self.users = self._prepare()
                    self._failure = self._not_ready = None
                except migrations.SchemaNotReady as error:
                    self._not_ready = (time.monotonic() + SCHEMA_RECHECK_SECONDS, error)
                    raise
                except exc.OperationalError as error:
                    self._failure = error
                    raise
            return self.users

    def _prepare(self) -> UsersTable:
        """Migrate (or check) the schema; the users table as the views use it."""
        settings = self._settings
        # Within the app's own deadlines first: a database that is down answers 503s now, not after the
        # migrations' long wait (the release command, `flask --app app db upgrade`, waits it out).
        with self._engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        if settings["MIGRATE_ON_START"]:
            ref = upgrade_schema(settings)
            # A connection opened before the migration may keep the old schema in memory (SQLite's pragmas
            # do): the pool starts afresh.
            self._engine.dispose()
        else:
            ref = migrations.verify(self._engine, settings["USERS_TABLE"], jwks=bool(settings["JWKS_URL"]))
        table = users_table(ref, MetaData())
        return UsersTable(ref, table, register_user(table, self._engine.dialect.name))
