"""Query/Retrieve SCP: C-FIND (Patient Root and Study Root; PATIENT, STUDY, SERIES, IMAGE),
C-MOVE to configured destinations and C-GET, over every instance the node holds (received
images and produced results).

The matching keys, their rules and the answers are :mod:`node.query`'s (shared with QIDO-RS).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node import audit as A
from node.compat import send_find_responses, wait_until_sent
from node.config import Config
from node.handlers import refuse_move
from node.query import (
    ATTRIBUTES,
    LEVELS,
    UNIQUE_KEY,
    Query,
    QueryError,
    QueryService,
    QueryUnavailable,
    from_identifier,
)
from node.scu import contexts_for, move_destination
from node.security import AccessControl
from node.status import CANCELLED, NOT_AUTHORIZED, PENDING
from storage.files import FileStore
from storage.models import Instance
from storage.reports import Reports

if TYPE_CHECKING:
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger("mammo_node.qr")

QR_CONTEXTS = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]
PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}


def _contexts(rows: list[Instance]) -> list[PresentationContext]:
    """Presentation contexts for sending ``rows``: each SOP class in its stored transfer
    syntax, with the uncompressed ones as fallbacks (at most 128, as DICOM allows)."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for ts in (r.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in by_class[r.sop_class_uid]:
                by_class[r.sop_class_uid].append(ts)
    return contexts_for(list(by_class.items())[:128])


def _status(code: int, comment: str) -> Dataset:
    """A failure status with its reason (Error Comment, LO: at most 64 characters)."""
    st = Dataset()
    st.Status = code
    st.ErrorComment = comment[:64]
    return st


