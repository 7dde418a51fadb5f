"""Tasks get a version (ETag, If-Match) and keep the Idempotency-Key that created them.

Revision ID: 0004_versions_and_keys
Revises: 0003_own_users_renamed
Create Date: 2026-11-30

Expand only: three columns an old release never names (version defaults to 1, the key and its body's
fingerprint are null for tasks created without a key) and a unique index on (user_id,
idempotency_key), which lets a create tell a new key from a replay in one statement. NULL keys never
collide. PostgreSQL adds the columns without rewriting the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_versions_and_keys"
down_revision = "0003_own_users_renamed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add version, idempotency_key and idempotency_fingerprint, and the keys' unique index."""
    op.add_column("tasks", sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("tasks", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("tasks", sa.Column("idempotency_fingerprint", sa.String(64), nullable=True))
    op.create_index("ux_tasks_user_idempotency_key", "tasks", ["user_id", "idempotency_key"], unique=True)


def downgrade() -> None:
    """Drop them (SQLite: in batch mode, a copy of the table)."""
    op.drop_index("ux_tasks_user_idempotency_key", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("idempotency_fingerprint")
        batch.drop_column("idempotency_key")
        batch.drop_column("version")
