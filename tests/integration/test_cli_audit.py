"""Every operator action of the CLI is in the audit trail (PS3.15 A.5 names), failures too:
complete, reprocess, resolve, resend, purge (DICOM Study Deleted), and reading the trail
itself (Audit Log Used)."""

from __future__ import annotations

import json

from inference.synthetic import make_exam
from tests.helpers import send


def _events(node) -> list[dict]:
    return [json.loads(x) for x in (node.data_dir / "audit.jsonl").read_text().splitlines()]


def test_cli_actions_are_audited(node_factory):
    node = node_factory()
    partial = make_exam(seed=131, rows=64, cols=64)[:3]
    study = partial[0].StudyInstanceUID
    assert send(node.port, partial) == [0] * 3
    assert node.cli("complete", study).returncode == 0
    assert node.cli("reprocess", "1.2.3.999", check=False).returncode == 1  # no such exam
    assert node.cli("resolve", study, "--patient-id", "NOBODY", check=False).returncode == 1
    assert node.cli("resend", study, check=False).returncode == 1  # nothing produced yet
    assert node.cli("purge", "--study", study, check=False).returncode == 1  # not read yet
    before = len(_events(node))
    r = node.cli("audit", "--json")
    assert len(r.stdout.splitlines()) == before  # the reader's own line is not in its read
    node.stop()

    ops = [
        e
        for e in _events(node)
        if isinstance(e.get("peer"), dict) and e["peer"].get("via") == "cli"
    ]
    got = [(e["event"], e.get("action"), e["outcome"]) for e in ops]
    assert got == [
        ("Application Activity", "complete", 0),
        ("Application Activity", "reprocess", 4),
        ("Patient Record", "resolve", 4),
        ("Application Activity", "resend", 4),
        ("DICOM Study Deleted", "purge", 4),
        ("Audit Log Used", "read", 0),
    ], got
    assert ops[0]["study"] == study and ops[0]["peer"]["user"]
    assert ops[-1]["records"] == before
    assert "NOBODY" in ops[2]["reason"] or ops[2]["reason"]
