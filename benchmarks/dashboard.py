#!/usr/bin/env python3
"""Dashboard response times with a large database (default 10,000 exams, 40,000 instances,
60,000 result deliveries), against the node's own /healthz measured in the same run.

The rows are written straight into a fresh SQLite database (no images: the pages read rows),
then a node starts on it (--no-worker) and each page is fetched --repeats times.

    python benchmarks/dashboard.py [--exams 10000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from benchmarks.common import free_port  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Exam, ExamEvent, Instance, Outbound, Result  # noqa: E402


def fill(db: Database, n: int) -> str:
    now = dt.datetime(2026, 11, 1)
    states = ["done"] * 8 + ["failed", "receiving"]
    exams, insts, results, outs, events = [], [], [], [], []
    for i in range(n):
        study = f"1.2.826.0.1.3680043.10.9999.{i}"
        t = now + dt.timedelta(minutes=i)
        exams.append(
            dict(
                id=i + 1,
                study_instance_uid=study,
                accession_number=f"A{i:07d}",
                patient_id=f"P{i:07d}",
                state=states[i % 10],
                version=1,
                l_cc=f"{study}.1",
                l_mlo=f"{study}.2",
                r_cc=f"{study}.3",
                r_mlo=f"{study}.4",
                notes_json="[]",
                created_at=t,
                last_received_at=t,
                state_changed_at=t,
            )
        )
        for k, slot in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO")):
            insts.append(
                dict(
                    sop_instance_uid=f"{study}.{k + 1}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                    study_instance_uid=study,
                    series_instance_uid=f"{study}.0",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/{study}/x/{k}.dcm",
                    size_bytes=17_000_000,
                    received_at=t,
                    patient_id=f"P{i:07d}",
                    modality="MG",
                    role="candidate",
                    slot=slot,
                    exam_id=i + 1,
                )
            )
            events.append(dict(exam_id=i + 1, at=t, kind="received", detail=f"{slot}"))
        if states[i % 10] == "done":
            for k in range(6):
                rid = len(results) + 1
                results.append(
                    dict(
                        id=rid,
                        exam_id=i + 1,
                        version=1,
                        kind="sc",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                        sop_instance_uid=f"2.25.{i}{k}9",
                        series_instance_uid=f"2.25.{i}8",
                        path=f"results/{study}/v1/{k}.dcm",
                        created_at=t,
                    )
                )
                outs.append(
                    dict(
                        result_id=rid,
                        destination="pacs",
                        state="sent",
                        attempts=1,
                        next_attempt_at=t,
                        sent_at=t + dt.timedelta(seconds=2),
                    )
                )
    with db.write() as s:
        for table, rows in (
            (Exam, exams),
            (Instance, insts),
            (Result, results),
            (Outbound, outs),
            (ExamEvent, events),
        ):
            for j in range(0, len(rows), 5000):
                s.execute(insert(table), rows[j : j + 5000])
    return exams[n // 2]["study_instance_uid"]


def timed(url: str, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = requests.get(url, timeout=60)
        ts.append(time.perf_counter() - t0)
        assert r.status_code == 200, (url, r.status_code)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mammo-dash-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = Database(f"sqlite:///{data / 'mammo-node.db'}")
        t0 = time.perf_counter()
        study = fill(db, args.exams)
        db.close()
        print(f"filled {args.exams} exams in {time.perf_counter() - t0:.1f} s", flush=True)
        port, web = free_port(), free_port()
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
            f'[dicomweb]\nenabled = true\nhost = "127.0.0.1"\nport = {web}\n'
            "[storage]\nmin_free_mb = 0\n"
            '[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
            'host = "127.0.0.1"\nport = 1\n'
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node",
                "start",
                "--config",
                str(cfg),
                "--no-worker",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
        )
        try:
            base = f"http://127.0.0.1:{web}"
            for _ in range(300):
                try:
                    requests.get(f"{base}/healthz", timeout=1)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            ref = timed(f"{base}/healthz", args.repeats)
            pages = {
                "exams list": "/ui",
                "exams, state=failed": "/ui?state=failed",
                "exams, page 50": "/ui?offset=5000",
                "one exam": f"/ui/exams/{study}",
                "destinations": "/ui/destinations",
                "system": "/ui/system",
                "metrics": "/metrics",
            }
            print(
                f"\n{args.exams} exams; median of {args.repeats}; reference /healthz "
                f"{ref * 1000:.1f} ms"
            )
            for name, path in pages.items():
                t = timed(base + path, args.repeats)
                print(f"  {name:<22} {t * 1000:8.1f} ms   ({t / ref:6.1f}x /healthz)")
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
