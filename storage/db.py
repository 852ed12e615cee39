"""Engine and session creation for any SQLAlchemy URL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    import sqlite3


def transient_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable or busy for now (the server
    restarting or failing over, a dropped connection, SQLite locked past its busy timeout,
    the pool exhausted): the same statement can succeed later. Constraint violations,
    programming errors and data errors are not transient."""
    if isinstance(
        exc,
        (
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.DisconnectionError,
            sa_exc.TimeoutError,
        ),
    ):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


class Database:
    """A database handle: engine, session factories and the write discipline.

    SQLite allows one writer at a time: a write transaction starts with ``BEGIN IMMEDIATE``
    (it takes the write lock first, so two processes never deadlock upgrading read locks;
    the other waits up to ``busy_timeout``), and the in-process ``write_lock`` queues our own
    threads. On PostgreSQL writers run side by side; row locks (``SELECT ... FOR UPDATE``,
    ``SKIP LOCKED`` for the claims of workers and exporters) order the transitions.

    ``check_schema``: refuse a database whose schema is not this release's
    (:class:`storage.schema.SchemaOutdated`); an empty one is created at the newest schema.
    """

    def __init__(self, url: str, check_schema: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.dialect = make_url(url).get_backend_name()
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            # A server restart or a fail-over drops pooled connections: test each on checkout.
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        # Write transactions: BEGIN IMMEDIATE on SQLite (see _sqlite_begin).
        self.write_engine = self.engine.execution_options(sqlite_immediate=True)
        if check_schema:
            from storage.schema import ensure_current

            ensure_current(self.write_engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.write_sessions = sessionmaker(self.write_engine, expire_on_commit=False)
        self.write_lock: contextlib.AbstractContextManager = (
            threading.RLock() if self.is_sqlite else contextlib.nullcontext()
        )
        from storage import wakeup

        wakeup.install(self)  # a commit that leaves work wakes workers / exporters

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no lock)."""
        with self.sessions() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error."""
        with self.write_lock, self.write_sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> bool:
        """The database answers (``/readyz``, a worker waiting out an outage)."""
        try:
            with self.session() as s:
                s.execute(select(1))
            return True
        except Exception:
            return False

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A lock across every process on this database, not waited for: yields whether it
        was taken (work such as a retention pass runs in one process at a time).
        PostgreSQL: a session advisory lock; SQLite: an flock beside the database file."""
        import hashlib

        if self.is_sqlite:
            import fcntl

            path = make_url(self.url).database
            if not path or path == ":memory:":
                yield True
                return
            with open(f"{path}.{name}.lock", "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                try:
                    yield True
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with self.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()

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


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    # Transactions are begun by _sqlite_begin, not by the sqlite3 module (which would begin
    # one only before a data change, too late for a lock taken by an earlier SELECT).
    dbapi_conn.isolation_level = None
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


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("sqlite_immediate")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
