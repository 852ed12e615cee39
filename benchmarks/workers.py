#!/usr/bin/env python3
"""Exams per minute with one and with two workers (``mammo-node start --role worker``).

For each worker count: a fresh database (PostgreSQL started from Debian's binaries, or
SQLite with --engine sqlite), one listener, one exporter, N workers and DCMTK's storescp as the
PACS, all separate processes on a shared data_dir. --exams synthetic four-view exams are sent
at once; the clock runs from the first C-STORE to the last result object stored at the PACS.
The reference is the one-worker run of the same invocation (ratio = speed-up).

    python benchmarks/workers.py [--exams 16] [--workers 1,2] [--rows 1536 --cols 1280]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.synthetic import make_exam  # noqa: E402
from tests.helpers import NodeProcess, StoreSCP, send, wait_for  # noqa: E402

OBJECTS_PER_EXAM = 6


def run(n_workers: int, exams: list, engine: str, tmp: Path) -> float:
    server = None
    if engine == "postgresql":
        from tests.pg import PostgresServer

        server = PostgresServer().start()
        url = server.new_database("workers")
    else:
        url = f"sqlite:///{tmp / 'mammo-node.db'}"
    pacs = StoreSCP(tmp / "pacs").start()
    shared = tmp / "shared"
    settings = {
        "node": {"database_url": url},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ],
        "export": {"initial_delay_seconds": 0.5, "max_delay_seconds": 1.0},
        "peers": [{"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
    }
    procs: list[NodeProcess] = []

    def start(role: str) -> NodeProcess:
        d = tmp / f"{role}{len(procs)}"
        d.mkdir()
        p = NodeProcess(d, settings, data_dir=shared, role=role)
        procs.append(p)
        return p.start()

    try:
        listener = start("listener")
        start("exporter")
        for _ in range(n_workers):
            start("worker")
        items = [ds for e in exams for ds in e]
        t0 = time.perf_counter()
        assert send(listener.port, items) == [0] * len(items)
        want = len(exams) * OBJECTS_PER_EXAM
        wait_for(lambda: pacs.received() >= want, 1800, interval=0.1, what="every result")
        return time.perf_counter() - t0
    finally:
        for p in procs:
            p.stop()
        pacs.stop()
        if server is not None:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exams", type=int, default=16)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=1280)
    ap.add_argument("--engine", choices=["postgresql", "sqlite"], default="postgresql")
    args = ap.parse_args()
    exams = [make_exam(seed=900 + i, rows=args.rows, cols=args.cols) for i in range(args.exams)]
    print(
        f"{args.exams} exams of 4 x {args.rows}x{args.cols}, {args.engine}, "
        f"{os.cpu_count()} CPU cores"
    )
    ref = None
    for n in [int(x) for x in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run(n, exams, args.engine, Path(tmp))
        rate = args.exams / seconds * 60
        ref = ref or rate
        print(
            f"  {n} worker(s): {seconds:6.1f} s  {rate:6.1f} exams/min  "
            f"x{rate / ref:.2f} vs 1 worker"
        )


if __name__ == "__main__":
    main()
