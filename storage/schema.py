"""The database schema's version: Alembic migrations in :mod:`storage.migrations`.

A new, empty database is created at the newest schema in one transaction (and stamped). A
database an older release wrote is never changed behind the administrator's back: the node
refuses to start and names the command (``mammo-node db upgrade``), which runs the migrations.
Release 0.1.0 had no version table; its schema is the baseline revision ``0001``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from storage.models import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The revision of release 0.1.0's schema (no alembic_version table yet).
BASELINE = "0001"
#: Serialises schema work of several processes starting at once on PostgreSQL.
_PG_LOCK = 0x6D616D6D  # "mamm"


class SchemaOutdated(RuntimeError):
    """The database holds an older schema than this release needs (or a newer one)."""


def alembic_config(conn: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    rev = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert rev is not None
    return rev


def _current(conn: Connection) -> str | None:
    """The stored revision: None for an empty database, BASELINE for release 0.1.0."""
    rev = MigrationContext.configure(conn).get_current_revision()
    if rev is not None:
        return rev
    tables = set(inspect(conn).get_table_names())
    return BASELINE if "exams" in tables else None


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _current(conn)


def ensure_current(engine: Engine) -> None:
    """Create an empty database at the newest schema; accept one at the newest schema;
    raise :class:`SchemaOutdated` (saying what to run) for anything else."""
    want = head()
    with engine.begin() as conn:
        _lock(conn)
        have = _current(conn)
        if have is None:
            Base.metadata.create_all(conn)
            command.stamp(alembic_config(conn), want)
            return
    if have == want:
        return
    known = {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}
    if have not in known:
        raise SchemaOutdated(
            f"the database's schema (revision {have}) is newer than this "
            f"release knows (newest {want}): run the release that wrote it"
        )
    raise SchemaOutdated(
        f"the database's schema is older (revision {have}) than this release "
        f"needs ({want}); back it up, then run 'mammo-node db upgrade'"
    )


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Run every migration up to the newest schema: (revision before, after)."""
    want = head()
    with engine.begin() as conn:
        _lock(conn)
        have = _current(conn)
        cfg = alembic_config(conn)
        if have is None:
            Base.metadata.create_all(conn)
            command.stamp(cfg, want)
            return None, want
        if MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(cfg, BASELINE)  # release 0.1.0: mark its schema first
        command.upgrade(cfg, want)
    return have, want
