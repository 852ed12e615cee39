"""Security: peers and their services, retrieve keys, whole and bounded inputs, audit trail,
file permissions. Real associations with pynetdicom and DCMTK against a running node."""

from __future__ import annotations

import json
import random
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (
    DigitalMammographyXRayImageStorageForPresentation,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from inference.synthetic import UID_ROOT, make_exam, make_mammogram, write
from node.validate import _read_meta
from tests.helpers import dcmtk, echo, send

MG = str(DigitalMammographyXRayImageStorageForPresentation)
NOT_AUTHORIZED = 0x0124

PEERS = [
    {"ae_title": "MODALITY", "services": ["echo", "store"]},
    {"ae_title": "VIEWER", "hosts": ["127.0.0.0/8"], "services": ["echo", "find", "get"]},
    {
        "ae_title": "FARAWAY",
        "hosts": ["10.0.0.0/8", "192.168.1.7"],
        "services": ["echo", "store", "find", "get", "move"],
    },
]


def _assoc(port: int, calling: str, contexts: list, called: str = "MAMMO_NODE"):
    ae = AE(ae_title=calling)
    ae.requested_contexts = contexts
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title=called)


def _find(port: int, calling: str, **keys) -> list[int]:
    assoc = _assoc(port, calling, [build_context(StudyRootQueryRetrieveInformationModelFind)])
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        for k, v in keys.items():
            setattr(q, k, v)
        return [
            int(st.Status)
            for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
        ]
    finally:
        assoc.release()


def _get(port: int, calling: str, model, **keys) -> tuple[list[int], int]:
    """C-GET statuses and how many instances arrived."""
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    got = []

    def on_store(event):
        got.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(model)
    ae.add_requested_context(MG, ExplicitVRLittleEndian)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = MG, False, True
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="MAMMO_NODE",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        q = Dataset()
        for k, v in keys.items():
            setattr(q, k, v)
        statuses = [int(st.Status) for st, _ in assoc.send_c_get(q, model) if st]
    finally:
        assoc.release()
    return statuses, len(got)


def test_no_peers_store_and_echo_from_anyone_query_refused(node):
    exam = make_exam(seed=61, rows=64, cols=64)
    assert send(node.port, exam, calling="ANYONE") == [0] * 4
    assert echo(node.port, node.ae_title, calling="WHOEVER")
    assert _find(node.port, "ANYONE") == [NOT_AUTHORIZED]
    statuses, n = _get(
        node.port,
        "ANYONE",
        StudyRootQueryRetrieveInformationModelGet,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=exam[0].StudyInstanceUID,
    )
    assert statuses[-1] == NOT_AUTHORIZED and n == 0
    r = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exam[0].StudyInstanceUID not in r.stdout + r.stderr
    assert "query/retrieve is off" in node.log.read_text()


def test_peers_only_listed_ae_from_listed_hosts_each_for_its_services(node_factory):
    node = node_factory({"peers": PEERS})
    exam = make_exam(seed=62, rows=64, cols=64)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam, calling="MODALITY") == [0] * 4
    # Unknown AE, a known AE from a host outside its networks, a wrong called AE: rejected.
    assert not echo(node.port, node.ae_title, calling="STRANGER")
    assert not echo(node.port, node.ae_title, calling="FARAWAY")
    assert not echo(node.port, "NOT_THE_NODE", calling="VIEWER")
    assert echo(node.port, node.ae_title, calling="VIEWER")
    # Each peer only for its services.
    assert _find(node.port, "MODALITY") == [NOT_AUTHORIZED]
    st = _find(node.port, "VIEWER", StudyInstanceUID=study)
    assert st == [0xFF00, 0x0000]
    viewer_store = send(node.port, make_exam(seed=63, rows=64, cols=64)[:1], calling="VIEWER")
    assert viewer_store == [NOT_AUTHORIZED]
    statuses, n = _get(
        node.port,
        "VIEWER",
        StudyRootQueryRetrieveInformationModelGet,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=study,
    )
    assert statuses[-1] == 0x0000 and n == 4
    # DCMTK's storescu as a peer that is not listed.
    f = write(make_mammogram("L", "CC", rows=64, cols=64), node.tmp / "x.dcm")
    r = subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "STRANGER",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            str(f),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stdout + r.stderr
    # A C-MOVE from a peer not granted move.
    assoc = _assoc(node.port, "VIEWER", [build_context(StudyRootQueryRetrieveInformationModelMove)])
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        st = [
            int(s.Status)
            for s, _ in assoc.send_c_move(q, "VIEWER", StudyRootQueryRetrieveInformationModelMove)
            if s
        ]
    finally:
        assoc.release()
    assert st[-1] != 0x0000 and not (0xFF00 <= st[-1] <= 0xFF01)
    log = node.log.read_text()
    assert "not a configured peer" in log and "is not this node" in log


