"""Unit layer: view classification, slot assignment, the state machine and the exam store on
a real SQLite file, C-FIND matching in SQL. No processes, no network (pytest -m unit)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from inference.synthetic import make_exam, make_mammogram
from node.assembly import assign_slots, classify
from node.query import Query, QueryError, QueryService, key_match
from node.scp import instance_record
from storage.db import Database
from storage.exams import Exams
from storage.files import FileStore
from storage.reports import Reports
from storage.transitions import (
    EXAM_TRANSITIONS,
    OUTBOUND_TRANSITIONS,
    ExamState,
    IllegalTransition,
    OutboundState,
    check_transition,
)

pytestmark = pytest.mark.unit


def _item(code: str, scheme: str = "SCT") -> Dataset:
    it = Dataset()
    it.CodeValue, it.CodingSchemeDesignator, it.CodeMeaning = code, scheme, code
    return it


@pytest.mark.parametrize(
    "setup, expected",
    [
        (dict(ImageLaterality="L", ViewPosition="CC"), "L-CC"),
        (dict(Laterality="R", ViewPosition="MLO"), "R-MLO"),
        (dict(ViewPosition="RCC"), "R-CC"),
        (dict(ViewPosition="L MLO"), "L-MLO"),
        (dict(ImageLaterality="R", ViewCodeSequence=[_item("399162004")]), "R-CC"),
        (dict(ImageLaterality="L", ViewCodeSequence=[_item("R-10226", "SRT")]), "L-MLO"),
    ],
)
def test_classify_slots_from_every_header_convention(setup, expected):
    ds = make_mammogram("", "", rows=8, cols=8)
    for k in ("ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence"):
        if k in ds:
            delattr(ds, k)
    for k, v in setup.items():
        setattr(ds, k, v)
    info = classify(ds)
    assert info.role == "candidate" and info.slot == expected


@pytest.mark.parametrize(
    "view, modifier, role",
    [
        ("XCCL", None, "extra"),
        ("ML", None, "extra"),
        ("CC", "spot", "extra"),
        ("MLO", "implant-displaced", "extra"),
        ("", None, "unclassified"),
    ],
)
def test_classify_extras_and_unclassified(view, modifier, role):
    ds = make_mammogram("L", view, rows=8, cols=8, modifier=modifier)
    assert classify(ds).role == role


def test_classify_other_sop_classes():
    ds = make_mammogram("L", "CC", rows=8, cols=8)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert classify(ds).role == "other"


def _records(store: FileStore, datasets) -> list:
    return [
        instance_record(
            ds,
            store,
            "UNIT",
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            "1.2.840.10008.1.2.1",
            100,
        )
        for ds in datasets
    ]


@pytest.fixture
def exams(tmp_path: Path, db_url: str):
    db = Database(db_url)
    yield Exams(db), FileStore(tmp_path / "data", fsync=False)
    db.close()


def _add(store: Exams, files: FileStore, datasets):
    return [
        store.add_instance(r, assign_slots, place=lambda: None) for r in _records(files, datasets)
    ]


def test_exam_assembly_repeat_views_and_reopening(exams):
    store, files = exams
    exam = make_exam(seed=1, rows=8, cols=8, acquisition=dt.datetime(2026, 1, 1, 9))
    results = _add(store, files, exam)
    assert [r.exam_state for r in results] == ["receiving"] * 3 + ["ready"]
    claimed = store.claim_next_ready()
    assert claimed is not None
    assert store.finish(*claimed, ok=True)
    retake = make_mammogram(
        "L",
        "CC",
        rows=8,
        cols=8,
        study_uid=exam[0].StudyInstanceUID,
        patient_id=exam[0].PatientID,
        acquisition=dt.datetime(2026, 1, 1, 10),
    )
    (r,) = _add(store, files, [retake])
    assert r.reopened and r.exam_version == 2 and r.exam_state == "ready"
    older = make_mammogram(
        "L",
        "CC",
        rows=8,
        cols=8,
        study_uid=exam[0].StudyInstanceUID,
        patient_id=exam[0].PatientID,
        acquisition=dt.datetime(2026, 1, 1, 8),
    )
    (r,) = _add(store, files, [older])
    assert not r.reopened and r.exam_version == 2  # an older repeat changes no slot
    (dup,) = _add(store, files, [exam[1]])
    assert dup.duplicate


def test_patient_conflict_holds_and_resolve_reads_again(exams):
    store, files = exams
    exam = make_exam(seed=2, rows=8, cols=8, patient_id="P-1")
    _add(store, files, exam)
    other = make_mammogram(
        "R",
        "CC",
        rows=8,
        cols=8,
        study_uid=exam[0].StudyInstanceUID,
        patient_id="P-2",
        acquisition=dt.datetime(2030, 1, 1),
    )
    (r,) = _add(store, files, [other])
    assert r.conflict and r.exam_state == "conflict"
    assert store.claim_next_ready() is None  # held: nothing to read
    with pytest.raises(ValueError):
        store.resolve_patient(exam[0].StudyInstanceUID, "P-3", assign_slots)
    detached, state, version = store.resolve_patient(exam[0].StudyInstanceUID, "P-1", assign_slots)
    assert (detached, state, version) == (1, "ready", 1)


def test_issuer_of_patient_id_separates_equal_ids(exams):
    store, files = exams
    exam = make_exam(seed=3, rows=8, cols=8, patient_id="123")
    for ds in exam:
        ds.IssuerOfPatientID = "HOSPITAL-A"
    _add(store, files, exam[:3])
    other = exam[3]
    other.IssuerOfPatientID = "HOSPITAL-B"
    (r,) = _add(store, files, [other])
    assert r.conflict


def test_transition_table_is_the_only_way():
    for old, allowed in EXAM_TRANSITIONS.items():
        for new in ExamState:
            if new == old or new in allowed:
                check_transition(old, new, EXAM_TRANSITIONS)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition(old, new, EXAM_TRANSITIONS)
    with pytest.raises(IllegalTransition):
        check_transition("sent", "gave_up", OUTBOUND_TRANSITIONS)
    with pytest.raises(IllegalTransition):
        check_transition("bogus", "ready", EXAM_TRANSITIONS)
    assert OutboundState.PENDING in OUTBOUND_TRANSITIONS[OutboundState.GAVE_UP]


def test_finish_refuses_an_exam_that_was_never_claimed(exams):
    store, files = exams
    exam = make_exam(seed=4, rows=8, cols=8)
    _add(store, files, exam)
    # ready -> done skips processing: refused (and nothing changes).
    assert store.finish(1, 1, ok=True) is False
    assert Reports(store.db).counts_by_state().counts["ready"] == 1


@pytest.mark.parametrize(
    "key, query, n",
    [
        ("PatientName", "alpha*", 1),
        ("PatientName", "ALPHA^ANN", 1),
        ("PatientName", "*a*a*", 2),
        ("PatientID", "PAT-?", 2),
        ("PatientID", "pat-a", 0),  # LO: case-sensitive
        ("StudyDate", "20260401-", 1),
        ("StudyDate", "-20260101", 0),
        ("AccessionNumber", "", 2),
        ("AccessionNumber", "ACC_A", 0),  # SQL wildcards are data
    ],
)
def test_study_matching_in_sql(exams, key, query, n):
    store, files = exams
    a = make_exam(
        seed=5,
        rows=8,
        cols=8,
        patient_id="PAT-A",
        patient_name="Alpha^Ann",
        accession="ACC-A",
        acquisition=dt.datetime(2026, 3, 1),
    )
    b = make_exam(
        seed=6,
        rows=8,
        cols=8,
        patient_id="PAT-B",
        patient_name="Beta^Bea",
        accession="ACC-B",
        acquisition=dt.datetime(2026, 5, 20),
    )
    _add(store, files, a + b)
    queries = QueryService(Reports(store.db))
    found = queries.find(Query("STUDY", {key: query}))
    assert len({r.study_instance_uid for r in found.rows}) == n and not found.more
    found = queries.find(Query("IMAGE", {}), limit=3)
    assert len(found.rows) == 3 and found.more
    # A cap counts entities and loads one row each, not every instance of them.
    found = queries.find(Query("STUDY", {}), limit=1000)
    assert len(found.rows) == 2 and not found.more


def test_key_match_by_vr():
    assert key_match("StudyInstanceUID", "1.2\\1.3").op == "in"
    assert key_match("StudyDate", "20260101-20261231").op == "range"
    assert key_match("StudyTime", "10").op == "prefix"
    assert key_match("PatientName", "a*").op == "like_ci"
    assert key_match("SeriesNumber", "3").op == "int"
    assert key_match("PatientID", "*") is None
    assert key_match("Modality", "MG\\SR").op == "in"
    for key, bad in (
        ("StudyDate", "2026-13"),
        ("SeriesNumber", "x"),
        ("Rows", "1*"),
        ("StudyInstanceUID", "1.2.*"),
        ("NumberOfStudyRelatedSeries", "1"),
        ("InstitutionName", "X"),
    ):
        with pytest.raises(QueryError, match=key):
            key_match(key, bad)


def test_header_values_longer_than_their_vr_are_kept_to_the_column(exams):
    """Vendors overrun AccessionNumber (SH 16) and the descriptions: stored whole up to the
    (wider) columns and matched exactly, on SQLite and PostgreSQL alike; longer still is cut
    to fit, the store never fails for it."""
    store, files = exams
    exam = make_exam(seed=9, rows=8, cols=8, accession="ACC-2026-000000012345")  # 21 chars
    for ds in exam:
        ds.StudyDescription = "Screening mammography, bilateral, " * 4  # 136 chars
        ds.SeriesDescription = "x" * 300  # > 256
    results = _add(store, files, exam)
    assert [r.exam_state for r in results][-1] == "ready"
    rows = (
        QueryService(Reports(store.db))
        .find(Query("STUDY", {"AccessionNumber": "ACC-2026-000000012345"}))
        .rows
    )
    assert rows and rows[0].study_description == exam[0].StudyDescription.strip()
    assert len(rows[0].series_description) == 256


def test_empty_patient_ids_are_compared_by_name_and_birth_date(exams):
    """Two images of one study without PatientID and with different names are two patients;
    the same name (any case, trailing components) and birth date are one."""
    store, files = exams
    exam = make_exam(seed=4, rows=8, cols=8, patient_name="Alpha^Ann")
    for ds in exam:
        ds.PatientID, ds.PatientBirthDate = "", "19600101"
    exam[1].PatientName = "ALPHA^ANN^^"
    results = _add(store, files, exam[:3])
    assert not any(r.conflict for r in results) and results[-1].exam_state == "receiving"
    other = exam[3]
    other.PatientName = "Beta^Bea"
    (r,) = _add(store, files, [other])
    assert r.conflict and r.exam_state == "conflict"
    study = exam[0].StudyInstanceUID
    with pytest.raises(ValueError, match="--patient-name"):
        store.resolve_patient(study, "", assign_slots)
    detached, state, _ = store.resolve_patient(study, "", assign_slots, patient_name="Alpha^Ann")
    assert (detached, state) == (1, "receiving")


def test_same_name_other_birth_date_without_id_is_a_conflict(exams):
    store, files = exams
    exam = make_exam(seed=5, rows=8, cols=8, patient_name="Same^Name")
    for ds in exam:
        ds.PatientID, ds.PatientBirthDate = "", "19600101"
    exam[3].PatientBirthDate = "19700101"
    results = _add(store, files, exam)
    assert [r.conflict for r in results] == [False, False, False, True]


def test_an_id_on_one_side_only_compares_names(exams):
    store, files = exams
    exam = make_exam(seed=6, rows=8, cols=8, patient_id="P-6", patient_name="Gamma^Gus")
    exam[2].PatientID = ""
    exam[3].PatientID = ""
    exam[3].PatientName = "Delta^Dot"
    results = _add(store, files, exam)
    assert [r.conflict for r in results] == [False, False, False, True]


def test_a_corrected_identity_holds_the_exam_and_keeps_both(exams):
    """The same SOP Instance re-sent with another PatientID is not dropped as a duplicate:
    the new identity replaces the old one, the exam is held, both are in its notes."""
    store, files = exams
    exam = make_exam(seed=7, rows=8, cols=8, patient_id="OLD-7")
    _add(store, files, exam)
    study = exam[0].StudyInstanceUID
    assert store.claim_next_ready() is not None  # read as usual
    placed: list[str] = []
    corrected = exam[0].copy()
    corrected.PatientID = "NEW-7"
    (rec,) = _records(files, [corrected])
    r = store.add_instance(rec, assign_slots, place=lambda: placed.append(rec.sop_instance_uid))
    assert not r.duplicate and r.conflict and r.exam_state == "conflict"
    assert placed == [rec.sop_instance_uid]  # the corrected file is kept
    assert (r.corrected_from, r.corrected_to) == ("PatientID 'OLD-7'", "PatientID 'NEW-7'")
    e = Reports(store.db).exam_view(study)
    assert e is not None
    assert any("OLD-7" in n and "NEW-7" in n for n in e.notes), e.notes
    # The same file again: a duplicate now (its identity is the stored one).
    (again,) = _add(store, files, [corrected])
    assert again.duplicate
    # The PACS corrects the other three; the operator confirms the new identity.
    for ds in exam[1:]:
        ds.PatientID = "NEW-7"
    assert all(r.conflict for r in _add(store, files, exam[1:]))
    detached, state, version = store.resolve_patient(study, "NEW-7", assign_slots)
    assert (detached, state) == (0, "ready") and version >= 1


@pytest.mark.parametrize("explicit", [True, False])
def test_encoded_c_find_answers_are_the_datasets_answers_builds(exams, explicit):
    """C-FIND's fast path (answers encoded straight from the rows) says exactly what the
    pydicom datasets of QueryService.answers say, in either Little Endian syntax: every key
    asked, unique keys added, empty where not held, and UTF-8 declared for a non-ASCII
    name the query gave no character set for."""
    from io import BytesIO

    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import decode

    from node.query import from_identifier

    store, files = exams
    a = make_exam(
        seed=7, rows=8, cols=8, patient_id="PAT-Ü", patient_name="Müller^Zoë", accession="ACC-U"
    )
    _add(store, files, a)
    queries = QueryService(Reports(store.db))
    for level in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        q = Dataset()
        q.QueryRetrieveLevel = level
        for kw in (
            "PatientName",
            "PatientID",
            "StudyDate",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
            "SeriesNumber",
            "Rows",
            "InstitutionName",
            "NumberOfPatientRelatedStudies",
            "NumberOfFrames",
        ):
            setattr(q, kw, None)
        query = from_identifier(q)
        found = queries.find(query)
        want = queries.answers(query, found)
        got = [
            decode(BytesIO(b), not explicit, True, False)
            for b in queries.encoded_answers(query, found, explicit)
        ]
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            w.SpecificCharacterSet = "ISO_IR 192"  # the name is not ASCII
            assert [e.tag for e in g] == [e.tag for e in w]
            for e in w:
                got_v, want_v = (("" if v is None else str(v)) for v in (g[e.tag].value, e.value))
                assert got_v == want_v, (level, e.keyword)


def test_query_caps_load_one_row_per_entity_answered(exams):
    """A study-level C-FIND / QIDO over 240 studies of 25 instances each (6,000 rows), capped
    at 100: 100 instance rows are loaded (one per study answered, counted by SQLAlchemy's
    load event), in at most four statements, with the counts over every instance; an image
    level query capped at 30 loads 30; a retrieve loads every instance of what it matches."""
    from sqlalchemy import event, insert

    from storage.models import Instance

    store, _ = exams
    rows = []
    for i in range(240):
        study = f"1.2.826.0.1.3680043.10.9999.{i}"
        for k in range(25):
            rows.append(
                dict(
                    sop_instance_uid=f"{study}.{k % 5}.{k}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                    study_instance_uid=study,
                    series_instance_uid=f"{study}.{k % 5}",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/{i}/{k}.dcm",
                    size_bytes=1,
                    received_at=dt.datetime(2026, 1, 1, 9),
                    calling_aet="MODALITY",
                    patient_id=f"PAT{i % 60:03d}",
                    patient_name="Name^Given",
                    accession_number=f"ACC{i:05d}",
                    study_date="20260101",
                    study_time="090000",
                    modality="MG",
                    series_number=k % 5 + 1,
                    instance_number=k + 1,
                    role="candidate",
                    for_processing=False,
                )
            )
    with store.db.session() as s:
        s.execute(insert(Instance), rows)
        s.commit()
    loaded, statements = [], []

    def on_load(target, context):
        loaded.append(target)

    def on_execute(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(Instance, "load", on_load)
    event.listen(store.db.engine, "before_cursor_execute", on_execute)
    try:
        queries = QueryService(Reports(store.db))
        q = Query(
            "STUDY",
            {"PatientName": "name*", "StudyDate": "20260101"},
            [
                (0x00201208, "IS", "NumberOfStudyRelatedInstances"),
                (0x00201206, "IS", "NumberOfStudyRelatedSeries"),
                (0x00080061, "CS", "ModalitiesInStudy"),
            ],
        )
        found = queries.find(q, limit=100)
        assert len(found.rows) == 100 and found.more
        assert len(loaded) == 100, len(loaded)
        assert len(statements) <= 4, statements
        assert set(found.counts[("STUDY", "instances")].values()) == {25}
        assert set(found.counts[("STUDY", "series")].values()) == {5}
        assert len(queries.answers(q, found)) == 100
        loaded.clear()
        found = queries.find(Query("STUDY", {}), limit=1000, offset=200)
        assert len(found.rows) == 40 and not found.more and len(loaded) == 40
        loaded.clear()
        found = queries.find(Query("IMAGE", {"Modality": "MG"}), limit=30)
        assert len(found.rows) == 30 and found.more and len(loaded) == 30
        loaded.clear()
        retrieved = queries.instances(Query("PATIENT", {"PatientID": "PAT007"}))
        assert len(retrieved) == len(loaded) == 4 * 25  # studies 7, 67, 127, 187
    finally:
        event.remove(Instance, "load", on_load)
        event.remove(store.db.engine, "before_cursor_execute", on_execute)


def test_an_unknown_study_is_exam_not_found(exams):
    """The store's actions on a study it does not hold raise ExamNotFound (a KeyError, so the
    callers written before it still catch it), naming the study."""
    from storage.transitions import ExamNotFound

    store, _ = exams
    with pytest.raises(ExamNotFound, match="1.2.3.404"):
        store.complete_now("1.2.3.404")
    with pytest.raises(KeyError):
        store.reprocess("1.2.3.404")
