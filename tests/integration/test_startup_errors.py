"""Every start-up failure is one line naming the key and the reason, exit code 2, no
traceback: data_dir, database URL, certificate files, checkpoint, audit path, ports."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.helpers import free_port, toml_document


def _start(tmp_path, sections: dict) -> subprocess.CompletedProcess:
    node = {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")}
    node.update(sections.pop("node", {}))
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml_document({"node": node, **sections}, {}))
    return subprocess.run(
        [sys.executable, "-m", "node", "start", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "refusing to start" in ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_data_dir_not_creatable(tmp_path):
    _refused(
        _start(tmp_path, {"node": {"data_dir": "/proc/nope"}}),
        "[node] data_dir = '/proc/nope'",
        "cannot create or write",
    )


def test_data_dir_is_a_file(tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    _refused(_start(tmp_path, {"node": {"data_dir": str(f)}}), "[node] data_dir")


def test_database_unreachable_hides_password(tmp_path):
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://u:s3cret@127.0.0.1:{port}/db"
    line = _refused(
        _start(tmp_path, {"node": {"database_url": url}}), "[node] database_url", "cannot connect"
    )
    assert "s3cret" not in line


def test_certificate_not_pem(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    r = _start(
        tmp_path,
        {"node": {"tls": True}, "tls": {"certificate": "cert.pem", "private_key": "key.pem"}},
    )
    _refused(r, "[tls] certificate", "cannot load")


def test_ca_certificates_not_pem(tmp_path, pki):
    (tmp_path / "ca.pem").write_text("junk\n")
    r = _start(
        tmp_path,
        {
            "node": {"tls": True},
            "tls": {
                "certificate": str(pki.pair("node")[1]),
                "private_key": str(pki.pair("node")[0]),
                "ca_certificates": "ca.pem",
            },
        },
    )
    _refused(r, "[tls] ca_certificates")


def test_checkpoint_not_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 3)
    _refused(
        _start(tmp_path, {"inference": {"checkpoint": "model.safetensors"}}),
        "[inference] checkpoint",
        "not a safetensors file",
    )


@pytest.mark.parametrize("key", ["node", "dicomweb"])
def test_port_in_use(tmp_path, key):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        sections: dict = (
            {"node": {"port": port}}
            if key == "node"
            else {"dicomweb": {"enabled": True, "host": "127.0.0.1", "port": port}}
        )
        _refused(_start(tmp_path, sections), f"[{key}] port = {port}", "cannot listen")


@pytest.mark.parametrize("fail_closed", [False, True])
def test_audit_fail_closed_refuses_what_it_cannot_audit(tmp_path, fail_closed):
    """An audit trail that cannot be written (/dev/full: every write is ENOSPC): by default
    the node logs it and goes on; with [audit] fail_closed it refuses associations and
    DICOMweb requests (503) instead of working unaudited."""
    import requests

    from tests.helpers import NodeProcess, echo

    web = free_port()
    node = NodeProcess(
        tmp_path,
        {
            "audit": {"path": "/dev/full", "fail_closed": fail_closed},
            "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web},
        },
    )
    node.launch()
    try:
        from tests.helpers import wait_for

        def web_up():
            try:
                return requests.get(f"http://127.0.0.1:{web}/healthz", timeout=5)
            except requests.ConnectionError:
                return None

        wait_for(web_up, 60, what="the node's HTTP port")
        assert echo(node.port, node.ae_title) is (not fail_closed)
        r = requests.get(f"http://127.0.0.1:{web}/dicomweb/studies", timeout=30)
        assert r.status_code == (503 if fail_closed else 200), r.text
        if fail_closed:
            ready = requests.get(f"http://127.0.0.1:{web}/readyz", timeout=30)
            assert ready.status_code == 503 and not ready.json()["checks"]["audit"]["ok"]
        assert "audit: cannot write /dev/full" in node.log.read_text()
    finally:
        node.stop()
