"""Prometheus metrics (``/metrics``, text format, names prefixed ``mammo_node_``).

Counters and histograms are updated where things happen (ingest, worker, exporter); gauges
that describe stored state (exams by state, queue depths, free disk, model loaded) are read
at scrape time by :class:`_StateCollector`, so they are never stale. One registry per node
(no process-global state: tests and tools can make several).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Distinct calling AE titles kept as label values; more are counted as "other" (a peer
#: must not be able to grow the metrics without bound by inventing AE titles).
MAX_AE_LABELS = 100


#: What a process runs (node.daemon.ROLES): the instruments of each part it runs.
PARTS = frozenset({"listener", "worker", "exporter"})


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict], parts: frozenset[str]) -> None:
        self.read = read
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        s = self.read()
        exams = GaugeMetricFamily("mammo_node_exams", "Exams by state", labels=["state"])
        for state, n in s["exams"].items():
            exams.add_metric([state], n)
        yield exams
        if self.parts & {"listener", "exporter"}:  # the dashboard's node shows it too
            queue = GaugeMetricFamily(
                "mammo_node_export_queue",
                "Result objects waiting for delivery, by destination and state",
                labels=["destination", "state"],
            )
            for q in s.get("queue", []):  # storage.reports.QueueDepth
                queue.add_metric([q.destination, q.state], q.waiting)
            yield queue
        yield GaugeMetricFamily(
            "mammo_node_disk_free_bytes", "Free bytes in data_dir", value=s["free_bytes"]
        )
        if "worker" in self.parts:
            yield GaugeMetricFamily(
                "mammo_node_model_loaded",
                "1 when the inference process has its model",
                value=s["model"],
            )
        yield GaugeMetricFamily(
            "mammo_node_uptime_seconds", "Seconds since the node started", value=s["uptime"]
        )


class NodeMetrics:
    """The node's instruments and their registry. ``parts``: what the process runs; only
    their instruments are exposed (a worker process's /metrics has no C-STORE counters, an
    exporter's no inference histogram), the others count into a registry nobody reads."""

    def __init__(self, parts: Iterable[str] = PARTS) -> None:
        self.parts = frozenset(parts)
        self.registry = CollectorRegistry(auto_describe=True)
        unread = CollectorRegistry(auto_describe=True)

        def of(part: str) -> CollectorRegistry:
            return self.registry if part in self.parts else unread

        r = of("listener")
        self.instances = Counter(
            "mammo_node_instances_received", "Instances stored", ["calling_ae"], registry=r
        )
        self.bytes = Counter(
            "mammo_node_bytes_received", "Bytes of instances stored", ["calling_ae"], registry=r
        )
        self.refused = Counter(
            "mammo_node_instances_refused", "Instances refused, by status", ["status"], registry=r
        )
        r = of("worker")
        self.inference = Histogram(
            "mammo_node_inference_seconds",
            "Seconds of inference work per exam, by stage",
            ["stage"],
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
        )
        self.exams_read = Counter(
            "mammo_node_exams_read",
            "Exams this worker finished reading, by outcome",
            ["outcome"],
            registry=r,
        )
        self.exam_failures = Counter(
            "mammo_node_exam_failures", "Exam readings that failed, by kind", ["kind"], registry=r
        )
        self.inference_restarts = Counter(
            "mammo_node_inference_restarts",
            "Inference process restarts (timeouts, crashes)",
            registry=r,
        )
        r = of("exporter")
        self.latency = Histogram(
            "mammo_node_results_latency_seconds",
            "Seconds from an exam's last image to all its results delivered",
            registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 14400),
        )
        self.export_attempts = Counter(
            "mammo_node_export_attempts",
            "C-STORE attempts of result objects",
            ["destination"],
            registry=r,
        )
        self.export_failures = Counter(
            "mammo_node_export_failures",
            "Failed C-STORE attempts of result objects",
            ["destination"],
            registry=r,
        )
        self.export_sent = Counter(
            "mammo_node_export_sent",
            "Result objects delivered (C-STORE success)",
            ["destination"],
            registry=r,
        )
        self.wakeups = Counter(
            "mammo_node_wakeups",
            "Times a worker or an exporter looked for work, by why: notified (new work was "
            "announced) or poll (the poll interval passed)",
            ["role", "cause"],
            registry=self.registry if self.parts & {"worker", "exporter"} else unread,
        )
        self._aes: set[str] = set()
        self._lock = threading.Lock()

    def watch_state(self, read: Callable[[], dict]) -> None:
        """Register the scrape-time reader of stored state (see :class:`_StateCollector`)."""
        self.registry.register(_StateCollector(read, self.parts))

    def ae_label(self, ae: str) -> str:
        ae = (ae or "").strip() or "-"
        with self._lock:
            if ae in self._aes:
                return ae
            if len(self._aes) < MAX_AE_LABELS:
                self._aes.add(ae)
                return ae
        return "other"

    def stored(self, calling_ae: str, size: int) -> None:
        label = self.ae_label(calling_ae)
        self.instances.labels(label).inc()
        self.bytes.labels(label).inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
