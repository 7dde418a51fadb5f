"""SQLite: task ids are never reused (AUTOINCREMENT).

Nothing to do on PostgreSQL, whose sequence never reuses an id.

Revision ID: 0002_sqlite_ids
Revises: 0001_baseline
Create Date: 2026-11-30

Without AUTOINCREMENT SQLite gives the next task the id of the newest deleted one, and a retried
DELETE of that id deletes the new task. SQLite cannot change this in place: batch mode copies the
table into one declared with AUTOINCREMENT (the ids, indexes and foreign key kept).
"""

from __future__ import annotations

from alembic import op

revision = "0002_sqlite_ids"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Recreate tasks with AUTOINCREMENT, on SQLite."""
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("tasks", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    """Recreate tasks without AUTOINCREMENT, on SQLite."""
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("tasks", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
