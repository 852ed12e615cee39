"""The whole node on PostgreSQL (one process, role ``all``): C-STORE, the reading, export,
C-FIND (DCMTK findscu), C-GET, QIDO-RS and WADO-RS, the dashboard, metrics, the CLI and
retention, all on ``database_url = "postgresql+psycopg://..."``."""

from __future__ import annotations

import subprocess

import pytest
import requests

from inference.synthetic import make_exam
from tests.helpers import QR_PEER, dcmtk, free_port, send, wait_for

pytestmark = pytest.mark.postgres


def test_the_node_on_postgresql(tmp_path, pg_server, node_factory, storescp_factory):
    url = pg_server.new_database("node")
    pacs = storescp_factory()
    web = free_port()
    node = node_factory(
        {
            "node": {"database_url": url},
            "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "export": {"initial_delay_seconds": 0.5, "max_delay_seconds": 1.0},
            "peers": [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
        },
        worker=True,
    )
    exam = make_exam(seed=321, rows=320, cols=256, patient_id="PG-PAT-1", accession="PG-ACC-1")
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    assert send(node.port, exam[:1]) == [0]  # a duplicate: success, stored once
    node.wait_exam(study, "done", timeout=180)
    wait_for(
        lambda: node.exam(study)["delivery"].get("pacs", {}).get("sent") == 6,
        60,
        what="6 objects at the PACS",
    )
    assert len(pacs.files()) == 6

    # C-FIND with DCMTK: the study with its 4 images and the node's 6 result objects.
    r = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            "MAMMO_NODE",
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=PG-PAT-1",
            "-k",
            "StudyInstanceUID",
            "-k",
            "NumberOfStudyRelatedInstances",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert study in r.stderr and "[10]" in r.stderr  # 4 images + 2 SRs + 4 SCs

    # C-GET of the study's images with DCMTK.
    out = tmp_path / "get"
    out.mkdir()
    r = subprocess.run(
        [
            dcmtk("getscu"),
            "-S",
            "-aet",
            "QRSCU",
            "-aec",
            "MAMMO_NODE",
            "-od",
            str(out),
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(list(out.iterdir())) == 10

    # DICOMweb: QIDO and a WADO-RS metadata request.
    base = f"http://127.0.0.1:{web}/dicomweb"
    found = requests.get(
        f"{base}/studies", params={"AccessionNumber": "PG-ACC-1"}, timeout=30
    ).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    meta = requests.get(f"{base}/studies/{study}/metadata", timeout=30)
    assert meta.status_code == 200 and len(meta.json()) == 10
    # The dashboard and metrics read the same database.
    page = requests.get(f"http://127.0.0.1:{web}/ui", timeout=30)
    assert page.status_code == 200 and "PG-ACC-1" in page.text
    page = requests.get(f"http://127.0.0.1:{web}/ui/exams/{study}", timeout=30)
    assert page.status_code == 200 and "sent" in page.text
    metrics = requests.get(f"http://127.0.0.1:{web}/metrics", timeout=30).text
    assert 'mammo_node_exams{state="done"} 1.0' in metrics
    assert requests.get(f"http://127.0.0.1:{web}/readyz", timeout=30).status_code == 200

    # The CLI: status, reprocess (a second version read), purge dry-run.
    assert node.cli("status").returncode == 0
    assert "version 2" in node.cli("reprocess", study).stdout
    node.wait_exam(study, "done", timeout=180)
    assert node.exam(study)["version"] == 2
    assert study not in node.cli("purge", "--dry-run").stdout  # not delivered long enough
