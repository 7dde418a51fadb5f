"""Tasks get a version (ETag, If-Match) and keep the Idempotency-Key that created them.

Revision ID: 0004_versions_and_keys
Revises: 0003_own_users_renamed
Create Date: 2026-11-30

Expand only: three columns an old release never names (version defaults to 1, the key and its body's
fingerprint are null for tasks created without a key) and a unique index on (user_id,
idempotency_key) over the tasks that have a key, which lets a create tell a new key from a replay in
one statement. PostgreSQL adds the columns without rewriting the table, and builds the index with
one scan that finds no key yet.

PostgreSQL also gets a trigger for the rolling deploy: the release before this one, still serving
while this one starts, changes tasks without counting versions. Whatever UPDATE moves updated_at
without moving version gets the next version anyway, so an ETag it made stale never matches. (SQLite
is one machine's file, served by one release at a time: no trigger.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_versions_and_keys"
down_revision = "0003_own_users_renamed"
branch_labels = None
depends_on = None

HAS_KEY = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    """Add version, idempotency_key and idempotency_fingerprint, the keys' unique index, the trigger."""
    op.add_column("tasks", sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("tasks", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("tasks", sa.Column("idempotency_fingerprint", sa.String(64), nullable=True))
    op.create_index(
        "ux_tasks_user_idempotency_key",
        "tasks",
        ["user_id", "idempotency_key"],
        unique=True,
        postgresql_where=HAS_KEY,
        sqlite_where=HAS_KEY,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION tasks_api_next_version() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.version := OLD.version + 1; RETURN NEW; END $$"
        )
        op.execute(
            "CREATE TRIGGER tasks_api_version_on_update BEFORE UPDATE OF updated_at ON tasks "
            "FOR EACH ROW WHEN (NEW.version = OLD.version) EXECUTE FUNCTION tasks_api_next_version()"
        )


def downgrade() -> None:
    """Drop them (SQLite: in batch mode, a copy of the table that keeps AUTOINCREMENT)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER tasks_api_version_on_update ON tasks")
        op.execute("DROP FUNCTION tasks_api_next_version()")
    op.drop_index("ux_tasks_user_idempotency_key", table_name="tasks")
    with op.batch_alter_table("tasks", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("idempotency_fingerprint")
        batch.drop_column("idempotency_key")
        batch.drop_column("version")
