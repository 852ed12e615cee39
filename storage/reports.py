"""Read models: what the dashboard, ``mammo-node exams`` / ``status``, ``/metrics`` and the
query services (C-FIND / QIDO-RS, retrieves) read from the database. Nothing here changes a
row.

Every answer is a typed record (frozen dataclass, or a ``NamedTuple`` where a tuple is the
natural shape); a record that goes out as JSON (``mammo-node exams --json``, the dashboard)
has ``to_json()``, whose keys are those of :meth:`storage.models.Exam.as_dict` plus the
record's own.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement

from storage.db import Database
from storage.models import Exam, ExamEvent, Instance, Outbound, Result
from storage.transitions import ExamNotFound, ExamState, OutboundState

if TYPE_CHECKING:
    from storage.query import Found


@dataclass(frozen=True)
class DeliveryCounts:
    """destination -> state -> number of result objects."""

    by_destination: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[str, str, int]]) -> DeliveryCounts:
        """From (destination, state, count) rows."""
        out: dict[str, dict[str, int]] = {}
        for dest, st, n in rows:
            out.setdefault(dest, {})[st] = n
        return cls(out)

    def count(self, destination: str, state: str) -> int:
        return self.by_destination.get(destination, {}).get(state, 0)

    @property
    def all_sent(self) -> bool:
        """Something is queued, and every object reached every destination."""
        return bool(self.by_destination) and all(
            set(c) == {OutboundState.SENT.value} for c in self.by_destination.values()
        )

    def to_json(self) -> dict[str, dict[str, int]]:
        return {d: dict(c) for d, c in self.by_destination.items()}


def _json(value: Any) -> Any:
    return value.to_json() if hasattr(value, "to_json") else copy.deepcopy(value)


@dataclass(frozen=True)
class ExamView:
    """An exam as lists and scripts see it: the fields of
    :meth:`storage.models.Exam.as_dict`, in its order (``to_json`` keeps the keys)."""

    study_instance_uid: str
    accession_number: str | None
    state: str
    version: int
    views: dict[str, str | None]
    #: the image kind each view is read from (conventional, synthesized, computed..)
    view_kinds: dict[str, str | None]
    missing: list[str]
    study_date: str | None
    implant: bool
    #: views with only a tomosynthesis volume, read missing ([grouping] volume_2d)
    volume_only: list[str]
    #: why it is a prior: "age" (prior_after_days) or "gap" (prior_gap_days)
    prior_rule: str | None
    #: an administrator asked for it to be read (a prior, an implant skipped)
    read_on_request: bool
    reason: str | None
    notes: list[str]
    last_received_at: str
    images_purged_at: str | None
    state_changed_at: str
    #: the worker reading it ("host:pid"), while it is processing
    worker: str | None
    #: the current reading's 0-100 exam score and verdict
    score: float | None
    operating_point: float | None
    above_operating_point: bool | None
    density: Any
    marks: list[dict[str, Any]]
    marks_above_operating_point: int

    @classmethod
    def of(cls, exam: Exam) -> ExamView:
        return cls(**exam.as_dict())

    def to_json(self) -> dict[str, Any]:
        """A plain dict, the record's fields in order (a copy: the caller may add keys)."""
        return {f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ExamRow(ExamView):
    """One exam of the dashboard's list: with its deliveries and its result latency."""

    delivery: DeliveryCounts
    #: seconds from the last image to the last result delivered, once all are sent
    latency_seconds: float | None


@dataclass(frozen=True)
class ExamDetail(ExamView):
    """One exam's page: with its reading as the worker recorded it (JSON text)."""

    reading_json: str | None


class ExamPage(NamedTuple):
    """A page of the exam list and the number of exams matching the filter."""

    rows: list[ExamRow]
    total: int


class LastError(NamedTuple):
    """A destination's most recent failed attempt still on record."""

    at: dt.datetime | None
    error: str


class QueueDepth(NamedTuple):
    """Result objects waiting (pending or retrying) for one destination."""

    destination: str
    state: str
    waiting: int


@dataclass(frozen=True)
class StateCounts:
    """Exams by state (every state, zero included)."""

    counts: Mapping[str, int]

    def to_json(self) -> dict[str, int]:
        return dict(self.counts)


class Reports:
    """Read models over the node's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- exams -----------------------------------------------------------------------------
    def exam_page(
        self,
        state: str | None = None,
        accession: str | None = None,
        day: dt.date | None = None,
        offset: int = 0,
        limit: int = 100,
        by_score: bool = False,
    ) -> ExamPage:
        """One page of exams, newest first (``by_score``: the highest exam score first, exams
        without a score last, then newest first: the triage order, over every exam, sorted by
        the database), with their deliveries and result latency (the dashboard's list;
        everything in a few queries whatever the number of exams)."""
        conds = []
        if state:
            conds.append(Exam.state == state)
        if accession:
            conds.append(
                Exam.accession_number.like(
                    "%"
                    + accession.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    + "%",
                    escape="\\",
                )
            )
        if day is not None:
            start = dt.datetime.combine(day, dt.time())
            conds.append(Exam.last_received_at >= start)
            conds.append(Exam.last_received_at < start + dt.timedelta(days=1))
        with self.db.session() as s:
            total = s.scalar(select(func.count()).select_from(Exam).where(*conds)) or 0
            order: list[ColumnElement[Any]] = [Exam.last_received_at.desc(), Exam.id.desc()]
            if by_score:  # NULLS LAST spelt portably (SQLite and PostgreSQL sort NULL apart)
                order = [Exam.exam_score.is_(None), Exam.exam_score.desc(), *order]
            exams = list(
                s.scalars(select(Exam).where(*conds).order_by(*order).offset(offset).limit(limit))
            )
            ids = [e.id for e in exams]
            delivery: dict[int, list[tuple[str, str, int]]] = {}
            last_sent: dict[int, dt.datetime] = {}
            if ids:
                for exam_id, dest, st, n, sent in s.execute(
                    select(
                        Result.exam_id,
                        Outbound.destination,
                        Outbound.state,
                        func.count(),
                        func.max(Outbound.sent_at),
                    )
                    .join(Outbound, Outbound.result_id == Result.id)
                    .join(Exam, Exam.id == Result.exam_id)
                    .where(Result.exam_id.in_(ids), Result.version == Exam.version)
                    .group_by(Result.exam_id, Outbound.destination, Outbound.state)
                ):
                    delivery.setdefault(exam_id, []).append((dest, st, n))
                    if sent is not None:
                        last_sent[exam_id] = max(sent, last_sent.get(exam_id, sent))
        rows = []
        for e in exams:
            counts = DeliveryCounts.of_rows(delivery.get(e.id, []))
            latency = (
                (last_sent[e.id] - e.last_received_at).total_seconds()
                if counts.all_sent and e.id in last_sent
                else None
            )
            rows.append(ExamRow(**e.as_dict(), delivery=counts, latency_seconds=latency))
        return ExamPage(rows, total)

    def exam_view(self, study_uid: str) -> ExamDetail:
        """One exam with its reading; ExamNotFound when the node holds no such study."""
        with self.db.session() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is None:
                raise ExamNotFound(study_uid)
            return ExamDetail(**exam.as_dict(), reading_json=exam.reading_json)

    def list_exams(self) -> list[Exam]:
        with self.db.session() as s:
            return list(s.scalars(select(Exam).order_by(Exam.created_at, Exam.id)))

    def counts_by_state(self) -> StateCounts:
        counts = {state.value: 0 for state in ExamState}
        with self.db.session() as s:
            for state, n in s.execute(select(Exam.state, func.count()).group_by(Exam.state)):
                counts[state] = n
        return StateCounts(counts)

    def events(self, study_uid: str) -> list[ExamEvent]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(ExamEvent)
                    .join(Exam, Exam.id == ExamEvent.exam_id)
                    .where(Exam.study_instance_uid == study_uid)
                    .order_by(ExamEvent.at, ExamEvent.id)
                )
            )

    # -- deliveries ------------------------------------------------------------------------
    def delivery_summary(self) -> dict[str, DeliveryCounts]:
        """study UID -> its deliveries (latest version of each exam)."""
        by_study: dict[str, list[tuple[str, str, int]]] = {}
        with self.db.session() as s:
            q = (
                select(Exam.study_instance_uid, Outbound.destination, Outbound.state, func.count())
                .join(Result, Result.exam_id == Exam.id)
                .join(Outbound, Outbound.result_id == Result.id)
                .where(Result.version == Exam.version)
                .group_by(Exam.study_instance_uid, Outbound.destination, Outbound.state)
            )
            for study, dest, state, n in s.execute(q):
                by_study.setdefault(study, []).append((dest, state, n))
        return {study: DeliveryCounts.of_rows(rows) for study, rows in by_study.items()}

    def delivery_of(self, study_uid: str) -> DeliveryCounts:
        """The deliveries of the study's current version (none for an unknown study)."""
        with self.db.session() as s:
            rows = s.execute(
                select(Outbound.destination, Outbound.state, func.count())
                .join(Result, Result.id == Outbound.result_id)
                .join(Exam, Exam.id == Result.exam_id)
                .where(Exam.study_instance_uid == study_uid, Result.version == Exam.version)
                .group_by(Outbound.destination, Outbound.state)
            ).all()
        return DeliveryCounts.of_rows(rows)  # type: ignore[arg-type]

    def delivery_totals(self) -> DeliveryCounts:
        """Deliveries over every result."""
        with self.db.session() as s:
            rows = s.execute(
                select(Outbound.destination, Outbound.state, func.count()).group_by(
                    Outbound.destination, Outbound.state
                )
            ).all()
        return DeliveryCounts.of_rows(rows)  # type: ignore[arg-type]

    def last_errors(self) -> dict[str, LastError]:
        """destination -> its most recent failed attempt still on record."""
        out: dict[str, LastError] = {}
        with self.db.session() as s:
            for dest, at, err in s.execute(
                select(Outbound.destination, Outbound.next_attempt_at, Outbound.last_error)
                .where(Outbound.last_error.isnot(None))
                .order_by(Outbound.next_attempt_at)
            ):
                out[dest] = LastError(at, err or "")
        return out

    def queue_depths(self) -> list[QueueDepth]:
        """Result objects waiting (pending or retrying), by destination and state."""
        with self.db.session() as s:
            rows = s.execute(
                select(Outbound.destination, Outbound.state, func.count())
                .where(
                    Outbound.state.in_((OutboundState.PENDING.value, OutboundState.RETRYING.value))
                )
                .group_by(Outbound.destination, Outbound.state)
            ).all()
        return [QueueDepth(d, st, n) for d, st, n in rows]

    def delivered_latency(self, study_uid: str) -> float | None:
        """Seconds from the exam's last image to its last result delivered, once every result
        of its current version reached every destination; None before that. The exam must be
        ``done``: its SRs are sent while its images are still being rendered, and "every result
        sent" then would count the exam once for its SRs and again for the rest."""
        with self.db.session() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is None or exam.state != ExamState.DONE:
                return None
            rows = s.execute(
                select(Outbound.state, Outbound.sent_at)
                .join(Result, Result.id == Outbound.result_id)
                .where(Result.exam_id == exam.id, Result.version == exam.version)
            ).all()
            if not rows or any(st != OutboundState.SENT for st, _ in rows):
                return None
            last = max(t for _, t in rows if t is not None)
            return max(0.0, (last - exam.last_received_at).total_seconds())

    # -- instances -------------------------------------------------------------------------
    def received_bytes_since(self, since: dt.datetime) -> int:
        with self.db.session() as s:
            return int(
                s.scalar(
                    select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(
                        Instance.received_at >= since, Instance.role != "result"
                    )
                )
                or 0
            )

    def instance_count(self) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(Instance)) or 0

    def find_instances(
        self,
        study_uids: list[str] | None = None,
        series_uids: list[str] | None = None,
        sop_uids: list[str] | None = None,
        patient_id: str | None = None,
    ) -> list[Instance]:
        """Instances (received and produced), narrowed by exact UIDs / patient ID when given;
        the caller applies the rest of the DICOM matching."""
        q = select(Instance)
        if study_uids:
            q = q.where(Instance.study_instance_uid.in_(study_uids))
        if series_uids:
            q = q.where(Instance.series_instance_uid.in_(series_uids))
        if sop_uids:
            q = q.where(Instance.sop_instance_uid.in_(sop_uids))
        if patient_id is not None:
            q = q.where(Instance.patient_id == patient_id)
        with self.db.session() as s:
            return list(s.scalars(q.order_by(Instance.id)))

    def find_entities(
        self,
        level: str,
        matches: list,
        limit: int | None = None,
        offset: int = 0,
        counts: frozenset = frozenset(),
        modalities: bool = False,
    ) -> Found:
        """C-FIND / QIDO matching in the database (see :func:`storage.query.find_entities`)."""
        from storage.query import find_entities

        with self.db.session() as s:
            return find_entities(s, level, matches, limit, offset, counts, modalities)

    def query_instances(self, level: str, matches: list) -> list[Instance]:
        """Every instance of the matching entities (a retrieve's; :mod:`storage.query`)."""
        from storage.query import query_instances

        with self.db.session() as s:
            return query_instances(s, level, matches)
