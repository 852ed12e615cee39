"""Bad input: each gets the right DICOM status or a clear error, and the node keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.synthetic import make_exam, make_mammogram, write
from node.config import ConfigError, parse_config
from tests.helpers import dcmtk, echo, send, wait_for


def _db_instances(node) -> int:
    import json

    return json.loads(node.cli("status", "--json").stdout)["instances"]


def _assert_nothing_left(node, expected_files: int = 0) -> None:
    assert len(node.stored_files()) == expected_files
    assert node.incoming_files() == []
    assert _db_instances(node) == expected_files


def test_truncated_and_garbage_datasets_fail_and_leave_nothing(node, tmp_path):
    ds = make_mammogram("L", "CC", rows=256, cols=208)
    good = write(ds, tmp_path / "good.dcm")
    truncated = tmp_path / "truncated.dcm"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) - 20000])
    garbage = tmp_path / "garbage.dcm"
    head = data[: data.index(b"\x08\x00\x05\x00")]  # preamble + file meta, then garbage
    garbage.write_bytes(head + os.urandom(3000))
    statuses = send(node.port, [truncated, garbage])
    assert statuses[0] == 0xC210 and statuses[1] in (0xC210, 0xA900)
    _assert_nothing_left(node)
    assert send(node.port, [good]) == [0]  # still serving
    _assert_nothing_left(node, 1)


def test_mismatched_identity_and_path_tricks_refused(node, tmp_path):
    ds = make_mammogram("L", "CC", rows=64, cols=64)
    # The request (from the file meta) names one instance, the dataset another: change the
    # first occurrence of the UID (in the file meta) to another of the same length.
    path = write(ds, tmp_path / "mismatch.dcm")
    uid = ds.SOPInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    path.write_bytes(path.read_bytes().replace(uid, other, 1))
    ds = path
    trick = make_mammogram("L", "CC", rows=64, cols=64)
    trick.StudyInstanceUID = "../../../../tmp/evil"
    trick2 = make_mammogram("R", "CC", rows=64, cols=64)
    trick2.SeriesInstanceUID = "1.2/../../x"
    no_study = make_mammogram("R", "MLO", rows=64, cols=64)
    del no_study.StudyInstanceUID
    statuses = send(node.port, [ds, trick, trick2, no_study])
    assert statuses == [0xA900] * 4
    _assert_nothing_left(node)
    assert not Path("/tmp/evil").exists()
    log = node.log.read_text()
    assert "not a valid DICOM UID" in log and "differs from the request" in log


def test_calling_ae_not_allowed_is_rejected(node_factory, tmp_path):
    node = node_factory({"security": {"allowed_calling_aets": ["GOODSCU"]}})
    assert echo(node.port, node.ae_title, calling="GOODSCU")
    assert not echo(node.port, node.ae_title, calling="BADSCU")
    f = write(make_mammogram("L", "CC", rows=64, cols=64), tmp_path / "a.dcm")
    r = subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "BADSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            str(f),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "reject" in (r.stdout + r.stderr).lower()
    _assert_nothing_left(node)


def test_disk_reserve_rejects_storage_associations(node_factory, tmp_path):
    """Below the reserve a storage association is rejected (transient) at its start, before
    any data travels; C-ECHO still answers so monitoring sees a live node."""
    node = node_factory({"storage": {"min_free_mb": 10_000_000}})  # more than any disk
    assert echo(node.port, node.ae_title)
    f = write(make_mammogram("L", "CC", rows=64, cols=64), tmp_path / "a.dcm")
    r = subprocess.run(
        [dcmtk("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), str(f)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Local Limit Exceeded" in r.stdout + r.stderr  # result transient, reason 2
    _assert_nothing_left(node)
    assert "disk below the free-space reserve" in node.log.read_text()


def test_real_full_disk_answers_out_of_resources(node_factory, tmp_path):
    """A data_dir on a 6 MB tmpfs: a 13 MB image gets 0xA7xx, small ones keep working."""
    if os.geteuid() != 0:  # CI runs as root; the reserve test above covers everyone else
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    assert r.returncode == 0, f"root but cannot mount a tmpfs: {r.stderr.strip()}"
    try:
        node = node_factory({"storage": {"min_free_mb": 0}}, data_dir=mnt / "data")
        small = make_exam(seed=2, rows=128, cols=104)
        assert send(node.port, small[:1]) == [0]
        big = make_mammogram(
            "L",
            "MLO",
            rows=2600,
            cols=2560,
            study_uid=small[0].StudyInstanceUID,
            patient_id=small[0].PatientID,
        )
        st = send(node.port, [big])
        assert 0xA700 <= st[0] <= 0xA7FF, hex(st[0])
        assert [p.stem for p in node.stored_files()] == [small[0].SOPInstanceUID]
        assert node.incoming_files() == []
        assert send(node.port, small[1:2]) == [0]  # the node survived and frees its space
        assert len(node.stored_files()) == 2
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reserve_crossed_while_a_dataset_arrives(node_factory, tmp_path):
    """Free space is checked while a dataset streams in, not only once it is whole: on a
    64 MB tmpfs with a 40 MB reserve, a 40 MB image is refused (0xA700) when the reserve is
    crossed, its partial file is removed, and a small image still goes in."""
    import numpy as np

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"root but cannot mount a tmpfs: {r.stderr.strip()}"
    try:
        node = node_factory({"storage": {"min_free_mb": 40}}, data_dir=mnt / "data")
        big = make_mammogram(
            "L", "CC", rows=5120, cols=4096, seed=4, pixels=np.zeros((5120, 4096), np.float32)
        )
        small = make_mammogram("L", "MLO", rows=64, cols=64, seed=4)
        assert send(node.port, [big, small]) == [0xA700, 0]
        assert [p.stem for p in node.stored_files()] == [small.SOPInstanceUID]
        assert node.incoming_files() == []
        assert "free space fell below the reserve" in node.log.read_text()
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_peer_killed_mid_association_keeps_acknowledged_only(node, tmp_path):
    small = make_exam(seed=3, rows=128, cols=104)
    files = [write(ds, tmp_path / f"s{i}.dcm") for i, ds in enumerate(small[:2])]
    big = make_mammogram(
        "R",
        "CC",
        rows=3328,
        cols=2560,
        study_uid=small[0].StudyInstanceUID,
        patient_id=small[0].PatientID,
    )
    files.append(write(big, tmp_path / "big.dcm"))
    # A slow sender: small PDUs so the big dataset takes a while to stream.
    proc = subprocess.Popen(
        [
            dcmtk("storescu"),
            "-aec",
            node.ae_title,
            "-pdu",
            "4096",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        partial = [p for p in node.incoming_files() if p.stat().st_size > 1_000_000]
        if len(node.stored_files()) == 2 and partial:
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("never saw the big dataset half received")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while node.incoming_files() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(p.stem for p in node.stored_files()) == sorted(
        ds.SOPInstanceUID for ds in small[:2]
    )
    _assert_nothing_left(node, 2)
    assert echo(node.port, node.ae_title)


class _Vanishing:
    """A socket that goes silent after ``after`` bytes, halfway through a write, without
    closing: a peer whose cable was pulled (no FIN, no RST). Everything else is the real
    socket's."""

    def __init__(self, sock, after: int) -> None:
        import threading

        self.sock, self.after, self.sent = sock, after, 0
        self.gone = threading.Event()

    def send(self, data) -> int:
        if self.sent >= self.after:
            self.gone.wait(60)  # silent from now on (until the test ends)
            raise OSError("the peer is gone")
        data = bytes(data)
        if self.sent + len(data) > self.after:
            data = data[: max(1, self.after - self.sent)]  # the last write, cut short
        n = self.sock.send(data)
        self.sent += n
        return n

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_peer_vanishing_mid_pdu_is_dropped_at_the_network_timeout(node_factory):
    """A peer that stops mid-PDU without closing its connection: at [node]
    network_timeout_seconds the node drops the connection, deletes the partial dataset and
    gives back the association's place (max_associations = 1: the next peer is accepted).
    Before, the read of the PDU blocked for good and the association never ended."""
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

    node = node_factory({"node": {"network_timeout_seconds": 2, "max_associations": 1}})
    ds = make_mammogram("L", "CC", rows=1024, cols=512, seed=81)  # 1 MB of pixels
    ae = AE(ae_title="VANISHING")
    ae.add_requested_context(
        DigitalMammographyXRayImageStorageForPresentation, str(ds.file_meta.TransferSyntaxUID)
    )
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    vanishing = _Vanishing(assoc.dul.socket.socket, after=300_000)
    assoc.dul.socket.socket = vanishing
    t = threading.Thread(target=lambda: assoc.send_c_store(ds), daemon=True)
    t.start()
    try:
        wait_for(
            lambda: vanishing.sent >= vanishing.after and node.incoming_files(),
            20,
            interval=0.01,
            what="the dataset half received",
        )
        t0 = time.monotonic()
        wait_for(
            lambda: node.incoming_files() == [],
            20,
            interval=0.1,
            what="the partial dataset deleted",
        )
        assert time.monotonic() - t0 < 12
        # The only association slot is free again.
        wait_for(
            lambda: echo(node.port, node.ae_title),
            10,
            interval=0.2,
            what="a new association accepted",
        )
        assert time.monotonic() - t0 < 12
    finally:
        vanishing.gone.set()
        t.join(30)
    assert node.stored_files() == []
    assert "partial data discarded" in node.log.read_text()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[node\] port"):
        parse_config({"node": {"port": "abc"}})
    with pytest.raises(ConfigError, match=r"\[node\] ae_tilte: unknown key"):
        parse_config({"node": {"ae_tilte": "X"}})
    with pytest.raises(ConfigError, match=r"\[grouping\] stable_seconds"):
        parse_config({"grouping": {"stable_seconds": -1}})
    with pytest.raises(ConfigError, match=r"destinations\]\] #1 port: missing"):
        parse_config({"destinations": [{"name": "p", "ae_title": "P", "host": "h"}]})
    with pytest.raises(ConfigError, match=r"\[security\] allowed_calling_aets\[0\]"):
        parse_config({"security": {"allowed_calling_aets": ["WAY_TOO_LONG_AE_TITLE"]}})
    with pytest.raises(ConfigError, match=r"\[inference\] device"):
        parse_config({"inference": {"device": "tpu"}})
    cfg = parse_config({})
    assert cfg.node.port == 11112 and cfg.node.ae_title == "MAMMO_NODE"
    from node.config import load_config

    missing = tmp_path / "missing.toml"
    missing.write_text('[inference]\ncheckpoint = "models/none.safetensors"\n')
    with pytest.raises(ConfigError, match=r"\[inference\] checkpoint: file not found"):
        load_config(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 70000\n")
    r = subprocess.run(
        [sys.executable, "-m", "node", "start", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "[node] port" in r.stderr


def test_shipped_config_is_valid():
    from node.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "config.toml")
    assert cfg.node.port == 11112 and cfg.grouping.stable_seconds == 60
    assert cfg.database_url.endswith("mammo-data/mammo-node.db")