def test_retrieve_refuses_universal_and_wildcard_unique_keys(node_factory):
    node = node_factory({"peers": [{"ae_title": "QR", "services": ["echo", "store", "get"]}]})
    exam = make_exam(seed=64, rows=64, cols=64, patient_id="PID-64")
    assert send(node.port, exam, calling="QR") == [0] * 4
    for model, keys in (
        (
            PatientRootQueryRetrieveInformationModelGet,
            {"QueryRetrieveLevel": "PATIENT", "PatientID": "*"},
        ),
        (
            PatientRootQueryRetrieveInformationModelGet,
            {"QueryRetrieveLevel": "PATIENT", "PatientID": "PID-6?"},
        ),
        (
            StudyRootQueryRetrieveInformationModelGet,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
        ),
        (
            StudyRootQueryRetrieveInformationModelGet,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": UID_ROOT + "*"},
        ),
        (
            StudyRootQueryRetrieveInformationModelGet,
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": exam[0].StudyInstanceUID,
                "SeriesInstanceUID": "*",
            },
        ),
    ):
        statuses, n = _get(node.port, "QR", model, **keys)
        assert statuses[-1] == 0xA900 and n == 0, (keys, statuses)  # a failure, not success
    statuses, n = _get(
        node.port,
        "QR",
        PatientRootQueryRetrieveInformationModelGet,
        QueryRetrieveLevel="PATIENT",
        PatientID="PID-64",
    )
    assert statuses[-1] == 0x0000 and n == 4
    assert "universal matching is refused" in node.log.read_text()


# -- whole and bounded inputs ------------------------------------------------------------
def _send_files(port: int, files: list[Path], ts: str = ExplicitVRLittleEndian) -> list[int]:
    """C-STORE raw files (sent as they are on disk) over one association."""
    assoc = _assoc(port, "FUZZER", [build_context(MG, ts)])
    assert assoc.is_established
    out = []
    try:
        for f in files:
            st = assoc.send_c_store(f)
            out.append(int(st.Status) if st and "Status" in st else -1)
    finally:
        assoc.release()
    return out


def _mutate(data: bytes, start: int, rng: random.Random, kind: int) -> bytes:
    b = bytearray(data)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            p = rng.randrange(start, len(b))
            b[p] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        b = b[: rng.randrange(start, len(b))]
    elif kind == 2:  # corrupted bytes in the header area (tags, VRs, lengths)
        p = rng.randrange(start, min(len(b), start + 1500))
        b[p : p + 4] = rng.randbytes(4)
    else:  # inserted garbage
        p = rng.randrange(start, len(b))
        b[p:p] = rng.randbytes(rng.randint(1, 64))
    return bytes(b)


def test_fuzzed_datasets_are_refused_or_stored_readable(node, tmp_path):
    """200 damaged datasets (bit flips, truncations, corrupted lengths, inserted garbage):
    each is refused with a failure status and leaves nothing, or is stored and reads back
    whole, pixels included."""
    rng = random.Random(20261129)
    files = []
    for i in range(200):
        ds = make_mammogram("L", "CC", rows=96, cols=80, seed=i)
        good = write(ds, tmp_path / f"good{i}.dcm")
        data = good.read_bytes()
        with open(good, "rb") as f:
            _, start = _read_meta(f, len(data))  # keep the file meta: the sender needs it
        bad = tmp_path / f"fuzz{i}.dcm"
        bad.write_bytes(_mutate(data, start, rng, i % 4))
        files.append(bad)
    statuses = _send_files(node.port, files)
    assert set(statuses) <= {0x0000, 0xC210, 0xA900}, sorted(set(statuses))
    accepted = statuses.count(0)
    refused = len(statuses) - accepted
    assert refused >= 100  # most damage is detectable; the rest must read back (below)
    stored = node.stored_files()
    assert len(stored) == accepted
    for f in stored:
        ds = dcmread(f)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    assert node.incoming_files() == []
    assert echo(node.port, node.ae_title)


