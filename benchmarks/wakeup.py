#!/usr/bin/env python3
"""Per-hop latency between split roles on PostgreSQL: woken by NOTIFY against polling.

A "worker" and an "exporter" process (the waiting and claiming of node.worker.Worker.run and
node.export.Exporter.run, without the model or the C-STORE) share a private PostgreSQL server
with this process, which makes --exams exams ready one at a time, each at a random moment
within the poll interval. Two hops are read from the database's own timestamps:

* ready -> claimed: the exam's "receiving -> ready" and "ready -> processing" events;
* queued -> sent: a delivery's queue time (``next_attempt_at``, written with the results) and
  its ``sent_at`` (the exporter claims it, marks it in flight and sent: no C-STORE here).

Mode ``notify``: the processes wait on storage.wakeup.Listener (what the roles run now), with
the poll interval as the fallback. Mode ``poll`` (the reference, measured in the same run): they
wait on an event nobody sets, i.e. they look every --poll seconds, as the roles did before.

    python benchmarks/wakeup.py [--exams 20] [--poll 1.0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _role(kind: str, url: str, mode: str, poll: float, stop_at: int) -> None:
    """One role process: look for work, else wait (Listener or a never-set event)."""
    from storage import wakeup
    from storage.db import Database
    from storage.deliveries import Deliveries
    from storage.exams import Exams
    from storage.records import ProducedObject

    db = Database(url)
    store, queue = Exams(db), Deliveries(db)
    channel = wakeup.EXAMS_READY if kind == "worker" else wakeup.DELIVERIES_DUE
    wake: wakeup.Wake = wakeup.Listener(db, channel) if mode == "notify" else threading.Event()
    handled = 0
    while handled < stop_at:
        wake.clear()
        if kind == "worker":
            claim = store.claim_next_ready(60)
            if claim is not None:
                study, version, _ = store.slot_paths(claim[0])
                produced = [
                    ProducedObject(
                        kind="sr-mammo-cad",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.50",
                        sop_instance_uid=f"{study[:56]}.77",
                        series_instance_uid=f"{study[:56]}.78",
                        path=f"results/{study}/r.dcm",
                        modality="SR",
                        size_bytes=10,
                    )
                ]
                store.complete(*claim, produced, ["pacs"])
                handled += 1
                continue
        else:
            rows = queue.claim_transfers(lease_seconds=60)
            for r in rows:
                queue.mark_in_flight(r.id)
                queue.mark_sent(r.id)
            handled += len(rows)
            if rows:
                continue
        wake.wait(poll)
    db.close()


def _ready_exam(store: object, files: object, seed: int) -> str:
    from inference.synthetic import make_exam
    from node.assembly import assign_slots
    from node.scp import instance_record

    exam = make_exam(seed=seed, rows=8, cols=8)
    for ds in exam:
        r = instance_record(
            ds, files, "T", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", 100
        )
        store.add_instance(r, assign_slots, place=lambda: None)  # type: ignore[attr-defined]
    return str(exam[0].StudyInstanceUID)


def run_mode(
    server: object, mode: str, n: int, poll: float, tmp: Path, seed: int
) -> tuple[list[float], list[float]]:
    from sqlalchemy import select

    from storage.db import Database
    from storage.exams import Exams
    from storage.files import FileStore
    from storage.models import ExamEvent, Outbound

    url = server.new_database(f"wake_{mode}")  # type: ignore[attr-defined]
    Database(url).close()  # the schema, before the roles start
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_role, args=(kind, url, mode, poll, n))
        for kind in ("worker", "exporter")
    ]
    for p in procs:
        p.start()
    db = Database(url)
    store = Exams(db)
    files = FileStore(tmp / mode, fsync=False)
    rng = random.Random(seed)
    time.sleep(3.0)  # both roles started and waiting
    for i in range(n):
        time.sleep(rng.uniform(0, poll))  # a random phase against the poll interval
        _ready_exam(store, files, seed * 1000 + i)
    for p in procs:
        p.join(timeout=60 + 3 * n * poll)
    with db.session() as s:
        events = s.execute(
            select(ExamEvent.exam_id, ExamEvent.detail, ExamEvent.at).order_by(ExamEvent.id)
        ).all()
        sends = s.execute(select(Outbound.next_attempt_at, Outbound.sent_at)).all()
    db.close()
    ready: dict[int, object] = {}
    claim_hops = []
    for exam_id, detail, at in events:
        if detail.startswith("receiving -> ready"):
            ready[exam_id] = at
        elif detail.startswith("ready -> processing") and exam_id in ready:
            claim_hops.append((at - ready[exam_id]).total_seconds())  # type: ignore[operator]
    send_hops = [(sent - queued).total_seconds() for queued, sent in sends if sent is not None]
    if len(claim_hops) != n or len(send_hops) != n:
        raise SystemExit(f"{mode}: {len(claim_hops)} claims, {len(send_hops)} sends of {n}")
    return claim_hops, send_hops


def _fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms, max {max(xs) * 1000:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=int, default=20)
    ap.add_argument("--poll", type=float, default=1.0, help="the poll interval (s)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                mode: run_mode(server, mode, args.exams, args.poll, Path(tmp), args.seed)
                for mode in ("notify", "poll")
            }
    finally:
        server.stop()
    print(f"{args.exams} exams, poll interval {args.poll:g} s, PostgreSQL")
    for i, hop in enumerate(("ready -> claimed", "queued -> sent")):
        n, p = results["notify"][i], results["poll"][i]
        print(
            f"  {hop:17s} notify: {_fmt(n)} | poll: {_fmt(p)} | notify / poll "
            f"(medians) {statistics.median(n) / statistics.median(p):.3f}"
        )


if __name__ == "__main__":
    main()
