"""The one table of legal state changes, and the helpers that make one: nothing else in the
node assigns ``Exam.state`` or ``Outbound.state``.

Exams::

    receiving -> ready -> processing -> done | failed
    any state -> receiving | ready   when a new instance changes the slots
                                     (from processing/done/failed: a new version)
    any state -> conflict            images of two patients in one study (held)
    conflict  -> receiving | ready   resolved (mammo-node resolve)
    processing -> ready              recovered after a crash
    receiving | ready -> prior       an old study ([grouping] prior_after_days), or one of a
                                     patient with a much newer study (prior_gap_days): kept
    prior -> ready | receiving       read on request (mammo-node complete)
    processing -> skipped            not read by the site's rule ([inference] implants = skip)
    skipped -> ready                 read on request (mammo-node complete)

Deliveries (one result object to one destination)::

    pending | retrying -> sent | retrying | gave_up
    sent | gave_up | retrying -> pending               queued again (mammo-node resend)

An illegal change raises :class:`IllegalTransition`.

Every transition runs inside :meth:`storage.db.Database.write` (process lock + transaction,
``SELECT ... FOR UPDATE`` on databases that have it); the services that make them are
:mod:`storage.exams` (exams, their claims and leases) and :mod:`storage.deliveries` (the
outbound queue).
"""

from __future__ import annotations

import datetime as dt
import logging
from enum import StrEnum
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from storage.models import Exam, ExamEvent, Outbound, utcnow

log = logging.getLogger("mammo_node.storage")


class ExamState(StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    #: Images of more than one patient share the study: held, nothing is read until an
    #: administrator resolves it (``mammo-node resolve``).
    CONFLICT = "conflict"
    #: An earlier study of the patient (old on arrival, or a much newer one is here): kept
    #: for comparison and listed with the current exam, not read unless asked
    #: (``mammo-node complete``).
    PRIOR = "prior"
    #: Not read, by the site's rule ([inference] implants = "skip"); ``reason`` says which.
    #: Read on request (``mammo-node complete``).
    SKIPPED = "skipped"


#: Why an exam is a prior (``Exam.prior_rule``): its StudyDate was older than [grouping]
#: prior_after_days on arrival, or the patient has a study prior_gap_days newer.
PRIOR_RULES = ("age", "gap")


class OutboundState(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    SENT = "sent"
    GAVE_UP = "gave_up"


_E, _O = ExamState, OutboundState
EXAM_TRANSITIONS: dict[ExamState, frozenset[ExamState]] = {
    _E.RECEIVING: frozenset({_E.READY, _E.CONFLICT, _E.PRIOR}),
    _E.READY: frozenset({_E.PROCESSING, _E.RECEIVING, _E.CONFLICT, _E.PRIOR}),
    _E.PROCESSING: frozenset({_E.DONE, _E.FAILED, _E.SKIPPED, _E.READY, _E.RECEIVING, _E.CONFLICT}),
    _E.DONE: frozenset({_E.READY, _E.RECEIVING, _E.CONFLICT}),
    _E.FAILED: frozenset({_E.READY, _E.RECEIVING, _E.CONFLICT}),
    _E.CONFLICT: frozenset({_E.READY, _E.RECEIVING}),
    _E.PRIOR: frozenset({_E.READY, _E.RECEIVING, _E.CONFLICT}),
    _E.SKIPPED: frozenset({_E.READY, _E.RECEIVING, _E.CONFLICT}),
}
OUTBOUND_TRANSITIONS: dict[OutboundState, frozenset[OutboundState]] = {
    _O.PENDING: frozenset({_O.SENT, _O.RETRYING, _O.GAVE_UP}),
    _O.RETRYING: frozenset({_O.SENT, _O.RETRYING, _O.GAVE_UP, _O.PENDING}),
    _O.SENT: frozenset({_O.PENDING}),
    _O.GAVE_UP: frozenset({_O.PENDING}),
}


#: States in which an exam has been (or is being) read: a slot change makes a new version.
READ_STATES = (ExamState.PROCESSING, ExamState.DONE, ExamState.FAILED)


class IllegalTransition(RuntimeError):
    """A state change the transition table does not allow (a bug, never user input)."""


class ExamNotFound(KeyError):
    """No exam (or row) with that key. A ``KeyError``, so callers written before it keep
    working; new code catches this."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "exam not found"


def check_transition(old: str, new: str, table: dict) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in ``table`` (staying in a
    state is always allowed)."""
    kind = ExamState if table is EXAM_TRANSITIONS else OutboundState
    try:
        o, n = kind(old), kind(new)
    except ValueError:
        raise IllegalTransition(f"unknown {kind.__name__} in {old!r} -> {new!r}") from None
    if o != n and n not in table[o]:
        raise IllegalTransition(f"{kind.__name__}: {o.value} -> {n.value} is not allowed")


_Row = TypeVar("_Row")


def get_row(s: Session, cls: type[_Row], key: int) -> _Row:
    """A row that must exist (its id came from this database); ExamNotFound otherwise."""
    row = s.get(cls, key)
    if row is None:
        raise ExamNotFound(f"{cls.__name__} {key} not found")
    return row


def exam_for_update(s: Session, study_uid: str) -> Exam:
    """The study's exam row, locked for this transaction; ExamNotFound when there is none."""
    exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid).with_for_update())
    if exam is None:
        raise ExamNotFound(study_uid)
    return exam


def add_event(exam: Exam, kind: str, detail: str, at: dt.datetime | None = None) -> None:
    """Add a line to the exam's timeline, in the exam's own transaction."""
    s = object_session(exam)
    if s is None:
        return
    if exam.id is None:
        s.flush()
    s.add(ExamEvent(exam_id=exam.id, at=at or utcnow(), kind=kind, detail=detail[:2000]))


def set_exam_state(
    exam: Exam, state: ExamState, now: dt.datetime, detail: str | None = None
) -> None:
    """Move ``exam`` to ``state`` (checked against :data:`EXAM_TRANSITIONS`): its lease ends
    unless it is being processed, and a change is a line in its timeline."""
    check_transition(exam.state, state, EXAM_TRANSITIONS)
    if state != ExamState.PROCESSING:
        exam.lease_owner = exam.lease_until = None
    if exam.state != state:
        add_event(
            exam,
            "state",
            f"{exam.state} -> {state.value} (version {exam.version})"
            + (f": {detail}" if detail else ""),
            now,
        )
        log.info("exam %s v%d: %s -> %s", exam.study_instance_uid, exam.version, exam.state, state)
        exam.state = state.value
        exam.state_changed_at = now


def set_outbound_state(row: Outbound, state: OutboundState) -> None:
    """Move a delivery to ``state`` (checked against :data:`OUTBOUND_TRANSITIONS`); its
    claim ends."""
    check_transition(row.state, state, OUTBOUND_TRANSITIONS)
    row.state = state.value
    row.lease_owner = row.lease_until = None
