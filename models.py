"""The tables, and everything that says SQL: the statements the views run, and tasks as JSON."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Insert,
    Integer,
    MetaData,
    Row,
    Select,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeEngine

TITLE_MAX = 200
DESCRIPTION_MAX = 1000
IDEMPOTENCY_KEY_MAX = 255
# Marks a users table that this service created and may therefore write to; an auth-owned table
# (Better Auth's) never carries it. A check constraint, because both PostgreSQL and SQLite reflect it.
OWNED_USERS_MARKER = "ck_tasks_api_users_id_not_empty"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC, SQLite included."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Store UTC; a naive datetime is a bug, not a guess."""
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Return an aware UTC datetime, whatever the database kept."""
        if value is None:
            return None
        # SQLite keeps no zone; this service only ever writes UTC, so a naive value is UTC.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


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
        # One task per user and Idempotency-Key, over the tasks that have one: a create's ON CONFLICT target.
        Index(
            "ux_tasks_user_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        # Ids are never reused: without AUTOINCREMENT, SQLite hands the id of the newest deleted task
        # to the next one, and a retried DELETE of the old id would delete the new task.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The foreign key to the users table is added when the table is created (tasks_table_for): which
    # table it points at is only known then.
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    title: Mapped[str] = mapped_column(String(TITLE_MAX), nullable=False)
    description: Mapped[str | None] = mapped_column(String(DESCRIPTION_MAX), nullable=True)
    completed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default="false")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # 1 at creation, one more at every change: the task's ETag.
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    # The Idempotency-Key the task was created with, and a fingerprint of the fields it was created from.
    idempotency_key: Mapped[str | None] = mapped_column(String(IDEMPOTENCY_KEY_MAX), nullable=True)
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)


TASKS = cast(Table, Task.__table__)
# A task as the API returns it: these columns, under these names, in this order.
TASK_FIELDS = ("id", "user_id", "title", "description", "completed", "created_at", "updated_at", "version")
TASK_COLUMNS = tuple(TASKS.c[name] for name in TASK_FIELDS)
# The fields a client may set, and what a create stores for those it leaves out.
WRITABLE_DEFAULTS: dict[str, Any] = {"title": None, "description": None, "completed": False}
_TIMESTAMPS = ("created_at", "updated_at")


def task_json(row: Row[Any]) -> dict[str, Any]:
    """A row that has the task's columns, as the API's JSON object (by column name)."""
    task = {name: getattr(row, name) for name in TASK_FIELDS}
    for name in _TIMESTAMPS:
        task[name] = iso_utc(task[name])
    task["user_id"] = str(task["user_id"])  # a text id already, or a uuid or an integer (the users table's)
    return task


def iso_utc(value: datetime) -> str:
    """Format a UTC timestamp as ISO-8601 with a trailing Z."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- "now", the one difference between the databases ---------------------------------------------


class WrittenAt(FunctionElement[datetime]):
    """What a write stores as "now": the database's clock on PostgreSQL, the service's on SQLite.

    An UPDATE (for_update) uses clock_timestamp(), read when the row is written (after any row lock
    wait), so the last of several concurrent writers always stores the newest updated_at. An INSERT
    uses now(), one value, so a new task's created_at and updated_at are equal. SQLite's own clock has
    milliseconds only: there the value is a parameter the service fills in at each execution.
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "written_at"

    def __init__(self, *, for_update: bool) -> None:
        self.for_update = for_update
        super().__init__()


def _utc_now() -> datetime:
    return datetime.now(UTC)


@compiles(WrittenAt, "postgresql")
def _written_at_on_postgresql(element: WrittenAt, compiler: SQLCompiler, **kw: Any) -> str:
    return "clock_timestamp()" if element.for_update else "now()"


@compiles(WrittenAt)
def _written_at_elsewhere(element: WrittenAt, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(bindparam("written_at", type_=UTCDateTime(), callable_=_utc_now), **kw)


# --- the statements the views run -----------------------------------------------------------------
# Each shape is built once, with bound parameters: a request neither rebuilds the expression nor
# loads ORM objects it has no use for, and stays one statement, one round trip.

# The WHERE clause for one task of one user: the second lock behind require_owner.
_OWNED = (TASKS.c.id == bindparam("task_id")) & (TASKS.c.user_id == bindparam("owner"))
GET_TASK = select(*TASK_COLUMNS).where(_OWNED)
SORT_COLUMNS = {"created": TASKS.c.created_at, "updated": TASKS.c.updated_at, "title": TASKS.c.title}


def _matching(by_version: bool, excluding: bool) -> ColumnElement[bool]:
    """The user's task; at one of the versions If-Match names (by_version), at none If-None-Match names."""
    condition = _OWNED
    if by_version:
        condition &= TASKS.c.version.in_(bindparam("versions", expanding=True))
    if excluding:
        condition &= TASKS.c.version.not_in(bindparam("excluded", expanding=True))
    return condition


