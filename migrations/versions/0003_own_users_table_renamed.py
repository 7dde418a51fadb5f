"""The service's own users table is tasks_api_users, leaving users and user to Better Auth.

Revision ID: 0003_own_users_renamed
Revises: 0002_sqlite_ids
Create Date: 2026-11-30

Drizzle's usePlural names Better Auth's table users: a service that started first and created its own
users took that name, and Better Auth's migration then collided with it. Renamed (only the service's
own table, the one carrying its marker constraint), the name is free; when Better Auth's table appears,
the service moves tasks' foreign key to it (migrations.move_foreign_key). Foreign keys follow a
renamed table on both databases.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_own_users_renamed"
down_revision = "0002_sqlite_ids"
branch_labels = None
depends_on = None

MARKER = "ck_tasks_api_users_id_not_empty"


def _owned(name: str) -> bool:
    """Whether a table of that name exists and is the service's own."""
    inspector = sa.inspect(op.get_bind())
    return inspector.has_table(name) and any(
        check.get("name") == MARKER for check in inspector.get_check_constraints(name)
    )


def upgrade() -> None:
    """Rename the service's own users table to tasks_api_users."""
    if _owned("users") and not sa.inspect(op.get_bind()).has_table("tasks_api_users"):
        op.rename_table("users", "tasks_api_users")


def downgrade() -> None:
    """Rename it back to users."""
    if _owned("tasks_api_users") and not sa.inspect(op.get_bind()).has_table("users"):
        op.rename_table("tasks_api_users", "users")