class QueryRetrieveSCP:
    """C-FIND / C-MOVE / C-GET handlers over the node's store."""

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        reports: Reports,
        *,
        access: AccessControl,
        audit: A.AuditLog | A.NullAudit,
    ) -> None:
        self.cfg, self.files = cfg, files
        self.audit = audit
        self.access = access
        self.queries = QueryService(reports)

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    def _parse(self, identifier: Dataset, model: str) -> Query:
        query = from_identifier(identifier)
        if query.level == "PATIENT" and model not in PATIENT_ROOT:
            raise QueryError("PATIENT level needs the Patient Root model")
        return query

    # -- handlers ------------------------------------------------------------------------
    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if not self.access.allowed(event, "find"):
            yield NOT_AUTHORIZED, None
            return
        who = self.access.who(event)
        cap = self.cfg.node.max_query_results
        try:
            query = self._parse(event.identifier, str(event.request.AffectedSOPClassUID))
            found = self.queries.find(query, limit=cap)
        except QueryError as exc:
            log.warning("C-FIND refused: %s", exc)
            self.audit.event(A.QUERY, A.MINOR_FAILURE, peer=who, reason=str(exc))
            yield _status(exc.status, str(exc)), None
            return
        except QueryUnavailable as exc:
            log.error("C-FIND failed: %s", exc.__cause__ or exc)
            self.audit.event(A.QUERY, A.SERIOUS_FAILURE, peer=who, reason=str(exc))
            yield _status(exc.status, str(exc)), None
            return
        more = found.more
        self.audit.event(
            A.QUERY,
            A.SUCCESS,
            peer=who,
            service="C-FIND",
            level=query.level,
            keys={k: v for k, v in query.keys.items() if ATTRIBUTES[k].level != "PATIENT" and v},
            matched_studies=len({r.study_instance_uid for r in found.rows}),
            capped=more or None,
        )
        if more:
            log.warning(
                "C-FIND from %s matched more than [node] max_query_results (%d): "
                "only the first %d are answered",
                who["ae_title"],
                cap,
                cap,
            )
        ts = str(event.context.transfer_syntax)
        if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            # The fast path (node.compat): answers encoded straight from the rows, several
            # responses per P-DATA-TF PDU. Deflated contexts take pynetdicom's path below.
            n, cancelled = send_find_responses(
                event.assoc,
                event.context.context_id,
                int(event.request.MessageID or 0),
                str(event.request.AffectedSOPClassUID),
                self.queries.encoded_answers(query, found, ts == ExplicitVRLittleEndian),
                lambda: event.is_cancelled,
            )
            if cancelled:
                log.info("C-FIND cancelled after %d match(es)", n)
                yield CANCELLED, None
                return
            log.info(
                "C-FIND %s level from %s: %d match(es)",
                query.level,
                event.assoc.requestor.ae_title,
                n,
            )
            return
        n = 0
        for ds in self.queries.answers(query, found):
            if n % 16 == 0 and n:
                wait_until_sent(event.assoc)  # so that a C-CANCEL can be read (node.compat)
            if event.is_cancelled:
                log.info("C-FIND cancelled after %d match(es)", n)
                yield CANCELLED, None
                return
            n += 1
            yield PENDING, ds
        log.info(
            "C-FIND %s level from %s: %d match(es)", query.level, event.assoc.requestor.ae_title, n
        )

    def _retrieve_rows(self, event: evt.Event) -> list[Instance]:
        """Rows of a C-MOVE / C-GET. Its unique keys must be single values or UID lists
        (PS3.4 C.4.2.2.1): universal matching or wildcards there are refused, so that no
        ``PatientID=*`` retrieves the whole archive."""
        model = str(event.request.AffectedSOPClassUID)
        query = self._parse(event.identifier, model)
        level = query.level
        top = 0 if model in PATIENT_ROOT else 1
        for lv in LEVELS[top : LEVELS.index(level) + 1]:
            k = UNIQUE_KEY[lv]
            v = query.keys.get(k, "").strip()
            if "*" in v or "?" in v:
                raise QueryError(f"wildcards are not allowed in the unique key {k} of a retrieve")
            if lv == level and not v:
                raise QueryError(
                    f"a retrieve at {level} level needs {k} (universal matching is refused)"
                )
        return self.queries.instances(query)

    def _datasets(
        self, rows: list[Instance], event: evt.Event, service: str = "", to: str = ""
    ) -> Iterator[tuple[int, Dataset | None]]:
        """The datasets of a retrieve; at its end, however it ends, the PS3.15 A.5.3.4
        completion event (:meth:`_audit_done`), with the sub-operations as the retrieve's
        own responses counted them (pynetdicom sends a pending C-GET / C-MOVE response after
        each sub-operation, before it asks for the next dataset)."""
        counts: dict[str, int] = {}

        def sent(ev: evt.Event) -> None:
            cs = getattr(ev.message, "command_set", None)
            if cs is not None and "NumberOfCompletedSuboperations" in cs:
                for k in ("Completed", "Failed", "Warning"):
                    counts[k.lower()] = int(cs.get(f"NumberOf{k}Suboperations", 0) or 0)

        if service:
            event.assoc.bind(evt.EVT_DIMSE_SENT, sent)
        unreadable, ended, serious = 0, "", False
        try:
            for r in rows:
                if not event.assoc.is_established:
                    break
                if event.is_cancelled:
                    ended = "cancelled by the requester"
                    yield CANCELLED, None
                    return
                try:
                    ds = dcmread(self.files.abspath(r.path))
                except Exception as exc:
                    log.error("cannot read %s for retrieve: %s", r.sop_instance_uid, exc)
                    unreadable += 1
                    yield PENDING, None  # counted as a failed sub-operation
                    continue
                yield PENDING, ds
            # Resumed after the last sub-operation: its response is sent, or the requester
            # is gone.
            if not event.assoc.is_established:
                ended, serious = "the association ended before the retrieve did", True
        except GeneratorExit:
            # pynetdicom stopped asking for datasets: the association ended (or, for a
            # C-CANCEL, the retrieve was answered).
            if not ended:
                ended, serious = "the association ended before the retrieve did", True
            raise
        except Exception as exc:
            ended, serious = f"{type(exc).__name__}: internal error", True
            raise
        finally:
            if service:
                event.assoc.unbind(evt.EVT_DIMSE_SENT, sent)
                failed = counts.get("failed", 0) + unreadable
                outcome = (
                    A.SERIOUS_FAILURE
                    if serious
                    else A.MINOR_FAILURE
                    if ended or failed or counts.get("warning")
                    else A.SUCCESS
                )
                self._audit_done(
                    event,
                    service,
                    rows,
                    to,
                    outcome,
                    reason=ended or None,
                    completed=counts.get("completed", 0),
                    failed=failed,
                    warning=counts.get("warning", 0),
                    unreadable=unreadable,
                )

    def _audit_done(
        self,
        event: evt.Event,
        service: str,
        rows: list[Instance],
        to: str,
        outcome: int,
        **fields: Any,
    ) -> None:
        """PS3.15 A.5.3.4 DICOM Instances Transferred, the end of a retrieve: 0 every
        sub-operation completed; 4 the retrieve ran to its end with failed or warning
        sub-operations, or was cancelled; 8 it was cut short (the association ended, the
        destination could not be reached, the node failed)."""
        try:
            self.audit.event(
                A.INSTANCES_TRANSFERRED,
                outcome,
                action="retrieve",
                service=service,
                peer=self.access.who(event),
                to=to,
                studies=sorted({r.study_instance_uid for r in rows}),
                instances=len(rows),
                **{k: v for k, v in fields.items() if v},
            )
        except A.AuditUnavailable:
            pass  # the transfer is over; the audit module logged the failure

    def _audit_retrieve(
        self, event: evt.Event, service: str, rows: list[Instance], to: str
    ) -> None:
        self.audit.event(
            A.BEGIN_TRANSFER,
            A.SUCCESS,
            service=service,
            peer=self.access.who(event),
            to=to,
            studies=sorted({r.study_instance_uid for r in rows}),
            instances=len(rows),
        )

    def on_move(self, event: evt.Event) -> Iterator[int | tuple[Any, ...]]:
        if not self.access.allowed(event, "move"):
            yield None, None  # pynetdicom then answers "move destination unknown"
            return
        dest_ae = str(event.move_destination).strip()
        dest = next((d for d in self.cfg.destinations if d.ae_title == dest_ae), None)
        if dest is None:
            log.warning("C-MOVE to unknown destination %r refused", dest_ae)
            yield None, None
            return
        try:
            rows = self._retrieve_rows(event)
        except (QueryError, QueryUnavailable) as exc:
            log.warning("C-MOVE refused: %s", exc)
            yield dest.host, dest.port
            # Answered now, without an association to the destination (node.compat).
            refuse_move(exc.status, str(exc))
        yield move_destination(self.cfg, dest, _contexts(rows))
        if not rows:
            yield 0  # answered success by pynetdicom, with no association to the destination
            return
        try:
            yield len(rows)
        except GeneratorExit:
            # pynetdicom asks for the datasets only once the destination has accepted its
            # association: it could not be reached (or refused), nothing was sent.
            log.warning(
                "C-MOVE to %s: the destination %s:%d could not be reached or "
                "refused the association",
                dest_ae,
                dest.host,
                dest.port,
            )
            self._audit_done(
                event,
                "C-MOVE",
                rows,
                dest_ae,
                A.SERIOUS_FAILURE,
                reason="the move destination could not be reached or refused the association",
                failed=len(rows),
            )
            raise
        log.info("C-MOVE of %d instance(s) to %s", len(rows), dest_ae)
        self._audit_retrieve(event, "C-MOVE", rows, dest_ae)
        yield from self._datasets(rows, event, "C-MOVE", dest_ae)

    def on_get(self, event: evt.Event) -> Iterator[int | tuple[int, Dataset | None]]:
        # A refusal is announced as one sub-operation that fails: with zero, pynetdicom
        # would answer an empty success.
        if not self.access.allowed(event, "get"):
            yield 1
            yield NOT_AUTHORIZED, None
            return
        try:
            rows = self._retrieve_rows(event)
        except (QueryError, QueryUnavailable) as exc:
            log.warning("C-GET refused: %s", exc)
            yield 1
            yield exc.status, None
            return
        yield len(rows)
        log.info("C-GET of %d instance(s) by %s", len(rows), event.assoc.requestor.ae_title)
        to = str(event.assoc.requestor.ae_title).strip()
        self._audit_retrieve(event, "C-GET", rows, to)
        yield from self._datasets(rows, event, "C-GET", to)
