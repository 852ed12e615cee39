"""Every DIMSE handler the node binds, guarded (pynetdicom ``apps/qrscp`` style: any unexpected
failure is answered with the service's "unable to process" status, never a traceback).

A handler that raises gets one ERROR line from ``mammo_node`` with the reason (the trace at
DEBUG), the service's failure status, and, for query / retrieve / store, an audit record of
the failed operation. pynetdicom's own ERROR lines for refusals the node already logs as a
WARNING (an unknown or refused move destination) are dropped, so that an operator grepping
for ERROR finds only real errors.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from pynetdicom import evt

from node import audit as A
from node.compat import MoveRefused
from node.compat import refuse_move as compat_refuse_move
from node.status import PROCESSING_FAILURE, UNABLE_TO_PROCESS

log = logging.getLogger("mammo_node")

#: Service name, audit event and failure status of each request event.
SERVICES: dict[evt.EventType, tuple[str, str | None, int]] = {
    evt.EVT_C_ECHO: ("C-ECHO", None, UNABLE_TO_PROCESS),
    evt.EVT_C_STORE: ("C-STORE", A.INSTANCES_TRANSFERRED, PROCESSING_FAILURE),
    evt.EVT_C_FIND: ("C-FIND", A.QUERY, UNABLE_TO_PROCESS),
    evt.EVT_C_GET: ("C-GET", A.BEGIN_TRANSFER, UNABLE_TO_PROCESS),
    evt.EVT_C_MOVE: ("C-MOVE", A.BEGIN_TRANSFER, UNABLE_TO_PROCESS),
}


def _peer(event: evt.Event) -> dict[str, Any]:
    try:
        req = event.assoc.requestor
        return {"ae_title": str(req.ae_title).strip(), "address": req.address}
    except Exception:
        return {}


def _failed(
    service: str,
    what: str | None,
    event: evt.Event,
    exc: BaseException,
    audit: A.AuditLog | A.NullAudit,
) -> None:
    log.debug("%s handler failed", service, exc_info=True)
    log.error(
        "%s from %s failed: %s: %s",
        service,
        _peer(event).get("ae_title", "?"),
        type(exc).__name__,
        str(exc).splitlines()[0] if str(exc) else "",
    )
    if what:
        try:
            audit.event(
                what,
                A.SERIOUS_FAILURE,
                peer=_peer(event),
                service=service,
                reason=f"{type(exc).__name__}: internal error",
            )
        except A.AuditUnavailable:
            pass  # the failure is answered all the same


def _guard_generator(
    fn: Callable, kind: evt.EventType, audit: A.AuditLog | A.NullAudit
) -> Callable:
    service, what, failure = SERVICES[kind]

    @functools.wraps(fn)
    def wrapped(event: evt.Event) -> Iterator:
        seen = 0
        try:
            for item in fn(event):
                seen += 1
                yield item
        except MoveRefused:
            raise  # a refusal the handler chose (refuse_move): pynetdicom answers it
        except Exception as exc:
            _failed(service, what, event, exc, audit)
            # Complete what the service's protocol still expects before the failure status:
            # C-GET its number of sub-operations, C-MOVE its destination and then that number.
            if kind is evt.EVT_C_MOVE and seen == 0:
                yield None, None  # no destination yet: pynetdicom can only answer 0xA801
                return
            if kind is evt.EVT_C_MOVE and seen == 1:
                # pynetdicom asks for the count, then associates with the destination: answer
                # the failure there instead, without associating.
                refuse_move(failure, "internal error")
            if kind is evt.EVT_C_GET and seen == 0:
                yield 1
            yield failure, None

    return wrapped


def _guard_call(fn: Callable, kind: evt.EventType, audit: A.AuditLog | A.NullAudit) -> Callable:
    service, what, failure = SERVICES.get(kind, (getattr(kind, "name", str(kind)), None, 0))
    is_request = kind in SERVICES

    @functools.wraps(fn)
    def wrapped(event: evt.Event, *args: Any) -> Any:
        try:
            return fn(event, *args)
        except Exception as exc:
            if not is_request:  # a notification: log it once, the association goes on
                log.error("%s handler failed: %s: %s", service, type(exc).__name__, exc)
                log.debug("%s handler failed", service, exc_info=True)
                return None
            _failed(service, what, event, exc, audit)
            return failure

    return wrapped


def guard(handlers: list[tuple], audit: A.AuditLog | A.NullAudit) -> list[tuple]:
    """The same handler list, each handler guarded (extra bound arguments kept)."""
    quiet_expected_refusals()
    out = []
    for item in handlers:
        kind, fn, *rest = item
        wrapper = _guard_generator if inspect.isgeneratorfunction(fn) else _guard_call
        out.append((kind, wrapper(fn, kind, audit), *rest))
    return out


def refuse_move(status: int, comment: str = "") -> NoReturn:
    """In a C-MOVE handler, after its destination: answer ``status`` without associating
    with the destination (:func:`node.compat.refuse_move`), pynetdicom's log lines of it
    dropped."""
    _FILTER.suppress_next()
    compat_refuse_move(status, comment)


class _ExpectedRefusals(logging.Filter):
    """Drops pynetdicom's ERROR lines for refusals the node answers on purpose and logs
    itself (as a WARNING, with the reason)."""

    PREFIXES = ("Unknown Move Destination",)

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def suppress_next(self) -> None:
        """Drop this thread's pynetdicom lines up to its traceback of a refused C-MOVE."""
        self._local.active = True

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self._local, "active", False):
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, MoveRefused):
                self._local.active = False
            return False
        try:
            msg = record.getMessage()
        except Exception:
            return True
        return not msg.startswith(self.PREFIXES)


_FILTER = _ExpectedRefusals()


def quiet_expected_refusals() -> None:
    """Install the filter on the pynetdicom logger that emits those lines (idempotent)."""
    lg = logging.getLogger("pynetdicom.service_class")
    if _FILTER not in lg.filters:
        lg.addFilter(_FILTER)
