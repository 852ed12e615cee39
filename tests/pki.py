"""Test certificates made with openssl: a CA, the node's and the peers' certificates, one from
an unknown CA and one that expired."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_CNF = """[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/newcerts
serial = {dir}/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = copy
[ policy_any ]
commonName = supplied
"""


def _run(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr}")


@dataclass
class PKI:
    dir: Path
    ca: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.key", self.dir / f"{name}.crt"


def _request(d: Path, name: str, cn: str) -> None:
    _run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        cwd=d,
    )


def make_pki(d: Path) -> PKI:
    d.mkdir(parents=True, exist_ok=True)
    (d / "newcerts").mkdir(exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(_CA_CNF.format(dir=d))
    _run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=mammo-node test CA",
        cwd=d,
    )
    for name, dates in (
        ("node", None),
        ("pacs", None),
        ("client", None),
        ("expired", ("20200101000000Z", "20200201000000Z")),
    ):
        _request(d, name, name)
        extra = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "30"]
        _run(
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.crt",
            "-keyfile",
            "ca.key",
            "-in",
            f"{name}.csr",
            "-out",
            f"{name}.crt",
            "-notext",
            *extra,
            cwd=d,
        )
    # A certificate no CA of ours signed.
    _run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "stranger.key",
        "-out",
        "stranger.crt",
        "-days",
        "30",
        "-subj",
        "/CN=stranger",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        cwd=d,
    )
    return PKI(d, d / "ca.crt")
