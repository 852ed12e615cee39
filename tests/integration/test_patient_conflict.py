"""One patient per exam, always: an image of another patient with the same StudyInstanceUID
is kept, holds the exam (no reading) and is never part of a result; ``mammo-node resolve``
ends the hold. Real node, real storescp as the PACS."""

from __future__ import annotations

import datetime as dt
import json

from pydicom import dcmread

from inference.synthetic import make_exam, make_mammogram
from tests.helpers import send, wait_for

FAST_EXPORT = {"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1.0}
SIZE = dict(rows=320, cols=256)


def _other_patient(study: str, slot: str = "L-CC", later: bool = True):
    lat, view = slot.split("-")
    return make_mammogram(
        lat,
        view,
        seed=99,
        study_uid=study,
        patient_id="OTHER-PATIENT",
        patient_name="Other^Person",
        accession="ACC-OTHER",
        acquisition=dt.datetime(2030, 1, 1) if later else dt.datetime(2000, 1, 1),
        **SIZE,
    )


def _node(node_factory, storescp_factory, worker=True):
    pacs = storescp_factory()
    node = node_factory(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "export": FAST_EXPORT,
            "grouping": {"stable_seconds": 2},
        },
        worker=worker,
    )
    return node, pacs


def _results_mention(pacs, needle: str) -> bool:
    return any(needle in json.dumps(dcmread(f).to_json_dict()) for f in pacs.files())


def test_conflicting_image_arriving_last_holds_the_exam(node_factory, storescp_factory):
    node, _ = _node(node_factory, storescp_factory, worker=False)
    exam = make_exam(seed=71, patient_id="PAT-71", acquisition=dt.datetime(2026, 1, 1), **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    assert node.exam(study)["state"] == "ready"
    intruder = _other_patient(study, "R-MLO")
    assert send(node.port, [intruder]) == [0]  # kept: nothing is lost
    e = node.exam(study)
    assert e["state"] == "conflict" and "patient conflict" in e["reason"]
    assert intruder.SOPInstanceUID not in e["views"].values()
    assert len(node.stored_files()) == 5
    log = node.log.read_text()
    assert f"exam {study} held" in log and "OTHER-PATIENT" not in log and "Other^" not in log
    node.stop()
    alerts = [
        json.loads(x)
        for x in (node.data_dir / "audit.jsonl").read_text().splitlines()
        if "patient conflict" in x
    ]
    assert alerts and alerts[0]["event"] == "Security Alert" and alerts[0]["study"] == study


def test_conflict_as_a_repeat_view_after_the_reading_then_resolved(node_factory, storescp_factory):
    node, pacs = _node(node_factory, storescp_factory)
    exam = make_exam(seed=72, patient_id="PAT-72", acquisition=dt.datetime(2026, 1, 1), **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: len(pacs.files()) == 6, 60, what="first reading at the PACS")
    # A later acquisition of the same view: it would take the slot, but it is another patient.
    intruder = _other_patient(study, "L-CC", later=True)
    assert send(node.port, [intruder]) == [0]
    e = node.exam(study)
    assert e["state"] == "conflict" and e["version"] == 1
    assert e["views"]["L-CC"] == exam[0].SOPInstanceUID
    # Resolved in favour of the exam's patient: read again as version 2, without the intruder.
    r = node.cli("resolve", study, "--patient-id", "PAT-72")
    assert "1 instance(s) of other patients left the exam" in r.stdout
    e = node.wait_exam(study, "done", timeout=180)
    assert e["version"] == 2 and e["views"]["L-CC"] == exam[0].SOPInstanceUID
    wait_for(lambda: len(pacs.files()) == 12, 60, what="second reading at the PACS")
    assert not _results_mention(pacs, intruder.SOPInstanceUID)
    assert {dcmread(f).PatientID for f in pacs.files()} == {"PAT-72"}


def test_conflicting_image_arriving_first_never_reaches_the_model(node_factory, storescp_factory):
    node, pacs = _node(node_factory, storescp_factory)
    study_exam = make_exam(seed=73, patient_id="PAT-73", **SIZE)
    study = study_exam[0].StudyInstanceUID
    intruder = _other_patient(study, "L-CC")
    assert send(node.port, [intruder] + study_exam) == [0] * 5
    e = node.exam(study)
    assert e["state"] == "conflict"
    # A resolution must name a patient of the exam.
    r = node.cli("resolve", study, "--patient-id", "NOBODY", check=False)
    assert r.returncode == 1 and "no instance of that patient" in r.stderr
    r = node.cli("resolve", study, "--patient-id", "PAT-73")
    assert r.returncode == 0
    e = node.wait_exam(study, "done", timeout=180)
    assert e["views"]["L-CC"] == study_exam[0].SOPInstanceUID and e["version"] == 1
    wait_for(lambda: len(pacs.files()) == 6, 60, what="reading at the PACS")
    assert not _results_mention(pacs, intruder.SOPInstanceUID)
    assert {dcmread(f).PatientID for f in pacs.files()} == {"PAT-73"}
    # The intruder is still stored (and findable), outside the exam.
    assert len(node.stored_files()) == 5
