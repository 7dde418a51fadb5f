"""Baseline: the schema of the release before migrations.

Tasks, its indexes, its foreign key to the users table, and the service's own users table when there
is no auth-owned one.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-30

Frozen as that release created it (SQLite without AUTOINCREMENT included): a database it created is
stamped here and upgraded from here. Which users table, and the type of its ids, are known only at
run time (migrations.choose_users_table), so they come from the configuration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

# The service's own users table, as this release named it (0003 renames it).
OWN_TABLE = "users"


def upgrade() -> None:
    """Create the users table (the service's own, when it has to) and tasks."""
    users = context.config.attributes["users"]
    if users.owned and not sa.inspect(op.get_bind()).has_table(OWN_TABLE):
        op.create_table(
            OWN_TABLE,
            sa.Column("id", sa.Text(), primary_key=True),
            sa.Column("email", sa.Text(), nullable=True),
            sa.Column("name", sa.Text(), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.CheckConstraint("length(id) > 0", name="ck_tasks_api_users_id_not_empty"),
            comment="Created by the tasks API service, which registers users here on their first write.",
        )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", users.id_type, nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.String(1000), nullable=True),
        sa.Column("completed", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            [f"{OWN_TABLE}.id" if users.owned else ".".join(filter(None, (users.schema, users.name, "id")))],
            ondelete="CASCADE",
            name="fk_tasks_user_id",
        ),
    )
    for name, order in (("created", "created_at"), ("updated", "updated_at"), ("title", "title")):
        op.create_index(f"ix_tasks_user_{name}", "tasks", ["user_id", order, "id"])


def downgrade() -> None:
    """Drop tasks, and the service's own users table (never Better Auth's, which may be called users too)."""
    op.drop_table("tasks")
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table(OWN_TABLE) and any(
        check.get("name") == "ck_tasks_api_users_id_not_empty" for check in inspector.get_check_constraints(OWN_TABLE)
    ):
        op.drop_table(OWN_TABLE)
