"""Engine and session creation for any SQLAlchemy URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Base


class Database:
    """A database handle: engine, session factory and the write lock.

    SQLite allows one writer at a time; the in-process ``write_lock`` serialises our own
    writers so that they queue instead of failing with "database is locked". Row locks
    (``SELECT ... FOR UPDATE``) protect the same transitions on PostgreSQL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.write_lock = threading.RLock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no lock)."""
        with self.sessions() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error."""
        with self.write_lock, self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()


def is_disk_full(exc: BaseException) -> bool:
    """Whether a database error means its disk is full: SQLite's SQLITE_FULL result code,
    PostgreSQL's SQLSTATE 53100 (disk_full), by code rather than by message text."""
    import sqlite3

    orig = getattr(exc, "orig", exc)
    if getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "53100"


def _add_missing_columns(engine: Engine) -> None:
    """Add nullable columns that a newer release defines to a database an older one
    created (``create_all`` only makes missing tables). Only additive, only nullable columns:
    anything else needs a real migration."""
    insp = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable:
                    ddl = col.type.compile(dialect=engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}'))


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed row survives power loss, as the C-STORE success promises.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    # DICOM matching is case-sensitive except for PN (which node.qr folds itself), as LIKE
    # is on PostgreSQL; SQLite's LIKE folds ASCII case unless told otherwise.
    cur.execute("PRAGMA case_sensitive_like=ON")
    cur.close()
