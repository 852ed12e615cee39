"""TLS everywhere: the DIMSE listener against DCMTK's own TLS (storescu/findscu +tls), exports
to a TLS PACS (storescp +tls), DICOMweb over HTTPS. Certificates made by openssl."""

from __future__ import annotations

import subprocess

import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from inference.synthetic import make_exam, make_mammogram, write
from tests.helpers import dcmtk, free_port, wait_for


def _tls(pki, require: bool = True) -> dict:
    key, crt = pki.pair("node")
    return {
        "certificate": str(crt),
        "private_key": str(key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": require,
    }


def _storescu(node, pki, f, cert: str | None = "client", tls: bool = True):
    args = [dcmtk("storescu"), "-aec", node.ae_title]
    if tls:
        key, crt = pki.pair(cert) if cert else (None, None)
        args += (["+tls", str(key), str(crt)] if cert else ["+tla"]) + ["+cf", str(pki.ca)]
    return subprocess.run(
        args + ["127.0.0.1", str(node.port), str(f)], capture_output=True, text=True, timeout=60
    )


def test_dimse_tls_listener_with_dcmtk_peers(node_factory, pki, tmp_path):
    node = node_factory(
        {
            "node": {"tls": True},
            "tls": _tls(pki),
            "peers": [
                {"ae_title": "STORESCU", "services": ["echo", "store"]},
                {"ae_title": "FINDSCU", "services": ["echo", "find"]},
            ],
        }
    )
    files = [
        write(ds, tmp_path / f"{i}.dcm")
        for i, ds in enumerate(make_exam(seed=81, rows=64, cols=64))
    ]
    r = _storescu(node, pki, files[0])
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(node.stored_files()) == 1
    # A plain peer on the TLS port, an unknown CA's certificate, an expired one, none at all:
    # refused, and the node goes on.
    for kwargs in ({"tls": False}, {"cert": "stranger"}, {"cert": "expired"}, {"cert": None}):
        r = _storescu(node, pki, files[1], **kwargs)
        assert r.returncode != 0, (kwargs, r.stdout + r.stderr)
    assert len(node.stored_files()) == 1
    key, crt = pki.pair("client")
    r = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "+tls",
            str(key),
            str(crt),
            "+cf",
            str(pki.ca),
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
    from pydicom import dcmread

    assert r.returncode == 0 and dcmread(files[0]).StudyInstanceUID in r.stdout + r.stderr
    r = _storescu(node, pki, files[2])
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(node.stored_files()) == 2
    assert node.proc.poll() is None and "Traceback" not in node.log.read_text()
    node.stop()
    audit = (node.data_dir / "audit.jsonl").read_text()
    assert '"tls":true' in audit


def test_export_over_tls_verifies_the_pacs(node_factory, storescp_factory, pki):
    pkey, pcrt = pki.pair("pacs")
    good = storescp_factory(extra=["+tls", str(pkey), str(pcrt), "+cf", str(pki.ca)])
    skey, scrt = pki.pair("stranger")
    bad = storescp_factory(extra=["+tls", str(skey), str(scrt), "+cf", str(pki.ca)])
    node = node_factory(
        {
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": good.port,
                    "tls": True,
                },
                {
                    "name": "impostor",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": bad.port,
                    "tls": True,
                },
            ],
            "tls": _tls(pki, require=False),
            "export": {"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1},
            "grouping": {"stable_seconds": 2},
        },
        worker=True,
    )
    from tests.helpers import send

    exam = make_exam(seed=82, rows=320, cols=256)
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    wait_for(lambda: len(good.files()) == 6, 60, what="results at the TLS PACS")

    def impostor_refused():
        d = node.exam(study)["delivery"].get("impostor", {})
        return d.get("retrying", 0) + d.get("gave_up", 0) == 6

    wait_for(impostor_refused, 60, what="the impostor's deliveries refused")
    assert bad.files() == []
    assert "(TLS)" in node.log.read_text()


def test_dicomweb_over_https_with_client_certificates(node_factory, pki):
    port = free_port()
    token = "https-token"
    node_factory(
        {
            "dicomweb": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "token": token,
                "tls": True,
            },
            "tls": _tls(pki),
        }
    )
    base = f"https://127.0.0.1:{port}/dicomweb"
    ckey, ccrt = pki.pair("client")
    auth = {"Authorization": f"Bearer {token}"}

    def up():
        try:
            requests.get(
                f"{base}/studies",
                headers=auth,
                verify=str(pki.ca),
                cert=(str(ccrt), str(ckey)),
                timeout=2,
            )
            return True
        except requests.RequestException:
            return False

    wait_for(up, 30, what="HTTPS up")
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override session.verify
    session.verify = str(pki.ca)
    session.cert = (str(ccrt), str(ckey))
    client = DICOMwebClient(url=base, headers=auth, session=session)
    ds = make_mammogram("L", "CC", rows=64, cols=64, seed=83)
    resp = client.store_instances([ds])
    assert len(resp.ReferencedSOPSequence) == 1
    found = client.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
    assert len(found) == 1
    # Plain HTTP on the HTTPS port, HTTPS without a client certificate, an expired one.
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{port}/dicomweb/studies", headers=auth, timeout=5)
    with pytest.raises(requests.RequestException):
        requests.get(f"{base}/studies", headers=auth, verify=str(pki.ca), timeout=5)
    skey, scrt = pki.pair("expired")
    with pytest.raises(requests.RequestException):
        requests.get(
            f"{base}/studies",
            headers=auth,
            verify=str(pki.ca),
            cert=(str(scrt), str(skey)),
            timeout=5,
        )
    assert session.get(f"{base}/studies", headers=auth, timeout=5).status_code == 200
