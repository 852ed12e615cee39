"""Large enhanced multi-frame volumes (Breast Tomosynthesis, 1.2.840.10008.5.1.4.1.1.13.1.3)
through a real node: received over C-STORE (DCMTK storescu, pynetdicom) and STOW-RS at bounded
memory, validated (functional groups), answered in QIDO-RS with NumberOfFrames, retrievable
as WADO-RS frames (any frame, lists, streamed), purged by retention.

Volumes are written to disk frame by frame (:func:`inference.synthetic.write_tomo_volume`):
the test never holds one in memory either."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import requests
from pydicom import dcmread

from inference.synthetic import volume_frame, write_tomo_volume
from tests.helpers import dcmtk, free_port, send, wait_for

FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"'


def _node(node_factory, **sections):
    port = free_port()
    node = node_factory(
        {
            "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": port, "root": "/dicomweb"},
            **sections,
        }
    )
    base = f"http://127.0.0.1:{port}/dicomweb"

    def up() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
        except requests.ConnectionError:
            return False

    wait_for(up, 30, what="the DICOMweb server")
    return node, base


def _parts(resp: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related answer."""
    m = re.search(r'boundary="?([^";]+)"?', resp.headers["content-type"])
    assert m, resp.headers["content-type"]
    sep = b"--" + m.group(1).encode()
    out = []
    for chunk in resp.content.split(sep)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        out.append(body[:-2] if body.endswith(b"\r\n") else body)
    return out


def _frame(body: bytes, rows: int, cols: int) -> np.ndarray:
    return np.frombuffer(body, dtype="<u2").reshape(rows, cols)


