"""Wake-ups of workers and exporters: a commit that leaves work for them wakes them at once.

Workers wait for an exam to become ``ready`` (assembly, the stable timer, a retry, ``mammo-node
reprocess`` / ``complete``); exporters wait for a delivery to become due (results recorded,
``mammo-node resend``, a dead exporter's claims freed). Either waits on a :class:`Listener`,
with the role's poll interval as the longest wait, so that a lost wake-up (SQLite across
processes, a dropped connection, work that falls due with time: a retry's backoff, a lease that
runs out) costs at most one interval.

* The notifier is a session hook (:func:`install`, done by every :class:`storage.db.Database`):
  after each flush it looks at the rows the flush wrote and, on PostgreSQL, issues ``NOTIFY
  <channel>`` on the flush's own connection, in the same transaction: it is delivered when the
  transaction commits and never when it rolls back. After the commit the process's own
  listeners on the same database are woken directly (what SQLite has, in one process).
* A :class:`Listener` on PostgreSQL holds one dedicated connection (autocommit, ``LISTEN
  <channel>``) and waits on its socket with ``select``; when the connection fails it is opened
  again (the reconnection itself counts as a wake-up: something may have been missed).
  ``set`` wakes it from another thread (shutdown, the worker of the same process).

Only the thread that owns a listener calls :meth:`Listener.wait` and :meth:`Listener.clear`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event, inspect

from storage.models import Exam, Outbound, utcnow

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.orm import Session, UOWTransaction

    from storage.db import Database

log = logging.getLogger("mammo_node.storage.wakeup")

#: An exam became ready to be read (workers listen).
EXAMS_READY = "mammo_node_exams_ready"
#: A delivery became due (exporters listen).
DELIVERIES_DUE = "mammo_node_deliveries_due"
CHANNELS = (EXAMS_READY, DELIVERIES_DUE)

#: How long a listener whose connection failed waits before it tries again.
RECONNECT_SECONDS = 2.0
_INFO_KEY = "mammo_node_wakeups"


class Wake(Protocol):
    """What a worker or an exporter waits on: a :class:`Listener` or a ``threading.Event``."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# -- notifying ---------------------------------------------------------------------------------


def _changed(obj: Any, *names: str) -> bool:
    attrs = inspect(obj).attrs
    return any(attrs[n].history.has_changes() for n in names)


def channels_of(session: Session) -> set[str]:
    """The channels that the rows of ``session`` about to be flushed wake: an exam now
    ``ready`` and due, a delivery now pending or retrying, unclaimed and due."""
    now = utcnow()
    out: set[str] = set()
    for obj in (*session.new, *session.dirty):
        if isinstance(obj, Exam):
            if (
                obj.state == "ready"
                and (obj.next_attempt_at is None or obj.next_attempt_at <= now)
                and (obj in session.new or _changed(obj, "state", "version", "next_attempt_at"))
            ):
                out.add(EXAMS_READY)
        elif isinstance(obj, Outbound):
            if (
                obj.state in ("pending", "retrying")
                and obj.lease_owner is None
                and (obj.next_attempt_at is None or obj.next_attempt_at <= now)
                and (obj in session.new or _changed(obj, "state", "lease_owner", "next_attempt_at"))
            ):
                out.add(DELIVERIES_DUE)
    return out


def install(db: Database) -> None:
    """Hook ``db``'s sessions: a transaction that makes work for workers or exporters
    notifies them when it commits."""
    postgres = db.dialect == "postgresql"
    url = db.url

    def after_flush(session: Session, _ctx: UOWTransaction) -> None:
        pending: set[str] = session.info.setdefault(_INFO_KEY, set())
        for channel in channels_of(session) - pending:
            if postgres:  # delivered at commit, dropped by a rollback
                session.connection().exec_driver_sql(f"NOTIFY {channel}")
            pending.add(channel)

    def after_commit(session: Session) -> None:
        for channel in session.info.pop(_INFO_KEY, ()):
            _wake_local(url, channel)

    def after_rollback(session: Session) -> None:
        session.info.pop(_INFO_KEY, None)

    for maker in (db.sessions, db.write_sessions):
        event.listen(maker, "after_flush", after_flush)
        event.listen(maker, "after_commit", after_commit)
        event.listen(maker, "after_rollback", after_rollback)


_local_lock = threading.Lock()
_local: dict[tuple[str, str], weakref.WeakSet[Listener]] = {}


def _wake_local(url: str, channel: str) -> None:
    with _local_lock:
        listeners = list(_local.get((url, channel), ()))
    for listener in listeners:
        listener.set()