def test_truncated_mammograms_are_refused(node, tmp_path):
    f = write(make_mammogram("R", "CC", rows=256, cols=200, seed=3), tmp_path / "full.dcm")
    data = f.read_bytes()
    cuts = []
    for n in (2048, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{n}.dcm"
        p.write_bytes(data[:n])
        cuts.append(p)
    assert _send_files(node.port, cuts) == [0xC210] * 3
    assert node.stored_files() == []


def _deflated_bomb(path: Path, rows: int, cols: int) -> Path:
    """A Deflated dataset whose pixel data is rows x cols x 16 bits of zeros: a few hundred
    KB on the wire, hundreds of MB inflated. Written in a stream (never whole in memory)."""
    ds = make_mammogram("L", "MLO", rows=8, cols=8, seed=9)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(z.compress(body.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, n)))
        block = bytes(1 << 20)
        for _ in range(n >> 20):
            f.write(z.compress(block))
        f.write(z.compress(bytes(n & ((1 << 20) - 1))) + z.flush())
    return path


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_deflate_bomb_is_capped_without_inflating_in_memory(node_factory, tmp_path):
    node = node_factory({"node": {"max_dataset_mb": 64}})
    bomb = _deflated_bomb(tmp_path / "bomb.dcm", 8192, 8192)  # 128 MiB inflated
    assert bomb.stat().st_size < 1 << 20
    small = _deflated_bomb(tmp_path / "small.dcm", 1024, 1024)  # 2 MiB: within the cap
    statuses = _send_files(node.port, [bomb, small], ts=DeflatedExplicitVRLittleEndian)
    assert statuses == [0xA700, 0x0000]
    assert len(node.stored_files()) == 1 and node.incoming_files() == []
    assert _peak_rss_mb(node.proc.pid) < 300
    assert "inflates beyond [node] max_dataset_mb" in node.log.read_text()


def test_oversized_dataset_refused_while_it_arrives(node_factory, tmp_path):
    node = node_factory({"node": {"max_dataset_mb": 1}})
    big = write(make_mammogram("L", "CC", rows=1024, cols=800, seed=2), tmp_path / "big.dcm")
    ok = write(make_mammogram("L", "MLO", rows=64, cols=64, seed=2), tmp_path / "ok.dcm")
    assert _send_files(node.port, [big, ok]) == [0xA700, 0x0000]
    assert len(node.stored_files()) == 1 and node.incoming_files() == []
    assert "larger than [node] max_dataset_mb" in node.log.read_text()


def test_deep_sequence_nesting_gets_a_failure_status(node, tmp_path):
    ds = make_mammogram("R", "MLO", rows=64, cols=64, seed=5)
    inner = Dataset()
    inner.CodeMeaning = "deep"
    for _ in range(60):
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = [inner]
    f = write(ds, tmp_path / "deep.dcm")
    ok = write(make_mammogram("R", "CC", rows=64, cols=64, seed=6), tmp_path / "ok.dcm")
    assert _send_files(node.port, [f, ok]) == [0xC210, 0x0000]
    assert "nested deeper than" in node.log.read_text()
    assert "Traceback" not in node.log.read_text()


