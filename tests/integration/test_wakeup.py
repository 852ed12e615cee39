"""Wake-ups (storage/wakeup.py): a commit that makes an exam ready or a delivery due wakes the
listeners of its channel, in this process (SQLite and PostgreSQL) and through ``LISTEN /
NOTIFY`` on a real PostgreSQL server (other processes); a rollback wakes nobody; a listener
whose connection is killed reconnects and says so by waking."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from inference.synthetic import make_exam
from node.assembly import assign_slots
from storage import wakeup
from storage.db import Database
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.models import Exam
from tests.integration.test_database import _produced, _ready_exams, _records


def _raw_listen(url: str, channel: str) -> psycopg.Connection:
    """A LISTEN connection of the test's own (what another process would hold)."""
    u = make_url(url)
    conn = psycopg.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True
    )
    conn.execute(f"LISTEN {channel}")
    return conn


def _notified(conn: psycopg.Connection, timeout: float) -> list[str]:
    return [n.channel for n in conn.notifies(timeout=timeout, stop_after=1)]


def test_a_commit_wakes_this_process_and_a_rollback_does_not(tmp_path, db_url):
    db = Database(db_url)
    exams = wakeup.Listener(db, wakeup.EXAMS_READY)
    deliveries = wakeup.Listener(db, wakeup.DELIVERIES_DUE)
    try:
        assert exams.wait(0.05) is False and deliveries.wait(0.05) is False
        store, queue = Exams(db, owner="w:1"), Deliveries(db, owner="w:1")
        files = FileStore(tmp_path / "d", fsync=False)
        # Assembly making an exam ready wakes the workers' channel only.
        (study,) = _ready_exams(store, files, 1)
        assert exams.wait(5) is True
        assert deliveries.wait(0.05) is False
        exams.clear()
        assert exams.wait(0.05) is False
        # Claiming it wakes nobody; its results queued wake the exporters'.
        claim = store.claim_next_ready(60)
        assert claim is not None and exams.wait(0.05) is False
        assert store.complete(*claim, _produced(study), ["pacs"])
        assert deliveries.wait(5) is True and exams.wait(0.05) is False
        deliveries.clear()
        # A failed send that retries later is not due yet: no wake-up; a resend is.
        (row, *_) = queue.claim_transfers(lease_seconds=60)
        assert queue.mark_failed(row.id, "status 0xA700", 5, 30.0, 60.0) == "retrying"
        assert deliveries.wait(0.1) is False
        assert queue.requeue_study(study) == 2
        assert deliveries.wait(5) is True
        # A rolled-back transaction that made the exam ready again wakes nobody.
        store.finish(*claim, ok=True)
        exams.clear()
        with pytest.raises(RuntimeError), db.write() as s:
            s.get(Exam, claim[0]).state = "ready"
            s.flush()
            raise RuntimeError("rolled back")
        assert exams.wait(0.2) is False
        # Reprocessing makes it ready again.
        store.reprocess(study)
        assert exams.wait(5) is True
    finally:
        exams.close()
        deliveries.close()
        db.close()


def test_the_stable_timer_making_a_partial_exam_ready_wakes_the_workers(tmp_path, db_url):
    """What Node._grouping_loop relies on: promote_stable's commit is the worker's wake-up."""
    db = Database(db_url)
    exams = wakeup.Listener(db, wakeup.EXAMS_READY)
    try:
        store = Exams(db, owner="l:1")
        files = FileStore(tmp_path / "d", fsync=False)
        exam = make_exam(seed=3, rows=8, cols=8)
        for r in _records(files, exam[:3]):  # three views of four: still receiving
            store.add_instance(r, assign_slots, place=lambda: None)
        assert exams.wait(0.1) is False
        assert store.promote_stable(0) == [exam[0].StudyInstanceUID]
        assert exams.wait(5) is True
        exams.clear()
        assert store.promote_stable(0) == [] and exams.wait(0.1) is False
    finally:
        exams.close()
        db.close()


def test_set_from_another_thread_ends_a_wait(db_url):
    db = Database(db_url)
    listener = wakeup.Listener(db, wakeup.EXAMS_READY)
    try:
        threading.Timer(0.2, listener.set).start()
        t0 = time.monotonic()
        assert listener.wait(30) is True
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()
        db.close()


@pytest.mark.postgres
def test_notify_crosses_connections_at_commit_only(tmp_path, pg_server):
    """The notifier's NOTIFY reaches another connection (another process, another host)
    when the transaction commits; the listener wakes on a NOTIFY sent by anyone."""
    url = pg_server.new_database("wake")
    db = Database(url)
    other = _raw_listen(url, wakeup.EXAMS_READY)
    listener = wakeup.Listener(db, wakeup.DELIVERIES_DUE)
    try:
        store = Exams(db, owner="w:1")
        files = FileStore(tmp_path / "d", fsync=False)
        with db.write() as s:  # nothing ready: no notification
            s.execute(text("SELECT 1"))
        assert _notified(other, 0.2) == []
        _ready_exams(store, files, 1)
        assert _notified(other, 5) == [wakeup.EXAMS_READY]
        # A NOTIFY from another connection wakes the listener (no local wake-up involved).
        with psycopg.connect(
            url.replace("postgresql+psycopg", "postgresql"), autocommit=True
        ) as conn:
            assert listener.wait(0.05) is False
            conn.execute(f"NOTIFY {wakeup.DELIVERIES_DUE}")
            assert listener.wait(5) is True
    finally:
        other.close()
        listener.close()
        db.close()


@pytest.mark.postgres
def test_a_listener_whose_connection_is_killed_reconnects(pg_server):
    url = pg_server.new_database("wake")
    db = Database(url)
    listener = wakeup.Listener(db, wakeup.EXAMS_READY)
    try:
        with psycopg.connect(
            url.replace("postgresql+psycopg", "postgresql"), autocommit=True
        ) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = "
                f"'LISTEN {wakeup.EXAMS_READY}'"
            ).fetchall()
            assert killed == [(True,)]
            # The loss is a wake-up (what was notified meanwhile is unknown), and so is
            # the reconnection that follows ...
            assert listener.wait(10) is True
            listener.clear()
            assert listener.wait(10) is True and listener.reconnects == 1
            listener.clear()
            assert listener.wait(0.1) is False
            # ... after which it hears NOTIFY again.
            admin.execute(f"NOTIFY {wakeup.EXAMS_READY}")
            assert listener.wait(5) is True
    finally:
        listener.close()
        db.close()


def test_a_stop_closes_the_listeners_only_once_their_threads_ended(tmp_path, monkeypatch, caplog):
    """Node.stop closes the wake-up listeners after the threads have ended; one still running
    is named in a warning and the listeners stay open (closing them under it is not safe)."""
    from node import daemon
    from node.config import load_config
    from tests.helpers import NodeProcess

    monkeypatch.setattr(daemon, "THREAD_STOP_SECONDS", 0.2)
    spec = NodeProcess(tmp_path)
    node = daemon.Node(load_config(spec.config), role="exporter")
    node.start()
    (listener,) = node.wakes
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="stuck", daemon=True)
    stuck.start()
    node._threads.append(stuck)
    try:
        with caplog.at_level("WARNING", logger="mammo_node"):
            node.stop()
        assert "thread(s) stuck still running" in caplog.text
        assert not listener._closed
        assert not any(t.is_alive() for t in node._threads if t is not stuck)
    finally:
        release.set()
        stuck.join(5)
        listener.close()

    node = daemon.Node(load_config(spec.config), role="exporter")
    node.start()
    (listener,) = node.wakes
    node.stop()
    assert listener._closed
