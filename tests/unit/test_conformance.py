"""docs/conformance.md stays true: its SOP class and transfer syntax tables are compared with
the presentation contexts the node's AE actually supports, and with what it accepts from a
real requestor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.config import Config
from node.scp import make_ae

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"


def _table(name: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- table: {re.escape(name)} -->(.*?)<!-- end -->", text, re.S)
    assert m, f"table {name} missing from {DOC.name}"
    return re.findall(r"^\| `([0-9.]+)` \|", m.group(1), re.M)


def test_tables_match_the_negotiated_contexts():
    contexts = {str(c.abstract_syntax): c for c in make_ae(Config()).supported_contexts}
    from node.qr import QR_CONTEXTS

    qr = {str(c) for c in QR_CONTEXTS}
    storage = set(contexts) - qr - {VERIFICATION}
    assert all(contexts[uid].scp_role and contexts[uid].scu_role for uid in storage)
    documented_storage = set(_table("storage-sop-classes"))
    assert documented_storage == storage, (
        sorted(storage - documented_storage),
        sorted(documented_storage - storage),
    )
    assert set(_table("verification-and-qr")) == qr | {VERIFICATION}
    storage_ts = {tuple(str(t) for t in contexts[uid].transfer_syntax) for uid in storage}
    assert storage_ts == {tuple(_table("storage-transfer-syntaxes"))}
    qr_ts = {tuple(str(t) for t in contexts[uid].transfer_syntax) for uid in qr}
    assert qr_ts == {tuple(_table("qr-transfer-syntaxes"))}


def test_mammography_and_result_classes_are_documented():
    text = DOC.read_text(encoding="utf-8")
    for uid in (
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.88.50",
        "1.2.840.10008.5.1.4.1.1.88.33",
        "1.2.840.10008.5.1.4.1.1.7",
    ):
        assert f"`{uid}`" in text, uid
    for heading in (
        "Conformance statement overview",
        "Networking",
        "Association policies",
        "Association acceptance policy",
        "Security",
        "Support of character sets",
        "Created SOP instances",
    ):
        assert heading in text, heading
