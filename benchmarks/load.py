#!/usr/bin/env python3
"""Steady under load (issue 21 item 5): one sender, then four at once, then four again.

Every round sends the same number of exams (``--senders`` x ``--exams``; round 1's one
sender sends them all). A node (``mammo-node start``, every role in one daemon, SQLite, the
warm-up exam on) exports to DCMTK's storescp as the PACS. Each sender is its own process
sending its exams one after another, one ``/usr/bin/storescu`` association per exam (as a
modality does), without waiting for results. Per round:

* exams per minute: from the round's first C-STORE to the last SR stored at the PACS;
* p50 / p99 of last image -> SRs: storescu's exit (its last C-STORE answered, the association
  released) to both SRs of that exam at the PACS;
* the node's resident memory after the round (every result of the round at the PACS), summed
  over the daemon and its children (the inference process);
* checks: every exam read once (one ``done`` line per study in the node's log, every exam
  ``done`` at version 1 in its database) and every result object delivered once (storescp's
  answered C-STOREs equal the distinct files it holds, 6 an exam: 2 SRs, 4 SCs).

The reference for the throughput is round 1 of the same run (ratio = rounds 2, 3 / round 1).
Goals: four senders >= 0.9x the throughput of one; RSS after round 3 within 40 MB of round 2.

    python benchmarks/load.py [--exams 3] [--senders 4] [--rows 1024 --cols 832]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.synthetic import make_exam, write  # noqa: E402
from node.results import result_uid  # noqa: E402
from tests.helpers import NodeProcess, StoreSCP, wait_for  # noqa: E402

SR_ROLES = ("sr-mammo-cad", "sr-tid1500")
OBJECTS_PER_EXAM = 6  # 2 SRs + 4 SCs (parametric maps and presentation states off)


def sender(port: int, exams: list[list[str]], out: mp.Queue) -> None:
    """Send each exam's files over its own storescu association; report when each ended."""
    for files in exams:
        t0 = time.monotonic()
        subprocess.run(
            [
                "/usr/bin/storescu",
                "-aet",
                "MODALITY",
                "-aec",
                "MAMMO_NODE",
                "127.0.0.1",
                str(port),
                *files,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out.put((files[0], t0, time.monotonic()))


class Arrivals(threading.Thread):
    """When each file first appeared in the PACS folder (polled every 10 ms)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for p in self.folder.iterdir():
                self.seen.setdefault(p.name, now)
            time.sleep(0.01)

    def at(self, sop_uid: str) -> float | None:
        for name, t in self.seen.items():
            if name.endswith(sop_uid):
                return t
        return None


def rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (p99 of a dozen values is their maximum, said as such)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--exams",
        type=int,
        default=3,
        help="exams per sender in rounds 2 and 3 (round 1's one sender sends as "
        "many as they all do)",
    )
    ap.add_argument("--senders", type=int, default=4, help="senders in rounds 2 and 3")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=832)
    ap.add_argument("--timeout", type=float, default=600, help="seconds a round may take")
    ap.add_argument("--no-read-ahead", action="store_true", help="[inference] read_ahead = false")
    args = ap.parse_args()
    rounds = [1, args.senders, args.senders]
    with tempfile.TemporaryDirectory(prefix="mammo-load-") as tmp:
        work = Path(tmp)
        # Every exam of every round written once: distinct studies, the same pixels.
        plan: list[list[list[list[str]]]] = []  # round -> sender -> exam -> files
        n = 0
        for senders in rounds:
            plan.append([])
            for _ in range(senders):
                plan[-1].append([])
                # The same number of exams every round: round 1's one sender sends them all.
                for _e in range(args.exams * args.senders // senders):
                    exam = make_exam(
                        seed=n % 4,
                        rows=args.rows,
                        cols=args.cols,
                        accession=f"LOAD{n:05d}",
                        patient_id=f"LOAD{n:05d}",
                        study_uid=None,
                    )
                    folder = work / "exams" / f"{n:05d}"
                    plan[-1][-1].append(
                        [str(write(ds, folder / f"{i}.dcm")) for i, ds in enumerate(exam)]
                    )
                    n += 1
        studies = {files[0]: _study(files[0]) for rnd in plan for snd in rnd for files in snd}
        pacs = StoreSCP(work / "pacs").start()
        (work / "node").mkdir()
        node = NodeProcess(
            work / "node",
            {
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
                ],
                "export": {"initial_delay_seconds": 0.2},
                "peers": [{"ae_title": "MODALITY", "services": ["echo", "store"]}],
                "grouping": {"stable_seconds": 3600},
                "inference": {"warm_up_exam": True, "read_ahead": not args.no_read_ahead},
            },
            worker=True,
        )
        arrivals = Arrivals(pacs.folder)
        arrivals.start()
        try:
            node.start()
            wait_for(
                lambda: "model loaded" in node.log.read_text(errors="replace"),
                300,
                interval=0.2,
                what="the model loaded",
            )
            assert node.proc is not None
            print(
                f"{n} exams of 4 x {args.rows}x{args.cols}: rounds of {rounds} sender(s) x "
                f"{args.exams} exams; node pid {node.proc.pid}, RSS "
                f"{rss(node.proc.pid) / 1e6:.0f} MB at start",
                flush=True,
            )
            results = []
            delivered = 0
            for r, senders in enumerate(rounds):
                q: mp.Queue = mp.Queue()
                procs = [
                    mp.get_context("fork").Process(target=sender, args=(node.port, plan[r][s], q))
                    for s in range(senders)
                ]
                for p in procs:
                    p.start()
                sent = [q.get(timeout=args.timeout) for _ in range(args.senders * args.exams)]
                for p in procs:
                    p.join()
                    assert p.exitcode == 0, f"a sender failed ({p.exitcode})"
                t_first = min(t0 for _, t0, _ in sent)
                delivered += len(sent) * OBJECTS_PER_EXAM
                wait_for(
                    lambda want=delivered: len(pacs.files()) >= want,
                    args.timeout,
                    interval=0.1,
                    what=f"round {r + 1}'s results",
                )
                time.sleep(0.1)  # the arrivals thread's last poll
                lat, t_last_sr = [], 0.0
                for first, _, t_end in sent:
                    uid = studies[first]
                    t_sr = max(_arrived(arrivals, result_uid(uid, 1, role)) for role in SR_ROLES)
                    lat.append(t_sr - t_end)
                    t_last_sr = max(t_last_sr, t_sr)
                seconds = t_last_sr - t_first
                rate = len(sent) / seconds * 60
                mem = rss(node.proc.pid)
                results.append((rate, mem))
                stages = _stages(
                    node.log.read_text(errors="replace"), [studies[first] for first, _, _ in sent]
                )
                print(
                    f"round {r + 1}: {senders} sender(s), {len(sent)} exams in {seconds:.1f} s "
                    f"= {rate:.1f} exams/min (x{rate / results[0][0]:.2f} vs round 1); "
                    f"last image -> SRs p50 {statistics.median(lat):.2f} s, p99 "
                    f"{quantile(lat, 0.99):.2f} s (max of {len(lat)}); "
                    f"node RSS {mem / 1e6:.0f} MB; worker's stages, median: {stages}",
                    flush=True,
                )
            # Every exam read once, every object delivered once.
            log = node.log.read_text(errors="replace")
            done_lines = {uid: log.count(f"exam {uid} v1 done in") for uid in studies.values()}
            exams = {e["study_instance_uid"]: e for e in node.exams()}
            bad_db = [
                u
                for u in studies.values()
                if exams.get(u, {}).get("state") != "done" or exams[u]["version"] != 1
            ]
            received = pacs.received()
            files = len(pacs.files())
            once = all(v == 1 for v in done_lines.values()) and not bad_db
            print(
                f"every exam read once: {once} ({sum(done_lines.values())} done lines for "
                f"{len(studies)} exams; not done at v1 in the database: {len(bad_db)}); "
                f"every object delivered once: {received == files == delivered} "
                f"({received} C-STOREs answered at the PACS, {files} distinct files, "
                f"{delivered} expected)"
            )
            r1, r2, r3 = results[0], results[1], results[2]
            print(
                f"goals: {args.senders} senders / 1 sender throughput x{r2[0] / r1[0]:.2f}, "
                f"x{r3[0] / r1[0]:.2f} (>= 0.9); RSS round 3 - round 2 "
                f"{(r3[1] - r2[1]) / 1e6:+.0f} MB (<= 40)"
            )
            print(
                "JSON "
                + json.dumps(
                    {
                        "rates": [x[0] for x in results],
                        "rss_mb": [x[1] / 1e6 for x in results],
                        "once": once,
                        "delivered_once": received == files == delivered,
                    }
                )
            )
        except Exception:
            print(node.log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            arrivals.stop.set()
            node.stop()
            pacs.stop()
    return 0


def _study(path: str) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _stages(log: str, uids: list[str]) -> str:
    """The median of each stage of the worker's ``done in`` lines for these studies (where
    a slower round spent its time: the worker's own stages, or waiting)."""
    import re

    per: dict[str, list[float]] = {}
    for uid in uids:
        m = re.search(rf"exam {re.escape(uid)} v1 done in ([0-9.]+) s \(([^)]*)\)", log)
        if not m:
            continue
        per.setdefault("total", []).append(float(m.group(1)))
        for part in m.group(2).split(", "):
            name, _, value = part.rpartition(" ")
            try:
                per.setdefault(name, []).append(float(value))
            except ValueError:
                pass
    return ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in per.items())


def _arrived(arrivals: Arrivals, sop_uid: str) -> float:
    t = arrivals.at(sop_uid)
    if t is None:
        raise RuntimeError(f"{sop_uid} is not at the PACS")
    return t


if __name__ == "__main__":
    raise SystemExit(main())
