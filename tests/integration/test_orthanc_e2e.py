"""End to end against a real PACS: Orthanc sends a study to the node, the reading comes back."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from inference.synthetic import Lesion, make_exam, write
from tests.helpers import dciodvfy_errors, free_port, wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, folder: Path, node_port: int, extra: dict | None = None):
        self.folder = folder
        self.http = free_port()
        self.dicom = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "Name": "mammo-node-test",
                    "StorageDirectory": str(folder / "db"),
                    "IndexDirectory": str(folder / "db"),
                    "HttpPort": self.http,
                    "DicomPort": self.dicom,
                    "DicomAet": "ORTHANC",
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [],
                    "DicomCheckCalledAet": False,
                    "DicomModalities": {"mammo": ["MAMMO_NODE", "127.0.0.1", node_port]},
                    **(extra or {}),
                }
            )
        )
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(folder / "config.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, 30, what="Orthanc")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes, ctype: str = "application/json"):
        req = urllib.request.Request(
            self.url(path), data=data, method="POST", headers={"Content-Type": ctype}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc is installed by .ci/run")
def test_orthanc_routes_a_study_and_receives_the_reading(node_factory, tmp_path):
    # Ports first: Orthanc must know the node. Parametric Maps on: Orthanc takes them too.
    node = node_factory(
        {"results": {"parametric_maps": True, "presentation_states": True}},
        start=False,
        worker=True,
    )
    orthanc = Orthanc(tmp_path / "orthanc", node.port)
    try:
        cfg = node.config.read_text() + (
            '[[destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\n'
            f'host = "127.0.0.1"\nport = {orthanc.dicom}\n'
            "[export]\ninitial_delay_seconds = 0.5\nmax_delay_seconds = 1.0\n"
        )
        node.config.write_text(cfg)
        node.start()
        exam = make_exam(
            seed=21, rows=640, cols=512, lesions={"R": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}
        )
        study_uid = exam[0].StudyInstanceUID
        for i, ds in enumerate(exam):
            orthanc.post(
                "/instances", write(ds, tmp_path / f"in{i}.dcm").read_bytes(), "application/dicom"
            )
        study_id = orthanc.post("/tools/lookup", study_uid.encode(), "text/plain")[0]["ID"]
        assert len(orthanc.get(f"/studies/{study_id}/instances")) == 4
        job = orthanc.post("/modalities/mammo/store", json.dumps(study_id).encode())
        assert job is not None
        node.wait_exam(study_uid, "done", timeout=180)
        wait_for(
            lambda: len(orthanc.get(f"/studies/{study_id}/instances")) == 15,
            90,
            what="SRs, the presentation state, SCs and Parametric Maps in Orthanc",
        )
        series = orthanc.get(f"/studies/{study_id}/series")
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        assert modalities.count("SR") == 2 and "MG" in modalities and "PR" in modalities
        for inst in orthanc.get(f"/studies/{study_id}/instances"):
            tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
            if tags.get("Modality") == "MG":
                continue
            f = tmp_path / f"{inst['ID']}.dcm"
            f.write_bytes(orthanc.get(f"/instances/{inst['ID']}/file"))
            assert dciodvfy_errors(f) == [], f
            ds = dcmread(f)
            assert ds.StudyInstanceUID == study_uid and ds.PatientID == exam[0].PatientID
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc is installed by .ci/run")
def test_send_cut_off_by_a_crash_is_confirmed_not_repeated(node_factory, tmp_path):
    """A C-STORE whose answer was lost in a crash: at restart the node asks the PACS (C-FIND)
    and, finding the object there, records it as sent without sending it a second time."""
    import datetime as dt
    import sqlite3

    node = node_factory(start=False, worker=True)
    orthanc = Orthanc(tmp_path / "orthanc", node.port)
    try:
        node.config.write_text(
            node.config.read_text()
            + (
                '[[destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\n'
                f'host = "127.0.0.1"\nport = {orthanc.dicom}\n'
                "[export]\ninitial_delay_seconds = 0.5\nmax_delay_seconds = 1.0\n"
            )
        )
        node.start()
        exam = make_exam(seed=22, rows=256, cols=208)
        study_uid = exam[0].StudyInstanceUID
        from tests.helpers import send

        assert send(node.port, exam) == [0] * 4
        wait_for(
            lambda: node.exam(study_uid).get("delivery", {}).get("orthanc", {}).get("sent") == 6,
            120,
            what="delivered",
        )
        assert node.stop() == 0
        db = sqlite3.connect(node.data_dir / "mammo-node.db")
        row_id, sop = db.execute(
            "SELECT o.id, r.sop_instance_uid FROM outbound o JOIN results r "
            "ON r.id = o.result_id ORDER BY o.id LIMIT 1"
        ).fetchone()
        now = dt.datetime.utcnow().isoformat(sep=" ")
        db.execute(
            "UPDATE outbound SET state='retrying', in_flight_since=?, next_attempt_at=? WHERE id=?",
            (now, now, row_id),
        )
        db.commit()
        db.close()
        before = node.log.read_text()
        node.start()
        wait_for(
            lambda: node.exam(study_uid)["delivery"]["orthanc"].get("sent") == 6,
            60,
            what="confirmed",
        )
        after = node.log.read_text()[len(before) :]
        assert f"{sop} was already at orthanc" in after
        assert f"sent {sop} to orthanc" not in after
    finally:
        node.stop()
        orthanc.stop()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc is installed by .ci/run")
def test_orthanc_dicomweb_plugin_retrieves_a_study_from_the_node(node_factory, tmp_path):
    """Orthanc's DICOMweb plugin with the node as a remote server: a WADO-RS retrieve of a
    whole study (the node streams it) lands in Orthanc."""
    assert DICOMWEB_PLUGIN.exists(), "install Debian's orthanc-dicomweb (.ci/run does)"
    from tests.helpers import send

    web = free_port()
    node = node_factory({"dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web}})
    exam = make_exam(seed=131, rows=320, cols=256)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    orthanc = Orthanc(
        tmp_path / "orthanc",
        node.port,
        extra={
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {"node": [f"http://127.0.0.1:{web}/dicomweb/"]},
            },
        },
    )
    try:
        found = orthanc.post(
            "/dicom-web/servers/node/qido",
            json.dumps({"Uri": "/studies", "Arguments": {"StudyInstanceUID": study}}).encode(),
        )
        assert len(found) == 1 and found[0]["0020000D"]["Value"] == study  # Orthanc simplifies
        orthanc.post(
            "/dicom-web/servers/node/retrieve",
            json.dumps({"Resources": [{"Study": study}]}).encode(),
        )
        ids = wait_for(
            lambda: orthanc.get("/instances") if len(orthanc.get("/instances")) == 4 else None,
            60,
            what="the study in Orthanc",
        )
        got = sorted(orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ids)
        assert got == sorted(ds.SOPInstanceUID for ds in exam)
    finally:
        orthanc.stop()
