"""The database under several processes: schema migrations from release 0.1.0, claims with
``FOR UPDATE SKIP LOCKED`` and leases, concurrent listeners, ``db copy``. Each claim test runs
on SQLite and on a real PostgreSQL server (the ``db_url`` fixture)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from inference.synthetic import make_exam
from node.assembly import assign_slots
from node.scp import instance_record
from storage.db import Database
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.models import Exam, ExamEvent, Instance, Outbound, Result, utcnow
from storage.records import ProducedObject
from storage.reports import Reports
from storage.schema import SchemaOutdated, head, revision
from tests.helpers import ROOT, toml_document

FIXTURE = ROOT / "tests" / "fixtures" / "db-release-0.1.0.sql"
#: What release 0.1.0's fixture database holds (checked before and after the upgrade).
FIXTURE_DONE = {
    "1.2.826.0.1.3680043.10.1234.278647244615839211833147801471436962",
    "1.2.826.0.1.3680043.10.1234.671927849149298742267695852343900405",
}
FIXTURE_PARTIAL = "1.2.826.0.1.3680043.10.1234.50638744778501585920546567510138575"


def _records(files: FileStore, datasets) -> list:
    return [
        instance_record(
            ds, files, "T", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", 100
        )
        for ds in datasets
    ]


def _ready_exams(store: Exams, files: FileStore, n: int, seed: int = 0) -> list[str]:
    studies = []
    for i in range(n):
        exam = make_exam(seed=seed + i, rows=8, cols=8)
        for r in _records(files, exam):
            store.add_instance(r, assign_slots, place=lambda: None)
        studies.append(exam[0].StudyInstanceUID)
    return studies


def _expire_leases(db: Database, owner: str | None = None) -> None:
    """Make the leases (of ``owner``, or all) run out now (what waiting lease_seconds
    without a heartbeat would do)."""
    with db.write() as s:
        past = utcnow() - dt.timedelta(seconds=1)
        for model in (Exam, Outbound):
            held = model.lease_owner == owner if owner else model.lease_owner.isnot(None)
            s.execute(update(model).where(held).values(lease_until=past))


def _produced(study: str, n: int = 2) -> list[ProducedObject]:
    return [
        ProducedObject(
            kind="sc",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid=f"{study[:58]}.9{i}",
            series_instance_uid=f"{study[:58]}.99",
            path=f"results/{study}/v1/r{i}.dcm",
            modality="OT",
            size_bytes=6,
        )
        for i in range(n)
    ]


# -- migrations ------------------------------------------------------------------------------


def _cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
    )


def _release_010_node(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder whose database release 0.1.0 wrote (from the checked-in dump)."""
    data = tmp_path / "data"
    data.mkdir()
    db_file = data / "mammo-node.db"
    with sqlite3.connect(db_file) as conn:
        conn.executescript(FIXTURE.read_text())
    config = tmp_path / "config.toml"
    config.write_text(
        toml_document(
            {"node": {"data_dir": str(data), "port": 0}, "dicomweb": {"enabled": False}}, {}
        )
    )
    return config, db_file


