"""The whole pipeline with real processes: node (worker + export) -> DCMTK storescp as PACS."""

from __future__ import annotations

import json
import os
import subprocess

import psutil
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from inference.scan import numba_available
from inference.synthetic import Lesion, make_exam
from tests.helpers import QR_PEER, dciodvfy_errors, dcmtk, send, wait_for

SIZE = dict(rows=640, cols=512)
FAST_EXPORT = {"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1.0}


def _node(node_factory, pacs_port: int, **extra):
    settings = {
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
        ],
        "export": FAST_EXPORT,
        "grouping": {"stable_seconds": 2},
        "peers": [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
    }
    settings.update(extra)
    return node_factory(settings, worker=True)


def _delivery(node, study):
    return node.exam(study).get("delivery", {}).get("pacs", {})


def _read_while_pacs_is_down(node_factory, storescp_factory, seed: int):
    """An exam read while the PACS is not listening: its 6 objects end up retrying."""
    pacs = storescp_factory(start=False)
    node = _node(node_factory, pacs.port)
    exam = make_exam(seed=seed, **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: _delivery(node, study).get("retrying") == 6, 30, what="retrying")
    return pacs, node, study


def test_exam_reading_arrives_in_the_pacs_and_validates(node_factory, storescp_factory):
    """Both SRs, the presentation state, the attention-map Secondary Captures and Parametric
    Maps reach DCMTK's storescp (which takes every one of them) and pass dciodvfy; the marks
    are in both SRs and the presentation state, on the lesion."""
    pacs = storescp_factory()
    node = _node(
        node_factory, pacs.port, results={"parametric_maps": True, "presentation_states": True}
    )
    exam = make_exam(seed=11, lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}, **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: _delivery(node, study).get("sent") == 11, 60, what="11 objects sent")
    wait_for(lambda: len(pacs.files()) == 11, 10, what="storescp wrote every file")
    if numba_available():  # the compiled scan runs, its kernels cached in the data folder
        assert "(scan: numba (CPU" in node.log.read_text()
        if "NUMBA_CACHE_DIR" not in os.environ:
            assert any((node.data_dir / "cache" / "numba").rglob("*.nbi"))
    files = pacs.files()
    assert len(files) == 11
    objs = [dcmread(f) for f in files]
    scs = [o for o in objs if o.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    srs = [o for o in objs if o.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"]
    cads = [o for o in objs if o.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.50"]
    pms = [o for o in objs if o.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    prs = [o for o in objs if o.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"]
    assert len(scs) == 4 and len(srs) == 1 and len(cads) == 1 and len(pms) == 4
    assert len(prs) == 1
    # The presentation state references the four images and draws the left breast's marks.
    pr = prs[0]
    refs = {
        r.ReferencedSOPInstanceUID
        for s in pr.ReferencedSeriesSequence
        for r in s.ReferencedImageSequence
    }
    assert refs == {ds.SOPInstanceUID for ds in exam}
    layers = {a.GraphicLayer for a in pr.GraphicAnnotationSequence}
    assert layers == {"AI MARKS", "AI EXAM SCORE"}
    marked = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "AI MARKS"]
    assert marked and all(
        a.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        in {ds.SOPInstanceUID for ds in exam if ds.ImageLaterality == "L"}
        for a in marked
    )
    sources = {ds.SOPInstanceUID: ds for ds in exam}
    for pm in pms:  # at the image's geometry, values mapped back to attention 0-1
        ref = (
            pm.PerFrameFunctionalGroupsSequence[0]
            .DerivationImageSequence[0]
            .SourceImageSequence[0]
            .ReferencedSOPInstanceUID
        )
        assert ref in sources and (pm.Rows, pm.Columns) == (sources[ref].Rows, sources[ref].Columns)
        rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert float(rwv.RealWorldValueSlope) * pm.pixel_array.max() <= 1.0 + 1e-6
        assert pm.Laterality == sources[ref].ImageLaterality
    for o in objs:
        assert o.StudyInstanceUID == study  # into the source study
        assert o.PatientID == exam[0].PatientID
        assert o.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in exam}  # new series
    for f in files:
        assert dciodvfy_errors(f) == [], f
    for sc in scs:
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {
            ds.SOPInstanceUID for ds in exam
        }
    text = json.dumps(srs[0].to_json_dict())
    # The left breast's spiculated lesion is read as suspicious: SNOMED BI-RADS 4 or 5.
    suspicious = {"397144001": "4", "397145000": "5"}
    found = [code for code in suspicious if code in text]
    assert found, "left breast not read as BI-RADS 4 or 5"
    category = suspicious[found[0]]
    cad = json.dumps(cads[0].to_json_dict())
    for needle in (
        "Mammography CAD Report",
        "Image Library",
        found[0],
        "Probability of cancer",
        "Probability of benign",
        "Algorithm Name",
        "HybridCnnVssm",
        "NOT FOR CLINICAL USE",
        "Summary of Analyses",
        f"AI reading: left BI-RADS {category}",
        "Fusion weight of L-MLO",
        "Missing views",
        "Single Image Finding",
        "Certainty of Finding",
        "Presentation Required",
        "Successful Detections",
    ):
        assert needle in cad, needle
    assert "AI region score" in text  # TID 1500: a planar ROI group per mark
    table = node.cli("exams").stdout
    assert "pacs:11 sent" in table
    listed = node.exam(study)  # exams --json: the exam's 0-100 score and its marks
    assert 0 <= listed["score"] <= 100 and listed["score"] >= 50  # the spiculated lesion
    assert listed["marks"] and all(m["slot"].startswith("L") for m in listed["marks"])
    assert max(m["score"] for m in listed["marks"]) == listed["score"]
    for suffix, title in (
        (".88.33", "Imaging Measurement Report"),
        (".88.50", "Mammography CAD Report"),
    ):
        sr_file = next(f for f, o in zip(files, objs) if o.SOPClassUID.endswith(suffix))
        dump = subprocess.run([dcmtk("dsrdump"), str(sr_file)], capture_output=True, text=True)
        assert dump.returncode == 0 and title in dump.stdout
    # The node answers C-FIND for what it produced, too.
    r = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            "SeriesInstanceUID",
            "-k",
            "Modality=SR",
        ],
        capture_output=True,
        text=True,
    )
    assert srs[0].SeriesInstanceUID in r.stdout + r.stderr


def test_destination_down_then_back_and_resend(node_factory, storescp_factory):
    pacs, node, study = _read_while_pacs_is_down(node_factory, storescp_factory, seed=12)
    pacs.start()
    wait_for(lambda: _delivery(node, study).get("sent") == 6, 60, what="delivered after outage")
    assert len(pacs.files()) == 6 and pacs.received() == 6
    r = node.cli("resend", study)
    assert "queued 6" in r.stdout
    wait_for(lambda: pacs.received() == 12, 60, what="resent")
    assert len(pacs.files()) == 6  # same deterministic SOP Instance UIDs: no second copy


def test_one_bad_exam_fails_with_reason_and_the_next_is_done(node_factory, storescp_factory):
    pacs = storescp_factory()
    node = _node(node_factory, pacs.port)
    bad = make_exam(seed=13, transfer_syntax=JPEGLSLossless, **SIZE)
    for ds in bad:  # a valid header around a JPEG-LS stream that cannot be decoded
        ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9"])
    good = make_exam(seed=14, **SIZE)
    assert send(node.port, bad) == [0] * 4
    assert send(node.port, good) == [0] * 4
    e = node.wait_exam(bad[0].StudyInstanceUID, "failed", timeout=180)
    assert e["reason"] and "decode" in e["reason"].lower()
    node.wait_exam(good[0].StudyInstanceUID, "done", timeout=180)


def test_sigkill_during_inference_then_restart_delivers_exactly_once(
    node_factory, storescp_factory
):
    import signal

    pacs = storescp_factory()
    node = _node(node_factory, pacs.port)
    exam = make_exam(seed=15, rows=2400, cols=1900)  # larger: inference takes a moment
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    wait_for(
        lambda: node.exam(study)["state"] == "processing", 60, interval=0.05, what="processing"
    )
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert children, "inference runs in a child process"
    node.stop(signal.SIGKILL)
    assert node.exam(study)["state"] == "processing"
    # The inference process does not outlive the daemon.
    wait_for(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        10,
        what="orphans gone",
    )
    node.start()
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: _delivery(node, study).get("sent") == 6, 60, what="sent after restart")
    assert any("interrupted" in n for n in node.exam(study)["notes"])
    assert pacs.received() == 6 and len(pacs.files()) == 6


