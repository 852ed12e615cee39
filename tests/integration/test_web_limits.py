"""DICOMweb under a hostile or clumsy client, in the test process (tests.helpers.WebInProcess):
the concurrency bound holds for streamed bodies and frees its slot whatever the client does."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import requests
from pydicom.uid import generate_uid

from inference.synthetic import make_mammogram
from tests.helpers import wait_for
from tests.integration.test_dicomweb_security import _part10, _stow


def _big_instance(seed: int, rows: int = 2048, cols: int = 2048):
    """An MG instance of rows x cols 16-bit pixels (8 MB at 2048 x 2048: more than the
    loopback socket buffers hold), built without synthesising a whole mammogram."""
    ds = make_mammogram("L", "CC", rows=64, cols=64, seed=seed)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = (
        np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    )
    ds.SOPInstanceUID = generate_uid()
    return ds


def _url(ds) -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
        f"instances/{ds.SOPInstanceUID}"
    )


def _slow_get(port: int, path: str, headers: str = "") -> socket.socket:
    """A GET from a client that reads the status line and headers, then nothing (a 4 KB
    receive buffer: the answer backs up into the node)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1024)
        assert chunk, "closed before the headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return s


def test_concurrency_bound_holds_streamed_bodies_and_frees_on_disconnect(web_factory):
    """max_concurrent_requests = 1: a WADO-RS answer still streaming to a reader that stopped
    reading holds the slot (another request -> 503, Retry-After: 1) until the client goes
    away; a client that reads to the end frees it too; clients that hang up before the
    answer starts leave no slot behind."""
    w = web_factory(max_concurrent_requests=1)
    ds = _big_instance(61)
    assert _stow(w.base, [_part10(ds)]).status_code == 200
    limit = w.web.limit
    assert limit is not None
    # (the STOW's slot is given back just after its answer's last byte)
    wait_for(lambda: limit.active == 0, 10, interval=0.01, what="the STOW's slot freed")

    stalled = _slow_get(w.port, _url(ds))
    try:
        assert limit.active == 1
        busy = requests.get(f"{w.base}/studies", timeout=10)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert busy.headers["X-Frame-Options"] == "DENY"
        # The probes are outside the bound.
        assert requests.get(f"{w.origin}/healthz", timeout=10).status_code == 200
        assert limit.active == 1  # still streaming: nothing read since the headers
    finally:
        stalled.close()  # the client goes away mid-body
    wait_for(lambda: limit.active == 0, 10, interval=0.02, what="the slot freed")
    assert requests.get(f"{w.base}/studies", timeout=10).status_code == 200

    # Read to the end: the slot is held until then, free after.
    r = requests.get(f"{w.origin}{_url(ds)}", stream=True, timeout=30)
    assert r.status_code == 200 and limit.active == 1
    assert len(r.content) > ds.Rows * ds.Columns * 2
    wait_for(lambda: limit.active == 0, 10, interval=0.02, what="the slot freed")

    # Clients that send a request and hang up at once, before any answer, one after the
    # other: each is handled (its completion event written) and leaves no slot behind.
    def ended() -> int:
        return sum(e["event"] == "DICOM Instances Transferred" for e in w.events())

    for _ in range(5):
        before = ended()
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
            s.sendall(f"GET {_url(ds)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        wait_for(lambda n=before: ended() == n + 1, 10, interval=0.01, what="handled")
        wait_for(lambda: limit.active == 0, 10, interval=0.01, what="no slot left behind")
    wait_for(lambda: limit.active == 0, 10, interval=0.02, what="no slot left behind")
    assert requests.get(f"{w.base}/studies", timeout=10).status_code == 200


@pytest.mark.parametrize("limit", [2])
def test_requests_beyond_the_bound_are_refused_not_queued(web_factory, limit):
    """Two stalled readers fill a bound of two; the third request is answered 503 at once,
    and the bound counts only requests that passed authentication (a 401 takes no slot)."""
    w = web_factory(max_concurrent_requests=limit, token="t0ken")
    ds = _big_instance(62)
    auth = {"Authorization": "Bearer t0ken"}
    assert _stow(w.base, [_part10(ds)], token="t0ken").status_code == 200
    wait_for(lambda: w.web.limit.active == 0, 10, interval=0.01, what="the STOW's slot freed")
    held = [_slow_get(w.port, _url(ds), "Authorization: Bearer t0ken\r\n") for _ in range(limit)]
    try:
        assert w.web.limit.active == limit
        assert requests.get(f"{w.base}/studies", timeout=10).status_code == 401
        r = requests.get(f"{w.base}/studies", headers=auth, timeout=10)
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    wait_for(lambda: w.web.limit.active == 0, 10, interval=0.02, what="the slots freed")
    assert requests.get(f"{w.base}/studies", headers=auth, timeout=10).status_code == 200


def test_every_wado_answer_ends_with_its_completion_event(web_factory):
    """PS3.15 A.5.3.4: each kind of WADO answer (instance, metadata, frames, bulk data,
    rendered, thumbnail, WADO-URI image and file) writes Begin Transferring and then DICOM
    Instances Transferred once sent whole (outcome 0); an answer the client walks away from
    halfway ends with outcome 8 and the reason. Rendered and thumbnail images of one instance
    are decoded once (the decode cache, node.wado.DecodedImages)."""
    w = web_factory()
    ds = _big_instance(63)
    assert _stow(w.base, [_part10(ds)]).status_code == 200
    inst = f"{w.origin}{_url(ds)}"
    uri = (
        f"{w.origin}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
        f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
    )
    octets = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for url, headers, service in (
        (inst, {}, "WADO-RS"),
        (f"{inst}/metadata", {}, "WADO-RS metadata"),
        (f"{inst}/frames/1", {"Accept": "application/octet-stream"}, "WADO-RS frames"),
        (f"{inst}/frames/1", octets, "WADO-RS frames"),
        (f"{inst}/bulkdata/7FE00010", {}, "WADO-RS bulkdata"),
        (f"{inst}/rendered", {"Accept": "image/png"}, "WADO-RS rendered"),
        (f"{inst}/thumbnail", {}, "WADO-RS rendered"),
        (f"{uri}&contentType=image/jpeg&rows=256", {}, "WADO-URI"),
        (f"{uri}&contentType=application/dicom", {}, "WADO-URI"),
    ):
        before = len(w.events())
        r = requests.get(url, headers=headers, timeout=30)
        assert r.status_code == 200, (url, r.text[:200])
        wait_for(lambda n=before: len(w.events()) >= n + 2, 10, interval=0.02, what=url)
        begin, end = w.events()[before : before + 2]
        assert (begin["event"], begin["service"]) == (
            "Begin Transferring DICOM Instances",
            service,
        ), begin
        assert (end["event"], end["service"], end["outcome"], end["instances"]) == (
            "DICOM Instances Transferred",
            service,
            0,
            1,
        ), end
        assert end["studies"] == [ds.StudyInstanceUID] and "reason" not in end
    assert w.web.decoded.decodes == 1  # rendered, thumbnail, WADO-URI image: one decode
    # Refused requests transfer nothing: no event.
    before = len(w.events())
    assert requests.get(f"{inst}/frames/2", timeout=30).status_code == 400
    assert requests.get(f"{uri}&contentType=text/html", timeout=30).status_code == 406
    assert len(w.events()) == before

    # Walked away from halfway: the study stream and the pixel data stream.
    for path in (_url(ds), f"{_url(ds)}/bulkdata/7FE00010"):
        before = len(w.events())
        _slow_get(w.port, path).close()
        wait_for(lambda n=before: len(w.events()) >= n + 2, 10, interval=0.02, what=path)
        end = w.events()[before + 1]
        assert (end["event"], end["outcome"]) == ("DICOM Instances Transferred", 8), end
        assert "went away" in end["reason"]
