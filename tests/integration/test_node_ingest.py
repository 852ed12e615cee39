"""The node as a real process: C-ECHO, C-STORE from pynetdicom and DCMTK, exam assembly."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from inference.synthetic import UID_ROOT, make_exam, make_mammogram, write
from node.implementation import IMPLEMENTATION_CLASS_UID
from tests.helpers import dcmtk, send

SLOTS = ["L-CC", "L-MLO", "R-CC", "R-MLO"]


def test_echoscu_and_storescu_full_exam(node, tmp_path):
    assert (
        subprocess.run(
            [dcmtk("echoscu"), "-aec", node.ae_title, "127.0.0.1", str(node.port)]
        ).returncode
        == 0
    )
    exam = make_exam(seed=3)
    files = [write(ds, tmp_path / f"img{i}.dcm") for i, ds in enumerate(exam)]
    r = subprocess.run(
        [dcmtk("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    study = exam[0].StudyInstanceUID
    e = node.exam(study)  # complete: ready at once, no stable wait
    assert e["state"] == "ready"
    assert e["missing"] == []
    assert e["reason"] is None
    assert e["accession_number"] == exam[0].AccessionNumber
    for ds in exam:
        slot = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        assert e["views"][slot] == ds.SOPInstanceUID
    stored = node.stored_files()
    assert len(stored) == 4
    # Stored byte for byte as sent (dataset part), readable as a DICOM file.
    for ds in exam:
        f = next(p for p in stored if p.stem == ds.SOPInstanceUID)
        back = dcmread(f)
        assert back.PixelData == ds.PixelData
        assert back.PatientID == ds.PatientID
        # the file meta is the node's writing (PS3.10 7.1), naming the node
        assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    table = node.cli("exams").stdout
    assert study in table and "ready" in table
    st = node.cli("status", check=False)
    assert st.returncode == 0 and "running" in st.stdout and "C-ECHO ok" in st.stdout


@pytest.mark.parametrize(
    "variant",
    [
        dict(dialect="code-only"),
        dict(dialect="srt"),
        dict(dialect="legacy"),
        dict(photometric="MONOCHROME1"),
        dict(transfer_syntax=JPEGLSLossless),
        dict(transfer_syntax=JPEG2000Lossless),
        dict(transfer_syntax=RLELossless),
        dict(transfer_syntax=DeflatedExplicitVRLittleEndian),
        dict(transfer_syntax=ImplicitVRLittleEndian),
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
def test_vendor_variants_fill_slots(node, variant):
    exam = make_exam(seed=5, rows=256, cols=208, **variant)
    assert send(node.port, exam) == [0, 0, 0, 0]
    e = node.exam(exam[0].StudyInstanceUID)
    assert e["state"] == "ready", e
    assert e["missing"] == []
    assert sorted(e["views"].values()) == sorted(ds.SOPInstanceUID for ds in exam)
    for f in node.stored_files():
        back = dcmread(f)
        assert back.file_meta.TransferSyntaxUID == exam[0].file_meta.TransferSyntaxUID
        assert back.pixel_array.shape == (256, 208)  # decodes with the installed plugins


def test_jpeg_lossless_from_dcmcjpeg_via_storescu(node, tmp_path):
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70), encoded by DCMTK, sent by DCMTK."""
    exam = make_exam(seed=6, rows=256, cols=208)
    files = []
    for i, ds in enumerate(exam):
        raw = write(ds, tmp_path / f"raw{i}.dcm")
        out = tmp_path / f"jpll{i}.dcm"
        subprocess.run([dcmtk("dcmcjpeg"), "+e1", str(raw), str(out)], check=True)
        files.append(out)
    r = subprocess.run(
        [
            dcmtk("storescu"),
            "-xs",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    e = node.exam(exam[0].StudyInstanceUID)
    assert e["missing"] == [] and e["state"] == "ready"
    f = node.stored_files()[0]
    back = dcmread(f)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    orig = next(ds for ds in exam if ds.SOPInstanceUID == f.stem)
    assert (back.pixel_array == orig.pixel_array).all()  # lossless round trip


def test_partial_exam_ready_after_stable_seconds(node_factory):
    node = node_factory({"grouping": {"stable_seconds": 1.5}})
    exam = make_exam(seed=7, rows=128, cols=104, views=("L-CC", "L-MLO", "R-CC"))
    assert send(node.port, exam) == [0, 0, 0]
    e = node.exam(exam[0].StudyInstanceUID)
    assert e["state"] == "receiving" and e["missing"] == ["R-MLO"]
    e = node.wait_exam(exam[0].StudyInstanceUID, "ready", timeout=15)
    assert e["missing"] == ["R-MLO"]
    assert "partial" in e["reason"] and "R-MLO" in e["reason"]


def test_extra_views_tomo_and_for_processing(node):
    study = generate_uid(prefix=UID_ROOT)
    kw = dict(study_uid=study, rows=128, cols=104)
    spot = make_mammogram("L", "CC", modifier="spot", seed=1, **kw)
    mag = make_mammogram("R", "CC", modifier="mag", seed=2, **kw)
    xccl = make_mammogram("L", "XCCL", seed=3, **kw)
    implant = make_mammogram("L", "MLO", modifier="implant-displaced", seed=4, **kw)
    proc_rcc = make_mammogram("R", "CC", for_processing=True, seed=5, **kw)
    proc_lcc = make_mammogram("L", "CC", for_processing=True, seed=6, **kw)
    pres_lcc = make_mammogram("L", "CC", seed=7, **kw)
    tomo = make_mammogram("L", "CC", seed=8, **kw)
    tomo.SOPClassUID = tomo.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    # An enhanced multi-frame object carries its functional groups (one frame here).
    tomo.NumberOfFrames = 1
    tomo.SharedFunctionalGroupsSequence = [Dataset()]
    tomo.PerFrameFunctionalGroupsSequence = [Dataset()]
    items = [spot, mag, xccl, implant, proc_rcc, tomo, proc_lcc, pres_lcc]
    assert send(node.port, items) == [0] * len(items)
    e = node.exam(study)
    assert e["views"]["L-CC"] == pres_lcc.SOPInstanceUID  # presentation beats processing
    assert e["views"]["R-CC"] == proc_rcc.SOPInstanceUID  # processing when nothing else
    assert e["views"]["L-MLO"] is None  # implant-displaced is an extra
    assert e["missing"] == ["L-MLO", "R-MLO"]
    assert len(node.stored_files()) == len(items)  # extras are stored all the same


def test_repeated_view_latest_acquisition_wins_and_duplicates(node):
    exam = make_exam(seed=8, rows=128, cols=104)
    study = exam[0].StudyInstanceUID
    early = dt.datetime(2026, 1, 15, 8, 0, 0)
    late = dt.datetime(2026, 1, 15, 10, 0, 0)
    retake_late = make_mammogram(
        "R",
        "CC",
        study_uid=study,
        acquisition=late,
        patient_id=exam[0].PatientID,
        rows=128,
        cols=104,
        seed=99,
    )
    retake_early = make_mammogram(
        "R",
        "CC",
        study_uid=study,
        acquisition=early,
        patient_id=exam[0].PatientID,
        rows=128,
        cols=104,
        seed=98,
    )
    assert send(node.port, [*exam[:2], retake_late, exam[2], retake_early, exam[3]]) == [0] * 6
    e = node.exam(study)
    assert e["views"]["R-CC"] == retake_late.SOPInstanceUID
    assert any("repeated view" in n and retake_late.SOPInstanceUID in n for n in e["notes"])
    n_files = len(node.stored_files())
    # The same SOP Instance again: success, nothing new.
    assert send(node.port, [exam[0], retake_late]) == [0, 0]
    assert len(node.stored_files()) == n_files == 6
    e2 = node.exam(study)
    assert e2["version"] == e["version"] and e2["views"] == e["views"]


def test_instance_after_done_reopens_exam(node):
    from storage.db import Database
    from storage.exams import Exams

    exam = make_exam(seed=9, rows=128, cols=104)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    # Play the worker's part on the node's own database.
    store = Exams(Database(f"sqlite:///{node.data_dir / 'mammo-node.db'}"))
    exam_id, version = store.claim_next_ready()
    assert store.finish(exam_id, version, ok=True)
    assert node.exam(study)["state"] == "done"
    retake = make_mammogram(
        "L",
        "MLO",
        study_uid=study,
        rows=128,
        cols=104,
        seed=77,
        patient_id=exam[0].PatientID,
        acquisition=dt.datetime(2026, 1, 15, 11, 0),
    )
    assert send(node.port, [retake]) == [0]
    e = node.exam(study)
    assert e["version"] == 2 and e["state"] == "ready"
    assert e["views"]["L-MLO"] == retake.SOPInstanceUID
    assert any("reopened as version 2" in n for n in e["notes"])
    # The worker that claimed version 1 cannot mark version 2 done.
    assert not store.finish(exam_id, version, ok=True)


def test_missing_laterality_or_view_is_stored_with_reason(node):
    study = generate_uid(prefix=UID_ROOT)
    no_lat = make_mammogram("", "CC", study_uid=study, rows=128, cols=104)
    no_view = make_mammogram("R", "", study_uid=study, rows=128, cols=104, dialect="legacy")
    odd_view = make_mammogram("L", "CC", study_uid=study, rows=128, cols=104)
    odd_view.ViewPosition = "WEIRD"
    del odd_view.ViewCodeSequence
    good = make_mammogram("L", "MLO", study_uid=study, rows=128, cols=104)
    assert send(node.port, [no_lat, no_view, odd_view, good]) == [0, 0, 0, 0]
    e = node.exam(study)
    assert e["views"]["L-MLO"] == good.SOPInstanceUID
    assert e["missing"] == ["L-CC", "R-CC", "R-MLO"]
    assert no_lat.SOPInstanceUID in e["reason"] and "laterality missing" in e["reason"]
    assert no_view.SOPInstanceUID in e["reason"] and "view missing" in e["reason"]
    assert "WEIRD" in e["reason"]
    assert len(node.stored_files()) == 4


def test_other_storage_class_stored_outside_exams(node):
    ds = make_mammogram("L", "CC", rows=64, cols=64)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    assert send(node.port, [ds]) == [0]
    assert node.exams() == []
    assert [p.stem for p in node.stored_files()] == [ds.SOPInstanceUID]
    status = node.cli("status", "--json").stdout
    assert '"instances": 1' in status


def test_pynetdicom_sends_many_exams_concurrently(node):
    import threading

    exams = [make_exam(seed=20 + i, rows=96, cols=80) for i in range(4)]
    results: list = [None] * 4

    def go(i):
        results[i] = send(node.port, exams[i], calling=f"SENDER{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[0, 0, 0, 0]] * 4
    got = {e["study_instance_uid"]: e for e in node.exams()}
    for ex in exams:
        assert got[ex[0].StudyInstanceUID]["state"] == "ready"


def test_sigterm_stops_cleanly(node):
    assert send(node.port, make_exam(seed=30, rows=64, cols=64)[:1]) == [0]
    assert node.stop() == 0
    assert not (node.data_dir / "mammo-node.pid").exists()
    st = node.cli("status", check=False)
    assert st.returncode == 3 and "not running" in st.stdout
    log = node.log.read_text()
    assert "shutting down" in log and "stopped" in log
    # Restart on the same data: the earlier instance is still there.
    node.start()
    assert len(node.stored_files()) == 1
    assert node.cli("status", "--json").returncode == 0


def test_no_patient_name_in_info_logs(node):
    exam = make_exam(seed=31, rows=64, cols=64, patient_name="Secret^Patient")
    assert send(node.port, exam) == [0] * 4
    time.sleep(0.2)
    assert "Secret" not in node.log.read_text()


def test_daemon_does_not_load_torch():
    """The receiving process stays small (ingest benchmark: < 300 MB): no torch in it."""
    code = (
        "import sys, node.cli, node.daemon, node.scp; node.cli.build_parser(); "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_listener_role_serves_images_without_torch(node_factory):
    """A listener-role process receives, answers QIDO and renders a mammogram (the display
    code the Secondary Captures use) without ever mapping libtorch."""
    import requests

    from tests.helpers import free_port

    web = free_port()
    node = node_factory(
        {"dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web}}, role="listener"
    )
    exam = make_exam(seed=33, rows=128, cols=96)
    assert send(node.port, exam) == [0] * 4
    ds = exam[0]
    base = f"http://127.0.0.1:{web}/dicomweb"
    r = requests.get(
        f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
        f"instances/{ds.SOPInstanceUID}/rendered",
        headers={"Accept": "image/png"},
        timeout=60,
    )
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert requests.get(f"{base}/studies", timeout=60).status_code == 200
    maps = open(f"/proc/{node.proc.pid}/maps").read()
    assert "libtorch" not in maps and "libc10" not in maps
