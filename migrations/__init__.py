"""The schema's evolution: which users table tasks reference, and Alembic's revisions (versions/), run to
the code's head once, under a lock, so that instances starting together migrate one at a time.

Alembic is configured here in code (no alembic.ini): env.py takes the connection, the users table and
the schema to compare against from the Config's attributes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Connection, Engine, Integer, SmallInteger, String, Text, Uuid, inspect, text

from errors import ConfigError, SchemaNotReady
from models import OWNED_USERS_MARKER, UsersRef

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# The service's own version table, so that nothing else in a shared database (Better Auth's tables, a
# frontend's own Alembic) mistakes it for theirs.
VERSION_TABLE = "tasks_api_alembic_version"
# The schema of the release before migrations: a database that has it (tasks, no version table) is
# stamped at this revision, then upgraded.
BASELINE = "0001_baseline"
# A lock key of our own, so that workers and instances starting together migrate one at a time.
SCHEMA_LOCK_KEY = 0x7A5C_0001
# Better Auth's users table as teams deploy it: its default, Drizzle's usePlural, Prisma's model name
# without @@map, and Neon Auth's schema. The service's own users table comes after all of them.
AUTH_TABLES: tuple[tuple[str | None, str], ...] = (
    (None, "user"),
    (None, "users"),
    (None, "User"),
    ("neon_auth", "user"),
)
# The service's own users table (revision 0003 renamed it from users, the name the baseline gives it).
OWN_TABLES = ("tasks_api_users", "users")
_INTEGER_MAX = {SmallInteger: 2**15 - 1, Integer: 2**31 - 1, BigInteger: 2**63 - 1}


# --- revisions --------------------------------------------------------------------------------------


def config(connection: Connection | None = None, users: UsersRef | None = None) -> Config:
    """Alembic's configuration, in code: the script folder, the version table, and what env.py needs."""
    alembic = Config()
    alembic.set_main_option("script_location", str(HERE))
    alembic.set_main_option("version_table", VERSION_TABLE)
    alembic.attributes.update(connection=connection, users=users)
    return alembic


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The revision this code's schema is at."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def known(revision: str) -> bool:
    """Whether this code has a revision of that id (else the database is at a newer release's)."""
    return revision in {script.revision for script in _scripts().walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


# --- running them -----------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the schema lock until it commits (or fails).

    PostgreSQL: a transaction-level advisory lock, which stays on one server even behind PgBouncer's
    transaction pooling (Neon's pooled URL), and which COMMIT or a lost connection frees; the DDL is
    transactional too, so a failed migration leaves nothing half done. SQLite: BEGIN IMMEDIATE takes
    the database's write lock, for which another process waits (its busy timeout).
    """
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="READ COMMITTED")
            with connection.begin():
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                yield connection
            return
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")


def upgrade(engine: Engine, configured: str | None, *, jwks: bool = False, to: str = "heads") -> UsersRef:
    """Migrate the database to `to` (the code's head) under the lock; return the users table tasks use.

    A database the release before migrations created (tasks, no version table) is stamped at the
    baseline first. One at a newer release's revision is left as it is: expand-then-contract
    revisions keep it readable by this code.
    """
    with locked(engine) as connection:
        require_utf8(connection)
        users = choose_users_table(connection, configured, jwks=jwks)
        current = current_revision(connection)
        alembic = config(connection, users)
        if current is None and inspect(connection).has_table("tasks"):
            log.info("schema: a database from before migrations; stamping it at %s", BASELINE)
            command.stamp(alembic, BASELINE)
        elif current is not None and not known(current):
            log.info(
                "schema: the database is at %s, newer than this release's %s; serving it as it is", current, head()
            )
            return users
        command.upgrade(alembic, to)
        users = choose_users_table(connection, configured, jwks=jwks, quiet=True)  # as the revisions left it
        move_foreign_key(connection, users)
        log.info("schema: at %s", current_revision(connection))
        return users


def verify(engine: Engine, configured: str | None, *, jwks: bool = False) -> UsersRef:
    """The users table, once the database is at this code's head or a newer release's; else SchemaNotReady."""
    with engine.connect() as connection:
        require_utf8(connection)
        users = choose_users_table(connection, configured, jwks=jwks)
        current = current_revision(connection)
        if current is None or (known(current) and current != head()):
            raise SchemaNotReady(current, head())
        return users


def downgrade(engine: Engine, configured: str | None, revision: str) -> None:
    """Migrate the database down to `revision` ("base": nothing of this service's left)."""
    with locked(engine) as connection:
        users = choose_users_table(connection, configured)
        command.downgrade(config(connection, users), revision)


def revision(engine: Engine, configured: str | None, message: str) -> None:
    """Write a new revision file, with the operations autogenerate finds missing in the database."""
    with locked(engine) as connection:
        users = choose_users_table(connection, configured)
        command.revision(config(connection, users), message=message, autogenerate=True)


def differences(engine: Engine, configured: str | None) -> list[Any]:
    """What the models have that the migrations do not make (autogenerate's comparison); [] when they agree."""
    from alembic.autogenerate import compare_metadata

    from models import schema_metadata

    with engine.connect() as connection:
        users = choose_users_table(connection, configured)
        context = MigrationContext.configure(connection, opts=_compare_options(users))
        return list(compare_metadata(context, schema_metadata(users)))


def _compare_options(users: UsersRef) -> dict[str, Any]:
    """Autogenerate's options: compare types, and only the service's own tables (never Better Auth's)."""
    own = {"tasks"} | ({users.name} if users.owned else set())

    def include_name(name: str | None, kind: str, _parent: Any) -> bool:
        return kind != "table" or name in own

    return {"compare_type": True, "include_name": include_name, "version_table": VERSION_TABLE, "render_as_batch": True}


# --- the users table --------------------------------------------------------------------------------


def choose_users_table(
    connection: Connection, configured: str | None, *, jwks: bool = False, quiet: bool = False
) -> UsersRef:
    """Pick the users table tasks reference, and say which at INFO.

    USERS_TABLE when set (it must exist; "schema.table" for another schema); else the first of Better
    Auth's shapes that exists (user, users, User, neon_auth.user); else this service's own users table
    (tasks_api_users; the baseline creates it as users, revision 0003 renames it). An auth-owned table wins over the service's own, so that a
    Better Auth migration run after the service's first start takes over (move_foreign_key).
    """
    inspector = inspect(connection)
    if configured:
        schema, _, name = configured.rpartition(".")
        if not inspector.has_table(name, schema=schema or None):
            raise ConfigError(f"USERS_TABLE names the table {configured!r}, which does not exist.")
        users = _describe(connection, schema or None, name)
    else:
        found = [(schema, name) for schema, name in AUTH_TABLES if _exists(connection, schema, name)]
        auth_owned = [place for place in found if not _is_owned(connection, *place)]
        own = [name for name in OWN_TABLES if inspector.has_table(name) and _is_owned(connection, None, name)]
        if auth_owned:
            users = _describe(connection, *auth_owned[0])
        elif own:
            users = _describe(connection, None, own[0])
        else:
            users = UsersRef(OWN_TABLES[-1], None, True, Text())  # the baseline creates it
    if quiet:
        return users
    kind = "owned by this service" if users.owned else "owned by the auth provider"
    log.info("users table: %s (%s; ids of type %s)", users.qualified, kind, users.id_type)
    if jwks and users.owned:
        log.warning(
            "JWKS mode, but no Better Auth users table was found (user, users, User, neon_auth.user): run "
            "Better Auth's migration (npx @better-auth/cli migrate) before this service, or set USERS_TABLE; "
            "until then deleting an account does not delete its tasks."
        )
    return users


def _exists(connection: Connection, schema: str | None, name: str) -> bool:
    """Whether the table exists, with exactly this name (PostgreSQL tells user from User)."""
    if schema and connection.dialect.name != "postgresql":
        return False  # SQLite's other "schemas" are attached databases, never Neon Auth's
    return name in inspect(connection).get_table_names(schema=schema)


def _is_owned(connection: Connection, schema: str | None, name: str) -> bool:
    """Whether an existing users table is one this service created (it carries the marker constraint)."""
    checks = inspect(connection).get_check_constraints(name, schema=schema)
    return any(check.get("name") == OWNED_USERS_MARKER for check in checks)


def _describe(connection: Connection, schema: str | None, name: str) -> UsersRef:
    """An existing users table: owned or not, and its id's type (text, uuid or an integer)."""
    columns = {column["name"]: column["type"] for column in inspect(connection).get_columns(name, schema=schema)}
    place = f"{schema}.{name}" if schema else name
    id_type = columns.get("id")
    if id_type is None:
        raise ConfigError(
            f"The users table {place!r} has no id column: set USERS_TABLE to the table that holds the accounts."
        )
    if isinstance(id_type, String):
        id_type = Text()
    elif isinstance(id_type, Uuid):
        id_type = Uuid()
    elif not any(isinstance(id_type, kind) for kind in _INTEGER_MAX):
        raise ConfigError(
            f"The users table {place!r} has ids of type {id_type}; this service supports text, uuid "
            f"and integer ids: set USERS_TABLE to another table."
        )
    return UsersRef(name, schema, _is_owned(connection, schema, name), id_type)


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def accepts(users: UsersRef, user_id: str) -> bool:
    """Whether a token's sub can be an id of this users table (its type), so that comparing it cannot fail."""
    if isinstance(users.id_type, Uuid):
        return _CANONICAL_UUID.fullmatch(user_id) is not None
    for kind, largest in _INTEGER_MAX.items():
        if isinstance(users.id_type, kind):
            digits = user_id.isascii() and user_id.isdigit() and (user_id == "0" or not user_id.startswith("0"))
            return digits and int(user_id) <= largest
    return True


def move_foreign_key(connection: Connection, users: UsersRef) -> None:
    """Point tasks.user_id at the chosen users table (and give it that table's id type) when it points
    elsewhere: the service's own table before Better Auth's migration ran, or another USERS_TABLE.

    Refused, in one sentence, when existing tasks belong to user ids the chosen table does not hold.
    """
    from alembic.operations import Operations
    from sqlalchemy import MetaData, Table, cast, exists, func, select

    foreign_keys = inspect(connection).get_foreign_keys("tasks")
    current = next((fk for fk in foreign_keys if fk.get("constrained_columns") == ["user_id"]), None)
    default = connection.dialect.default_schema_name
    if current is not None and (current["referred_table"], current.get("referred_schema") or default) == (
        users.name,
        users.schema or default,
    ):
        return
    metadata = MetaData()
    tasks = Table("tasks", metadata, autoload_with=connection)
    target = Table(users.name, metadata, autoload_with=connection, schema=users.schema)
    orphans = connection.scalar(
        select(func.count())
        .select_from(tasks)
        .where(~exists(select(1).select_from(target).where(cast(target.c.id, Text) == cast(tasks.c.user_id, Text))))
    )
    if orphans:
        raise ConfigError(
            f"The users table {users.qualified!r} lacks the user ids of {orphans} existing tasks, so "
            f"tasks cannot reference it: point USERS_TABLE at the table that holds those accounts."
        )
    was = f"{current['referred_table']}" if current else "no table"
    log.info("schema: tasks.user_id referenced %s; now %s", was, users.qualified)
    operations = Operations(MigrationContext.configure(connection, opts={"render_as_batch": True}))
    with operations.batch_alter_table("tasks") as batch:
        if current is not None:
            batch.drop_constraint(current.get("name") or "fk_tasks_user_id", type_="foreignkey")
        if type(tasks.c.user_id.type) is not type(users.id_type) and not (
            isinstance(tasks.c.user_id.type, String) and isinstance(users.id_type, String)
        ):
            using = f"user_id::{users.id_type.compile(connection.dialect)}"
            batch.alter_column("user_id", type_=users.id_type, postgresql_using=using)
        batch.create_foreign_key(
            "fk_tasks_user_id", users.name, ["user_id"], ["id"], referent_schema=users.schema, ondelete="CASCADE"
        )


def require_utf8(connection: Connection) -> None:
    """Refuse a PostgreSQL database that cannot store every Unicode title (SQL_ASCII, LATIN1, ...)."""
    if connection.dialect.name != "postgresql":
        return  # SQLite stores text as UTF-8
    encoding = connection.execute(text("SHOW server_encoding")).scalar()
    if encoding != "UTF8":
        raise ConfigError(
            f"The database in DATABASE_URL uses the {encoding} encoding, which cannot store every "
            f"title: create it with ENCODING 'UTF8' (TEMPLATE template0) and point DATABASE_URL at it."
        )
