"""DICOMweb against the running daemon, driven by dicomweb-client (a real client)."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient

from inference.synthetic import Lesion, make_exam, write
from tests.helpers import free_port, wait_for

TOKEN = "s3cret-token"


def _node(node_factory, worker=True, token=TOKEN):
    port = free_port()
    node = node_factory(
        {
            "dicomweb": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "root": "/dicomweb",
                "token": token,
            }
        },
        worker=worker,
    )
    base = f"http://127.0.0.1:{port}/dicomweb"
    wait_for(lambda: _up(base), 30, what="DICOMweb up")
    return node, base


def _up(base: str) -> bool:
    try:
        requests.get(f"{base}/studies", timeout=2)
        return True
    except requests.RequestException:
        return False


def _client(base: str, token: str = TOKEN) -> DICOMwebClient:
    return DICOMwebClient(url=base, headers={"Authorization": f"Bearer {token}"})


def test_stow_study_ends_with_an_sr_found_by_qido(node_factory):
    node, base = _node(node_factory)
    client = _client(base)
    exam = make_exam(
        seed=51, rows=512, cols=416, lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}
    )
    study = exam[0].StudyInstanceUID
    resp = client.store_instances(exam)
    assert len(resp.ReferencedSOPSequence) == 4 and "FailedSOPSequence" not in resp
    node.wait_exam(study, "done", timeout=180)
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(studies) == 1
    series = client.search_for_series(study, search_filters={"Modality": "SR"})
    assert len(series) == 2  # Mammography CAD SR and TID 1500
    sr_series = series[0]["0020000E"]["Value"][0]
    instances = client.search_for_instances(study, sr_series)
    sop = instances[0]["00080018"]["Value"][0]
    sr = client.retrieve_instance(study, sr_series, sop)
    assert sr.StudyInstanceUID == study and sr.Modality == "SR"
    meta = client.retrieve_series_metadata(study, sr_series)
    assert meta[0]["00080018"]["Value"][0] == sop
    whole = client.retrieve_study(study)
    assert len(whole) == 4 + 6  # the received images and every result
    sc = [ds for ds in whole if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"][0]
    png = requests.get(
        f"{base}/studies/{study}/series/{sc.SeriesInstanceUID}/instances/"
        f"{sc.SOPInstanceUID}/rendered",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"},
        timeout=30,
    )
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    limited = client.search_for_instances(study, search_filters={"limit": 3})
    assert len(limited) == 3
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "SR"})) == 1
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}) == []
    dated = client.search_for_studies(search_filters={"StudyDate": "20260101-20261231"})
    assert [s["0020000D"]["Value"][0] for s in dated] == [study]
    assert client.search_for_studies(search_filters={"StudyDate": "-20251231"}) == []


def test_bad_requests_get_the_standard_status_and_a_reason(node_factory, tmp_path):
    node, base = _node(node_factory, worker=False)
    exam = make_exam(seed=52, rows=64, cols=64)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # Wrong token.
    r = requests.get(f"{base}/studies", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401 and "token" in r.json()["error"]
    # Wrong media type.
    r = requests.post(
        f"{base}/studies",
        data=b"x",
        timeout=10,
        headers={**auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 415 and "multipart/related" in r.json()["error"]
    # Malformed multipart.
    ctype = 'multipart/related; type="application/dicom"; boundary=XYZ'
    r = requests.post(
        f"{base}/studies",
        data=b"no boundary here",
        timeout=10,
        headers={**auth, "Content-Type": ctype},
    )
    assert r.status_code == 400 and "malformed" in r.json()["error"]
    # Only non-DICOM parts: all fail -> 409 with FailedSOPSequence and reasons.
    body = (
        b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n"
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XYZ--\r\n"
    )
    r = requests.post(
        f"{base}/studies", data=body, timeout=10, headers={**auth, "Content-Type": ctype}
    )
    assert r.status_code == 409
    js = r.json()
    assert len(js["00081198"]["Value"]) == 2
    assert "not a DICOM file" in r.headers["Warning"] and "text/plain" in r.headers["Warning"]
    # One good, one refused (its study is not the URL's): 202, through dicomweb-client.
    client = _client(base)
    other = make_exam(seed=53, rows=64, cols=64)[0]
    resp = client.store_instances([exam[0], other], study_instance_uid=exam[0].StudyInstanceUID)
    assert [i.ReferencedSOPInstanceUID for i in resp.ReferencedSOPSequence] == [
        exam[0].SOPInstanceUID
    ]
    assert resp.FailedSOPSequence[0].ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert resp.FailedSOPSequence[0].FailureReason == 0xA900
    good = write(exam[1], tmp_path / "good.dcm").read_bytes()
    body = (
        b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n"
        + good
        + b"\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XYZ--\r\n"
    )
    r = requests.post(
        f"{base}/studies", data=body, timeout=10, headers={**auth, "Content-Type": ctype}
    )
    assert r.status_code == 202
    assert {e["study_instance_uid"] for e in node.exams()} == {exam[0].StudyInstanceUID}
    assert len(node.stored_files()) == 2
    # Unknown UIDs.
    r = requests.get(f"{base}/studies/1.2.3.4.5", headers=auth, timeout=10)
    assert r.status_code == 404
    assert client.search_for_studies(search_filters={"StudyInstanceUID": "1.2.3.4.5"}) == []
    r = requests.get(f"{base}/studies?BogusKey=1", headers=auth, timeout=10)
    assert r.status_code == 400 and "BogusKey" in r.json()["error"]