def test_release_010_database_is_refused_then_upgraded_without_loss(tmp_path, pg_server):
    config, db_file = _release_010_node(tmp_path)
    # The daemon refuses the old schema and names the command.
    r = _cli(config, "start")
    assert r.returncode == 2, r.stderr
    assert "older (revision 0001)" in r.stderr and "mammo-node db upgrade" in r.stderr
    r = _cli(config, "exams")
    assert r.returncode == 2 and "mammo-node db upgrade" in r.stderr
    assert _cli(config, "db", "current").returncode == 1
    r = _cli(config, "db", "upgrade")
    assert r.returncode == 0 and "upgraded from 0001" in r.stdout, r.stdout + r.stderr
    assert _cli(config, "db", "current").returncode == 0
    assert "already current" in _cli(config, "db", "upgrade").stdout

    db = Database(f"sqlite:///{db_file}")
    assert revision(db.engine) == head()
    with db.session() as s:
        exams = {e.study_instance_uid: e for e in s.scalars(select(Exam))}
        assert {u for u, e in exams.items() if e.state == "done"} == FIXTURE_DONE
        assert exams[FIXTURE_PARTIAL].state == "receiving"
        for uid in FIXTURE_DONE:  # each reading kept: the plain-data summary and 6 objects
            reading = json.loads(exams[uid].reading_json)
            assert set(reading["breasts"]) == {"L", "R"}
            assert (
                s.scalar(
                    select(func.count()).select_from(Result).where(Result.exam_id == exams[uid].id)
                )
                == 6
            )
        assert s.scalar(select(func.count()).select_from(Instance)) == 23
        sent = s.execute(select(Outbound.state, func.count()).group_by(Outbound.state)).all()
        assert sent == [("sent", 12)]
        assert all(e.lease_owner is None for e in exams.values())
        assert s.scalar(select(func.count()).select_from(ExamEvent)) > 20
    # The CLI reads it as before, deliveries included.
    listed = {
        e["study_instance_uid"]: e for e in json.loads(_cli(config, "exams", "--json").stdout)
    }
    assert listed[next(iter(FIXTURE_DONE))]["delivery"] == {"pacs": {"sent": 6}}

    # ... and moves to PostgreSQL with every row (db copy), ids and sequences kept usable.
    url = pg_server.new_database("copy")
    r = _cli(config, "db", "copy", "--to", url, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "copied" in r.stdout and "23 instances" in r.stdout
    pg = Database(url)
    try:
        with db.session() as a, pg.session() as b:
            for model in (Exam, Instance, Result, Outbound, ExamEvent):
                cols = [c for c in model.__table__.c]  # type: ignore[attr-defined]
                rows_a = a.execute(select(*cols).order_by(cols[0])).all()
                rows_b = b.execute(select(*cols).order_by(cols[0])).all()
                assert rows_a == rows_b, model.__name__
        store = Exams(pg)
        files = FileStore(tmp_path / "pgdata", fsync=False)
        _ready_exams(store, files, 1, seed=77)  # new rows get new ids
        assert Reports(store.db).counts_by_state().counts["ready"] == 1
        # A second copy into a database that is not empty is refused, nothing written.
        r = _cli(config, "db", "copy", "--to", url, "--quiet")
        assert r.returncode == 1 and "not empty" in r.stderr
    finally:
        pg.close()
        db.close()


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    Database(url).close()
    db = Database(url, check_schema=False)
    with db.write() as s:
        s.execute(
            update(
                __import__("sqlalchemy").table(
                    "alembic_version", __import__("sqlalchemy").column("version_num")
                )
            ).values(version_num="9999")
        )
    db.close()
    with pytest.raises(SchemaOutdated, match="newer"):
        Database(url)


# -- triage: the exam score as an indexed column ----------------------------------------


def test_triage_sorts_every_exam_by_score_in_the_database(tmp_path, db_url):
    """The dashboard's sort=score: the highest score first over every exam matching the
    filter (an old exam beyond any "newest N" window included), exams without one last."""
    db = Database(db_url)
    store = Exams(db)
    files = FileStore(tmp_path / "data", fsync=False)
    (study,) = _ready_exams(store, files, 1)
    claim = store.claim_next_ready(lease_seconds=60)
    assert claim is not None
    assert store.complete(*claim, _produced(study), ["pacs"], reading={"score": 42.5})
    t0 = dt.datetime(2026, 1, 1)
    scores = [None if i % 7 == 0 else float((i * 37) % 990) / 10 for i in range(1500)]
    scores[0] = 99.9  # the oldest exam is the most suspicious
    with db.write() as s:
        s.add_all(
            Exam(
                study_instance_uid=f"1.2.826.0.1.3680043.10.1234.77.{i}",
                state="done" if i % 2 else "failed",
                exam_score=sc,
                reading_json=json.dumps({"score": sc}),
                last_received_at=t0 + dt.timedelta(minutes=i),
            )
            for i, sc in enumerate(scores)
        )
    with db.session() as s:  # complete() recorded the reading's score in the column
        assert s.scalar(select(Exam.exam_score).where(Exam.study_instance_uid == study)) == 42.5
    rows, total = Reports(store.db).exam_page(offset=0, limit=100, by_score=True)
    assert total == 1501 and len(rows) == 100
    assert rows[0].study_instance_uid.endswith(".77.0") and rows[0].score == 99.9
    listed = [r.score for r in rows]
    assert listed == sorted(listed, reverse=True)
    every: list = []
    for offset in range(0, 1501, 500):  # pages continue the order, nothing twice
        every += Reports(store.db).exam_page(offset=offset, limit=500, by_score=True)[0]
    assert len({r.study_instance_uid for r in every}) == 1501
    known = [r.score for r in every if r.score is not None]
    assert known == sorted(known, reverse=True) and 42.5 in known
    assert all(r.score is None for r in every[len(known) :])  # unscored last
    nulls = [r for r in every if r.score is None]  # newest first among them
    assert [r.last_received_at for r in nulls] == sorted(
        (r.last_received_at for r in nulls), reverse=True
    )
    failed, n = Reports(store.db).exam_page(state="failed", offset=0, limit=10, by_score=True)
    assert n == 750 and all(r.state == "failed" for r in failed)
    assert failed[0].score == 99.9
    newest = Reports(store.db).exam_page(offset=0, limit=3).rows
    assert [r.score for r in newest][0] == 42.5
    db.close()


def test_exam_score_migration_fills_it_from_the_readings(tmp_path):
    from alembic import command

    from storage.schema import alembic_config, upgrade

    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004")
    db.close()
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        assert "exam_score" not in {c["name"] for c in sa.inspect(conn).get_columns("exams")}
        for i, reading in enumerate(['{"score": 73.5}', '{"breasts": {}}', "not json", None]):
            conn.execute(
                sa.text(
                    "INSERT INTO exams (study_instance_uid, state, version, notes_json, "
                    "created_at, last_received_at, state_changed_at, reading_json) VALUES "
                    "(:u, 'done', 1, '[]', '2026-01-01', '2026-01-01', '2026-01-01', :r)"
                ),
                {"u": f"1.2.3.{i}", "r": reading},
            )
    assert upgrade(engine) == ("0004", head())
    with engine.connect() as conn:
        got = {
            u: sc
            for u, sc in conn.execute(sa.text("SELECT study_instance_uid, exam_score FROM exams"))
        }
        assert "ix_exams_exam_score" in {i["name"] for i in sa.inspect(conn).get_indexes("exams")}
    assert got == {"1.2.3.0": 73.5, "1.2.3.1": None, "1.2.3.2": None, "1.2.3.3": None}
    engine.dispose()


# -- claims and leases ---------------------------------------------------------------------


def test_worker_lease_takeover_and_the_old_holder_cannot_finish(tmp_path, db_url):
    db = Database(db_url)
    files = FileStore(tmp_path / "data", fsync=False)
    a, b = Exams(db, owner="host-a:1"), Exams(db, owner="host-b:2")
    (study,) = _ready_exams(a, files, 1)
    claim = a.claim_next_ready(lease_seconds=60)
    assert claim is not None
    assert b.claim_next_ready(lease_seconds=60) is None  # held
    assert a.renew_lease(*claim, 60) and not b.renew_lease(*claim, 60)
    _expire_leases(db)  # worker a stopped beating
    assert b.claim_next_ready(lease_seconds=60) == claim  # taken over
    assert not a.renew_lease(*claim, 60)
    assert a.complete(*claim, _produced(study), ["pacs"]) is False  # a's work is discarded
    assert a.finish(*claim, ok=False, reason="x") is False
    assert b.complete(*claim, _produced(study), ["pacs"]) is True
    with db.session() as s:
        exam = s.scalar(select(Exam))
        assert exam.state == "done" and exam.lease_owner is None and exam.attempts == 1
        assert s.scalar(select(func.count()).select_from(Result)) == 2
        assert any("taken over from host-a:1" in e.detail for e in s.scalars(select(ExamEvent)))
    db.close()


def test_an_exam_that_keeps_killing_workers_fails(tmp_path, db_url):
    db = Database(db_url)
    store = Exams(db, owner="h:1")
    _ready_exams(store, FileStore(tmp_path / "d", fsync=False), 1)
    assert store.claim_next_ready(60, max_attempts=2) is not None
    _expire_leases(db)
    assert store.claim_next_ready(60, max_attempts=2) is not None  # attempt 1
    _expire_leases(db)
    assert store.claim_next_ready(60, max_attempts=2) is None  # attempt 2: gives up
    with db.session() as s:
        exam = s.scalar(select(Exam))
        assert exam.state == "failed" and "stopped 2 times" in exam.reason
    db.close()


def test_recover_frees_only_dead_local_holders(tmp_path, db_url):
    db = Database(db_url)
    store = Exams(db)
    _ready_exams(store, FileStore(tmp_path / "d", fsync=False), 3)
    claims = [
        Exams(db, owner=o).claim_next_ready(60)
        for o in (
            f"{__import__('socket').gethostname()}:999999999",  # gone
            "another-host:4242",  # unknown
            store.owner.rsplit(":", 1)[0] + ":1",
        )
    ]  # init: alive
    assert all(claims)
    assert store.recover() == 1
    counts = Reports(store.db).counts_by_state().counts
    assert counts == {**counts, "ready": 1, "processing": 2}
    db.close()


def test_concurrent_workers_claim_each_exam_once(tmp_path, db_url):
    """Four workers (each its own connection pool and owner) race for 16 exams."""
    files = FileStore(tmp_path / "d", fsync=False)
    setup = Database(db_url)
    _ready_exams(Exams(setup), files, 16)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        db = Database(db_url)  # own engine and lock: like another process
        store = Exams(db, owner=name)
        got: list[int] = []
        try:
            start.wait()
            while (c := store.claim_next_ready(60)) is not None:
                got.append(c[0])
                assert store.finish(*c, ok=True)
        except BaseException as exc:
            errors.append(exc)
        finally:
            claimed[name] = got
            db.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    every = [e for got in claimed.values() for e in got]
    assert sorted(every) == sorted(set(every)) and len(every) == 16
    assert Reports(setup).counts_by_state().counts["done"] == 16
    setup.close()


def test_concurrent_exporters_claim_disjoint_deliveries(tmp_path, db_url):
    db = Database(db_url)
    files = FileStore(tmp_path / "d", fsync=False)
    store = Exams(db, owner="w:1")
    for study in _ready_exams(store, files, 3):
        c = store.claim_next_ready(60)
        assert c is not None and store.complete(*c, _produced(study, 4), ["pacs", "archive"])
    x, y = Deliveries(db, owner="x:1"), Deliveries(db, owner="y:2")
    first = x.claim_transfers(limit=10, lease_seconds=60)
    second = y.claim_transfers(limit=100, lease_seconds=60)
    assert len(first) == 10 and len(second) == 14
    assert not {d.id for d in first} & {d.id for d in second}
    assert y.claim_transfers(limit=100) == []
    assert x.mark_in_flight(first[0].id) and not y.mark_in_flight(first[1].id)
    _expire_leases(db, "x:1")  # exporter x died mid-send: y takes over; the cut-off one is checked
    again = y.claim_transfers(limit=100, lease_seconds=60)
    assert {d.id for d in again} == {d.id for d in first}
    assert [d.interrupted for d in again].count(True) == 1
    x.release_transfers()
    assert x.renew_transfer_leases(60) == 0
    db.close()


def test_stable_timer_fires_once_across_listeners(tmp_path, db_url):
    files = FileStore(tmp_path / "d", fsync=False)
    setup = Database(db_url)
    store = Exams(setup)
    studies = []
    for i in range(6):  # six partial exams (three views each)
        exam = make_exam(seed=40 + i, rows=8, cols=8)
        for r in _records(files, exam[:3]):
            store.add_instance(r, assign_slots, place=lambda: None)
        studies.append(exam[0].StudyInstanceUID)
    promoted: list[str] = []
    start = threading.Barrier(3)

    def listener() -> None:
        db = Database(db_url)
        start.wait()
        promoted.extend(Exams(db).promote_stable(0))
        db.close()

    threads = [threading.Thread(target=listener) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(promoted) == sorted(studies)  # each promoted by exactly one listener
    with setup.session() as s:
        events = s.scalars(select(ExamEvent.detail).where(ExamEvent.kind == "state")).all()
    assert sum("receiving -> ready" in e for e in events) == 6
    setup.close()


def test_two_listeners_store_one_study_at_once(tmp_path, db_url):
    """The four views of each study split between two listeners storing at the same moment,
    and one image sent to both: one exam per study, complete, the image stored once."""
    files = FileStore(tmp_path / "d", fsync=False)
    exams = [make_exam(seed=60 + i, rows=8, cols=8) for i in range(8)]
    Database(db_url).close()  # the schema, before the listeners race
    halves = [[ds for e in exams for ds in e[k::2]] for k in (0, 1)]
    halves[1].append(exams[0][0])  # a duplicate, sent to the other listener too
    results: list = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def listener(items) -> None:
        db = Database(db_url)
        store = Exams(db)
        start.wait()
        try:
            for r in _records(files, items):
                results.append(store.add_instance(r, assign_slots, place=lambda: None))
        except BaseException as exc:
            errors.append(exc)
        db.close()

    threads = [threading.Thread(target=listener, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(r.duplicate for r in results) == 1
    db = Database(db_url)
    store = Exams(db)
    reports = Reports(store.db)
    assert reports.counts_by_state().counts["ready"] == 8 and reports.instance_count() == 32
    db.close()


def test_start_options_are_checked(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(toml_document({"node": {"data_dir": str(tmp_path / "d"), "port": 0}}, {}))
    r = _cli(config, "start", "--role", "worker", "--device", "gpu0")
    assert r.returncode == 2 and "--device must be auto, cpu, cuda or cuda:N" in r.stderr
    r = _cli(config, "start", "--role", "janitor")
    assert r.returncode == 2 and "invalid choice: 'janitor'" in r.stderr


def test_exclusive_work_runs_in_one_process_at_a_time(db_url):
    """Retention passes of several listeners: one at a time, the others skip."""
    a, b = Database(db_url), Database(db_url)
    with a.exclusive("retention") as first:
        assert first
        with b.exclusive("retention") as second:
            assert not second
        with b.exclusive("other-work") as other:
            assert other
    with b.exclusive("retention") as again:
        assert again
    a.close()
    b.close()


@pytest.mark.unit
def test_a_locked_sqlite_database_is_a_transient_error(tmp_path):
    """SQLite locked past its busy timeout is transient (the worker waits and reads the exam
    again); a constraint violation is not."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError, OperationalError

    from storage.db import transient_database_error

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    try:
        with pytest.raises(OperationalError) as locked:
            with engine.begin() as c:
                c.execute(text("INSERT INTO t VALUES (2)"))
        assert "locked" in str(locked.value) and transient_database_error(locked.value)
        holder.execute("COMMIT")
        with pytest.raises(IntegrityError) as dup:
            with engine.begin() as c:
                c.execute(text("INSERT INTO t VALUES (1)"))
        assert not transient_database_error(dup.value)
    finally:
        holder.close()
        engine.dispose()
