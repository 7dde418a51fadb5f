"""Database layer: the Task model, the engine, the scoped session and schema setup."""

from __future__ import annotations

import logging
import os
import select as io_select
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import Any

import psycopg2
from psycopg2 import extensions as pg_extensions
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    exc,
    func,
    inspect,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from errors import ConfigError

log = logging.getLogger(__name__)

# Unbound on purpose: create_app() binds it to the engine it builds, so importing this module
# opens no connection and reads no configuration.
Session = scoped_session(sessionmaker(expire_on_commit=False))

TITLE_MAX = 200
DESCRIPTION_MAX = 1000
# Marks a users table that this service created and may therefore write to; an auth-owned table
# (Better Auth's) never carries it. A check constraint, because both PostgreSQL and SQLite reflect it.
OWNED_USERS_MARKER = "ck_tasks_api_users_id_not_empty"
# A lock key of our own, so that workers starting together create the schema one at a time.
SCHEMA_LOCK_KEY = 0x7A5C_0001


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC, SQLite included."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # SQLite keeps no zone; this service only ever writes UTC, so a naive value is UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base for the service's models."""


class Task(Base):
    """One todo item, owned by exactly one user."""

    __tablename__ = "tasks"
    __table_args__ = (
        # One index per list order, each led by user_id, so a user's page is an index range scan
        # whatever the size of the table.
        Index("ix_tasks_user_created", "user_id", "created_at", "id"),
        Index("ix_tasks_user_updated", "user_id", "updated_at", "id"),
        Index("ix_tasks_user_title", "user_id", "title", "id"),
        # Ids are never reused: without AUTOINCREMENT, SQLite hands the id of the newest deleted task
        # to the next one, and a retried DELETE of the old id would delete the new task.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The foreign key to the users table is added when the table is created (see create_schema):
    # which table it points at is only known then.
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    title: Mapped[str] = mapped_column(String(TITLE_MAX), nullable=False)
    description: Mapped[str | None] = mapped_column(String(DESCRIPTION_MAX), nullable=True)
    completed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default="false")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


TASKS = Task.__table__
# The columns of a task as the API returns it, in its JSON order.
TASK_COLUMNS = tuple(TASKS.c[name] for name in
                     ("id", "user_id", "title", "description", "completed", "created_at", "updated_at"))


def task_json(row: Any) -> dict[str, Any]:
    """A row of TASK_COLUMNS as the API's JSON object."""
    return {"id": row[0], "user_id": row[1], "title": row[2], "description": row[3], "completed": row[4],
            "created_at": iso_utc(row[5]), "updated_at": iso_utc(row[6])}


def iso_utc(value: datetime) -> str:
    """Format a UTC timestamp as ISO-8601 with a trailing Z."""
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_expression(dialect_name: str, *, for_update: bool) -> ColumnElement[datetime] | datetime:
    """Return what a write stores as 'now': the database's clock on PostgreSQL, ours on SQLite.

    An UPDATE uses clock_timestamp(), read when the row is written (after any row lock wait), so
    the last of several concurrent writers always stores the newest updated_at. An INSERT uses
    now(), one value, so a new task's created_at and updated_at are equal.
    """
    if dialect_name == "postgresql":
        return func.clock_timestamp() if for_update else func.now()
    return datetime.now(timezone.utc)


# --- configuration of the engine -------------------------------------------------------------

def normalise_database_url(raw: str) -> str:
    """Accept postgres:// and postgresql:// URLs (Heroku and Neon give the first) for psycopg2.

    A URL that cannot be read is a configuration error, in one sentence that never repeats the URL
    (it holds the password).
    """
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL must look like postgresql://user:password@host/dbname "
                          "(or sqlite:///file.db); it has no scheme.")
    url = f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else raw
    try:
        parsed = make_url(url)
    except (ValueError, exc.ArgumentError):
        raise ConfigError("DATABASE_URL cannot be parsed: check the port (a number) and percent-encode "
                          "special characters in the user and password (@ as %40, / as %2F, : as %3A).") from None
    if "@" in (parsed.host or ""):
        raise ConfigError("DATABASE_URL has a raw @ in its password: write it as %40.")
    return url


