"""Export: persisted outbound rows sent with C-STORE, retried with exponential backoff."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from contextlib import ExitStack
from typing import TYPE_CHECKING

from pydicom import dcmread

from node import audit as A
from node.config import Config, Destination
from node.scu import AssociationFailed, TLSArgs, association, contexts_for, destination_tls
from node.status import PENDING, PENDING_WARNING, STORED, SUCCESS
from storage.deliveries import Deliveries
from storage.files import FileStore
from storage.records import Delivery
from storage.reports import Reports

if TYPE_CHECKING:
    from node.metrics import NodeMetrics
    from storage.wakeup import Wake

log = logging.getLogger("mammo_node.export")

#: Seconds for ACSE, DIMSE and the network: an export's association, and the C-FIND that asks
#: whether an interrupted send had reached the destination.
SEND_TIMEOUT = 30
FIND_TIMEOUT = 15


def _find_instance(
    ae_title: str, dest: Destination, study_uid: str, sop_uid: str, tls: TLSArgs | None = None
) -> bool | None:
    """Ask the destination (C-FIND, Study Root, IMAGE level) whether it holds an instance;
    None when it cannot tell (no C-FIND there, or it does not associate)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    find = StudyRootQueryRetrieveInformationModelFind
    try:
        with association(
            ae_title,
            dest.host,
            dest.port,
            dest.ae_title,
            contexts_for([str(find)]),
            FIND_TIMEOUT,
            tls,
        ) as assoc:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = ""
            q.SOPInstanceUID = sop_uid
            found, final = False, None
            for status, ident in assoc.send_c_find(q, find):
                if not status:
                    return None
                final = int(status.Status)
                if (
                    final in (PENDING, PENDING_WARNING)
                    and ident is not None
                    and str(ident.get("SOPInstanceUID", "")) == sop_uid
                ):
                    found = True
            return found if final == SUCCESS else None
    except AssociationFailed as exc:
        if exc.tls_setup:
            raise  # certificate files: not a question of what the destination holds
        return None
    except (ValueError, RuntimeError):  # no accepted C-FIND context
        return None


def _not_associated(dest: Destination, exc: Exception) -> str:
    """A delivery's error when its association could not be opened."""
    if isinstance(exc, AssociationFailed) and not exc.tls_setup:
        return str(exc)  # "association with AE@host:port failed[ (TLS)]"
    cause = exc.__cause__ if isinstance(exc, AssociationFailed) else exc
    return f"cannot open TLS to {dest.name}: {cause}"


class Exporter(threading.Thread):
    """Sends due deliveries, one association per destination and batch."""

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        deliveries: Deliveries,
        reports: Reports,
        stop: threading.Event,
        *,
        audit: A.AuditLog | A.NullAudit,
        wake: Wake | None = None,
        poll_seconds: float = 1.0,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(name="export", daemon=True)
        self.audit = audit
        self.metrics = metrics  # node.metrics.NodeMetrics or None
        self.cfg, self.files, self.stop = cfg, files, stop
        self.deliveries, self.reports = deliveries, reports
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
            self.deliveries.release_transfers()
        except Exception:
            log.exception("could not release this exporter's claims")

    def send_due(self) -> int:
        """Claim due deliveries (other exporters skip them) and send them; how many."""
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        lease = self.cfg.export.lease_seconds
        # Destinations paused by an administrator keep their queue until resumed.
        claimed = self.deliveries.claim_transfers(
            lease_seconds=lease, exclude=self.deliveries.paused_destinations()
        )
        for row in claimed:
            by_dest[row.destination].append(row)
        from node.worker import Heartbeat

        with Heartbeat(
            lambda: self.deliveries.renew_transfer_leases(lease) >= 0, lease, "deliveries"
        ):
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
        state = self.deliveries.mark_failed(
            row.id, error, e.max_attempts, e.initial_delay_seconds, e.max_delay_seconds
        )
        log.log(
            logging.ERROR if state == "gave_up" else logging.WARNING,
            "delivery of %s to %s failed (attempt %d): %s%s",
            row.sop_instance_uid,
            row.destination,
            row.attempts + 1,
            error,
            "; giving up" if state == "gave_up" else "; will retry",
        )

    def _already_there(self, dest: Destination, row: Delivery) -> bool:
        """For a delivery whose previous attempt was cut off: is it at the destination?"""
        found = _find_instance(
            self.cfg.node.ae_title,
            dest,
            row.study_instance_uid,
            row.sop_instance_uid,
            destination_tls(self.cfg, dest),
        )
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
        contexts = {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets
        }
        # The stack holds the association: released (if still up) before the end of the
        # transfer is audited.
        with ExitStack() as stack:
            try:
                assoc = stack.enter_context(
                    association(
                        self.cfg.node.ae_title,
                        dest.host,
                        dest.port,
                        dest.ae_title,
                        contexts_for(sorted(contexts)),
                        SEND_TIMEOUT,
                        destination_tls(self.cfg, dest),
                        no_delay=True,
                    )
                )
            except (AssociationFailed, OSError, ValueError) as exc:  # OSError, ValueError:
                for r, _ in datasets:  # TLS certificate files
                    self._failed(r, _not_associated(dest, exc))
                return
            to = {
                "name": dest.name,
                "ae_title": dest.ae_title,
                "host": dest.host,
                "port": dest.port,
                "tls": dest.tls,
            }
            studies = sorted({r.study_instance_uid for r, _ in datasets})
            self.audit.event(
                A.BEGIN_TRANSFER,
                A.SUCCESS,
                service="export",
                to=to,
                studies=studies,
                instances=len(datasets),
            )
            sent = failed = 0
            try:
                for r, ds in datasets:
                    if not assoc.is_established:
                        self._failed(r, "association lost")
                        continue
                    if r.interrupted and self._already_there(dest, r):
                        self.deliveries.mark_sent(r.id)
                        log.info(
                            "%s was already at %s (a send interrupted by a restart "
                            "had reached it): not sent again",
                            r.sop_instance_uid,
                            dest.name,
                        )
                        continue
                    if not self.deliveries.mark_in_flight(r.id, self.cfg.export.lease_seconds):
                        log.warning(
                            "%s to %s: taken over by another exporter; not sent here",
                            r.sop_instance_uid,
                            dest.name,
                        )
                        continue
                    if self.metrics is not None:
                        self.metrics.export_attempts.labels(dest.name).inc()
                    status = assoc.send_c_store(ds)
                    code = int(status.Status) if status and "Status" in status else None
                    if code in STORED:
                        self.deliveries.mark_sent(r.id)
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
                stack.close()
                self.audit.event(
                    A.INSTANCES_TRANSFERRED,
                    A.SUCCESS if not failed else A.MINOR_FAILURE,
                    service="export",
                    to=to,
                    studies=studies,
                    sent=sent,
                    failed=failed or None,
                )
                if self.metrics is not None and sent:
                    for study in studies:
                        latency = self.reports.delivered_latency(study)
                        if latency is not None:
                            self.metrics.latency.observe(latency)