def test_sigkill_with_deliveries_pending_then_restart(node_factory, storescp_factory):
    import signal

    pacs, node, study = _read_while_pacs_is_down(node_factory, storescp_factory, seed=16)
    node.stop(signal.SIGKILL)
    pacs.start()
    node.start()
    wait_for(lambda: _delivery(node, study).get("sent") == 6, 60, what="resumed deliveries")
    assert pacs.received() == 6 and len(pacs.files()) == 6


def test_reopened_exam_gets_a_new_version_that_references_the_old(node_factory, storescp_factory):
    import datetime as dt

    from inference.synthetic import make_mammogram

    pacs = storescp_factory()
    node = _node(node_factory, pacs.port)
    exam = make_exam(seed=17, **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: pacs.received() == 6, 60, what="v1 delivered")
    retake = make_mammogram(
        "L",
        "CC",
        study_uid=study,
        seed=99,
        **SIZE,
        patient_id=exam[0].PatientID,
        acquisition=dt.datetime(2026, 1, 15, 12, 0),
    )
    assert send(node.port, [retake]) == [0]
    wait_for(
        lambda: node.exam(study)["version"] == 2 and node.exam(study)["state"] == "done",
        180,
        what="version 2 done",
    )
    wait_for(lambda: pacs.received() == 12, 60, what="v2 delivered")
    wait_for(lambda: len(pacs.files()) == 12, 10, what="storescp wrote every file")
    objs = [dcmread(f) for f in pacs.files()]
    assert len(objs) == 12  # new UIDs for the new version, the old ones stay
    v1 = {o.SOPInstanceUID for o in objs if o.SOPClassUID.endswith(".88.50")}
    assert len(v1) == 2
    newest = [
        o for o in objs if o.SOPClassUID.endswith(".88.50") and "PredecessorDocumentsSequence" in o
    ]
    assert len(newest) == 1
    ref = (
        newest[0]
        .PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
    )
    assert ref in v1 and ref != newest[0].SOPInstanceUID


def test_sigkill_in_the_middle_of_an_export(node_factory, storescp_factory):
    """Killed while a slow PACS is receiving: after the restart every object is there once
    (an object in flight at the kill may be sent again; its fixed SOP Instance UID makes the
    second copy the same instance, so the PACS holds one)."""
    import signal

    pacs = storescp_factory(extra=["--sleep-after", "1"])  # each store takes >= 1 s
    node = _node(node_factory, pacs.port)
    exam = make_exam(seed=18, **SIZE)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    wait_for(lambda: pacs.received() >= 2, 120, interval=0.05, what="export under way")
    node.stop(signal.SIGKILL)
    assert pacs.received() < 6
    node.start()
    wait_for(lambda: _delivery(node, study).get("sent") == 6, 120, what="all delivered")
    wait_for(lambda: len(pacs.files()) == 6, 20, what="six objects at the PACS")
    uids = [dcmread(f).SOPInstanceUID for f in pacs.files()]
    assert len(set(uids)) == 6
    assert pacs.received() <= 7
    assert node.exam(study)["state"] == "done"
