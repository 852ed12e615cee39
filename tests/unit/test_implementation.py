"""The node names itself in DICOM: its Implementation Class UID and Version Name in the
associations it accepts and requests (a real pynetdicom association on loopback, in this
process) and in the File Meta Information of every file it writes (the results, through the
worker's one write path; a STOW part without file meta; a C-STORE dataset as pynetdicom
streams it to disk), never pynetdicom's, pydicom's or highdicom's."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, _config, dimse_messages, evt
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

from inference.synthetic import make_exam
from node import __version__
from node.compat import received_file_meta_names
from node.config import Config
from node.implementation import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    application_entity,
)
from node.results import (
    build_mammo_cad,
    build_parametric_map,
    build_presentation_state,
    build_sc,
    build_tid1500,
)
from node.results.identity import _UID_NAMESPACE
from node.scp import make_ae
from tests.helpers import dciodvfy_errors, free_port, reading_summary

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OURS = (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)


def _meta(path: Path) -> tuple[str, str]:
    m = dcmread(path, stop_before_pixels=True).file_meta
    return str(m.ImplementationClassUID), str(m.ImplementationVersionName)


def test_the_identity_is_the_nodes_own():
    uid = IMPLEMENTATION_CLASS_UID
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64
    assert uid == f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'mammo-node|implementation-class').int}"
    assert uid not in (PYNETDICOM_IMPLEMENTATION_UID, PYDICOM_IMPLEMENTATION_UID)
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16
    assert IMPLEMENTATION_VERSION_NAME == "MAMMO_NODE_" + __version__.replace(".", "")
    text = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    assert f"`{uid}`" in text and f"`{IMPLEMENTATION_VERSION_NAME}`" in text


def test_every_application_entity_is_the_nodes():
    """No module builds a pynetdicom AE but through application_entity (the listener and its
    C-MOVE / C-GET sub-operations, export, the status check, the dashboard's C-ECHO test)."""
    bare = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "node").rglob("*.py"))
        if p.name != "implementation.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<!\w)(AE|ApplicationEntity)\(", line)
    ]
    assert bare == []
    ae = make_ae(Config())
    assert (ae.implementation_class_uid, ae.implementation_version_name) == OURS


def test_associations_carry_the_identity_both_ways(tmp_path, monkeypatch):
    """The node's SCP answers A-ASSOCIATE-AC with its identity, the node's SCU sends it in its
    A-ASSOCIATE-RQ, and the file pynetdicom streams a received dataset into names the node."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    monkeypatch.setattr(dimse_messages, "create_file_meta", dimse_messages.create_file_meta)
    received_file_meta_names(*OURS)
    seen: dict = {}

    def on_store(event):
        req = event.assoc.requestor
        seen["requestor"] = (req.implementation_class_uid, req.implementation_version_name)
        seen["file"] = _meta(Path(event.dataset_path))
        Path(event.dataset_path).unlink()
        return 0x0000

    port = free_port()
    server = make_ae(Config()).start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        scu = application_entity("NODE_SCU")
        scu.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
        assoc = scu.associate("127.0.0.1", port, ae_title="MAMMO_NODE")
        assert assoc.is_established
        acceptor = assoc.acceptor
        assert (acceptor.implementation_class_uid, acceptor.implementation_version_name) == OURS
        ds = make_exam(seed=3, rows=32, cols=24)[0]
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert seen == {"requestor": OURS, "file": OURS}


def test_every_result_file_names_the_node(tmp_path):
    """Each kind of result, written by the worker's one write path, carries the node's
    identity in its file meta (highdicom put its own there) and stays valid (dciodvfy)."""
    from node.inference_process import ExamJob, _adder

    sources = {
        f"{ds.ImageLaterality}-{ds.ViewPosition}": ds for ds in make_exam(seed=5, rows=64, cols=48)
    }
    src = sources["L-CC"]
    study = str(src.StudyInstanceUID)
    reading = reading_summary()
    attention = np.zeros((int(src.Rows), int(src.Columns)), dtype=np.float32)
    attention[10:20, 10:20] = 1.0
    display = np.linspace(0, 1, attention.size).reshape(attention.shape)
    built = {
        "mammo-cad": build_mammo_cad(sources, reading, study, 1),
        "tid1500": build_tid1500(sources, reading, study, 1),
        "gsps": build_presentation_state(sources, reading, study, 1),
        "sc": build_sc(src, "L-CC", display, attention, reading, study, 1, 1),
        "pm": build_parametric_map(src, "L-CC", attention, reading, study, 1, 1),
    }
    assert str(built["sc"].file_meta.ImplementationClassUID) != IMPLEMENTATION_CLASS_UID
    produced: list = []
    add = _adder(ExamJob(data_dir=str(tmp_path), study_uid=study, version=1, paths={}), produced)
    for kind, ds in built.items():
        add(ds, kind)
    # the conformance statement's Annex B lists exactly what the builders make
    doc = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- table: produced-sop-classes -->(.*?)<!-- end -->", doc, re.S)
    assert table, "Annex B's produced-sop-classes table is missing"
    assert {p.sop_class_uid for p in produced} == set(
        re.findall(r"^\| `([0-9.]+)` \|", table.group(1), re.M)
    )
    for p in produced:
        f = tmp_path / p.path
        assert _meta(f) == OURS, p.kind
        assert (
            dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
            == ExplicitVRLittleEndian
        ), p.kind
        assert dciodvfy_errors(f) == [], p.kind


def test_a_stow_part_without_file_meta_gets_the_nodes(tmp_path):
    """A part sent as a bare dataset (no preamble, no file meta) is stored with file meta the
    node writes, naming the node."""
    from pydicom.filewriter import dcmwrite

    from node.ingest import _wrap_raw

    ds = make_exam(seed=4, rows=32, cols=24)[0]
    raw = tmp_path / "part.raw"
    del ds.file_meta
    dcmwrite(raw, ds, implicit_vr=False, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    out = tmp_path / "stored.dcm"
    with open(out, "wb") as f:
        _wrap_raw(raw, f)
    assert _meta(out) == OURS
    assert dcmread(out).SOPInstanceUID == ds.SOPInstanceUID
