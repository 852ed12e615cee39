"""Retention: each rule on a real SQLite database and file store (unit), and the daemon's
`mammo-node purge` end to end."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from inference.synthetic import make_exam, write
from node.assembly import assign_slots
from node.query import Query, QueryService
from node.scp import instance_record
from storage.db import Database
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.models import Instance, PurgeJournal, Result, utcnow
from storage.records import ProducedObject
from storage.reports import Reports
from storage.retention import Retention
from tests.helpers import QR_PEER, send, wait_for

DAY = dt.timedelta(days=1)


@pytest.fixture
def env(tmp_path, db_url):
    db = Database(db_url)
    files = FileStore(tmp_path / "data", fsync=False)
    yield Exams(db), files, Retention(db, files), db
    db.close()


def _exam(
    store: Exams, files: FileStore, seed: int, deliver: str | None = "sent", read: bool = True
):
    """An exam received (files on disk), optionally read (2 results) and delivered."""
    exam = make_exam(seed=seed, rows=16, cols=16)
    for ds in exam:
        rec = instance_record(
            ds, files, "T", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", 1000
        )
        tmp = write(ds, files.incoming / f"{ds.SOPInstanceUID}.dcm")
        store.add_instance(rec, assign_slots, place=lambda t=tmp, r=rec: files.place(t, r.path))
    study = exam[0].StudyInstanceUID
    if not read:
        return study
    exam_id, version = store.claim_next_ready()
    produced = []
    for i in range(2):
        rel = f"results/{study}/v1/r{i}.dcm"
        (files.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (files.root / rel).write_bytes(b"result")
        produced.append(
            ProducedObject(
                kind="sc",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                sop_instance_uid=f"{study[:58]}.9{i}",
                series_instance_uid=f"{study[:58]}.99",
                path=rel,
                modality="OT",
                size_bytes=6,
            )
        )
    assert store.complete(exam_id, version, produced, ["pacs"] if deliver else [])
    if deliver:
        deliveries = Deliveries(store.db, store.owner)
        for d in deliveries.due_transfers():
            if deliver == "sent":
                deliveries.mark_sent(d.id)
            elif deliver == "gave_up":
                deliveries.mark_failed(d.id, "refused", 1, 1, 1)
    return study


def _files_of(db: Database, study: str) -> list[str]:
    from sqlalchemy import select

    with db.session() as s:
        return list(
            s.scalars(
                select(Instance.path).where(
                    Instance.study_instance_uid == study, Instance.role != "result"
                )
            )
        )


def test_done_and_delivered_images_go_after_keep_days(env):
    store, files, ret, db = env
    study = _exam(store, files, 1)
    paths = _files_of(db, study)
    assert len(paths) == 4 and all((files.root / p).exists() for p in paths)
    report = ret.run(7, None, None, now=utcnow() + 6 * DAY)
    assert report.studies == []  # not yet
    report = ret.run(7, None, None, now=utcnow() + 8 * DAY)
    assert report.studies == [study] and report.instances == 4
    assert _files_of(db, study) == [] and not any((files.root / p).exists() for p in paths)
    assert not (files.root / "instances" / study).exists()  # empty folders go too
    exam = Reports(store.db).list_exams()[0]
    assert exam.state == "done" and exam.images_purged_at is not None
    assert any("retention" in n for n in exam.notes)
    # Gone from C-FIND; the produced objects stay findable.
    found = QueryService(Reports(store.db)).find(Query("IMAGE", {"StudyInstanceUID": study}))
    assert {r.role for r in found.rows} == {"result"}


@pytest.mark.parametrize(
    "deliver, why", [(None, None), ("pending", "not delivered yet"), ("gave_up", "gave up")]
)
def test_undelivered_or_unread_images_stay(env, deliver, why):
    store, files, ret, db = env
    if deliver is None:
        study = _exam(store, files, 2, read=False)  # never read
    else:
        study = _exam(store, files, 2, deliver=deliver)
    report = ret.run(0, None, 1.0, now=utcnow() + 100 * DAY, disk_use=lambda: 99.0)
    assert report.studies == [] and len(_files_of(db, study)) == 4
    if why:
        assert why in report.kept[study]
    if deliver == "gave_up":
        assert any("gave up" in n for n in Reports(store.db).list_exams()[0].notes)


def test_disk_above_the_watermark_purges_oldest_first_until_below(env):
    store, files, ret, db = env
    old, mid, new = (_exam(store, files, s) for s in (3, 4, 5))
    unread = _exam(store, files, 6, read=False)
    uses = iter([95.0, 92.0, 85.0, 85.0])
    report = ret.run(30, None, 90.0, now=utcnow(), disk_use=lambda: next(uses))
    assert report.studies == [old, mid]  # oldest first, then below 90 %
    assert _files_of(db, new) and _files_of(db, unread)


def test_results_go_after_keep_results_days_and_rows_stay(env):
    store, files, ret, db = env
    study = _exam(store, files, 7)
    report = ret.run(None, 1, None, now=utcnow() + 2 * DAY)
    assert report.results == 2
    from sqlalchemy import select

    with db.session() as s:
        results = list(s.scalars(select(Result)))
    assert all(r.purged_at is not None and r.path == "" for r in results)
    assert not (files.root / "results" / study).exists()
    assert Deliveries(store.db, store.owner).requeue_study(study) == 0  # nothing left to resend
    assert len(_files_of(db, study)) == 4  # images stay (keep_images_days None)


def test_a_purge_cut_by_a_crash_is_finished_and_nothing_points_at_a_missing_file(env):
    store, files, ret, db = env
    study = _exam(store, files, 8)
    paths = _files_of(db, study)
    # A crash after the rows went and the journal was written, before the files went:
    from sqlalchemy import delete

    with db.write() as s:
        for p in paths:
            s.add(PurgeJournal(path=p))
        s.execute(delete(Instance).where(Instance.path.in_(paths)))
    assert all((files.root / p).exists() for p in paths)
    assert ret.finish_journal() == 4  # what the next start does
    assert not any((files.root / p).exists() for p in paths)
    from sqlalchemy import select

    with db.session() as s:
        for p in s.scalars(select(Instance.path)):
            assert (files.root / p).exists(), p
        assert s.scalar(select(PurgeJournal.id)) is None


def test_instances_outside_exams_go_after_keep_days(env):
    store, files, ret, db = env
    ds = make_exam(seed=9, rows=16, cols=16)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    rec = instance_record(
        ds, files, "T", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", 10
    )
    tmp = write(ds, files.incoming / "x.dcm")
    store.add_instance(rec, assign_slots, place=lambda: files.place(tmp, rec.path))
    assert ret.run(7, None, None, now=utcnow() + DAY).studies == []
    assert ret.run(7, None, None, now=utcnow() + 8 * DAY).studies == [ds.StudyInstanceUID]
    assert not (files.root / rec.path).exists()


def test_purge_command_against_a_running_node(node_factory, storescp_factory):
    pacs = storescp_factory()
    node = node_factory(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "peers": [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
            "export": {"initial_delay_seconds": 0.5, "max_delay_seconds": 1},
        },
        worker=True,
    )
    exam = make_exam(seed=10, rows=320, cols=256)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    waiting = make_exam(seed=11, rows=64, cols=64)[:2]  # partial: not read, never purged
    assert send(node.port, waiting) == [0] * 2
    wait_for(
        lambda: node.exam(study)["delivery"].get("pacs", {}).get("sent") == 6, 60, what="delivered"
    )
    dry = node.cli("purge", "--dry-run", "--older-than", "0")
    assert "would purge 1 study(ies): 4 image(s)" in dry.stdout and study in dry.stdout
    assert len(node.stored_files()) == 6
    r = node.cli("purge", "--study", waiting[0].StudyInstanceUID, check=False)
    assert r.returncode == 1 and "not purged" in r.stderr
    r = node.cli("purge", "--older-than", "0")
    assert "purged 1 study(ies): 4 image(s)" in r.stdout
    assert sorted(p.stem for p in node.stored_files()) == sorted(
        ds.SOPInstanceUID for ds in waiting
    )
    e = node.exam(study)
    assert e["state"] == "done" and e["images_purged_at"] and e["delivery"]["pacs"]["sent"] == 6
    exams = json.loads(node.cli("exams", "--json").stdout)
    assert len(exams) == 2
    deleted = [
        json.loads(x)
        for x in (node.data_dir / "audit.jsonl").read_text().splitlines()
        if '"DICOM Study Deleted"' in x
    ]
    assert [(d["outcome"], d["studies"], d["peer"]["via"]) for d in deleted] == [
        (4, [waiting[0].StudyInstanceUID], "cli"),
        (0, [study], "cli"),
    ]


def test_the_daemon_applies_retention_by_itself(node_factory):
    node = node_factory(
        {"retention": {"keep_images_days": 0.00002, "check_seconds": 1}}, worker=True
    )  # ~2 s after done (no destinations: delivered at once)
    exam = make_exam(seed=12, rows=320, cols=256)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: not node.stored_files(), 60, what="the images purged by the daemon")
    assert node.exam(study)["images_purged_at"]
    wait_for(
        lambda: "DICOM Study Deleted" in (node.data_dir / "audit.jsonl").read_text(),
        10,
        what="the audit line",
    )
    assert "retention: 1 study(ies) purged" in node.log.read_text()


def test_priors_go_keep_days_after_they_arrived(env):
    """A prior is never read (never done): its images go keep_images_days after its last
    image arrived, the current exam's stay until it is done and delivered."""
    _, files, ret, db = env
    store = Exams(db, prior_gap_days=180)
    current = make_exam(seed=13, rows=16, cols=16, patient_id="PRI-1")
    old = make_exam(
        seed=14, rows=16, cols=16, patient_id="PRI-1", acquisition=dt.datetime(2024, 1, 15, 9, 0)
    )
    for ds in current + old:
        rec = instance_record(
            ds, files, "T", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", 100
        )
        tmp = write(ds, files.incoming / f"{ds.SOPInstanceUID}.dcm")
        store.add_instance(rec, assign_slots, place=lambda t=tmp, r=rec: files.place(t, r.path))
    prior_study = old[0].StudyInstanceUID
    assert Reports(store.db).exam_view(prior_study).state == "prior"
    assert ret.run(7, None, None, now=utcnow() + 6 * DAY).studies == []
    report = ret.run(7, None, None, now=utcnow() + 8 * DAY)
    assert report.studies == [prior_study] and report.instances == 4
    assert _files_of(db, prior_study) == []
    assert len(_files_of(db, current[0].StudyInstanceUID)) == 4
    exam = Reports(store.db).exam_view(prior_study)
    assert exam.state == "prior" and exam.images_purged_at
    assert ret.run(7, None, None, now=utcnow() + 9 * DAY).studies == []  # once


