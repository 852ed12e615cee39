"""Export: persisted outbound rows sent with C-STORE, retried with exponential backoff."""

from __future__ import annotations

import logging
import socket
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pynetdicom import build_context

from node import audit as A
from node.config import Config, Destination
from node.implementation import application_entity
from node.status import PENDING, PENDING_WARNING, STORED, SUCCESS
from storage.files import FileStore
from storage.records import Delivery
from storage.state import ExamStore

if TYPE_CHECKING:
    from node.metrics import NodeMetrics
    from storage.wakeup import Wake

log = logging.getLogger("mammo_node.export")



def nodelay(assoc: Any) -> None:
    """Disable Nagle's algorithm on an association's socket: a C-STORE request is a command
    PDU then data PDUs, and Nagle + the peer's delayed ACK would stall each one ~40 ms."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def tls_args(cfg: Config, dest: Destination) -> dict:
    """``ae.associate`` keyword for a destination with ``tls = true``: the PACS's certificate
    is verified against ``[tls] ca_certificates`` and its host name."""
    if not dest.tls:
        return {}
    from node.security import client_context

    return {"tls_args": (client_context(cfg), dest.host)}


def _find_instance(ae_title: str, dest: Destination, study_uid: str, sop_uid: str,
                   tls: dict | None = None) -> bool | None:
    """Ask the destination (C-FIND, Study Root, IMAGE level) whether it holds an instance;
    None when it cannot tell (no C-FIND there)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = application_entity(ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, **(tls or {}))
    if not assoc.is_established:
        return None
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.SOPInstanceUID = sop_uid
        found, final = False, None
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                return None
            final = int(status.Status)
            if final in (PENDING, PENDING_WARNING) and ident is not None and \
                    str(ident.get("SOPInstanceUID", "")) == sop_uid:
                found = True
        return found if final == SUCCESS else None
    except (ValueError, RuntimeError):  # no accepted C-FIND context
        return None
    finally:
        if assoc.is_established:
            assoc.release()