def display_url(url: str) -> str:
    """The database URL as it may be printed or logged: with its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, pool_timeout: float = 10,
                connect_timeout: int = 5, idle_check_seconds: float = 30, query_timeout: float = 8) -> Engine:
    """Build the engine: autocommit, so that each request is one statement and one round trip.

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
        "connect_timeout": connect_timeout,
        # The deadlines _wait_with_deadline enforces, carried by this engine's connections.
        "connection_factory": _timed_connection_class(connect_timeout, query_timeout),
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
    engine = create_engine(
        parsed,
        isolation_level="AUTOCOMMIT",
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        # Under Neon's five-minute idle cut, so the pool rarely meets a dropped connection.
        pool_recycle=240,
        # Replaced by _check_on_checkout, which costs no round trip on a busy connection.
        pool_pre_ping=False,
        connect_args=connect_args,
    )
    pg_extensions.set_wait_callback(_wait_with_deadline)
    event.listen(engine, "checkout", _make_checkout_check(idle_check_seconds))
    event.listen(engine, "checkin", _mark_checkin)
    _ENGINES.add(engine)
    return engine


def _timed_connection_class(connect_timeout: float, query_timeout: float) -> type:
    """A psycopg2 connection class whose connections carry the deadlines of the engine that opens them."""
    return type("TimedConnection", (pg_extensions.connection,),
                {"connect_deadline": float(connect_timeout), "wait_deadline": float(query_timeout)})


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
                f"could not {'connect to' if connecting else 'receive data from'} server: no answer within {limit:g} s")
        poller = io_select.poll()
        poller.register(connection.fileno(),
                        io_select.POLLIN if state == pg_extensions.POLL_READ else io_select.POLLOUT)
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


