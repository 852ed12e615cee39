"""Split roles on PostgreSQL wake each other at once and each serve their own /metrics.

A listener, a worker and an exporter as separate processes on one PostgreSQL server, with
``[roles] poll_seconds = 60``: had they still only polled, the exam's hop from ``ready`` to its
claim would wait for the worker's next poll (it polled when it started, moments before the
exam arrived) and the SRs would wait for the exporter's first poll (it starts last, 60 s before
its first look), so each hop would take most of a minute. LISTEN / NOTIFY wakes them: each hop
is measured from the database's own timestamps (the exam's timeline, the deliveries' queue and
sent times) and must stay under HOP_BOUND, generous next to the milliseconds the event path
takes and far below the poll path's tens of seconds.

Each role process serves /healthz, /readyz and /metrics on its own port, with its own
instruments: the worker's exams read and inference seconds, the exporter's objects sent and
queue, the listener's instances received.
"""

from __future__ import annotations

import datetime as dt

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from inference.synthetic import make_exam
from storage.db import Database
from storage.models import Exam, ExamEvent, Outbound, Result
from tests.helpers import free_port, send, wait_for

pytestmark = pytest.mark.postgres

POLL_SECONDS = 60.0
#: Ready -> claimed and queued -> delivered: milliseconds on the event path; a poll would take
#: tens of seconds (see the module's docstring).
HOP_BOUND = 5.0


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _names(text: str) -> set[str]:
    return {fam.name for fam in text_string_to_metric_families(text)}


def _sr_deliveries(db: Database, study: str) -> list[tuple[dt.datetime, dt.datetime | None]]:
    """(queued, sent) of the exam's SR deliveries."""
    with db.session() as s:
        return [
            tuple(r)
            for r in s.execute(  # type: ignore[misc]
                select(Outbound.next_attempt_at, Outbound.sent_at)
                .join(Result, Result.id == Outbound.result_id)
                .join(Exam, Exam.id == Result.exam_id)
                .where(Exam.study_instance_uid == study, Result.kind.like("sr-%"))
            ).all()
        ]


def _hops(db: Database, study: str) -> tuple[float, float]:
    """(ready -> claimed, the SRs' queued -> first sent), in seconds."""
    with db.session() as s:
        details = s.execute(
            select(ExamEvent.detail, ExamEvent.at)
            .join(Exam, Exam.id == ExamEvent.exam_id)
            .where(Exam.study_instance_uid == study)
            .order_by(ExamEvent.id)
        ).all()
    ready = [at for d, at in details if d.startswith("receiving -> ready")]
    claimed = [at for d, at in details if d.startswith("ready -> processing")]
    assert len(ready) == 1 and len(claimed) == 1, details
    srs = _sr_deliveries(db, study)
    first = min(at for _, at in srs if at is not None) - min(q for q, _ in srs)
    return (claimed[0] - ready[0]).total_seconds(), first.total_seconds()


def test_split_roles_wake_at_once_and_each_serves_its_own_metrics(
    pg_server, node_factory, storescp_factory, tmp_path
):
    url = pg_server.new_database("roles")
    pacs = storescp_factory()
    ports = {role: free_port() for role in ("listener", "worker", "exporter")}
    settings = {
        "node": {"database_url": url},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ],
        "roles": {
            "poll_seconds": POLL_SECONDS,
            **{f"{role}_metrics_port": port for role, port in ports.items()},
        },
        "peers": [{"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
    }
    shared = tmp_path / "shared"
    listener = node_factory(settings, sub="listener", data_dir=shared, role="listener")
    node_factory(settings, sub="worker", data_dir=shared, role="worker")  # polled once now
    node_factory(settings, sub="exporter", data_dir=shared, role="exporter")  # first poll: 60 s
    exam = make_exam(seed=4242, rows=320, cols=256)
    study = exam[0].StudyInstanceUID
    assert send(listener.port, exam) == [0] * 4

    db = Database(url)
    try:
        wait_for(
            lambda: sum(at is not None for _, at in _sr_deliveries(db, study)) == 2,
            300,
            what="both SRs at the PACS",
        )
        to_claim, to_send = _hops(db, study)
    finally:
        db.close()
    assert 0 <= to_claim < HOP_BOUND, f"ready -> claimed took {to_claim:.2f} s"
    assert 0 <= to_send < HOP_BOUND, f"SRs queued -> at the PACS took {to_send:.2f} s"
    wait_for(lambda: pacs.received() == 6, 60, what="the 2 SRs and 4 SCs at the PACS")

    base = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    for role, url_ in base.items():
        assert requests.get(f"{url_}/healthz", timeout=10).json() == {
            "status": "alive",
            "role": role,
        }
        ready = requests.get(f"{url_}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
        checks = set(ready.json()["checks"])
        assert {"database", "disk"} <= checks
        assert ("model" in checks) == (role == "worker")
    assert "thread worker" in requests.get(f"{base['worker']}/readyz", timeout=10).json()["checks"]
    assert (
        "thread export" in requests.get(f"{base['exporter']}/readyz", timeout=10).json()["checks"]
    )

    worker_text = requests.get(f"{base['worker']}/metrics", timeout=10).text
    exporter_text = requests.get(f"{base['exporter']}/metrics", timeout=10).text
    listener_text = requests.get(f"{base['listener']}/metrics", timeout=10).text
    w, e, li = _samples(worker_text), _samples(exporter_text), _samples(listener_text)
    # The worker: its reading, its inference stages, its model, woken by the notification.
    assert w[("mammo_node_exams_read_total", (("outcome", "done"),))] == 1
    assert w[("mammo_node_inference_seconds_count", (("stage", "total"),))] == 1
    assert w[("mammo_node_model_loaded", ())] == 1
    assert w[("mammo_node_wakeups_total", (("cause", "notified"), ("role", "worker")))] >= 1
    assert not _names(worker_text) & {
        "mammo_node_export_attempts",
        "mammo_node_export_sent",
        "mammo_node_export_queue",
        "mammo_node_instances_received",
    }
    # The exporter: what it sent, its queue (empty now), woken by the notification.
    wait_for(
        lambda: (
            _samples(requests.get(f"{base['exporter']}/metrics", timeout=10).text).get(
                ("mammo_node_export_sent_total", (("destination", "pacs"),))
            )
            == 6
        ),
        30,
        what="6 objects sent in the exporter's metrics",
    )
    assert e[("mammo_node_wakeups_total", (("cause", "notified"), ("role", "exporter")))] >= 1
    assert "mammo_node_export_queue" in _names(exporter_text)
    assert not _names(exporter_text) & {
        "mammo_node_inference_seconds",
        "mammo_node_exams_read",
        "mammo_node_model_loaded",
        "mammo_node_instances_received",
    }
    # The listener: what it received; no worker or exporter instruments.
    assert li[("mammo_node_instances_received_total", (("calling_ae", "PYNETDICOM"),))] == 4
    assert not _names(listener_text) & {
        "mammo_node_inference_seconds",
        "mammo_node_export_sent",
        "mammo_node_wakeups",
    }