# -- audit and permissions -----------------------------------------------------------------
def test_audit_trail_and_private_files(node_factory):
    node = node_factory({"peers": PEERS})
    exam = make_exam(seed=65, rows=64, cols=64)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam, calling="MODALITY") == [0] * 4
    assert not echo(node.port, node.ae_title, calling="STRANGER")
    assert _find(node.port, "VIEWER", StudyInstanceUID=study)[-1] == 0
    assert _find(node.port, "MODALITY") == [NOT_AUTHORIZED]
    statuses, n = _get(
        node.port,
        "VIEWER",
        StudyRootQueryRetrieveInformationModelGet,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=study,
    )
    assert n == 4
    node.stop()
    audit = node.data_dir / "audit.jsonl"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "Application Activity" and events[0]["action"] == "start"
    assert names[-1] == "Application Activity" and events[-1]["action"] == "stop"
    logins = [e for e in events if e["event"] == "User Authentication"]
    assert any(e["outcome"] == 0 and e["peer"]["ae_title"] == "MODALITY" for e in logins)
    assert any(e["outcome"] == 4 and e["peer"]["ae_title"] == "STRANGER" for e in logins)
    assert all(e["peer"]["address"] == "127.0.0.1" and e["peer"]["tls"] is False for e in logins)
    stores = [
        e
        for e in events
        if e["event"] == "DICOM Instances Transferred" and e.get("action") == "store"
    ]
    assert len(stores) == 4 and {e["study"] for e in stores} == {study}
    queries = [e for e in events if e["event"] == "Query"]
    assert queries and queries[0]["peer"]["ae_title"] == "VIEWER"
    assert queries[0]["matched_studies"] == 1 and queries[0]["level"] == "STUDY"
    alerts = [e for e in events if e["event"] == "Security Alert"]
    assert {a["peer"]["ae_title"] for a in alerts} >= {"STRANGER", "MODALITY"}
    begins = [e for e in events if e["event"] == "Begin Transferring DICOM Instances"]
    assert begins[0]["studies"] == [study] and begins[0]["to"] == "VIEWER"
    assert "Phantom" not in audit.read_text()  # no patient names
    # mammo-node audit filters.
    out = node.cli("audit", "--study", study, "--json").stdout
    got = [json.loads(line) for line in out.splitlines()]
    assert got and all(study in (e.get("studies") or [e.get("study")]) for e in got)
    assert (
        len(
            [
                e
                for e in got
                if e["event"] == "DICOM Instances Transferred" and e.get("action") == "store"
            ]
        )
        == 4
    )
    table = node.cli("audit", "--since", "2000-01-01T00:00:00Z").stdout
    assert "Security Alert" in table and "STRANGER" in table
    # Readable by the service account only.
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    for f in (audit, node.data_dir / "mammo-node.db", *node.stored_files()):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_syslog_forwarding_rfc5424_over_tcp(node_factory):
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    received = bytearray()
    done = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(30)
            while b"Security Alert" not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    node = node_factory(
        {"peers": PEERS, "audit": {"syslog": f"tcp://127.0.0.1:{srv.getsockname()[1]}"}}
    )
    assert not echo(node.port, node.ae_title, calling="STRANGER")
    assert done.wait(30)
    srv.close()
    text = received.decode()
    # Octet-counted frames (RFC 6587) of RFC 5424 messages: "<PRI>1 TIMESTAMP HOST APP ...".
    # The node's start and the start-up probe's association race: any order.
    frames, rest = [], text
    while rest:
        length, _, rest = rest.partition(" ")
        assert length.isdigit() and rest.startswith("<"), rest[:80]
        frames.append(rest[: int(length)])
        rest = rest[int(length) :]
    for frame in frames:
        pri, _, after = frame[1:].partition(">")
        assert int(pri) // 8 == 13 and after.startswith("1 ") and " mammo-node " in frame
    assert any("Application Activity" in f for f in frames)
    assert any("Security Alert" in f and "STRANGER" in f for f in frames)


@pytest.mark.unit
def test_config_errors_name_the_keys():
    from node.config import ConfigError, parse_config

    for raw, needle in (
        ({"peers": [{"ae_title": "X", "services": ["fly"]}]}, r"\[\[peers\]\] #1 services"),
        ({"peers": [{"ae_title": "X", "hosts": ["pacs.example"]}]}, "not an IP address"),
        ({"dicomweb": {"tokens": [{"name": "a", "sha256": "abc"}]}}, "sha256 must be 64 hex"),
        ({"dicomweb": {"tokens": [{"name": "a", "token": "x"}]}}, "never the token"),
        ({"node": {"tls": True}}, r"\[tls\] certificate"),
        (
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": True}]},
            "ca_certificates",
        ),
        ({"audit": {"syslog": "http://x"}}, r"\[audit\] syslog"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config(raw)
    cfg = parse_config({"security": {"allowed_calling_aets": ["OLDSCU"]}})
    assert [(p.ae_title, p.services) for p in cfg.peers] == [("OLDSCU", ("echo", "store"))]
