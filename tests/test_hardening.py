"""Issue 18, sections 3-6: the node is hard to break (bad input from real clients, asserted
with the exact status)."""

from __future__ import annotations

from pathlib import Path

import requests
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from inference.synthetic import make_mammogram
from tests.helpers import free_port, wait_for
from tests.test_dicomweb_security import _part10, _stow
from tests.test_security import _deflated_bomb


def _web(node_factory, sections: dict | None = None, **dicomweb):
    """A node with DICOMweb on loopback (and the other ``sections`` of its config)."""
    port = free_port()
    settings = {"enabled": True, "host": "127.0.0.1", "port": port, "root": "/dicomweb",
                **dicomweb}
    node = node_factory({**(sections or {}), "dicomweb": settings})
    base = f"http://127.0.0.1:{port}/dicomweb"

    def up():
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return True
        except requests.RequestException:
            return False
    wait_for(up, 30, what="DICOMweb up")
    return node, base


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


# -- 4. STOW parts through the streaming validation -------------------------------------------
def test_stow_deflate_bomb_is_refused_at_the_cap_in_a_stream(node_factory, tmp_path):
    """A ~200 KB Deflated part that inflates to 200 MB: refused 0xA700 at max_dataset_mb,
    inflated in a stream (the node's peak RSS grows by far less than the inflated size);
    the part beside it, and a part sent without preamble, are stored."""
    node, base = _web(node_factory, {"node": {"max_dataset_mb": 50}}, max_request_mb=64)
    bomb = _deflated_bomb(tmp_path / "bomb.dcm", 10240, 10240)  # 200 MiB of pixel data
    assert bomb.stat().st_size < 400 * 1024
    ok = _part10(make_mammogram("L", "CC", rows=64, cols=64, seed=21))
    raw = DicomBytesIO()
    dcmwrite(raw, make_mammogram("L", "MLO", rows=64, cols=64, seed=21))  # no preamble
    assert raw.getvalue()[128:132] != b"DICM"
    hwm_before = _status_kb(node.proc.pid, "VmHWM")
    r = _stow(base, [bomb.read_bytes(), ok, raw.getvalue()])
    assert r.status_code == 202, r.text
    js = r.json()
    failed = js["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xA700]
    assert len(js["00081199"]["Value"]) == 2
    assert "inflates beyond [node] max_dataset_mb" in r.headers["Warning"]
    grown_mb = (_status_kb(node.proc.pid, "VmHWM") - hwm_before) / 1024
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"
    assert node.incoming_files() == []
    assert requests.get(f"{base}/studies").status_code == 200


# -- 4. TLS handshake off the accept thread, with a deadline ----------------------------------
def test_idle_tcp_connection_does_not_block_tls_peers(node_factory, pki):
    """A plain TCP connection to the TLS port that never sends a ClientHello: another peer's
    TLS C-ECHO (DCMTK echoscu +tls) is answered meanwhile, and the idle connection is closed
    at network_timeout_seconds."""
    import socket
    import subprocess
    import time

    from tests.helpers import dcmtk
    from tests.test_tls import _tls

    node = node_factory({"node": {"tls": True, "network_timeout_seconds": 3},
                         "tls": _tls(pki)})
    idle = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    try:
        key, crt = pki.pair("client")
        t0 = time.monotonic()
        r = subprocess.run([dcmtk("echoscu"), "+tls", str(key), str(crt), "+cf", str(pki.ca),
                            "-to", "5", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stdout + r.stderr
        assert time.monotonic() - t0 < 2.5  # before the idle peer's deadline
        assert idle.recv(1) == b""  # closed by the node at its deadline (not by our timeout)
        assert time.monotonic() - t0 < 8
    finally:
        idle.close()
    assert "TLS handshake with 127.0.0.1" in node.log.read_text()


# -- 4. Unauthenticated bodies capped while they stream; frame lists -------------------------
def test_sign_in_body_is_capped_while_it_streams(node_factory):
    """POST /ui/login reads nothing past 4 KB: a declared 300 MB body and a chunked 8 MB
    body without a length are both answered 413; the node's RSS does not grow with them."""
    node, base = _web(node_factory, token="a-token")
    url = base.replace("/dicomweb", "") + "/ui/login"
    rss = _status_kb(node.proc.pid, "VmRSS")

    def chunks(n_mb: int):
        block = b"token=" + b"x" * (1 << 20)
        for _ in range(n_mb):
            yield block
    r = requests.post(url, data=chunks(8), timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413, r.status_code
    r = requests.post(url, data=b"token=" + b"x" * 5000, timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    assert (_status_kb(node.proc.pid, "VmRSS") - rss) / 1024 < 30
    r = requests.post(url, data={"token": "a-token"}, allow_redirects=False, timeout=30)
    assert r.status_code == 303


def test_frame_lists_are_bounded_and_multipart_frames_stream(node_factory):
    """frames/1,1 -> 400 (a frame named twice); 2,000 numbers in the URL -> 400; a
    multi-frame answer is streamed (chunked, no Content-Length)."""
    from pydicom.uid import generate_uid

    node, base = _web(node_factory)
    ds = make_mammogram("R", "CC", rows=32, cols=32, seed=31)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.SOPInstanceUID = generate_uid()
    assert _stow(base, [_part10(ds)]).status_code == 200
    inst = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}")
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    r = requests.get(f"{inst}/frames/1,1", headers=accept, timeout=30)
    assert r.status_code == 400 and "more than once" in r.json()["error"]
    r = requests.get(f"{inst}/frames/" + ",".join(["1"] * 2000), headers=accept, timeout=30)
    assert r.status_code == 400 and "at most" in r.json()["error"]
    r = requests.get(f"{inst}/frames/3,1,2", headers=accept, timeout=30)
    assert r.status_code == 200, r.text
    assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
    boundary = r.headers["content-type"].split("boundary=")[1].encode()
    parts = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in r.content.split(b"--" + boundary)[1:-1]]
    size = 32 * 32 * 2
    assert parts == [ds.PixelData[(n - 1) * size:n * size] for n in (3, 1, 2)]


# -- 3. No slow work on network threads --------------------------------------------------------
def _qido_latencies(base: str, n: int | None = None, until=None) -> list[float]:
    import time

    out = []
    while (n is not None and len(out) < n) or (until is not None and not until()):
        t0 = time.perf_counter()
        r = requests.get(f"{base}/studies", timeout=30)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200
    return out


def test_qido_answers_while_a_400_mb_stow_is_received(node_factory):
    """While a 400 MB STOW body streams in (and is scanned and refused), QIDO queries keep
    answering: the slowest is within 200 ms over the slowest of an idle baseline."""
    import statistics
    import threading

    node, base = _web(node_factory)
    for seed in (41, 42):
        assert _stow(base, [_part10(make_mammogram("L", "CC", rows=32, cols=32,
                                                   seed=seed))]).status_code == 200
    baseline = _qido_latencies(base, n=20)
    boundary = b"big-boundary"
    block = bytes(1 << 20)

    def body():
        yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(400):
            yield block
        yield b"\r\n--" + boundary + b"--\r\n"
    result: dict = {}
    done = threading.Event()

    def stow():
        try:
            result["r"] = requests.post(
                f"{base}/studies", data=body(), timeout=300,
                headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                         f"boundary={boundary.decode()}"})
        finally:
            done.set()
    t = threading.Thread(target=stow)
    t.start()
    wait_for(lambda: list((node.data_dir / "incoming").rglob("stow-*.body")), 30,
             interval=0.01, what="the STOW under way")
    during = _qido_latencies(base, until=done.is_set)
    t.join(300)
    assert result["r"].status_code == 409  # 400 MB of zeros is not a DICOM dataset
    assert len(during) >= 5, "the STOW ended before it could be measured"
    print(f"QIDO idle median {statistics.median(baseline) * 1000:.1f} ms, max "
          f"{max(baseline) * 1000:.1f} ms; during the STOW max {max(during) * 1000:.1f} ms "
          f"over {len(during)} queries")
    assert max(during) < max(baseline) + 0.2


def test_association_accepted_at_once_while_a_purge_runs(tmp_path):
    """While a retention pass holds the purge lock: a storage association is accepted within
    100 ms of an idle baseline; below the free-space reserve it is answered at once
    (rejected, transient: retry) and the retention thread is woken, instead of a purge (or
    a wait for the running one) on the accepting thread. An in-process node: the test holds
    the very lock a running purge holds."""
    import os
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation
    from sqlalchemy.engine import make_url

    from node.config import load_config
    from node.daemon import Node
    from tests.helpers import NodeProcess

    spec = NodeProcess(tmp_path, {"retention": {"check_seconds": 3600}})
    umask = os.umask(0o022)
    os.umask(umask)
    node = Node(load_config(spec.config), run_worker=False)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
    ae.acse_timeout = 10

    def associate() -> tuple[float, bool, int | None]:
        """(seconds to the answer, accepted, the rejection's result)."""
        t0 = time.perf_counter()
        assoc = ae.associate("127.0.0.1", spec.port, ae_title=spec.ae_title)
        elapsed = time.perf_counter() - t0
        accepted = assoc.is_established
        result = assoc.acceptor.primitive.result if assoc.is_rejected else None
        if accepted:
            assoc.release()
        return elapsed, accepted, result
    try:
        node.start()
        baseline = []
        for _ in range(3):
            elapsed, accepted, _ = associate()
            assert accepted
            baseline.append(elapsed)
        with node._retention_lock:  # a purge in progress
            held = []
            for _ in range(3):
                elapsed, accepted, _ = associate()
                assert accepted
                held.append(elapsed)
            assert max(held) < max(baseline) + 0.1, (baseline, held)
            node.ingest.min_free = 1 << 62  # now below the reserve
            elapsed, accepted, result = associate()
            assert not accepted and result == 0x02
            assert elapsed < max(baseline) + 1.0, elapsed  # pynetdicom's reject path
            lock_file = Path(f"{make_url(node.db.url).database}.retention.lock")
            assert not lock_file.exists()  # no retention pass yet (check_seconds = 3600)
        # The woken retention thread runs its pass once the lock is free.
        wait_for(lock_file.exists, 10, interval=0.02, what="the retention thread woken")
    finally:
        node.stop()
        os.umask(umask)