@functools.cache
def insert_task(dialect: str) -> Any:
    """INSERT ... RETURNING of a new task, or of the task its Idempotency-Key created before.

    One statement either way. Every writable field is bound (v_<field>), so a new field changes no view.
    ON CONFLICT on (user_id, idempotency_key) returns the existing task instead of a second one
    (concurrent requests with one key included: the unique index makes them wait for the first), and
    `inserted` tells the two apart. No row comes back when the user already has max_tasks (and no task
    has this key): the count is a subquery of the same statement, so creates running at the same time
    may each see room for one more, and a user can overshoot by at most that many. A key that is NULL
    never conflicts.
    """
    owner = bindparam("owner", type_=TASKS.c.user_id.type)
    key = bindparam("idempotency_key", type_=TASKS.c.idempotency_key.type)
    now = WrittenAt(for_update=False)
    values = {
        "user_id": owner,
        **{name: bindparam(f"v_{name}", type_=TASKS.c[name].type) for name in WRITABLE_DEFAULTS},
        "created_at": now,
        "updated_at": now,
        "idempotency_key": key,
        "idempotency_fingerprint": bindparam("idempotency_fingerprint", type_=TASKS.c.idempotency_fingerprint.type),
    }
    tasks_of_owner = select(func.count()).select_from(TASKS).where(TASKS.c.user_id == owner).scalar_subquery()
    key_used = exists().where(TASKS.c.user_id == owner, TASKS.c.idempotency_key == key)
    new_row = select(*values.values()).where((tasks_of_owner < bindparam("max_tasks")) | key_used)
    statement = _on_conflict(
        insert(TASKS).from_select(list(values), new_row),
        "ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL"
        " DO UPDATE SET idempotency_key = excluded.idempotency_key",
    )
    # PostgreSQL: a row this statement inserted has no xmax; one its ON CONFLICT updated has (exact, even
    # for two creates in one microsecond). SQLite has no xmax, and writes one at a time: a new row's
    # created_at is this execution's own microsecond timestamp.
    inserted = (literal_column("xmax") == 0 if dialect == "postgresql" else TASKS.c.created_at == now).label("inserted")
    return statement.returning(*TASK_COLUMNS, TASKS.c.idempotency_fingerprint, inserted)


@functools.cache
def update_task(fields: tuple[str, ...] | None, by_version: bool = False, excluding: bool = False) -> Any:
    """UPDATE ... RETURNING of the user's task: the given fields (v_<field>), or a flip of completed (None).

    Every change is one more version (the ETag); with conditions, only a task at a version they allow.
    """
    values: dict[str, Any] = (
        {"completed": ~TASKS.c.completed} if fields is None else {name: bindparam(f"v_{name}") for name in fields}
    )
    return (
        update(TASKS)
        .where(_matching(by_version, excluding))
        .values(**values, version=TASKS.c.version + 1, updated_at=WrittenAt(for_update=True))
        .returning(*TASK_COLUMNS)
    )


