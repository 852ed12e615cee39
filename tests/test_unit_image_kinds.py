"""Unit layer: image kinds from the header (every vendor convention), which image a slot
reads, priors and implants in the exam store (a real SQLite / PostgreSQL database)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from inference.synthetic import make_exam, make_mammogram, make_tomo_volume
from inference.views import classify, image_kind
from inference.volume import computed_2d
from node.assembly import assign_slots
from node.scp import instance_record
from storage.db import Database
from storage.files import FileStore
from storage.state import ExamStore

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


@pytest.mark.parametrize("header, kind", [
    ({}, "conventional"),
    (dict(ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]), "synthesized"),
    (dict(SeriesDescription="L CC C-View"), "synthesized"),          # Hologic
    (dict(SeriesDescription="RMLO Intelligent 2D"), "synthesized"),  # Hologic 3DQuorum
    (dict(ProtocolName="V-Preview CC"), "synthesized"),              # GE
    (dict(SeriesDescription="Insight 2D"), "synthesized"),           # Siemens
    (dict(SeriesDescription="S-View LCC"), "synthesized"),           # Fujifilm
    (dict(private="C-VIEW"), "synthesized"),                         # vendor's own attribute
    (dict(SeriesDescription="L CC VIEW"), "conventional"),           # not a vendor name
    (dict(PresentationIntentType="FOR PROCESSING"), "for_processing"),
])
def test_image_kind_from_every_convention(header, kind):
    ds = _img(**header)
    assert image_kind(ds) == kind
    assert classify(ds).kind == kind and classify(ds).slot == "L-CC"


def test_volume_and_projection_fill_no_slot_but_keep_their_view():
    vol = make_tomo_volume("R", "MLO", frames=3, rows=8, cols=8)
    info = classify(vol)
    assert (info.kind, info.role, info.laterality, info.view) == ("volume", "extra", "R", "MLO")
    proj = make_mammogram("R", "MLO", rows=8, cols=8)
    proj.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.4"
    assert classify(proj).kind == "projection" and classify(proj).slot is None


def test_implant_flag():
    assert classify(_img(BreastImplantPresent="YES")).implant
    assert classify(make_mammogram("L", "CC", rows=8, cols=8,
                                   modifier="implant-displaced")).implant
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


def _add(store: ExamStore, files: FileStore, datasets, assign=assign_slots):
    return [store.add_instance(instance_record(ds, files, "UNIT", str(ds.SOPClassUID),
                                               str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1",
                                               100), assign, place=lambda: None)
            for ds in datasets]


def test_combo_reads_conventional_although_synthesized_came_last(exams):
    db, files = exams
    store = ExamStore(db)
    conv = make_exam(seed=5, rows=8, cols=8, acquisition=T0)
    synth = make_exam(seed=6, rows=8, cols=8, study_uid=conv[0].StudyInstanceUID,
                      patient_id=conv[0].PatientID, acquisition=T0 + dt.timedelta(minutes=5))
    for ds in synth:
        ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
    _add(store, files, conv + synth)
    exam = store.exam_dict(conv[0].StudyInstanceUID)
    assert exam is not None
    assert set(exam["views"].values()) == {d.SOPInstanceUID for d in conv}
    assert set(exam["view_kinds"].values()) == {"conventional"}
    assert any("synthesized 2D image not used" in n for n in exam["notes"])

    # A site that prefers the synthesized image.
    store2 = ExamStore(db)
    other = make_exam(seed=7, rows=8, cols=8, acquisition=T0)
    synth2 = make_exam(seed=8, rows=8, cols=8, study_uid=other[0].StudyInstanceUID,
                       patient_id=other[0].PatientID, acquisition=T0 - dt.timedelta(hours=1))
    for ds in synth2:
        ds.SeriesDescription = "C-View"
    _add(store2, files, other + synth2,
         assign=lambda m: assign_slots(m, prefer=("synthesized", "conventional")))
    e2 = store2.exam_dict(other[0].StudyInstanceUID)
    assert e2 is not None and set(e2["views"].values()) == {d.SOPInstanceUID for d in synth2}
    assert set(e2["view_kinds"].values()) == {"synthesized"}


def test_volume_only_view_missing_or_computed(exams):
    db, files = exams
    store = ExamStore(db)
    exam = make_exam(seed=9, rows=8, cols=8, views=("L-CC", "L-MLO", "R-CC"))
    vol = make_tomo_volume("R", "MLO", frames=3, rows=8, cols=8,
                           study_uid=exam[0].StudyInstanceUID, patient_id=exam[0].PatientID)
    _add(store, files, [*exam, vol])
    e = store.exam_dict(exam[0].StudyInstanceUID)
    assert e is not None and e["missing"] == ["R-MLO"] and e["state"] == "receiving"
    assert any("R-MLO: only a tomosynthesis volume; read with this view missing" in n
               for n in e["notes"])
    exam2 = make_exam(seed=10, rows=8, cols=8, views=("L-CC", "L-MLO", "R-CC"))
    vol2 = make_tomo_volume("R", "MLO", frames=3, rows=8, cols=8,
                            study_uid=exam2[0].StudyInstanceUID, patient_id=exam2[0].PatientID)
    _add(store, files, [*exam2, vol2], assign=lambda m: assign_slots(m, volume_2d="mip"))
    e2 = store.exam_dict(exam2[0].StudyInstanceUID)
    assert e2 is not None and e2["views"]["R-MLO"] == vol2.SOPInstanceUID
    assert e2["view_kinds"]["R-MLO"] == "computed" and e2["state"] == "ready"


def test_implant_exam_is_flagged(exams):
    db, files = exams
    store = ExamStore(db)
    exam = make_exam(seed=11, rows=8, cols=8)
    extra = make_mammogram("L", "CC", rows=8, cols=8, modifier="implant-displaced",
                           study_uid=exam[0].StudyInstanceUID, patient_id=exam[0].PatientID)
    _add(store, files, [*exam, extra])
    e = store.exam_dict(exam[0].StudyInstanceUID)
    assert e is not None and e["implant"] and e["state"] == "ready"
    assert extra.SOPInstanceUID not in e["views"].values()


def test_priors_by_age_and_by_a_newer_study(exams):
    db, files = exams
    store = ExamStore(db, prior_after_days=30, prior_gap_days=180)
    today = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    old = make_exam(seed=12, rows=8, cols=8, patient_id="PAT-P",
                    acquisition=today - dt.timedelta(days=400))
    (r, *_) = _add(store, files, old)
    assert r.exam_state == "prior"
    e = store.exam_dict(old[0].StudyInstanceUID)
    assert e is not None and "prior_after_days" in (e["reason"] or "")

    # The gap rule: a study not read yet becomes a prior when a newer one arrives.
    lenient = ExamStore(db, prior_after_days=None, prior_gap_days=180)
    mid = make_exam(seed=13, rows=8, cols=8, patient_id="PAT-P",
                    acquisition=today - dt.timedelta(days=200))
    assert _add(lenient, files, mid)[-1].exam_state == "ready"
    cur = make_exam(seed=14, rows=8, cols=8, patient_id="PAT-P", acquisition=today)
    assert _add(lenient, files, cur)[-1].exam_state == "ready"
    assert lenient.exam_dict(mid[0].StudyInstanceUID)["state"] == "prior"  # type: ignore[index]
    # ... and one that arrives after the newer one is a prior at once.
    late = make_exam(seed=15, rows=8, cols=8, patient_id="PAT-P",
                     acquisition=today - dt.timedelta(days=365))
    assert _add(lenient, files, late)[0].exam_state == "prior"
    # Another patient's old study is not touched by this patient's.
    assert len(lenient.priors_of(cur[0].StudyInstanceUID)) == 3
    ctx = lenient.reading_context(lenient.claim_next_ready()[0])  # type: ignore[index]
    assert len(ctx["priors"]) == 3 and ctx["priors"][0] < ctx["priors"][-1]
    # mammo-node complete reads a prior on request.
    missing, state = lenient.complete_now(old[0].StudyInstanceUID)
    assert (missing, state) == ([], "ready")