def _make_checkout_check(idle_check_seconds: float):
    """Build the pool checkout hook that replaces pool_pre_ping."""

    def check_on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """Refuse a connection the server has closed, without a round trip when it is busy.

        An idle PostgreSQL connection never has data waiting: if its socket is readable, the
        server has sent a FATAL message or closed it (pg_terminate_backend, Neon's idle cut).
        Only a connection idle for longer than idle_check_seconds, whose silent loss the socket
        cannot show, is pinged.
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
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _close_idle_connections_before_fork() -> None:
    """The forking process gives up its pooled connections: a gunicorn master (preload_app) has no use
    for the one that created the schema, and the child starts from an empty pool of its own."""
    for engine in list(_ENGINES):
        engine.dispose()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_idle_connections_before_fork)


# --- schema ----------------------------------------------------------------------------------

class UsersTable:
    """Which table holds the users, and whether this service may write to it."""

    def __init__(self, table: Table, owned: bool) -> None:
        self.table = table
        self.owned = owned

    @property
    def name(self) -> str:
        return self.table.name


def _owned_users_table(name: str, metadata: MetaData) -> Table:
    """The users table this service creates when no auth-owned one exists."""
    return Table(
        name,
        metadata,
        Column("id", Text, primary_key=True),
        Column("email", Text, nullable=True),
        Column("name", Text, nullable=True),
        Column("created_at", UTCDateTime, nullable=False),
        CheckConstraint("length(id) > 0", name=OWNED_USERS_MARKER),
        comment="Created by the tasks API service, which registers users here on their first write.",
    )


def _tasks_table_for(users_table: str, metadata: MetaData) -> Table:
    """A copy of the tasks table whose user_id references the chosen users table."""
    if users_table not in metadata.tables:
        # Only the key matters for the foreign key's DDL; this stand-in is never created.
        Table(users_table, metadata, Column("id", Text, primary_key=True))
    tasks = Task.__table__.to_metadata(metadata)
    tasks.append_constraint(
        ForeignKeyConstraint(["user_id"], [f"{users_table}.id"], ondelete="CASCADE", name="fk_tasks_user_id")
    )
    return tasks


def _choose_users_table(connection: Any, configured: str | None) -> tuple[str, bool]:
    """Pick the users table: USERS_TABLE, else an existing users, else user, else a new users.

    Returns its name and whether it already exists.
    """
    inspector = inspect(connection)
    if configured:
        if not inspector.has_table(configured):
            raise RuntimeError(f"USERS_TABLE names the table {configured!r}, which does not exist.")
        return configured, True
    for candidate in ("users", "user"):
        if inspector.has_table(candidate):
            return candidate, True
    return "users", False


def _is_owned(connection: Any, name: str) -> bool:
    """Whether an existing users table is one this service created."""
    checks = inspect(connection).get_check_constraints(name)
    return any(check.get("name") == OWNED_USERS_MARKER for check in checks)


def create_schema(engine: Engine, users_table: str | None = None) -> UsersTable:
    """Create the missing tables, safely when several processes start at once on an empty database."""
    with engine.connect() as connection:
        if connection.dialect.name != "postgresql":
            return _create_schema_locked(connection, users_table)
        # One transaction holding a transaction-level lock: it stays on one server even behind
        # PgBouncer's transaction pooling (Neon's pooled URL), and COMMIT or a lost connection frees it.
        connection = connection.execution_options(isolation_level="READ COMMITTED")
        with connection.begin():
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            return _create_schema_locked(connection, users_table)


def _create_schema_locked(connection: Any, configured: str | None) -> UsersTable:
    _require_utf8(connection)
    metadata = MetaData()
    name, exists = _choose_users_table(connection, configured)
    if exists:
        _require_text_ids(connection, name)
        owned = _is_owned(connection, name)
        users = Table(name, metadata, Column("id", Text, primary_key=True))
        if owned:
            metadata.remove(users)
            users = _owned_users_table(name, metadata)
    else:
        users = _owned_users_table(name, metadata)
        owned = True
        _create_ignoring_race(connection, users)
    _create_ignoring_race(connection, _tasks_table_for(name, metadata))
    log.debug("users table: %s (%s)", name, "owned by this service" if owned else "owned by the auth provider")
    return UsersTable(users, owned)


def _require_utf8(connection: Any) -> None:
    """Refuse a PostgreSQL database that cannot store every Unicode title (SQL_ASCII, LATIN1, ...)."""
    if connection.dialect.name != "postgresql":
        return  # SQLite stores text as UTF-8
    encoding = connection.execute(text("SHOW server_encoding")).scalar()
    if encoding != "UTF8":
        raise ConfigError(f"The database in DATABASE_URL uses the {encoding} encoding, which cannot store every "
                          f"title: create it with ENCODING 'UTF8' (TEMPLATE template0) and point DATABASE_URL at it.")


def _require_text_ids(connection: Any, users_table: str) -> None:
    """Refuse a users table whose ids are not text: tasks.user_id holds the token's sub, a string."""
    columns = {column["name"]: column["type"] for column in inspect(connection).get_columns(users_table)}
    id_type = columns.get("id")
    if id_type is None:
        raise ConfigError(f"The users table {users_table!r} has no id column: set USERS_TABLE to the table that "
                          f"holds the accounts.")
    if not isinstance(id_type, String):
        raise ConfigError(f"The users table {users_table!r} has ids of type {id_type}, but this service stores user "
                          f"ids as text: use text ids (Better Auth's default) or set USERS_TABLE to another table.")


def _create_ignoring_race(connection: Any, table: Table) -> None:
    """Create a table and its indexes unless present; a concurrent creator (SQLite) is no error."""
    try:
        table.create(connection, checkfirst=True)
    except exc.OperationalError as error:
        # SQLite has no advisory lock; the loser of a creation race sees "already exists".
        if "already exists" not in str(error.orig):
            raise


class SchemaState:
    """Creates the schema once per process, and again on demand if the database was down at start."""

    def __init__(self, engine: Engine, users_table: str | None) -> None:
        self._engine = engine
        self._configured = users_table
        self._lock = threading.Lock()
        self.users: UsersTable | None = None
        self._attempts = 0
        self._failure: Exception | None = None

    def ensure(self) -> UsersTable:
        """Return the users table, creating the schema first if that has not succeeded yet."""
        users = self.users
        if users is not None:
            return users
        attempt = self._attempts
        with self._lock:
            if self.users is None:
                if self._attempts != attempt and self._failure is not None:
                    raise self._failure  # it failed while we waited: 503 now, not after one more timeout
                self._attempts += 1
                try:
                    self.users = create_schema(self._engine, self._configured)
                    self._failure = None
                except exc.OperationalError as error:
                    self._failure = error
                    raise
            return self.users