class Exporter(threading.Thread):
    """Sends due deliveries, one association per destination and batch."""

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore,
                 stop: threading.Event, *, audit: A.AuditLog | A.NullAudit,
                 wake: Wake | None = None, poll_seconds: float = 1.0,
                 metrics: NodeMetrics | None = None) -> None:
        super().__init__(name="export", daemon=True)
        self.audit = audit
        self.metrics = metrics  # node.metrics.NodeMetrics or None
        self.cfg, self.files, self.exams, self.stop = cfg, files, exams, stop
        #: Set when deliveries become due (storage.wakeup.Listener: NOTIFY on PostgreSQL);
        #: without one, the exporter looks again every ``poll_seconds``.
        self.wake: Wake = wake or threading.Event()
        self.poll = poll_seconds
        self.destinations = {d.name: d for d in cfg.destinations}

    def run(self) -> None:
        while not self.stop.is_set():
            woken = self.wake.wait(self.poll)
            self.wake.clear()
            if self.stop.is_set():
                break
            if self.metrics is not None:
                self.metrics.wakeups.labels("exporter", "notified" if woken else "poll").inc()
            try:
                while self.send_due() and not self.stop.is_set():
                    pass  # more were due than one claim takes
            except Exception:
                log.exception("export loop failed; retrying")
        try:
            self.exams.release_transfers()
        except Exception:
            log.exception("could not release this exporter's claims")

    def send_due(self) -> int:
        """Claim due deliveries (other exporters skip them) and send them; how many."""
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        lease = self.cfg.export.lease_seconds
        # Destinations paused by an administrator keep their queue until resumed.
        claimed = self.exams.claim_transfers(lease_seconds=lease,
                                             exclude=self.exams.paused_destinations())
        for row in claimed:
            by_dest[row.destination].append(row)
        from node.worker import Heartbeat

        with Heartbeat(lambda: self.exams.renew_transfer_leases(lease) >= 0, lease,
                       "deliveries"):
            for name, rows in by_dest.items():
                dest = self.destinations.get(name)
                if dest is None:
                    for r in rows:
                        self._failed(r, f"destination {name!r} is no longer configured")
                    continue
                self._send(dest, rows)
        return len(claimed)

    def _failed(self, row: Delivery, error: str) -> None:
        e = self.cfg.export
        state = self.exams.mark_failed(row.id, error, e.max_attempts,
                                       e.initial_delay_seconds, e.max_delay_seconds)
        log.log(logging.ERROR if state == "gave_up" else logging.WARNING,
                "delivery of %s to %s failed (attempt %d): %s%s", row.sop_instance_uid,
                row.destination, row.attempts + 1, error,
                "; giving up" if state == "gave_up" else "; will retry")

    def _already_there(self, dest: Destination, row: Delivery) -> bool:
        """For a delivery whose previous attempt was cut off: is it at the destination?"""
        found = _find_instance(self.cfg.node.ae_title, dest, row.study_instance_uid,
                               row.sop_instance_uid, tls_args(self.cfg, dest))
        return bool(found)

    def _send(self, dest: Destination, rows: list[Delivery]) -> None:
        datasets = []
        for r in rows:
            try:
                datasets.append((r, dcmread(self.files.abspath(r.path))))
            except Exception as exc:
                self._failed(r, f"cannot read result file: {exc}")
        if not datasets:
            return
        ae = application_entity(self.cfg.node.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                    for _, ds in datasets}
        ae.requested_contexts = [build_context(a, [t]) for a, t in sorted(contexts)]
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                 **tls_args(self.cfg, dest))
        except (OSError, ValueError) as exc:  # TLS set-up (certificate files) failed
            for r, _ in datasets:
                self._failed(r, f"cannot open TLS to {dest.name}: {exc}")
            return
        if assoc.is_established:
            nodelay(assoc)
        if not assoc.is_established:
            for r, _ in datasets:
                self._failed(r, f"association with {dest.ae_title}@{dest.host}:{dest.port} "
                                f"failed{' (TLS)' if dest.tls else ''}")
            return
        to = {"name": dest.name, "ae_title": dest.ae_title, "host": dest.host,
              "port": dest.port, "tls": dest.tls}
        studies = sorted({r.study_instance_uid for r, _ in datasets})
        self.audit.event(A.BEGIN_TRANSFER, A.SUCCESS, service="export", to=to, studies=studies,
                         instances=len(datasets))
        sent = failed = 0
        try:
            for r, ds in datasets:
                if not assoc.is_established:
                    self._failed(r, "association lost")
                    continue
                if r.interrupted and self._already_there(dest, r):
                    self.exams.mark_sent(r.id)
                    log.info("%s was already at %s (a send interrupted by a restart had "
                             "reached it): not sent again", r.sop_instance_uid, dest.name)
                    continue
                if not self.exams.mark_in_flight(r.id, self.cfg.export.lease_seconds):
                    log.warning("%s to %s: taken over by another exporter; not sent here",
                                r.sop_instance_uid, dest.name)
                    continue
                if self.metrics is not None:
                    self.metrics.export_attempts.labels(dest.name).inc()
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code in STORED:
                    self.exams.mark_sent(r.id)
                    sent += 1
                    if self.metrics is not None:
                        self.metrics.export_sent.labels(dest.name).inc()
                    log.info("sent %s to %s", r.sop_instance_uid, dest.name)
                else:
                    failed += 1
                    if self.metrics is not None:
                        self.metrics.export_failures.labels(dest.name).inc()
                    self._failed(r, "no response" if code is None else f"status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
            self.audit.event(A.INSTANCES_TRANSFERRED, A.SUCCESS if not failed else
                             A.MINOR_FAILURE, service="export", to=to, studies=studies,
                             sent=sent, failed=failed or None)
            if self.metrics is not None and sent:
                for study in studies:
                    latency = self.exams.delivered_latency(study)
                    if latency is not None:
                        self.metrics.latency.observe(latency)