def notify(db: Database, channel: str) -> None:
    """Wake ``channel``'s listeners now, outside any transaction (on PostgreSQL every
    process's, else this process's)."""
    if db.dialect == "postgresql":
        with db.engine.connect() as conn:
            conn.exec_driver_sql(f"NOTIFY {channel}")
            conn.commit()
    _wake_local(db.url, channel)


# -- listening ---------------------------------------------------------------------------------


class Listener:
    """Wakes its owner when ``channel`` is notified: by a commit of this process on the same
    database, by ``NOTIFY`` on PostgreSQL (any process, any host), or by :meth:`set`.
    Behaves as a ``threading.Event`` for the owner: ``wait`` returns whether it was woken
    (False: the timeout passed), ``clear`` forgets wake-ups received so far."""

    def __init__(self, db: Database, channel: str) -> None:
        if channel not in CHANNELS:
            raise ValueError(f"unknown wake-up channel {channel!r}")
        self.db, self.channel = db, channel
        self.postgres = db.dialect == "postgresql"
        if self.postgres and db.engine.dialect.driver != "psycopg":
            log.warning(
                "%s: LISTEN/NOTIFY needs the psycopg driver (postgresql+psycopg://), "
                "not %s: waking by the poll interval only",
                channel,
                db.engine.dialect.driver,
            )
            self.postgres = False
        self._flag = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._conn: psycopg.Connection | None = None  # only the owner's thread touches it
        self._retry_at = 0.0
        #: Times the database connection was opened again after a failure.
        self.reconnects = 0
        self._closed = False
        with _local_lock:
            _local.setdefault((db.url, channel), weakref.WeakSet()).add(self)
        if self.postgres:
            self._connect(first=True)

    # -- Event-like -------------------------------------------------------------------------
    def set(self) -> None:
        self._flag = True
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        """Forget the wake-ups received so far (the owner is about to look for work: what
        was committed before is what it will find)."""
        self._drain_pipe()
        self._read_notifies()
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag and not self._closed:
            if self.postgres and self._conn is None and time.monotonic() >= self._retry_at:
                self._connect()
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            fds = [self._r]
            if self._conn is not None:
                fds.append(self._conn.fileno())
            elif self.postgres:  # down: wait for the next attempt at most
                until = max(0.0, self._retry_at - time.monotonic())
                remaining = until if remaining is None else min(remaining, until)
            try:
                ready, _, _ = select.select(fds, [], [], remaining)
            except (OSError, ValueError):  # a descriptor closed under us
                self._lost("its socket closed")
                continue
            if self._r in ready and self._drain_pipe():
                self._flag = True  # a set() (its flag may have met a clear() meanwhile)
            if len(fds) > 1 and fds[1] in ready:
                self._read_notifies()
        return self._flag

    def close(self) -> None:
        self._closed = True
        with _local_lock:
            group = _local.get((self.db.url, self.channel))
            if group is not None:
                group.discard(self)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- PostgreSQL ---------------------------------------------------------------------------
    def _connect(self, first: bool = False) -> None:
        import psycopg

        engine = self.db.engine
        _args, params = engine.dialect.create_connect_args(engine.url)
        conn = None
        try:
            conn = psycopg.connect(
                **params,
                autocommit=True,
                connect_timeout=10,
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                application_name=f"mammo-node {self.channel}",
            )
            conn.execute(f"LISTEN {self.channel}")
        except Exception as exc:
            if conn is not None:  # connected, but LISTEN refused (a hot standby): not leaked
                with contextlib.suppress(Exception):
                    conn.close()
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            log.warning(
                "cannot LISTEN on %s (%s); waking by the poll interval until the database answers",
                self.channel,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )
            return
        self._conn = conn
        if not first:
            self.reconnects += 1
            log.info("listening on %s again", self.channel)
            self._flag = True  # notifications may have been sent while it was down

    def _lost(self, why: str) -> None:
        log.warning("the connection listening on %s failed (%s); reconnecting", self.channel, why)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        self._retry_at = time.monotonic()  # at once; then every RECONNECT_SECONDS
        self._flag = True  # look for work now: wake-ups may be lost until it is back

    def _read_notifies(self) -> None:
        """Consume what the server sent (without blocking); set the flag for a notification
        of this channel."""
        conn = self._conn
        if conn is None:
            return
        try:
            pgconn = conn.pgconn
            pgconn.consume_input()
            while (n := pgconn.notifies()) is not None:
                if n.relname.decode() == self.channel:
                    self._flag = True
            if pgconn.status != 0:  # CONNECTION_OK
                raise OSError("the server closed the connection")
        except Exception as exc:
            self._lost(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def _drain_pipe(self) -> bool:
        """Empty the pipe; whether there was anything in it."""
        got = False
        try:
            while os.read(self._r, 4096):
                got = True
        except (BlockingIOError, OSError):
            pass
        return got
