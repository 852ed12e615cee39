"""DICOMweb for zero-footprint viewers: frames with transfer syntax negotiation, bulk data,
QIDO at every level, thumbnails and rendered images, CORS, WADO-URI, streaming retrieve.
Driven by dicomweb-client and plain HTTP against the running daemon."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, RLELossless

from inference.synthetic import make_exam, make_mammogram
from tests.helpers import free_port, wait_for

SIZE = dict(rows=256, cols=208)


@pytest.fixture
def web(node_factory):
    port = free_port()
    node = node_factory(
        {
            "dicomweb": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "cors_origins": ["http://viewer.example:3000"],
            }
        }
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, 30, what="HTTP up")
    return node, base, DICOMwebClient(url=f"{base}/dicomweb")


def _store(client, datasets):
    resp = client.store_instances(datasets)
    assert "FailedSOPSequence" not in resp
    return datasets


def test_frames_uncompressed_and_pass_through(web):
    node, base, client = web
    native = make_mammogram("L", "CC", seed=1, **SIZE)
    jls = make_mammogram(
        "L",
        "MLO",
        seed=2,
        transfer_syntax=JPEGLSLossless,
        study_uid=native.StudyInstanceUID,
        **SIZE,
    )
    rle = make_mammogram(
        "R", "CC", seed=3, transfer_syntax=RLELossless, study_uid=native.StudyInstanceUID, **SIZE
    )
    _store(client, [native, jls, rle])
    for ds in (native, jls, rle):
        # dicomweb-client asks for uncompressed frames: decoded from whatever is stored.
        (frame,) = client.retrieve_instance_frames(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1]
        )
        got = np.frombuffer(frame, "<u2").reshape(ds.Rows, ds.Columns)
        assert np.array_equal(got, dcmread_like(ds)), ds.file_meta.TransferSyntaxUID
    url = (
        f"{base}/dicomweb/studies/{jls.StudyInstanceUID}/series/{jls.SeriesInstanceUID}"
        f"/instances/{jls.SOPInstanceUID}/frames/1"
    )
    # transfer-syntax=*: the stored JPEG-LS stream, untouched.
    r = requests.get(
        url,
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert r.status_code == 200 and "multipart/related" in r.headers["content-type"]
    assert f"transfer-syntax={JPEGLSLossless}" in r.text[:400]
    assert b"\xff\xd8\xff\xf7" in r.content  # JPEG-LS SOI + SOF55
    # Its image media type, single part.
    r = requests.get(url, headers={"Accept": "image/jls"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/jls")
    assert r.content.startswith(b"\xff\xd8")
    # Single-part uncompressed.
    r = requests.get(url, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and len(r.content) == jls.Rows * jls.Columns * 2
    # Something we cannot give; a frame that does not exist.
    assert requests.get(url, headers={"Accept": "image/jp2"}).status_code == 406
    assert requests.get(url.replace("/frames/1", "/frames/2")).status_code == 400


def dcmread_like(ds):
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf).pixel_array


def test_metadata_bulkdata_uris_resolve(web):
    node, base, client = web
    ds = make_mammogram("R", "MLO", seed=4, **SIZE)
    _store(client, [ds])
    meta = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(base) and uri.endswith("/bulkdata/7FE00010")
    assert "InlineBinary" not in meta["7FE00010"]
    value = client.retrieve_bulkdata(uri)[0]
    assert value == ds.PixelData
    assert requests.get(uri.replace("7FE00010", "00100010")).status_code == 404


def test_qido_at_every_level_with_default_attributes(web):
    node, base, client = web
    exam = _store(client, make_exam(seed=5, **SIZE))
    studies = client.search_for_studies(search_filters={"includefield": "all"})
    assert len(studies) == 1
    s = studies[0]
    for tag in (
        "00100010",
        "00100020",
        "00080020",
        "00080050",
        "00080061",
        "00201206",
        "00201208",
        "00081190",
    ):
        assert tag in s, tag
    assert s["00201208"]["Value"] == [4]
    series = requests.get(f"{base}/dicomweb/series", params={"Modality": "MG"}).json()
    assert len(series) == 1 and series[0]["00201209"]["Value"] == [4]
    instances = requests.get(
        f"{base}/dicomweb/instances", params={"SOPInstanceUID": exam[2].SOPInstanceUID}
    ).json()
    assert len(instances) == 1
    assert instances[0]["00280010"]["Value"] == [SIZE["rows"]]  # Rows
    assert instances[0]["00280011"]["Value"] == [SIZE["cols"]]  # Columns
    assert instances[0]["00081190"]["Value"][0].endswith(exam[2].SOPInstanceUID)


def test_thumbnails_rendered_parameters_and_wado_uri(web):
    import io

    from PIL import Image

    node, base, client = web
    ds = _store(client, [make_mammogram("L", "CC", seed=6, **SIZE)])[0]
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    for url in (
        f"/studies/{st}/thumbnail",
        f"/studies/{st}/series/{se}/thumbnail",
        f"/studies/{st}/series/{se}/instances/{sop}/thumbnail",
    ):
        r = requests.get(f"{base}/dicomweb{url}", headers={"Accept": "image/jpeg"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", url
        img = Image.open(io.BytesIO(r.content))
        assert max(img.size) <= 200
    inst = f"{base}/dicomweb/studies/{st}/series/{se}/instances/{sop}"
    r = requests.get(
        f"{inst}/rendered",
        params={"viewport": "100,100", "quality": "50"},
        headers={"Accept": "image/jpeg"},
    )
    img = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and max(img.size) == 100
    dark = requests.get(
        f"{inst}/rendered", params={"window": "4000,100"}, headers={"Accept": "image/png"}
    )
    bright = requests.get(
        f"{inst}/rendered", params={"window": "0,100"}, headers={"Accept": "image/png"}
    )
    assert (
        np.asarray(Image.open(io.BytesIO(dark.content))).mean()
        < np.asarray(Image.open(io.BytesIO(bright.content))).mean()
    )
    assert requests.get(f"{inst}/rendered", params={"viewport": "x"}).status_code == 400
    r = requests.get(
        f"{base}/wado",
        params={"requestType": "WADO", "studyUID": st, "seriesUID": se, "objectUID": sop},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = requests.get(
        f"{base}/wado",
        params={
            "requestType": "WADO",
            "studyUID": st,
            "seriesUID": se,
            "objectUID": sop,
            "contentType": "application/dicom",
        },
    )
    assert dcmread(io.BytesIO(r.content)).SOPInstanceUID == sop
    r = requests.get(
        f"{base}/wado",
        params={"requestType": "WADO", "studyUID": "../x", "seriesUID": se, "objectUID": sop},
    )
    assert r.status_code == 400


def test_cors_preflight_and_headers(web):
    node, base, _ = web
    origin = "http://viewer.example:3000"
    r = requests.options(
        f"{base}/dicomweb/studies",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "GET" in r.headers["access-control-allow-methods"]
    r = requests.get(f"{base}/dicomweb/studies", headers={"Origin": origin})
    assert r.headers["access-control-allow-origin"] == origin
    r = requests.get(f"{base}/dicomweb/studies", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_study_retrieve_streams_in_bounded_memory(web):
    """A 24-image, ~400 MB study retrieved through WADO-RS while the node's resident memory
    stays under 200 MB."""
    import psutil

    node, base, client = web
    bases = {}
    from inference.synthetic import phantom

    rng = np.random.default_rng(0)
    study = None
    total = 0
    for i in range(24):
        lat, view = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")][i % 4]
        if view not in bases:
            bases[view] = phantom(3328, 2560, view, rng)
        ds = make_mammogram(lat, view, pixels=bases[view], study_uid=study, seed=i)
        study = ds.StudyInstanceUID
        client.store_instances([ds])
        total += len(ds.PixelData)
    assert total > 390e6
    proc = psutil.Process(node.proc.pid)
    peak = 0
    received = 0
    with requests.get(
        f"{base}/dicomweb/studies/{study}",
        stream=True,
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(1 << 20):
            received += len(chunk)
            peak = max(peak, proc.memory_info().rss)
    assert received > total
    print(f"retrieved {received / 1e6:.0f} MB at a node peak RSS of {peak / 2**20:.0f} MB")
    assert peak < 200 * 2**20, peak / 2**20