@functools.cache
def delete_task(by_version: bool = False, excluding: bool = False) -> Any:
    """DELETE ... RETURNING of the user's task; with conditions, only at a version they allow."""
    return delete(TASKS).where(_matching(by_version, excluding)).returning(TASKS.c.id)


def _listed(filtered: bool) -> ColumnElement[bool]:
    """Which tasks a list shows: the user's, and only those of one status when filtered."""
    condition = TASKS.c.user_id == bindparam("owner")
    return condition & (TASKS.c.completed == bindparam("completed")) if filtered else condition


@functools.cache
def count_tasks(filtered: bool) -> Select[Any]:
    """The number of the user's tasks a list shows."""
    return select(func.count()).select_from(TASKS).where(_listed(filtered))


@functools.cache
def list_tasks(filtered: bool, sort: str, descending: bool, paged: bool, offset: bool) -> Select[Any]:
    """SELECT of one user's tasks in one order; paged, each row carries the total.

    The total is a scalar subquery, counted once over the index: a window count(*) OVER () would read
    every one of the user's rows to return twenty of them.
    """
    total = count_tasks(filtered).scalar_subquery().label("total")
    column = SORT_COLUMNS[sort]
    order = (column.desc(), TASKS.c.id.desc()) if descending else (column.asc(), TASKS.c.id.asc())
    statement = select(*TASK_COLUMNS, *([total] if paged else [])).where(_listed(filtered)).order_by(*order)
    if paged:
        statement = statement.limit(bindparam("limit"))
    return statement.offset(bindparam("offset")) if offset else statement


# --- the users table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsersRef:
    """The users table tasks reference: where it is, whether this service owns it, the type of its ids."""

    name: str
    schema: str | None
    owned: bool
    id_type: TypeEngine[Any]

    @property
    def qualified(self) -> str:
        """schema.name, or the name alone in the default schema (for log lines and sentences)."""
        return f"{self.schema}.{self.name}" if self.schema else self.name


TEXT_IDS = Text()


def owned_users_table(name: str, metadata: MetaData) -> Table:
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


def users_table(users: UsersRef, metadata: MetaData) -> Table:
    """The users table as this service sees it: all of its own; of an auth-owned one, only the id."""
    if users.owned:
        return owned_users_table(users.name, metadata)
    return Table(users.name, metadata, Column("id", users.id_type, primary_key=True), schema=users.schema)


def schema_metadata(users: UsersRef) -> MetaData:
    """The schema the migrations must produce, with tasks.user_id referencing (and typed as) users.id."""
    metadata = MetaData()
    referenced = users_table(users, metadata)
    tasks = TASKS.to_metadata(metadata)
    tasks.c.user_id.type = users.id_type
    tasks.append_constraint(
        ForeignKeyConstraint(["user_id"], [referenced.c.id], ondelete="CASCADE", name="fk_tasks_user_id")
    )
    return metadata


def register_user(users: Table, dialect: str) -> Any:
    """INSERT of a user into this service's own users table, doing nothing when the id is there already."""
    values = {
        "id": bindparam("id"),
        "email": bindparam("email"),
        "name": bindparam("name"),
        "created_at": WrittenAt(for_update=False),
    }
    return _on_conflict(insert(users).values(**values), "ON CONFLICT (id) DO NOTHING")


def _on_conflict(statement: Insert, clause: str) -> Insert:
    """The INSERT followed by an ON CONFLICT clause, written as SQL that PostgreSQL and SQLite both speak.

    Not the dialects' own insert(): SQLAlchemy 2.0 gives it no cache key (sqlalchemy#10445), so every
    execution compiled the statement again. The clause goes where theirs goes (the standard INSERT's
    post-values clause, part of its cache key); tests pin that both upserts are cached.
    """
    statement._post_values_clause = text(clause)
    return statement
