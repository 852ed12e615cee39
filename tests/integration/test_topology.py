"""Scale-out as separate processes on one PostgreSQL server: two listeners, two workers and an
exporter share the database and data_dir; studies arrive at both listeners at once (some split
between them); one worker is SIGKILLed in the middle of an exam. Every exam ends ``done`` with
one reading, and every result object reaches the PACS once."""

from __future__ import annotations

import signal
import socket
import threading
import time

import psutil
import pytest
from sqlalchemy import func, select

from inference.synthetic import make_exam
from storage.db import Database
from storage.models import Exam, ExamEvent, Result
from tests.helpers import QR_PEER, send, wait_for

SIZE = dict(rows=320, cols=256)
OBJECTS_PER_EXAM = 6  # 2 SRs + 4 attention-map SCs
N_EXAMS = 10  # besides the victim; enough for both listeners, split studies and two workers


def _settings(url: str, pacs_port: int, lease: float) -> dict:
    return {
        "node": {"database_url": url},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
        ],
        "export": {
            "max_attempts": 20,
            "initial_delay_seconds": 0.5,
            "max_delay_seconds": 1.0,
            "lease_seconds": lease,
        },
        "inference": {"lease_seconds": lease, "timeout_seconds": 600},
        "grouping": {"stable_seconds": 30},
        "peers": [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
    }


def _states(db: Database) -> dict[str, tuple[str, int, str | None]]:
    with db.session() as s:
        return {
            e.study_instance_uid: (e.state, e.version, e.lease_owner)
            for e in s.scalars(select(Exam))
        }


def _takeovers(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(ExamEvent.detail).where(ExamEvent.detail.like("taken over%"))))


@pytest.mark.parametrize(
    "engine", [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]
)
def test_two_listeners_two_workers_one_exporter_one_worker_killed(
    tmp_path, engine, request, node_factory, storescp_factory
):
    """On PostgreSQL (the deployment across hosts) and on SQLite (processes on one host)."""
    shared = tmp_path / "shared"  # the shared data_dir (NFS in a real deployment)
    if engine == "postgresql":
        url = request.getfixturevalue("pg_server").new_database("topology")
    else:
        shared.mkdir()
        url = f"sqlite:///{shared / 'mammo-node.db'}"
    pacs = storescp_factory()
    settings = _settings(url, pacs.port, lease=3.0)
    victim_exam = make_exam(seed=500, **SIZE)
    victim = victim_exam[0].StudyInstanceUID

    listeners = [
        node_factory(settings, sub="listener", data_dir=shared, role="listener") for _ in range(2)
    ]
    node_factory(settings, sub="exporter", data_dir=shared, role="exporter")
    # Worker 1 hangs in the middle of the victim's reading (fault injection), so that it is
    # mid-exam when it is killed.
    w1 = node_factory(
        settings,
        sub="worker",
        data_dir=shared,
        role="worker",
        env={"MAMMO_NODE_FAILPOINT": f"hang:{victim}"},
    )
    db = Database(url)
    try:
        assert send(listeners[0].port, victim_exam) == [0] * 4
        wait_for(
            lambda: _states(db).get(victim, ("",))[0] == "processing",
            60,
            what="worker 1 reading the victim",
        )
        w2 = node_factory(settings, sub="worker", data_dir=shared, role="worker")

        # Ten studies at both listeners at once: studies 0-4 to one, 5-9 to the other, every
        # fourth split view by view between the two.
        exams = [make_exam(seed=600 + i, **SIZE) for i in range(N_EXAMS)]
        batches: list[list] = [[], []]
        for i, exam in enumerate(exams):
            if i % 4 == 0:
                batches[0] += exam[:2]
                batches[1] += exam[2:]
            else:
                batches[i * 2 // N_EXAMS] += exam
        statuses: list[list[int]] = [[], []]
        senders = [
            threading.Thread(
                target=lambda k=k: statuses[k].extend(send(listeners[k].port, batches[k]))
            )
            for k in (0, 1)
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        assert statuses[0] == [0] * len(batches[0]) and statuses[1] == [0] * len(batches[1])

        # Once worker 2 has read a few, worker 1 is killed mid-exam (the daemon: its
        # inference process goes with it). Worker 2 takes the victim over when worker 1's
        # lease runs out; then a fresh worker joins (after the takeover: a worker starting
        # on the same host would free a dead local worker's exam at once, see recover()).
        wait_for(
            lambda: sum(s == "done" for s, _, _ in _states(db).values()) >= 3,
            180,
            what="worker 2 reading",
        )
        assert _states(db)[victim][0] == "processing"  # still held by worker 1
        children = psutil.Process(w1.proc.pid).children(recursive=True)
        w1.stop(sig=signal.SIGKILL)
        psutil.wait_procs(children, timeout=30)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
        wait_for(lambda: _takeovers(db), 60, what="the victim taken over")
        node_factory(settings, sub="worker", data_dir=shared, role="worker")

        every = [e[0].StudyInstanceUID for e in exams] + [victim]
        wait_for(
            lambda: all(_states(db).get(u, ("",))[0] == "done" for u in every),
            300,
            what=f"all {N_EXAMS + 1} exams done: {_states(db)}",
        )
        wait_for(
            lambda: pacs.received() >= (N_EXAMS + 1) * OBJECTS_PER_EXAM,
            120,
            what="every result at the PACS",
        )
        time.sleep(2 * 3.0)  # two lease periods: no late, doubled delivery may follow
    finally:
        states = _states(db)
        with db.session() as s:
            results = dict(
                s.execute(
                    select(Exam.study_instance_uid, func.count(Result.id))
                    .join(Result, Result.exam_id == Exam.id)
                    .group_by(Exam.study_instance_uid)
                ).all()
            )
            done_events = s.execute(
                select(Exam.study_instance_uid, func.count())
                .join(ExamEvent, ExamEvent.exam_id == Exam.id)
                .where(ExamEvent.detail.like("% -> done %"))
                .group_by(Exam.study_instance_uid)
            ).all()
        takeover = _takeovers(db)
        db.close()
    # One reading per exam: version 1, done once, one set of result objects.
    assert {u: (st, v) for u, (st, v, _) in states.items()} == {u: ("done", 1) for u in every}
    assert dict(done_events) == {u: 1 for u in every}
    assert results == {u: OBJECTS_PER_EXAM for u in every}
    host = socket.gethostname()
    assert takeover == [
        f"taken over from {host}:{w1.proc.pid} by {host}:{w2.proc.pid}: its "
        f"lease ran out (attempt 1)"
    ]
    # Each object at the PACS exactly once.
    assert pacs.received() == (N_EXAMS + 1) * OBJECTS_PER_EXAM
    assert len(pacs.files()) == (N_EXAMS + 1) * OBJECTS_PER_EXAM
    logs = w2.log.read_text()
    assert "Traceback" not in logs