def _stow_body(dcm: Path, out: Path) -> str:
    """A one-part STOW-RS body written to ``out`` (copied in blocks); its Content-Type."""
    boundary = uuid.uuid4().hex
    with open(out, "wb") as f:
        f.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        with open(dcm, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
        f.write(f"\r\n--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stow(base: str, dcm: Path, tmp: Path) -> requests.Response:
    body = tmp / f"{dcm.stem}.stow"
    ctype = _stow_body(dcm, body)
    with open(body, "rb") as f:  # requests streams a file body
        return requests.post(
            f"{base}/studies",
            data=f,
            timeout=300,
            headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
        )


def _instance_url(base: str, path: Path) -> tuple[str, str, str, str]:
    h = dcmread(path, stop_before_pixels=True)
    return (
        f"{base}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}/instances/"
        f"{h.SOPInstanceUID}",
        h.StudyInstanceUID,
        h.SeriesInstanceUID,
        h.SOPInstanceUID,
    )


def test_volume_frames_qido_and_retention(node_factory, tmp_path):
    node, base = _node(node_factory, retention={"keep_images_days": 0.00002, "check_seconds": 1})
    rows = cols = 512
    current = write_tomo_volume(
        tmp_path / "current.dcm",
        "L",
        "CC",
        frames=60,
        rows=rows,
        cols=cols,
        patient_id="VOL-1",
        accession="VOLACC1",
    )
    # -R: propose the file's own SOP Class (storescu's default list lacks the volumes).
    r = subprocess.run(
        [dcmtk("storescu"), "-R", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(current)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    url, study, series, sop = _instance_url(base, current)

    # QIDO-RS says how many frames the instance has.
    found = requests.get(f"{base}/studies/{study}/instances", timeout=30).json()
    assert len(found) == 1
    assert found[0]["00280008"]["Value"] == [60]
    assert found[0]["00080016"]["Value"] == ["1.2.840.10008.5.1.4.1.1.13.1.3"]

    # One frame, single part and multipart; the last frame; a list in the asked order.
    one = requests.get(
        f"{url}/frames/37", headers={"Accept": "application/octet-stream"}, timeout=30
    )
    assert one.status_code == 200, one.text
    assert np.array_equal(_frame(one.content, rows, cols), volume_frame(37, rows, cols))
    last = requests.get(f"{url}/frames/60", headers={"Accept": FRAMES_ACCEPT}, timeout=30)
    assert last.status_code == 200 and "multipart/related" in last.headers["content-type"]
    [body] = _parts(last)
    assert np.array_equal(_frame(body, rows, cols), volume_frame(60, rows, cols))
    many = requests.get(f"{url}/frames/59,1,30", headers={"Accept": FRAMES_ACCEPT}, timeout=30)
    got = [_frame(b, rows, cols) for b in _parts(many)]
    assert [int(g[0, 0]) for g in got] == [59, 1, 30]
    assert all(
        np.array_equal(g, volume_frame(n, rows, cols))
        for g, n in zip(got, (59, 1, 30), strict=True)
    )
    # Frames that do not exist: 400, not a truncated answer.
    assert (
        requests.get(f"{url}/frames/61", headers={"Accept": FRAMES_ACCEPT}, timeout=30).status_code
        == 400
    )
    assert (
        requests.get(f"{url}/frames/0", headers={"Accept": FRAMES_ACCEPT}, timeout=30).status_code
        == 400
    )
    # Rendered frame 60 (a PNG of that frame, read alone from the file).
    png = requests.get(f"{url}/frames/60/rendered", headers={"Accept": "image/png"}, timeout=30)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Pixel Data as bulk data: streamed from the file, every frame in order.
    bulk = requests.get(
        f"{url}/bulkdata/7FE00010", headers={"Accept": "application/octet-stream"}, timeout=60
    )
    assert len(bulk.content) == 60 * rows * cols * 2
    assert np.array_equal(
        _frame(bulk.content[-rows * cols * 2 :], rows, cols), volume_frame(60, rows, cols)
    )

    # The same patient's volume of two years before, by STOW-RS: a prior (gap rule), kept
    # for comparison, never read: retention purges it keep_images_days after it arrived.
    prior = write_tomo_volume(
        tmp_path / "prior.dcm",
        "L",
        "CC",
        frames=60,
        rows=rows,
        cols=cols,
        patient_id="VOL-1",
        accession="VOLACC0",
        acquisition=dt.datetime(2024, 1, 15, 9, 0),
    )
    resp = _stow(base, prior, tmp_path)
    assert resp.status_code == 200, resp.text
    prior_url, prior_study, _, prior_sop = _instance_url(base, prior)
    assert node.exam(prior_study)["state"] == "prior"
    wait_for(
        lambda: node.exam(prior_study)["images_purged_at"],
        30,
        what="the prior purged by the daemon's retention",
    )
    stems = {p.stem for p in node.stored_files()}
    assert prior_sop not in stems and sop in stems  # the current exam is not read yet: kept
    assert (
        requests.get(
            f"{prior_url}/frames/1", headers={"Accept": FRAMES_ACCEPT}, timeout=30
        ).status_code
        == 404
    )
    assert requests.get(f"{base}/studies/{prior_study}/instances", timeout=30).json() == []
    assert node.exam(study)["state"] in ("receiving", "ready")


def test_volume_with_bad_functional_groups_is_refused(node_factory, tmp_path):
    """Per-frame Functional Groups items that do not match Number of Frames: over C-STORE
    (pynetdicom, DCMTK storescu) refused 0xC210 while it arrives, at the Pixel Data header
    (nothing of its frames written), a FailedSOPSequence over STOW-RS; nothing left on disk."""
    node, base = _node(node_factory)
    path = write_tomo_volume(tmp_path / "v.dcm", frames=12, rows=256, cols=256)
    ds = dcmread(path)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:11]
    ds.save_as(path)
    pixels_at = path.read_bytes().rindex(b"\xe0\x7f\x10\x00OW")
    assert send(node.port, [path], max_pdu=16384) == [0xC210]
    r = subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            "-R",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Error: CannotUnderstand" in r.stderr, r.stdout + r.stderr  # 0xC210
    refusals = re.findall(
        r"Per-frame Functional Groups Sequence holds 11 items.*refused "
        r"while it arrived, at byte (\d+)",
        node.log.read_text(),
    )
    assert len(refusals) == 2, node.log.read_text()[-3000:]
    # Refused in the block that carried the Pixel Data header: the frames (1.5 MB) never
    # reached the disk.
    assert all(int(at) <= pixels_at for at in refusals), (refusals, pixels_at)
    resp = _stow(base, path, tmp_path)
    assert resp.status_code == 409
    assert "Per-frame Functional Groups Sequence holds 11 items" in resp.headers["Warning"]
    assert node.stored_files() == [] and node.incoming_files() == []


def _rss_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_node_memory_stays_bounded_receiving_a_400_mb_volume(node_factory, tmp_path):
    """A 400 MB volume by C-STORE and by STOW-RS: the node's peak resident size grows by a
    small fraction of it (the data streams to disk and is validated from there), and any of
    its frames comes back."""
    node, base = _node(node_factory)
    assert node.proc is not None
    pid = node.proc.pid
    rows, cols, frames = 2048, 1024, 100  # 4 MiB a frame, 400 MiB
    big = write_tomo_volume(
        tmp_path / "big.dcm", "R", "MLO", frames=frames, rows=rows, cols=cols, patient_id="VOL-2"
    )
    assert big.stat().st_size > 400 * 2**20
    baseline = _rss_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    assert send(node.port, [big]) == [0]  # pynetdicom streams the file (chunked send)
    url, study, _, sop = _instance_url(base, big)
    # A frame near the end, then a list across the volume.
    last = requests.get(f"{url}/frames/{frames}", headers={"Accept": FRAMES_ACCEPT}, timeout=60)
    [body] = _parts(last)
    assert np.array_equal(_frame(body, rows, cols), volume_frame(frames, rows, cols))
    peak_cstore = _rss_kb(pid, "VmHWM") - baseline
    # STOW-RS of the same size (another instance of the study: a new SOP Instance UID).
    ds = dcmread(big, stop_before_pixels=True)
    other = write_tomo_volume(
        tmp_path / "big2.dcm",
        "L",
        "MLO",
        frames=frames,
        rows=rows,
        cols=cols,
        patient_id="VOL-2",
        study_uid=ds.StudyInstanceUID,
    )
    big.unlink()
    resp = _stow(base, other, tmp_path)
    assert resp.status_code == 200, resp.text
    url2, _, _, sop2 = _instance_url(base, other)
    many = requests.get(
        f"{url2}/frames/1,50,{frames}", headers={"Accept": FRAMES_ACCEPT}, timeout=60
    )
    assert [int(_frame(b, rows, cols)[0, 0]) for b in _parts(many)] == [1, 50, frames]
    peak = _rss_kb(pid, "VmHWM") - baseline
    found = requests.get(f"{base}/studies/{study}/instances", timeout=30).json()
    assert sorted(f["00280008"]["Value"][0] for f in found) == [frames, frames]
    assert {sop, sop2} <= {p.stem for p in node.stored_files()}
    print(
        f"node RSS {baseline / 1024:.0f} MB; peak growth C-STORE {peak_cstore / 1024:.0f} MB,"
        f" with STOW-RS {peak / 1024:.0f} MB (volume {frames * rows * cols * 2 >> 20} MB)"
    )
    assert peak < 100 * 1024, f"peak RSS grew by {peak / 1024:.0f} MB receiving 400 MB"


def test_frames_of_compressed_volumes_are_read_one_by_one(tmp_path):
    """Compressed volumes (RLE, JPEG-LS, JPEG 2000 lossless): pass-through frames are the
    stored fragments of that frame; decoded frames are the volume's pixels."""
    from pydicom.encaps import generate_frames

    from inference.synthetic import make_tomo_volume, set_transfer_syntax, write
    from node import wado

    rows, cols, frames = 48, 40, 7
    stack = np.stack([volume_frame(n, rows, cols) for n in range(1, frames + 1)])
    for syntax in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"):
        ds = set_transfer_syntax(make_tomo_volume("L", "CC", pixels=stack.copy()), syntax)
        path = write(ds, tmp_path / f"{syntax}.dcm")
        stored = list(generate_frames(dcmread(path).PixelData, number_of_frames=frames))
        assert wado.frames(path, [7, 2], passthrough=True) == [stored[6], stored[1]]
        decoded = wado.frames(path, [5, 1], passthrough=False)
        assert np.array_equal(_frame(decoded[0], rows, cols), stack[4]), syntax
        assert np.array_equal(_frame(decoded[1], rows, cols), stack[0]), syntax


def test_frames_of_a_deflated_volume(tmp_path):
    """A Deflated file has no byte offsets (the header read inflates it all): its frames are
    found by decoding, not refused as 'no pixel data'."""
    from inference.synthetic import make_tomo_volume, set_transfer_syntax, write
    from node import wado

    rows, cols, frames = 48, 40, 5
    stack = np.stack([volume_frame(n, rows, cols) for n in range(1, frames + 1)])
    ds = set_transfer_syntax(
        make_tomo_volume("L", "CC", pixels=stack.copy()), "1.2.840.10008.1.2.1.99"
    )
    path = write(ds, tmp_path / "deflated.dcm")
    got = wado.frames(path, [4, 1], passthrough=False)
    assert np.array_equal(_frame(got[0], rows, cols), stack[3])
    assert np.array_equal(_frame(got[1], rows, cols), stack[0])


def test_stow_part_with_bad_functional_groups_is_refused_while_it_is_copied(
    web_factory, tmp_path, monkeypatch
):
    """STOW-RS, in process (the ASGI app, no server round trip): a two-part request whose
    first part is a volume with 11 Per-frame Functional Groups items for 12 frames. Each block
    of a part goes through the C-STORE's StreamCheck before it is written: the bad part is
    refused (FailureReason 0xC210, the reason in the Warning header) in the block that holds
    its Pixel Data header, its frames never written; the good part is stored without a second
    walk of its file; nothing is left in incoming/."""
    import node.ingest as ingest
    from node.validate import StreamCheck
    from tests.helpers import asgi_request

    monkeypatch.setattr(ingest, "PART_BLOCK", 64 * 1024)  # several blocks per 1.5 MB part
    fed: dict[int, int] = {}
    feed = StreamCheck.feed

    def counting(self, data):
        fed[id(self)] = fed.get(id(self), 0) + len(data)
        return feed(self, data)

    monkeypatch.setattr(StreamCheck, "feed", counting)
    walks: list[Path] = []
    whole = ingest.check_dataset
    monkeypatch.setattr(
        ingest, "check_dataset", lambda path, *a, **kw: walks.append(path) or whole(path, *a, **kw)
    )

    bad = write_tomo_volume(tmp_path / "bad.dcm", frames=12, rows=256, cols=256, patient_id="VOL-B")
    ds = dcmread(bad)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:11]
    ds.save_as(bad)
    pixels_at = bad.read_bytes().rindex(b"\xe0\x7f\x10\x00OW")
    good = write_tomo_volume(
        tmp_path / "good.dcm", "R", "CC", frames=12, rows=256, cols=256, patient_id="VOL-B"
    )
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in (bad, good)
        )
        + f"--{boundary}--\r\n".encode()
    )
    w = web_factory()
    status, headers, out = asgi_request(
        w.web.app,
        "POST",
        "/dicomweb/studies",
        body,
        {
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "accept": "application/dicom+json",
        },
    )
    assert status == 202, out[:500]
    import json

    res = json.loads(out)
    failed = res["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC210]
    # Which instance failed: from the part's file meta (its header was never parsed).
    assert failed[0]["00081155"]["Value"][0] == ds.SOPInstanceUID
    assert failed[0]["00081150"]["Value"][0] == ds.SOPClassUID
    stored = res["00081199"]["Value"]
    assert (
        stored[0]["00081155"]["Value"][0] == dcmread(good, stop_before_pixels=True).SOPInstanceUID
    )
    assert "Per-frame Functional Groups Sequence holds 11 items" in headers["warning"]
    assert "refused while the part was copied" in headers["warning"]
    # Two checks: the bad part's stopped in the block with the Pixel Data header (of 1.5 MB
    # of frames, at most that block was read), the good part's saw every byte.
    bad_fed, good_fed = sorted(fed.values())
    assert bad_fed <= pixels_at + 64 * 1024 < bad.stat().st_size // 2
    assert good_fed == good.stat().st_size
    assert walks == []  # validated while copied: not walked again
    files = w.node.files
    assert [p for p in files.incoming_root.rglob("*") if p.is_file()] == []
    assert [p.stem for p in (files.root / "instances").rglob("*.dcm")] == [
        stored[0]["00081155"]["Value"][0]
    ]
