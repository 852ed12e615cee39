"""Query/retrieve against the running node with DCMTK findscu / movescu / getscu and pynetdicom."""

from __future__ import annotations

import datetime as dt
import re
import subprocess

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from inference.synthetic import make_exam
from tests.helpers import QR_PEER, dcmtk, send

PEERS = [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}]


@pytest.fixture
def loaded(node_factory, storescp_factory):
    pacs = storescp_factory()
    node = node_factory(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "peers": PEERS,
        }
    )
    a = make_exam(
        seed=41,
        rows=64,
        cols=64,
        patient_id="PAT-A",
        patient_name="Alpha^Ann",
        accession="ACC-A",
        acquisition=dt.datetime(2026, 3, 1, 9, 0),
    )
    b = make_exam(
        seed=42,
        rows=64,
        cols=64,
        patient_id="PAT-B",
        patient_name="Beta^Bea",
        accession="ACC-B",
        acquisition=dt.datetime(2026, 5, 20, 14, 30),
    )
    assert send(node.port, a + b) == [0] * 8
    return node, pacs, a, b


def findscu(node, *keys, model="-S"):
    r = subprocess.run(
        [
            dcmtk("findscu"),
            model,
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *[x for k in keys for x in ("-k", k)],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    return out.count("Find Response:") - out.count("(Success)"), out


def test_findscu_study_level_matching(loaded):
    node, _, a, b = loaded
    n, out = findscu(
        node,
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "PatientName",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "StudyDate=20260401-20261231",
    )
    assert n == 1 and b[0].StudyInstanceUID in out and a[0].StudyInstanceUID not in out
    assert re.search(r"NumberOfStudyRelatedInstances", out) and "[4 ]" in out
    assert "[MG]" in out
    n, out = findscu(
        node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName=alpha*"
    )  # PN wildcard, case-insensitive
    assert n == 1 and a[0].StudyInstanceUID in out
    n, _ = findscu(node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate=-20260101")
    assert n == 0
    n, out = findscu(
        node,
        "QueryRetrieveLevel=STUDY",  # UID list
        f"StudyInstanceUID={a[0].StudyInstanceUID}\\{b[0].StudyInstanceUID}",
    )
    assert n == 2
    n, _ = findscu(node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "AccessionNumber")
    assert n == 2  # universal matching
    n, _ = findscu(node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "ModalitiesInStudy=MG")
    assert n == 2
    n, _ = findscu(node, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "ModalitiesInStudy=CT")
    assert n == 0
    n, out = findscu(
        node,
        "QueryRetrieveLevel=PATIENT",
        "PatientID=PAT-?",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        model="-P",
    )
    assert n == 2 and "Alpha^Ann" in out and "Beta^Bea" in out


def test_pynetdicom_series_and_image_levels(loaded):
    node, _, a, _ = loaded
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = a[0].StudyInstanceUID
        q.SeriesInstanceUID = ""
        q.Modality = "MG"
        q.NumberOfSeriesRelatedInstances = ""
        res = [
            (s.Status, d)
            for s, d in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
        ]
        pending = [d for st, d in res if st == 0xFF00]
        assert len(pending) == 1 and res[-1][0] == 0x0000
        assert pending[0].SeriesInstanceUID == a[0].SeriesInstanceUID
        assert int(pending[0].NumberOfSeriesRelatedInstances) == 4
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = a[0].StudyInstanceUID
        q.SeriesInstanceUID = a[0].SeriesInstanceUID
        q.SOPInstanceUID = ""
        q.InstanceNumber = "2"
        res = [
            d
            for s, d in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
            if s.Status == 0xFF00
        ]
        assert [d.SOPInstanceUID for d in res] == [a[1].SOPInstanceUID]
        bad = Dataset()
        bad.QueryRetrieveLevel = "PATIENT"  # not allowed with Study Root
        bad.PatientID = ""
        st = [
            s.Status for s, _ in assoc.send_c_find(bad, StudyRootQueryRetrieveInformationModelFind)
        ]
        assert st[-1] == 0xA900
    finally:
        assoc.release()


def test_movescu_and_getscu(loaded, tmp_path):
    node, pacs, a, _ = loaded
    r = subprocess.run(
        [
            dcmtk("movescu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "-aem",
            "PACS",
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={a[0].StudyInstanceUID}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = sorted(dcmread(f).SOPInstanceUID for f in pacs.files())
    assert got == sorted(ds.SOPInstanceUID for ds in a)
    out = tmp_path / "get"
    out.mkdir()
    r = subprocess.run(
        [
            dcmtk("getscu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "-od",
            str(out),
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={a[0].StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={a[0].SeriesInstanceUID}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(dcmread(f).SOPInstanceUID for f in out.iterdir()) == sorted(
        ds.SOPInstanceUID for ds in a
    )
    r = subprocess.run(
        [
            dcmtk("movescu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "-aem",
            "NOWHERE",
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={a[0].StudyInstanceUID}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "MoveDestinationUnknown" in r.stdout + r.stderr
    # An expected refusal: the node's own WARNING, no ERROR line from pynetdicom.
    log = node.log.read_text()
    assert "C-MOVE to unknown destination 'NOWHERE' refused" in log
    assert not [ln for ln in log.splitlines() if " ERROR " in ln], log


def test_c_cancel_stops_a_long_c_find(node_factory):
    """A C-CANCEL sent after the first answer stops the C-FIND. The node holds 20,000
    matching rows (written straight into its database: C-FIND needs no files), so it is
    still answering when the cancel arrives however loaded the machine is; with 400 rows a
    fast node sometimes finished first."""
    from pydicom.uid import generate_uid
    from sqlalchemy import insert

    from inference.synthetic import UID_ROOT
    from storage.db import Database
    from storage.models import Instance

    n_rows = 20_000
    node = node_factory({"peers": PEERS, "node": {"max_query_results": n_rows}}, start=False)
    study, series = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    node.data_dir.mkdir(parents=True)
    db = Database(f"sqlite:///{node.data_dir / 'mammo-node.db'}")
    with db.write() as s:
        s.execute(
            insert(Instance),
            [
                dict(
                    sop_instance_uid=f"{series}.{i}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    study_instance_uid=study,
                    series_instance_uid=series,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/x/{i}.dcm",
                    size_bytes=0,
                    patient_id="PAT-CANCEL",
                    modality="OT",
                    role="other",
                )
                for i in range(n_rows)
            ],
        )
    db.close()
    node.start()
    # DCMTK's findscu sends the C-CANCEL as soon as it has the first answer (pynetdicom's
    # requestor queues it behind the answers still arriving, so it may go out too late).
    r = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-v",
            "-aet",
            "QRSCU",
            "-aec",
            node.ae_title,
            "--cancel",
            "1",
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=IMAGE",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            f"SeriesInstanceUID={series}",
            "-k",
            "SOPInstanceUID",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Received Final Find Response (Cancel" in out
    m = re.search(r"C-FIND cancelled after (\d+) match", node.log.read_text())
    assert m and 1 <= int(m.group(1)) < n_rows, out[-500:]


def test_move_refused_for_its_keys_never_connects_to_the_destination(node_factory):
    """A C-MOVE whose keys are refused (universal matching of the unique key) is answered
    0xA900 with the reason, and the move destination never sees a connection."""
    import socket

    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    node = node_factory(
        {
            "destinations": [
                {
                    "name": "trap",
                    "ae_title": "TRAP",
                    "host": "127.0.0.1",
                    "port": trap.getsockname()[1],
                }
            ],
            "peers": PEERS,
        }
    )
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = "*"
    rsps = [
        st
        for st, _ in assoc.send_c_move(ident, "TRAP", StudyRootQueryRetrieveInformationModelMove)
        if st
    ]
    assoc.release()
    assert [r.Status for r in rsps] == [0xA900]
    assert "wildcards" in str(rsps[0].get("ErrorComment", ""))
    try:
        trap.accept()
        connected = True
    except BlockingIOError:
        connected = False
    trap.close()
    assert not connected
    log = node.log.read_text()
    assert not [ln for ln in log.splitlines() if " ERROR " in ln], log
