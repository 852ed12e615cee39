"""Alembic environment: the node's own migrations, run by ``mammo-node db upgrade`` (through
:mod:`storage.schema`), never by an ``alembic.ini``."""

from __future__ import annotations

from alembic import context

from storage.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called with a connection
    raise RuntimeError("storage.migrations runs only through storage.schema")
context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True
)
with context.begin_transaction():
    context.run_migrations()
