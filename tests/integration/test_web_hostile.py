"""DICOMweb as a hostile client uses it, in the test process (tests.helpers.WebInProcess):
path tricks, malformed multipart bodies, oversized headers, parameters out of range and
clients that vanish mid-upload get a clear 4xx (or nothing, when nobody is left to answer),
never a 500 or a traceback, and leave nothing behind."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import requests

from inference.synthetic import make_mammogram
from tests.helpers import wait_for
from tests.integration.test_dicomweb_security import _part10, _stow

T = 'multipart/related; type="application/dicom"'


class _Errors(logging.Handler):
    """ERROR records of uvicorn ("Exception in ASGI application") and of the node."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def hostile(web_factory):
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "mammo_node")]
    for lg in loggers:
        lg.addHandler(errors)
    w = web_factory()
    ds = make_mammogram("L", "CC", rows=64, cols=64, seed=71)
    assert _stow(w.base, [_part10(ds)]).status_code == 200
    yield w, ds, errors
    for lg in loggers:
        lg.removeHandler(errors)
    assert errors.records == []


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_path_and_parameter_tricks_are_refused_plainly(hostile):
    w, ds, _ = hostile
    inst = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
        f"instances/{ds.SOPInstanceUID}"
    )
    for path, status in (
        ("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd", 404),
        (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/../../../../etc/passwd", 404),
        ("/dicomweb/studies/%00/metadata", 404),
        ("/dicomweb/studies/" + "1" * 5000, 404),
        (f"{inst}/bulkdata/..%2F..%2Fetc", 404),
        (f"{inst}/frames/0", 400),
        (f"{inst}/frames/1,", 400),
        (f"{inst}/frames/99999999999999999999", 400),
        (f"{inst}/rendered?window=nan,nan", 400),
        (f"{inst}/rendered?window=inf,1e309", 400),
        (f"{inst}/rendered?window=40,0", 400),
        (f"{inst}/rendered?viewport=99999999999999999999,1", 400),
        ("/wado?requestType=WADO&studyUID=../../x&seriesUID=1.2&objectUID=1.3", 400),
        (
            f"/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
            f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}&windowCenter=nan"
            "&windowWidth=1",
            400,
        ),
        ("/dicomweb/studies?offset=99999999999999999999999", 400),  # was a 500
        ("/dicomweb/studies?offset=-1", 400),
        ("/dicomweb/studies?limit=99999999999999999999999", 200),  # the cap applies
        ("/dicomweb/studies?PatientName=" + "*" * 5000, 200),
    ):
        r = requests.get(w.origin + path, timeout=30)
        assert r.status_code == status, (path[:80], r.status_code, r.text[:200])
        assert "root:" not in r.text
    # An Accept header of nothing but garbage is ignored (was a 500: IndexError).
    for path in (inst, f"{inst}/frames/1", f"{inst}/rendered"):
        r = requests.get(w.origin + path, headers={"Accept": ";;;,,,q=abc"}, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    # Oversized request lines and headers: the HTTP parser refuses them (400), at 16 KB.
    for data in (
        b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        + b"a" * (1 << 20)
        + b"\r\n\r\n",
        b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 20000 + b"\r\n",
        b"GET /dicomweb/studies?" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n",
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
    ):
        assert _raw(w.port, data).startswith(b"HTTP/1.1 400 "), data[:60]


def test_malformed_multipart_bodies_get_a_reason_never_a_500(hostile):
    w, ds, _ = hostile
    part = _part10(make_mammogram("L", "MLO", rows=32, cols=32, seed=72))
    head = b"--abc\r\nContent-Type: application/dicom\r\n\r\n"
    abc = T + "; boundary=abc"
    for ctype, body, status, says in (
        (T, b"x", 400, "without a boundary"),
        (T + '; boundary=""', b"--\r\n\r\n", 400, "without a boundary"),
        (abc, b"hello", 400, "never appears"),
        (abc, head + part, 400, "without a closing boundary"),
        (
            abc,
            b"--abc\r\nContent-Type: application/dicom\r\n"
            + b"X: y\r\n" * 5000
            + b"\r\n--abc--\r\n",
            400,
            "ends its headers",
        ),
        (abc, b"--abc--\r\n", 400, "without any part"),
        (abc, b"", 400, "empty body"),
        (abc, head + b"\r\n--abc--\r\n", 409, None),  # an empty part
        (abc, head + bytes(128) + b"DICM\r\n--abc--\r\n", 409, None),
        (abc, head + part[:140] + b"\r\n--abc--\r\n", 409, None),  # cut in its meta
        (abc, b"--abc\r\nContent-Type: text/html\r\n\r\n<p>\r\n--abc--\r\n", 409, None),
    ):
        r = requests.post(
            f"{w.base}/studies", data=body, headers={"Content-Type": ctype}, timeout=30
        )
        assert r.status_code == status, (body[:60], r.status_code, r.text[:200])
        if says:
            assert says in r.json()["error"]
        else:
            assert r.headers["Warning"].startswith("299 mammo-node:")
    # A part without headers (RFC 2046 allows it) is a part: refused for its missing type,
    # not as a malformed body; a boundary sent in latin-1 is the boundary.
    r = requests.post(
        f"{w.base}/studies",
        data=b"--abc\r\n\r\n" + part + b"\r\n--abc--\r\n",
        headers={"Content-Type": abc},
        timeout=30,
    )
    assert r.status_code == 409 and "application/octet-stream" in r.headers["Warning"]
    b = "\u00e9t\u00e9".encode("latin-1")
    r = requests.post(
        f"{w.base}/studies",
        data=b"--" + b + b"\r\nContent-Type: "
        b"application/dicom\r\n\r\n" + part + b"\r\n--" + b + b"--\r\n",
        headers={"Content-Type": (T + "; boundary=").encode() + b},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert list(w.node.files.incoming.rglob("*.dcm")) == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_vanishing_mid_stow_leaves_nothing_and_no_traceback(hostile, caplog, framing):
    """The peer goes away halfway through its STOW body: nothing stored or left in
    incoming/, a WARNING and an audit line saying so (no "Exception in ASGI application"),
    and the node answers the next client."""
    w, ds, _ = hostile
    part = _part10(make_mammogram("R", "CC", rows=256, cols=256, seed=73))
    length = (
        b"Content-Length: 10000000\r\n"
        if framing == "content-length"
        else b"Transfer-Encoding: chunked\r\n"
    )
    before = len(w.events())
    s = socket.create_connection(("127.0.0.1", w.port), timeout=10)
    s.sendall(
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        + (T + "; boundary=abc").encode()
        + b"\r\n"
        + length
        + b"\r\n"
        + (b"" if framing == "content-length" else b"100000\r\n")
        + b"--abc\r\nContent-Type: application/dicom\r\n\r\n"
        + part[:60000]
    )
    wait_for(
        lambda: list(w.node.files.incoming.rglob("stow-*.body")),
        10,
        interval=0.01,
        what="the STOW under way",
    )
    time.sleep(0.05)
    s.close()
    wait_for(
        lambda: any(
            e.get("service") == "STOW-RS" and e["outcome"] == 4 for e in w.events()[before:]
        ),
        10,
        interval=0.02,
        what="the cut STOW audited",
    )
    wait_for(
        lambda: (
            not list(w.node.files.incoming.rglob("*"))
            or all(p.is_dir() for p in w.node.files.incoming.rglob("*"))
        ),
        10,
        interval=0.02,
        what="incoming/ emptied",
    )
    assert "the client went away after" in caplog.text
    assert requests.get(f"{w.base}/studies", timeout=10).status_code == 200
    assert w.node.reports.instance_count() == 1  # the fixture's image only


def test_an_unwritable_audit_trail_refuses_at_the_front_door_with_503(web_factory):
    """[audit] fail_closed and a trail that cannot be written (/dev/full): a request whose
    refusal must be audited (a wrong token) is answered 503 with Retry-After, as the routes
    answer, not a 500 from the middleware."""
    w = web_factory({"audit": {"path": "/dev/full", "fail_closed": True}}, token="s3cret")
    r = requests.get(f"{w.base}/studies", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.text
    assert "audit trail" in r.json()["error"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert requests.get(f"{w.origin}/healthz", timeout=10).status_code == 200
