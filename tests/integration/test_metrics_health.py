"""/metrics (Prometheus text format), /healthz and /readyz on the node's HTTP server."""

from __future__ import annotations

import re

import requests
from prometheus_client.parser import text_string_to_metric_families

from inference.synthetic import make_exam
from tests.helpers import free_port, send, wait_for

SIZE = dict(rows=320, cols=256)


def _web(node_factory, storescp_factory=None, settings=None, **dicomweb):
    port = free_port()
    s = {
        "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": port, **dicomweb},
        "export": {"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1},
    }
    if storescp_factory is not None:
        pacs = storescp_factory()
        s["destinations"] = [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ]
    s.update(settings or {})
    node = node_factory(s, worker=True)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{base}/healthz") is not None, 30, what="HTTP up")
    return node, base


def _get(url, **kw):
    try:
        return requests.get(url, timeout=5, **kw)
    except requests.RequestException:
        return None


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_probes_after_an_exam(node_factory, storescp_factory):
    node, base = _web(
        node_factory, storescp_factory, settings={"inference": {"warm_up_exam": True}}
    )
    wait_for(
        lambda: _get(f"{base}/readyz").status_code == 200, 120, interval=1, what="ready (model)"
    )
    # Ready only once a synthetic exam went through every stage (warm start, issue 21); it
    # leaves nothing behind (the exam counts below are the real exam's only).
    warm = re.search(r"warm-up exam read in ([0-9.]+) s", node.log.read_text())
    assert warm and float(warm.group(1)) > 0
    exam = make_exam(seed=101, **SIZE)
    assert send(node.port, exam) == [0] * 4
    study = exam[0].StudyInstanceUID
    node.wait_exam(study, "done", timeout=180)
    wait_for(
        lambda: node.exam(study)["delivery"].get("pacs", {}).get("sent") == 6, 60, what="delivered"
    )

    def latency_seen():
        m = _samples(_get(f"{base}/metrics").text)
        return m if m.get(("mammo_node_results_latency_seconds_count", ())) == 1 else None

    m = wait_for(latency_seen, 30, what="the latency histogram")
    assert m[("mammo_node_instances_received_total", (("calling_ae", "PYNETDICOM"),))] == 4
    assert m[("mammo_node_bytes_received_total", (("calling_ae", "PYNETDICOM"),))] > 4 * 320 * 256
    assert m[("mammo_node_exams", (("state", "done"),))] == 1
    assert m[("mammo_node_exams", (("state", "ready"),))] == 0
    assert m[("mammo_node_inference_seconds_count", (("stage", "total"),))] == 1
    assert m[("mammo_node_export_attempts_total", (("destination", "pacs"),))] == 6
    assert m[("mammo_node_disk_free_bytes", ())] > 0
    assert m[("mammo_node_model_loaded", ())] == 1
    assert 0 < m[("mammo_node_results_latency_seconds_sum", ())] < 180
    r = _get(f"{base}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _get(f"{base}/healthz").json() == {"status": "alive"}
    ready = _get(f"{base}/readyz").json()
    assert ready["ready"] and all(c["ok"] for c in ready["checks"].values())
    assert set(ready["checks"]) == {
        "database",
        "model",
        "disk",
        "listener",
        "thread worker",
        "thread export",
        "thread retention",
        "thread stable-timer",
    }


def test_readyz_says_why_when_not_ready(node_factory, tmp_path):
    # A safetensors file (the start-up check passes) that is not a model (its load fails).
    header = b'{"__metadata__": {"format": "pt"}}'
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    node, base = _web(
        node_factory,
        settings={"inference": {"checkpoint": str(bad)}, "storage": {"min_free_mb": 10_000_000}},
    )

    seen = []

    def failed() -> bool:  # (a 503 Response is falsy: keep it aside)
        r = _get(f"{base}/readyz")
        seen.append(r)
        return r is not None and bool(r.json()["checks"]["model"].get("error"))

    wait_for(failed, 120, what="the model failure in /readyz")
    r = seen[-1]
    assert r.status_code == 503 and not r.json()["ready"]
    checks = r.json()["checks"]
    assert checks["disk"]["ok"] is False and checks["database"]["ok"] is True
    assert checks["listener"]["ok"] is True
    assert _get(f"{base}/healthz").status_code == 200  # alive all the same
    m = _samples(_get(f"{base}/metrics").text)
    assert m[("mammo_node_model_loaded", ())] == 0


def test_metrics_need_a_token_when_tokens_are_set(node_factory):
    node, base = _web(node_factory, token="metrics-token")
    assert _get(f"{base}/metrics").status_code == 401
    r = _get(f"{base}/metrics", headers={"Authorization": "Bearer metrics-token"})
    assert r.status_code == 200 and "mammo_node_uptime_seconds" in r.text
    assert _get(f"{base}/healthz").status_code == 200  # probes stay open


def test_json_logs_for_collectors(node_factory):
    import json

    node = node_factory({"logging": {"format": "json"}})
    assert send(node.port, make_exam(seed=102, rows=64, cols=64)[:1]) == [0]
    node.stop()
    lines = [json.loads(x) for x in node.log.read_text().splitlines() if x.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert any("stored" in x["message"] and x["logger"] == "mammo_node.ingest" for x in lines)
