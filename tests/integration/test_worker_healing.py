"""A worker that heals itself: a hung inference is killed and the exams behind it go on,
transient failures are retried then failed with the reason, a model that cannot load leaves
exams ready and says why, and no child process outlives a daemon killed at any moment."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from inference.synthetic import make_exam
from tests.helpers import free_port, send, wait_for

SIZE = dict(rows=320, cols=256)


def _node(node_factory, env=None, start=True, **inference):
    settings = {
        "inference": {
            "timeout_seconds": 20,
            "max_attempts": 2,
            "retry_delay_seconds": 0.5,
            **inference,
        },
        "grouping": {"stable_seconds": 3600},
    }
    return node_factory(settings, worker=True, env=env, start=start)


def test_hung_inference_is_killed_and_the_next_exam_goes_on(node_factory):
    hung = make_exam(seed=91, **SIZE)
    good = make_exam(seed=92, **SIZE)
    study = hung[0].StudyInstanceUID
    # The warm-up exam on: without it the good exam's first reading in each new inference
    # process pays the start-up (numba's kernels, decoders), which on a loaded machine ran
    # past a short timeout too.
    node = _node(
        node_factory,
        env={"MAMMO_NODE_FAILPOINT": f"hang:{study}"},
        timeout_seconds=6,
        warm_up_exam=True,
    )
    assert send(node.port, hung) == [0] * 4
    assert send(node.port, good) == [0] * 4
    e = node.wait_exam(study, "failed", timeout=120)
    assert "longer than 6 s" in e["reason"] and "after 2 attempts" in e["reason"]
    assert any("attempt 1 failed" in n for n in e["notes"])
    node.wait_exam(good[0].StudyInstanceUID, "done", timeout=120)
    log = node.log.read_text()
    assert log.count("restarting the inference process") >= 2


def test_crashing_inference_is_retried_then_failed_with_the_reason(node_factory):
    exam = make_exam(seed=93, **SIZE)
    study = exam[0].StudyInstanceUID
    node = _node(node_factory, env={"MAMMO_NODE_FAILPOINT": f"crash:{study}"})
    assert send(node.port, exam) == [0] * 4
    e = node.wait_exam(study, "failed", timeout=120)
    assert "the inference process died" in e["reason"]
    # reprocess reads it again as a new version; without the fault it would succeed.
    r = node.cli("reprocess", study)
    assert "version 2 is ready" in r.stdout


def test_the_next_exam_is_read_ahead_and_a_crash_there_charges_neither_exam(node_factory, tmp_path):
    """While an exam's Secondary Captures are built, the next ready exam is decoded and
    preprocessed ahead ([inference] read_ahead, issue 21): B, read ahead during A's images,
    says so in its stages. C crashes the inference process while it is read ahead during
    D's images: D goes back to ready with no attempt counted and is read again (done); C is
    not read ahead again, and crashes on its own, charged to itself (failed)."""
    a, b, d, c = (make_exam(seed=s, **SIZE) for s in (95, 96, 97, 98))
    uid = {k: e[0].StudyInstanceUID for k, e in zip("abdc", (a, b, d, c))}
    gate = tmp_path / "gate"
    node = _node(
        node_factory,
        env={"MAMMO_NODE_FAILPOINT": f"gate:{uid['a']}:{gate},crash:{uid['c']}"},
        max_attempts=1,  # C fails at its own first crash: the one read ahead was not counted
    )
    assert send(node.port, a) == [0] * 4
    wait_for(lambda: Path(f"{gate}.reached").exists(), 120, what="exam A held mid-reading")
    for exam in (b, d, c):  # ready, in this order, while A is held
        assert send(node.port, exam) == [0] * 4
    wait_for(lambda: sum(e["state"] == "ready" for e in node.exams()) == 3, 30, what="three ready")
    gate.touch()
    for k in "abd":
        node.wait_exam(uid[k], "done", timeout=120)
    failed = node.wait_exam(uid["c"], "failed", timeout=120)
    assert "the inference process died" in failed["reason"], failed
    assert "gave up after 1 attempts" in failed["reason"], failed
    log = node.log.read_text()
    done_b = [line for line in log.splitlines() if f"exam {uid['b']} v1 done in" in line]
    assert len(done_b) == 1 and "ahead_wait" in done_b[0], done_b
    assert f"the inference process died while exam {uid['c']} was read ahead" in log
    exam_d = node.exam(uid["d"])
    assert any("read ahead); queued again" in n for n in exam_d["notes"]), exam_d["notes"]
    assert not any("attempt 1 failed" in n for n in exam_d["notes"]), exam_d["notes"]


def test_model_that_cannot_load_leaves_exams_ready(node_factory, tmp_path):
    # A safetensors file (the start-up check passes) that is not a model (its load fails).
    header = b'{"__metadata__": {"format": "pt"}}'
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    node = _node(node_factory, checkpoint=str(bad))
    exam = make_exam(seed=94, **SIZE)
    assert send(node.port, exam) == [0] * 4
    wait_for(
        lambda: "cannot load the model" in node.log.read_text(),
        120,
        what="the model load failure in the log",
    )
    assert node.exam(exam[0].StudyInstanceUID)["state"] == "ready"


def test_complete_processes_a_partial_exam_now(node_factory):
    node = _node(node_factory)
    exam = make_exam(seed=95, **SIZE)[:3]
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 3
    assert node.exam(study)["state"] == "receiving"
    r = node.cli("complete", study)
    assert "ready with R-MLO missing" in r.stdout
    e = node.wait_exam(study, "done", timeout=120)
    assert "completed by request" in e["reason"]


def _tagged(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``tag``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if f"MAMMO_NODE_TEST_TAG={tag}".encode() in env and ") Z " not in stat:
            pids.append(int(d.name))
    return pids


def test_no_child_outlives_a_daemon_killed_at_any_moment(node_factory):
    """SIGKILL the daemon at seeded random moments of its start-up and of its work, nine
    times, and count the processes of it that are left (the inference process included)."""
    rng = random.Random(20261129)
    exam = make_exam(seed=96, **SIZE)
    for i in range(9):  # three kills in each of the three phases
        tag = uuid.uuid4().hex
        env = {"MAMMO_NODE_TEST_TAG": tag}
        if i % 3 == 0:  # during start-up: before the listener answers
            node = _node(node_factory, env=env, start=False).launch()
        else:
            node = _node(node_factory, env=env)
            if i % 3 == 2:
                send(node.port, exam)  # at work: an exam being read when it dies
        time.sleep(rng.uniform(0.0, 4.0))
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        wait_for(
            lambda tag=tag: not _tagged(tag),
            15,
            interval=0.2,
            what=f"the children of killed daemon #{i + 1} to go",
        )


@pytest.mark.postgres
def test_postgresql_restarted_mid_exam_the_exam_ends_done_once(
    node_factory, storescp_factory, tmp_path
):
    """The PostgreSQL server stops while an exam is being read and the reading finishes
    while it is down: the worker neither dies nor fails the exam; once the server is back
    the exam is read again, ends ``done`` at version 1 and each result reaches the PACS once;
    /readyz reports every background thread alive."""
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    try:
        pacs = storescp_factory()
        web = free_port()
        exam = make_exam(seed=95, **SIZE)
        study = exam[0].StudyInstanceUID
        gate = tmp_path / "gate"
        node = node_factory(
            {
                "node": {"database_url": server.new_database("restart")},
                "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web},
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
                ],
                "export": {"initial_delay_seconds": 0.5, "max_delay_seconds": 1.0},
                "inference": {"timeout_seconds": 120, "max_attempts": 2},
            },
            worker=True,
            env={"MAMMO_NODE_FAILPOINT": f"gate:{study}:{gate}"},
        )
        assert send(node.port, exam) == [0] * 4
        wait_for(lambda: Path(f"{gate}.reached").exists(), 180, what="the exam mid-reading")
        server.stop_server()
        gate.touch()  # the reading goes on, and meets no database
        wait_for(
            lambda: "the database failed" in node.log.read_text(),
            120,
            what="the worker seeing the database gone",
        )
        server.start_server()
        e = node.wait_exam(study, "done", timeout=180)
        assert e["version"] == 1 and not any("failed" in n for n in e["notes"])
        assert any("interrupted (database error" in n for n in e["notes"])
        wait_for(
            lambda: node.exam(study)["delivery"].get("pacs", {}).get("sent") == 6,
            60,
            what="6 objects at the PACS",
        )
        uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in pacs.files()]
        assert len(uids) == 6 and len(set(uids)) == 6
        r = requests.get(f"http://127.0.0.1:{web}/readyz", timeout=30)
        checks = r.json()["checks"]
        assert r.status_code == 200, checks
        page = requests.get(f"http://127.0.0.1:{web}/ui/system", timeout=30).text
        for name in ("worker", "export", "retention", "stable-timer"):
            assert checks[f"thread {name}"]["ok"], name
            assert f"thread {name}" in page  # the dashboard's System page lists them too
        assert node.proc is not None and node.proc.poll() is None
    finally:
        server.stop()
