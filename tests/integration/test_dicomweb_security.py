"""DICOMweb security: secure defaults, tokens with services, bounded queries and uploads."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from inference.synthetic import make_mammogram
from node.dicomweb import public_message
from storage.query import like_pattern
from tests.helpers import NodeProcess, free_port, wait_for

VIEWER, UPLOADER = "viewer-secret", "uploader-secret"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _web(node_factory, **dicomweb):
    port = free_port()
    settings = {"enabled": True, "host": "127.0.0.1", "port": port, "root": "/dicomweb"}
    settings.update(dicomweb)
    node = node_factory({"dicomweb": settings})
    base = f"http://127.0.0.1:{port}/dicomweb"

    def up():
        try:
            requests.get(f"{base}/studies", timeout=2)
            return True
        except requests.RequestException:
            return False

    wait_for(up, 30, what="DICOMweb up")
    return node, base


def _part10(ds) -> bytes:
    buf = DicomBytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _stow(base: str, body_parts: list[bytes], token: str | None = None, **kw):
    boundary = "mammo-test-boundary"
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
            for p in body_parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{base}/studies", data=body, headers=headers, timeout=60, **kw)


def test_start_refused_on_a_public_address_without_a_token(tmp_path):
    node = NodeProcess(
        tmp_path, {"dicomweb": {"enabled": True, "host": "0.0.0.0", "port": free_port()}}
    )
    r = subprocess.run(
        [sys.executable, "-m", "node", "start", "--config", str(node.config), "--no-worker"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "[dicomweb] token" in r.stderr and "[[dicomweb.tokens]]" in r.stderr
    assert "127.0.0.1" in r.stderr


@pytest.mark.unit
def test_shipped_config_serves_dicomweb_on_loopback_only():
    from node.config import load_config

    cfg = load_config("config.toml")
    assert cfg.dicomweb.host == "127.0.0.1" and cfg.dicomweb.is_loopback
    assert cfg.peers == []  # query/retrieve refused until peers are granted it
    cfg.check_startable()


def test_tokens_have_services_and_failures_are_audited(node_factory):
    node, base = _web(
        node_factory,
        tokens=[
            {"name": "viewer", "sha256": _sha(VIEWER), "services": ["qido", "wado"]},
            {"name": "uploader", "sha256": _sha(UPLOADER), "services": ["stow"]},
        ],
    )
    assert VIEWER not in node.config.read_text()  # only hashes in the file
    ds = make_mammogram("L", "CC", rows=64, cols=64, seed=91)
    up = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {UPLOADER}"})
    assert len(up.store_instances([ds]).ReferencedSOPSequence) == 1
    view = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {VIEWER}"})
    assert len(view.search_for_studies()) == 1
    assert (
        view.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        ).SOPInstanceUID
        == ds.SOPInstanceUID
    )
    r = _stow(base, [_part10(make_mammogram("R", "CC", rows=64, cols=64))], token=VIEWER)
    assert r.status_code == 403 and "stow" in r.json()["error"]
    r = requests.get(f"{base}/studies", headers={"Authorization": f"Bearer {UPLOADER}"})
    assert r.status_code == 403
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": VIEWER}):
        r = requests.get(f"{base}/studies", headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    node.stop()
    events = [json.loads(x) for x in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    failures = [e for e in events if e["event"] == "User Authentication" and e["outcome"]]
    assert len(failures) >= 3 and failures[-1]["peer"]["address"] == "127.0.0.1"  # + the probe
    queries = [e for e in events if e["event"] == "Query"]
    assert queries[0]["peer"]["token"] == "viewer" and queries[0]["matched_studies"] == 1
    stores = [e for e in events if e["event"] == "DICOM Instances Transferred"]
    assert stores[0]["peer"]["token"] == "uploader" and stores[0]["study"] == ds.StudyInstanceUID


def test_qido_limit_offset_and_the_result_cap(node_factory):
    node, base = _web(node_factory, max_results=2)
    studies = []
    for i in range(3):
        ds = make_mammogram(
            "L", "CC", rows=32, cols=32, seed=100 + i, patient_name=f"Name^{'a' * 30}{i}"
        )
        studies.append(ds.StudyInstanceUID)
        assert _stow(base, [_part10(ds)]).status_code == 200
    for bad in ("limit=abc", "limit=-1", "offset=x", "offset=-3", "limit=1.5"):
        r = requests.get(f"{base}/studies?{bad}")
        assert r.status_code == 400, bad
    r = requests.get(f"{base}/studies")
    assert len(r.json()) == 2 and "exceeded the maximum" in r.headers["Warning"]
    assert [s["0020000D"]["Value"][0] for s in r.json()] == studies[:2]
    r = requests.get(f"{base}/studies?limit=1&offset=2")
    assert [s["0020000D"]["Value"][0] for s in r.json()] == studies[2:]
    assert "Warning" not in r.headers
    # A pattern that makes a backtracking matcher explode answers at once, correctly.
    r = requests.get(
        f"{base}/studies", params={"PatientName": "*a*a*a*a*a*a*a*a*a*b", "limit": "10"}
    )
    assert r.status_code == 200 and r.json() == []
    r = requests.get(f"{base}/studies", params={"PatientName": "name^*A*A*2"})
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [studies[2]]  # PN: any case
    r = requests.get(f"{base}/studies", params={"PatientName": "Name^a%"})
    assert r.json() == []  # SQL wildcards are data, not patterns


def test_stow_request_size_and_concurrency_are_bounded(node_factory):
    node, base = _web(node_factory, max_request_mb=1, max_concurrent_requests=1)
    big = make_mammogram("L", "CC", rows=1024, cols=800, seed=5)
    r = _stow(base, [_part10(big)])
    assert r.status_code == 413 and "max_request_mb" in r.json()["error"]
    # A client that sends slowly holds the only slot; the next request is told to retry.
    release = threading.Event()

    def slow_body():
        boundary = b"--slow\r\nContent-Type: application/dicom\r\n\r\n"
        yield boundary
        release.wait(30)
        yield _part10(make_mammogram("L", "MLO", rows=32, cols=32, seed=6)) + b"\r\n--slow--\r\n"

    result = {}

    def slow():
        result["r"] = requests.post(
            f"{base}/studies",
            data=slow_body(),
            timeout=60,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=slow'},
        )

    t = threading.Thread(target=slow)
    t.start()
    try:
        # The STOW holds the slot once its spool file exists (nothing else may poll before:
        # a poll could take the only slot and the STOW would be the one refused).
        wait_for(
            lambda: list((node.data_dir / "incoming").rglob("stow-*.body")),
            30,
            interval=0.02,
            what="the slow STOW under way",
        )
        r = requests.get(f"{base}/studies", timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert "too many concurrent requests" in r.json()["error"]
    finally:
        release.set()
        t.join(60)
    assert result["r"].status_code == 200
    assert requests.get(f"{base}/studies").status_code == 200


def test_stow_warning_header_never_carries_server_paths(node_factory):
    node, base = _web(node_factory)
    data = _part10(make_mammogram("L", "CC", rows=128, cols=128, seed=7))
    r = _stow(base, [data[: len(data) // 2]])
    assert r.status_code == 409
    warning = r.headers["Warning"]
    assert "truncated" in warning or "needs" in warning or "ends" in warning
    assert str(node.data_dir) not in warning and "/tmp" not in warning
    assert (
        public_message(f"cannot parse {node.data_dir}/incoming/tmpab12.dcm: bad")
        == "cannot parse <path>: bad"
    )


@pytest.mark.unit
def test_wildcard_matching_in_sql_agrees_with_a_reference_and_stays_fast():
    """DICOM ``*`` / ``?`` as the database matches them (LIKE with escaping, case-sensitive
    as the node sets SQLite up), against a regular-expression reference."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA case_sensitive_like=ON")

    def wildcard_match(pattern: str, value: str, fold: bool = False) -> bool:
        if fold:
            pattern, value = pattern.lower(), value.lower()
        return bool(
            db.execute("SELECT ? LIKE ? ESCAPE '\\'", (value, like_pattern(pattern))).fetchone()[0]
        )

    rng = random.Random(7)
    alphabet = "ab*?%_"
    for _ in range(3000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        value = "".join(rng.choice("ab%_") for _ in range(rng.randint(0, 10)))
        rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        assert wildcard_match(pattern, value) == bool(re.fullmatch(rx, value, re.S)), (
            pattern,
            value,
        )
    assert wildcard_match("ALPHA*", "alpha^ann", fold=True)
    assert not wildcard_match("*a" * 40 + "b", "a" * 4000)  # quadratic at worst, not 2^n


@pytest.mark.unit
@pytest.mark.parametrize("value", ["127.0.0.1", "::1", "localhost"])
def test_loopback_addresses(value):
    from node.config import is_loopback

    assert is_loopback(value) and not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
