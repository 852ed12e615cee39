"""Unit layer: image kinds from the header (every vendor convention), which image a slot
reads, priors and implants in the exam store (a real SQLite / PostgreSQL database)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from pathlib import Path

import numpy as np
import pytest

from inference.synthetic import make_exam, make_mammogram, make_tomo_volume
from inference.views import classify, image_kind, synthesized_reason, vendor_private_texts
from inference.volume import computed_2d
from node.assembly import assign_slots
from node.scp import instance_record
from storage.db import Database
from storage.exams import Exams
from storage.files import FileStore
from storage.reports import Reports

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 15, 9, 0)


def _img(**header):
    ds = make_mammogram("L", "CC", rows=8, cols=8, acquisition=header.pop("at", T0))
    for k, v in header.items():
        if k.startswith("private"):
            ds.private_block(0x0019, "HOLOGIC, Inc.", create=True).add_new(0x06, "LO", v)
        else:
            setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    "header, kind",
    [
        ({}, "conventional"),
        (dict(ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]), "synthesized"),
        (dict(SeriesDescription="L CC C-View"), "synthesized"),  # Hologic
        (dict(SeriesDescription="RMLO Intelligent 2D"), "synthesized"),  # Hologic 3DQuorum
        (dict(ProtocolName="V-Preview CC"), "synthesized"),  # GE
        (dict(SeriesDescription="Insight 2D"), "synthesized"),  # Siemens
        (dict(SeriesDescription="S-View LCC"), "synthesized"),  # Fujifilm
        (dict(private="C-VIEW"), "synthesized"),  # vendor's own attribute
        (dict(SeriesDescription="L CC VIEW"), "conventional"),  # not a vendor name
        (dict(PresentationIntentType="FOR PROCESSING"), "for_processing"),
    ],
)
def test_image_kind_from_every_convention(header, kind):
    ds = _img(**header)
    assert image_kind(ds) == kind
    assert classify(ds).kind == kind and classify(ds).slot == "L-CC"


def _with_private(
    ds,
    creator: str,
    group: int,
    offset: int,
    value: str,
    vr: str = "LO",
    before: tuple[str, ...] = (),
):
    """A private block of ``creator`` in ``group`` (after the blocks of ``before``, so its
    element numbers differ from file to file as they do between systems)."""
    for other in before:
        ds.private_block(group, other, create=True).add_new(0x01, "LO", "something else")
    ds.private_block(group, creator, create=True).add_new(offset, vr, value)
    return ds


@pytest.mark.parametrize(
    "vendor, header, private",
    [
        # Hologic Selenia Dimensions / 3Dimensions: C-View, Intelligent 2D
        ("Hologic", dict(SeriesDescription="L CC C-View"), None),
        ("Hologic", dict(ProtocolName="R MLO Intelligent 2D"), None),
        ("Hologic", {}, ("HOLOGIC, Inc.", 0x0019, 0x06, "C-VIEW")),
        # GE Senographe Pristina: V-Preview
        ("GE", dict(SeriesDescription="V-Preview LCC"), None),
        ("GE", {}, ("GEMS_SENO_02", 0x0045, 0x1B, "V-PREVIEW CC")),
        ("GE", {}, ("GEMS_IDEN_01", 0x0009, 0x17, "VPreview RMLO")),
        # Siemens Mammomat Revelation / Inspiration: Insight 2D
        ("Siemens", dict(ProtocolName="Insight 2D"), None),
        ("Siemens", {}, ("SIEMENS MED MG", 0x0029, 0x40, "INSIGHT2D")),
        # Fujifilm Amulet Innovality: S-View
        ("Fujifilm", dict(SeriesDescription="S-View RCC"), None),
        ("Fujifilm", {}, ("FDMS 1.0", 0x0019, 0x30, "S VIEW")),
    ],
)
def test_synthesized_by_each_vendors_names_and_private_creators(vendor, header, private):
    ds = _img(**header)
    if private:
        creator, group, offset, value = private
        _with_private(ds, creator, group, offset, value, before=("OTHER VENDOR 1", "X"))
    assert image_kind(ds) == "synthesized", vendor
    reason = synthesized_reason(ds) or ""
    assert (f"{vendor} private attribute" in reason) == bool(private), reason


def test_private_names_count_only_in_the_vendors_blocks():
    # The same words under an unknown creator, or in a vendor's block where it is not text,
    # do not make an image synthesized: private data is looked up by its creator.
    assert (
        image_kind(_with_private(_img(), "ACME RESEARCH", 0x0019, 0x06, "C-VIEW")) == "conventional"
    )
    assert (
        image_kind(_with_private(_img(), "HOLOGIC, Inc.", 0x0019, 0x06, b"C-VIEW", vr="OB"))
        == "conventional"
    )
    # A vendor block with other text: conventional; its words are not vendor names.
    assert image_kind(_with_private(_img(), "GEMS_SENO_02", 0x0045, 0x1B, "CC")) == "conventional"
    assert [
        v
        for v, _ in vendor_private_texts(_with_private(_img(), "FDMS 1.0", 0x0019, 0x30, "S-VIEW"))
    ] == ["Fujifilm"]


def test_volume_and_projection_fill_no_slot_but_keep_their_view():
    vol = make_tomo_volume("R", "MLO", frames=3, rows=8, cols=8)
    info = classify(vol)
    assert (info.kind, info.role, info.laterality, info.view) == ("volume", "extra", "R", "MLO")
    proj = make_mammogram("R", "MLO", rows=8, cols=8)
    proj.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.4"
    assert classify(proj).kind == "projection" and classify(proj).slot is None


def test_implant_flag():
    assert classify(_img(BreastImplantPresent="YES")).implant
    assert classify(make_mammogram("L", "CC", rows=8, cols=8, modifier="implant-displaced")).implant
    assert not classify(_img(BreastImplantPresent="NO")).implant


def test_computed_2d_projects_the_central_slab(tmp_path: Path):
    stack = np.zeros((10, 4, 4), np.uint16)
    stack[4, 0, 0], stack[0, 1, 1], stack[5, 2, 2] = 900, 1000, 300
    vol = make_tomo_volume("L", "CC", pixels=stack)
    path = tmp_path / "v.dcm"
    vol.save_as(path, enforce_file_format=True)
    mip = computed_2d(path, "mip")
    assert mip.SOPInstanceUID == vol.SOPInstanceUID and mip.ImageLaterality == "L"
    px = mip.pixel_array
    assert px[0, 0] == 900 and px[1, 1] == 0 and px[2, 2] == 300  # frame 0 is outside the slab
    assert "frames 3-7 of 10" in mip.DerivationDescription
    avg = computed_2d(path, "average").pixel_array
    assert avg[0, 0] == 180


@pytest.fixture
def exams(tmp_path: Path, db_url: str):
    db = Database(db_url)
    yield db, FileStore(tmp_path / "data", fsync=False)
    db.close()


def _add(store: Exams, files: FileStore, datasets, assign=assign_slots):
    return [
        store.add_instance(
            instance_record(
                ds,
                files,
                "UNIT",
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                "1.2.840.10008.1.2.1",
                100,
            ),
            assign,
            place=lambda: None,
        )
        for ds in datasets
    ]


def test_combo_reads_conventional_although_synthesized_came_last(exams):
    db, files = exams
    store = Exams(db)
    conv = make_exam(seed=5, rows=8, cols=8, acquisition=T0)
    synth = make_exam(
        seed=6,
        rows=8,
        cols=8,
        study_uid=conv[0].StudyInstanceUID,
        patient_id=conv[0].PatientID,
        acquisition=T0 + dt.timedelta(minutes=5),
    )
    for ds in synth:
        ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
    _add(store, files, conv + synth)
    exam = Reports(store.db).exam_view(conv[0].StudyInstanceUID)
    assert exam is not None
    assert set(exam.views.values()) == {d.SOPInstanceUID for d in conv}
    assert set(exam.view_kinds.values()) == {"conventional"}
    assert any("synthesized 2D image not used" in n for n in exam.notes)

    # A site that prefers the synthesized image.
    store2 = Exams(db)
    other = make_exam(seed=7, rows=8, cols=8, acquisition=T0)
    synth2 = make_exam(
        seed=8,
        rows=8,
        cols=8,
        study_uid=other[0].StudyInstanceUID,
        patient_id=other[0].PatientID,
        acquisition=T0 - dt.timedelta(hours=1),
    )
    for ds in synth2:
        ds.SeriesDescription = "C-View"
    _add(
        store2,
        files,
        other + synth2,
        assign=lambda m: assign_slots(m, prefer=("synthesized", "conventional")),
    )
    e2 = Reports(store2.db).exam_view(other[0].StudyInstanceUID)
    assert set(e2.views.values()) == {d.SOPInstanceUID for d in synth2}
    assert set(e2.view_kinds.values()) == {"synthesized"}


def test_volume_only_view_missing_or_computed(exams):
    db, files = exams
    store = Exams(db)
    exam = make_exam(seed=9, rows=8, cols=8, views=("L-CC", "L-MLO", "R-CC"))
    vol = make_tomo_volume(
        "R",
        "MLO",
        frames=3,
        rows=8,
        cols=8,
        study_uid=exam[0].StudyInstanceUID,
        patient_id=exam[0].PatientID,
    )
    _add(store, files, [*exam, vol])
    e = Reports(store.db).exam_view(exam[0].StudyInstanceUID)
    assert e.missing == ["R-MLO"] and e.state == "receiving"
    assert e.volume_only == ["R-MLO"]
    assert any(
        "R-MLO: only a tomosynthesis volume; read with this view missing" in n for n in e.notes
    )
    # A 2D image of the view comes later: it is read, the view is no longer volume-only.
    late = make_mammogram(
        "R", "MLO", rows=8, cols=8, study_uid=exam[0].StudyInstanceUID, patient_id=exam[0].PatientID
    )
    _add(store, files, [late])
    e = Reports(store.db).exam_view(exam[0].StudyInstanceUID)
    assert e.volume_only == [] and e.state == "ready"
    exam2 = make_exam(seed=10, rows=8, cols=8, views=("L-CC", "L-MLO", "R-CC"))
    vol2 = make_tomo_volume(
        "R",
        "MLO",
        frames=3,
        rows=8,
        cols=8,
        study_uid=exam2[0].StudyInstanceUID,
        patient_id=exam2[0].PatientID,
    )
    _add(store, files, [*exam2, vol2], assign=lambda m: assign_slots(m, volume_2d="mip"))
    e2 = Reports(store.db).exam_view(exam2[0].StudyInstanceUID)
    assert e2.views["R-MLO"] == vol2.SOPInstanceUID
    assert e2.view_kinds["R-MLO"] == "computed" and e2.state == "ready"


def test_implant_exam_is_flagged(exams):
    db, files = exams
    store = Exams(db)
    exam = make_exam(seed=11, rows=8, cols=8)
    extra = make_mammogram(
        "L",
        "CC",
        rows=8,
        cols=8,
        modifier="implant-displaced",
        study_uid=exam[0].StudyInstanceUID,
        patient_id=exam[0].PatientID,
    )
    _add(store, files, [*exam, extra])
    e = Reports(store.db).exam_view(exam[0].StudyInstanceUID)
    assert e.implant and e.state == "ready"
    assert extra.SOPInstanceUID not in e.views.values()


def test_priors_by_age_and_by_a_newer_study(exams):
    db, files = exams
    store = Exams(db, prior_after_days=30, prior_gap_days=180)
    today = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    old = make_exam(
        seed=12, rows=8, cols=8, patient_id="PAT-P", acquisition=today - dt.timedelta(days=400)
    )
    (r, *_) = _add(store, files, old)
    assert r.exam_state == "prior"
    e = Reports(store.db).exam_view(old[0].StudyInstanceUID)
    assert "prior_after_days" in (e.reason or "")

    # The gap rule: a study not read yet becomes a prior when a newer one arrives.
    lenient = Exams(db, prior_after_days=None, prior_gap_days=180)
    mid = make_exam(
        seed=13, rows=8, cols=8, patient_id="PAT-P", acquisition=today - dt.timedelta(days=200)
    )
    assert _add(lenient, files, mid)[-1].exam_state == "ready"
    cur = make_exam(seed=14, rows=8, cols=8, patient_id="PAT-P", acquisition=today)
    assert _add(lenient, files, cur)[-1].exam_state == "ready"
    assert Reports(lenient.db).exam_view(mid[0].StudyInstanceUID).state == "prior"
    # ... and one that arrives after the newer one is a prior at once.
    late = make_exam(
        seed=15, rows=8, cols=8, patient_id="PAT-P", acquisition=today - dt.timedelta(days=365)
    )
    assert _add(lenient, files, late)[0].exam_state == "prior"
    # Another patient's old study is not touched by this patient's.
    assert len(lenient.priors_of(cur[0].StudyInstanceUID)) == 3
    ctx = lenient.reading_context(lenient.claim_next_ready()[0])  # type: ignore[index]
    assert len(ctx.priors) == 3 and ctx.priors[0] < ctx.priors[-1]
    # mammo-node complete reads a prior on request.
    missing, state = lenient.complete_now(old[0].StudyInstanceUID)
    assert (missing, state) == ([], "ready")


def test_prior_rules_store_which_rule_applied_and_their_reason(exams):
    db, files = exams
    today = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    store = Exams(db, prior_after_days=30, prior_gap_days=180)
    old = make_exam(
        seed=20, rows=8, cols=8, patient_id="PAT-R", acquisition=today - dt.timedelta(days=400)
    )
    _add(store, files, old)
    e = Reports(store.db).exam_view(old[0].StudyInstanceUID)
    assert e.state == "prior" and e.prior_rule == "age"
    # The gap rule, when a newer study arrives later: the reason names that study and the
    # setting that applied, not the age rule.
    gap = Exams(db, prior_after_days=None, prior_gap_days=180)
    mid = make_exam(
        seed=21,
        rows=8,
        cols=8,
        patient_id="PAT-R",
        acquisition=today - dt.timedelta(days=200),
        views=("L-CC", "L-MLO"),
    )
    assert _add(gap, files, mid)[-1].exam_state == "receiving"
    cur = make_exam(seed=22, rows=8, cols=8, patient_id="PAT-R", acquisition=today)
    _add(gap, files, cur)
    e = Reports(gap.db).exam_view(mid[0].StudyInstanceUID)
    assert (e.state, e.prior_rule) == ("prior", "gap")
    reason = e.reason or ""
    assert cur[0].StudyInstanceUID in reason and "arrived, 200 days newer" in reason
    assert "prior_gap_days = 180" in reason and "prior_after_days" not in reason
    assert f"mammo-node complete {mid[0].StudyInstanceUID}" in reason
    # A study that arrives after a newer one: the newest such study is named.
    late = make_exam(
        seed=23, rows=8, cols=8, patient_id="PAT-R", acquisition=today - dt.timedelta(days=500)
    )
    _add(gap, files, late)
    e = Reports(gap.db).exam_view(late[0].StudyInstanceUID)
    assert e.prior_rule == "gap"
    assert cur[0].StudyInstanceUID in (e.reason or "") and "500 days newer" in e.reason
    # Read on request: a structured flag, and no newer study makes it a prior again.
    gap.complete_now(mid[0].StudyInstanceUID)
    e = Reports(gap.db).exam_view(mid[0].StudyInstanceUID)
    assert e.read_on_request and e.state == "ready"
    newest = make_exam(
        seed=24, rows=8, cols=8, patient_id="PAT-R", acquisition=today + dt.timedelta(days=200)
    )
    _add(gap, files, newest)
    assert Reports(gap.db).exam_view(mid[0].StudyInstanceUID).state == "ready"
    assert Reports(gap.db).exam_view(cur[0].StudyInstanceUID).state == "prior"
    assert [u for u, _ in gap.priors_of(newest[0].StudyInstanceUID)] == [
        late[0].StudyInstanceUID,
        old[0].StudyInstanceUID,
        cur[0].StudyInstanceUID,
    ]
    assert gap.priors_by_study([newest[0].StudyInstanceUID]) == {
        newest[0].StudyInstanceUID: gap.priors_of(newest[0].StudyInstanceUID)
    }


def _statements(db: Database, action) -> list[str]:
    from sqlalchemy import event

    seen: list[str] = []

    def hook(conn, cursor, statement, params, context, executemany):
        seen.append(" ".join(statement.split()))

    event.listen(db.engine, "before_cursor_execute", hook)
    try:
        action()
    finally:
        event.remove(db.engine, "before_cursor_execute", hook)
    return seen


def test_prior_lookup_is_one_indexed_query_per_new_study(exams, db_url):
    db, files = exams
    today = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    store = Exams(db, prior_after_days=None, prior_gap_days=180)
    for seed in range(30, 34):  # other patients' exams the lookup must not read
        _add(store, files, make_exam(seed=seed, rows=8, cols=8, patient_id=f"OTHER-{seed}"))
    _add(
        store,
        files,
        make_exam(
            seed=35, rows=8, cols=8, patient_id="PAT-Q", acquisition=today - dt.timedelta(days=300)
        ),
    )
    first, *rest = make_exam(seed=36, rows=8, cols=8, patient_id="PAT-Q", acquisition=today)
    sql = _statements(db, lambda: _add(store, files, [first]))
    by_id = [
        q for q in sql if q.startswith("SELECT") and "FROM exams" in q and "exams.patient_id =" in q
    ]
    assert len(by_id) == 1, by_id  # both rules, one lookup
    # Images without a PatientID of the same name and birth date: one query, which finds
    # none here (every synthetic patient has the same name and birth date, but an ID).
    by_birth = [q for q in sql if "patient_birth_date =" in q]
    assert len(by_birth) == 1 and len([q for q in sql if "FROM exams" in q]) == 2, sql
    # Later images of the study: no lookup at all.
    sql = _statements(db, lambda: _add(store, files, rest))
    assert not [q for q in sql if "exams.patient_id =" in q or "patient_birth_date =" in q]
    if db_url.startswith("sqlite"):
        with db.engine.connect() as c:
            from sqlalchemy import text

            plan = " ".join(
                str(r[-1])
                for r in c.execute(
                    text("EXPLAIN QUERY PLAN SELECT id FROM exams WHERE patient_id = 'PAT-Q'")
                )
            )
            assert "ix_exams_patient" in plan, plan
            plan = " ".join(
                str(r[-1])
                for r in c.execute(
                    text(
                        "EXPLAIN QUERY PLAN SELECT exam_id FROM instances WHERE patient_birth_date"
                        " = '19600101'"
                    )
                )
            )
            assert "ix_instances_patient_birth_date" in plan, plan


def test_implant_skip_is_its_own_state_and_is_read_on_request(exams):
    from node.cli import exams_json
    from node.config import parse_config
    from node.worker import Worker, skip_reason
    from storage.retention import Retention
    from storage.transitions import EXAM_TRANSITIONS, IllegalTransition, check_transition

    db, files = exams
    store = Exams(db)
    exam = make_exam(seed=40, rows=8, cols=8)
    for ds in exam:
        ds.BreastImplantPresent = "YES"
    _add(store, files, exam)
    study = exam[0].StudyInstanceUID
    cfg = parse_config({"inference": {"implants": "skip"}})
    worker = Worker(cfg, files, store, stop=threading.Event())
    claimed = store.claim_next_ready()
    assert claimed is not None
    worker._process(*claimed)  # skipped before any model is needed
    (row,) = [e for e in exams_json(Reports(db)) if e["study_instance_uid"] == study]
    assert row["state"] == "skipped" and row["implant"] is True
    assert row["reason"].startswith("implant present: not read ([inference] implants = skip)")
    assert store.claim_next_ready() is None
    assert study in {c.study_uid for c in Retention(db, files).candidates()}  # nothing to send
    # mammo-node complete reads it: ready, and the worker's rule lets it through.
    missing, state = store.complete_now(study)
    assert (missing, state) == ([], "ready")
    claimed = store.claim_next_ready()
    assert claimed is not None
    context = store.reading_context(claimed[0])
    assert context.read_on_request and context.implant
    assert skip_reason(cfg, context) is None
    unasked = dataclasses.replace(context, read_on_request=False)
    assert skip_reason(cfg, unasked) is not None
    assert skip_reason(parse_config({}), unasked) is None
    check_transition("processing", "skipped", EXAM_TRANSITIONS)
    with pytest.raises(IllegalTransition):
        check_transition("ready", "skipped", EXAM_TRANSITIONS)


def test_migration_0005_turns_notes_into_fields(db_url):
    """A database at 0004 (release 0.2) whose priors, requests and volume-only views were
    sentences: upgraded, they are fields."""
    import json

    from alembic import command
    from sqlalchemy import create_engine, text

    from storage.schema import alembic_config, head

    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0004")
            for i, (state, reason, notes) in enumerate(
                [
                    (
                        "prior",
                        "prior: StudyDate 2024-01-15 is 700 days old ([grouping] "
                        "prior_after_days = 30); stored, not read",
                        [],
                    ),
                    (
                        "prior",
                        "prior: study 1.2.3 of the same patient from 2026-01-01 "
                        "arrived, 400 days newer",
                        [],
                    ),
                    (
                        "done",
                        None,
                        [
                            "prior read on request (no view missing)",
                            "R-MLO: only a tomosynthesis volume; read with this view "
                            'missing ([grouping] volume_2d = "missing")',
                        ],
                    ),
                ]
            ):
                conn.execute(
                    text(
                        "INSERT INTO exams (id, study_instance_uid, state, version, reason, "
                        "notes_json, created_at, last_received_at, state_changed_at) VALUES "
                        "(:i, :u, :s, 1, :r, :n, :t, :t, :t)"
                    ),
                    {
                        "i": i + 1,
                        "u": f"1.2.9.{i}",
                        "s": state,
                        "r": reason,
                        "n": json.dumps(notes),
                        "t": dt.datetime(2026, 1, 1),
                    },
                )
            command.upgrade(alembic_config(conn), head())
        db = Database(db_url)
        try:
            store = Exams(db)
            got = {
                e["study_instance_uid"]: e
                for e in (x.as_dict() for x in Reports(store.db).list_exams())
            }
        finally:
            db.close()
        assert got["1.2.9.0"]["prior_rule"] == "age" and got["1.2.9.1"]["prior_rule"] == "gap"
        assert got["1.2.9.2"]["read_on_request"] and not got["1.2.9.0"]["read_on_request"]
        assert got["1.2.9.2"]["prior_rule"] is None
        with engine.connect() as conn:
            assert (
                conn.execute(text("SELECT volume_only_json FROM exams WHERE id = 3")).scalar()
                == '["R-MLO"]'
            )
    finally:
        engine.dispose()