def test_priors_without_patient_id_by_name_and_birth_date(env):
    """Studies without a PatientID: a prior by the gap rule when the name and the birth date
    match, not when only the name does."""
    _, files, _, db = env
    store = Exams(db, prior_gap_days=180)

    def receive(exam):
        for ds in exam:
            ds.PatientID = ""
            rec = instance_record(
                ds,
                files,
                "T",
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                "1.2.840.10008.1.2.1",
                100,
            )
            tmp = write(ds, files.incoming / f"{ds.SOPInstanceUID}.dcm")
            store.add_instance(rec, assign_slots, place=lambda t=tmp, r=rec: files.place(t, r.path))
        return exam[0].StudyInstanceUID

    old = dt.datetime(2024, 1, 15, 9, 0)
    current = make_exam(seed=15, rows=16, cols=16, patient_name="Anon^Ann")
    same = make_exam(seed=16, rows=16, cols=16, patient_name="ANON^ANN", acquisition=old)
    other = make_exam(seed=17, rows=16, cols=16, patient_name="Anon^Ann", acquisition=old)
    for ds in current + same:
        ds.PatientBirthDate = "19600101"
    for ds in other:
        ds.PatientBirthDate = "19700101"
    cur = receive(current)
    assert Reports(store.db).exam_view(receive(same)).state == "prior"
    assert Reports(store.db).exam_view(receive(other)).state != "prior"
    assert [u for u, _ in store.priors_of(cur)] == [same[0].StudyInstanceUID]
