"""Alembic's environment: the connection (already holding the schema lock) and the users table come
from the Config's attributes (migrations.config); there is no offline (SQL script) mode."""

from __future__ import annotations

from alembic import context

from migrations import _compare_options
from models import schema_metadata

connection = context.config.attributes.get("connection")
users = context.config.attributes.get("users")
if connection is None or users is None:
    raise RuntimeError("run the migrations through migrations.upgrade() (flask --app app db upgrade)")

context.configure(
    connection=connection,
    target_metadata=schema_metadata(users),
    # SQLite cannot alter most of a table in place: batch mode copies it into a new one.
    **_compare_options(users),
)
with context.begin_transaction():
    context.run_migrations()
