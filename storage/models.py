"""ORM tables. One row per received instance; one row per exam (one exam per study)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    DDL,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The four slots of a screening exam, in display order.
SLOTS: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO")
# Exam and delivery states are storage.transitions.ExamState / OutboundState; only its
# helpers change them, through its transition table.

_SLOT_COLUMNS = {"L-CC": "l_cc", "L-MLO": "l_mlo", "R-CC": "r_cc", "R-MLO": "r_mlo"}


def utcnow() -> dt.datetime:
    """Naive UTC timestamp (SQLite keeps no time zone)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """A stored SOP instance (any storage SOP class)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(400))  # relative to data_dir
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    calling_aet: Mapped[str | None] = mapped_column(String(64), nullable=True)

    # Header attributes the node queries on (patient data stays in the DB, never in INFO logs).
    # Wider than the VRs allow where vendors are known to overrun them (accession numbers,
    # descriptions); anything longer still is cut to fit (storage.exams.fit_row), since
    # PostgreSQL enforces lengths.
    # Indexed: the keys C-FIND / QIDO queries narrow by (PatientID, AccessionNumber,
    # StudyDate ranges); benchmarks/queries.py measures them at 100,000 instances.
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_name: Mapped[str | None] = mapped_column(String(324), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True, index=True)
    study_time: Mapped[str | None] = mapped_column(String(32), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Default QIDO-RS return attributes (PS3.18 Table 6.7.1-2) a viewer's lists show.
    #: Indexed: a study without a PatientID is some patient's prior by name and birth date
    #: (storage.exams.Exams.patient_exams).
    patient_birth_date: Mapped[str | None] = mapped_column(String(8), nullable=True, index=True)
    patient_sex: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_description: Mapped[str | None] = mapped_column(String(256), nullable=True)
    study_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    referring_physician_name: Mapped[str | None] = mapped_column(String(324), nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(256), nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)

    # View classification (filled by node.assembly).
    laterality: Mapped[str | None] = mapped_column(String(1), nullable=True)
    view: Mapped[str | None] = mapped_column(String(16), nullable=True)
    view_modifiers: Mapped[str | None] = mapped_column(String(200), nullable=True)
    for_processing: Mapped[bool] = mapped_column(default=False)
    acquisition_key: Mapped[str | None] = mapped_column(String(40), nullable=True)
    #: "candidate" (may fill ``slot``), "extra" (mammography view that fills no slot),
    #: "other" (not a 2-D mammogram), "unclassified" (laterality or view missing).
    role: Mapped[str] = mapped_column(String(16))
    #: inference.views.IMAGE_KINDS: conventional | synthesized | for_processing | volume |
    #: projection (None: not a breast image, or a row from before the kinds).
    image_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: BreastImplantPresent YES, or an implant-displaced view.
    implant: Mapped[bool | None] = mapped_column(nullable=True, default=False)
    slot: Mapped[str | None] = mapped_column(String(8), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    exam_id: Mapped[int | None] = mapped_column(ForeignKey("exams.id"), nullable=True, index=True)


#: PatientName matching is case-insensitive (PN): an index on lower(patient_name) lets the
#: database find "SMITH*" without reading every row (400 ms -> ~1 ms at 100,000 instances).
#: PostgreSQL needs text_pattern_ops for LIKE 'prefix%' under any collation; SQLite uses it
#: for the range storage.query adds to a prefix. Created per dialect, here for new
#: databases and by migration 0004 for existing ones.
PATIENT_NAME_INDEX = {
    "sqlite": "CREATE INDEX IF NOT EXISTS ix_instances_patient_name_lower "
    "ON instances (lower(patient_name))",
    "postgresql": "CREATE INDEX IF NOT EXISTS ix_instances_patient_name_lower "
    "ON instances (lower(patient_name) text_pattern_ops)",
}
for _dialect, _sql in PATIENT_NAME_INDEX.items():
    event.listen(Instance.__table__, "after_create", DDL(_sql).execute_if(dialect=_dialect))


class Exam(Base):
    """One screening exam per StudyInstanceUID with four view slots."""

    __tablename__ = "exams"
    #: A patient's exams (the prior rules, the priors listed with an exam) by one indexed
    #: lookup.
    __table_args__ = (Index("ix_exams_patient", "patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    #: Incremented whenever an instance arrives after the exam left ``receiving``.
    version: Mapped[int] = mapped_column(Integer, default=1)
    l_cc: Mapped[str | None] = mapped_column(String(64), nullable=True)
    l_mlo: Mapped[str | None] = mapped_column(String(64), nullable=True)
    r_cc: Mapped[str | None] = mapped_column(String(64), nullable=True)
    r_mlo: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: StudyDate of its images (the prior rules of [grouping] compare them).
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    #: slot -> image kind of the instance in it ("computed": made from a volume).
    kinds_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: An image of the exam says a breast implant is present.
    implant: Mapped[bool | None] = mapped_column(nullable=True, default=False)
    #: Why the exam is a prior (storage.transitions.PRIOR_RULES: "age" = [grouping]
    #: prior_after_days, "gap" = prior_gap_days); None when it is not one.
    prior_rule: Mapped[str | None] = mapped_column(String(8), nullable=True)
    #: An administrator asked for this exam to be read (mammo-node complete, the dashboard):
    #: a prior or an exam skipped for its implant is read, and no newer study demotes it.
    read_on_request: Mapped[bool | None] = mapped_column(nullable=True, default=False)
    #: Slots that hold only a tomosynthesis volume, read with the view missing (JSON list).
    volume_only_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    notes_json: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(
        DateTime, default=utcnow, index=True
    )  # the exams list's order
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: The worker reading this exam ("host:pid") and until when its claim holds: renewed by
    #: its heartbeat; an exam whose lease ran out is taken over by another worker.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: Readings of this version that failed for a transient reason, and when to try again.
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: When retention deleted the received images (the exam's history stays).
    images_purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The current version's reading in plain data (per-breast BI-RADS, probabilities,
    #: fusion weights, model identity) for the dashboard; the SRs are the record.
    reading_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: That reading's 0-100 exam score (None: not read, or no score), a column so that the
    #: dashboard's triage sorts every exam in the database, by an index.
    exam_score: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)

    def get_slot(self, slot: str) -> str | None:
        return getattr(self, _SLOT_COLUMNS[slot])

    def set_slot(self, slot: str, sop_uid: str | None) -> None:
        setattr(self, _SLOT_COLUMNS[slot], sop_uid)

    @property
    def views(self) -> dict[str, str | None]:
        return {s: self.get_slot(s) for s in SLOTS}

    @property
    def missing(self) -> list[str]:
        return [s for s in SLOTS if self.get_slot(s) is None]

    @property
    def view_kinds(self) -> dict[str, str | None]:
        kinds = json.loads(self.kinds_json or "{}")
        return {s: (kinds.get(s) if self.get_slot(s) else None) for s in SLOTS}

    @property
    def volume_only(self) -> list[str]:
        """Slots still without an image that had only a tomosynthesis volume."""
        slots = set(json.loads(self.volume_only_json or "[]"))
        return [s for s in SLOTS if s in slots and self.get_slot(s) is None]

    @property
    def notes(self) -> list[str]:
        return list(json.loads(self.notes_json or "[]"))

    def add_note(self, text: str) -> None:
        notes = self.notes
        notes.append(text)
        self.notes_json = json.dumps(notes[-50:])

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "state": self.state,
            "version": self.version,
            "views": self.views,
            # the image kind each view is read from (conventional, synthesized, computed..)
            "view_kinds": self.view_kinds,
            "missing": self.missing,
            "study_date": self.study_date,
            "implant": bool(self.implant),
            # views with only a tomosynthesis volume, read missing ([grouping] volume_2d)
            "volume_only": self.volume_only,
            # why it is a prior: "age" (prior_after_days) or "gap" (prior_gap_days)
            "prior_rule": self.prior_rule,
            # an administrator asked for it to be read (a prior, an implant skipped)
            "read_on_request": bool(self.read_on_request),
            "reason": self.reason,
            "notes": self.notes,
            "last_received_at": self.last_received_at.isoformat() + "Z",
            "images_purged_at": (
                self.images_purged_at.isoformat() + "Z" if self.images_purged_at else None
            ),
            "state_changed_at": self.state_changed_at.isoformat() + "Z",
            # the worker reading it ("host:pid"), while it is processing
            "worker": self.lease_owner,
            **self._reading_score(),
        }

    def _reading_score(self) -> dict[str, Any]:
        """The current reading's 0-100 exam score and verdict, for lists and scripts."""
        try:
            r = json.loads(self.reading_json or "{}")
        except ValueError:
            r = {}
        marks = [
            {
                "slot": m.get("slot"),
                "index": m.get("index"),
                "score": m.get("score"),
                "center": m.get("center"),
                "outline": m.get("outline"),
                "above_operating_point": m.get("above_operating_point"),
            }
            for ms in (r.get("marks") or {}).values()
            for m in ms
        ]
        return {
            "score": r.get("score"),
            "operating_point": r.get("operating_point"),
            "above_operating_point": r.get("above_operating_point"),
            "density": r.get("density"),
            "marks": sorted(marks, key=lambda m: (-(m["score"] or 0), m["slot"] or "")),
            "marks_above_operating_point": sum(bool(m["above_operating_point"]) for m in marks),
        }


class Result(Base):
    """A produced object (SR or SC) of one version of an exam's reading."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # sc | sr-tid1500 | sr-mammo-cad
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(400))  # relative to data_dir; "" once purged
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: The file was deleted by retention (the row stays: the exam's history).
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class ExamEvent(Base):
    """One line of an exam's timeline: an image received, a state change, a delivery
    attempt, an error."""

    __tablename__ = "exam_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # received | state | delivery | action
    detail: Mapped[str] = mapped_column(Text)


class DestinationSetting(Base):
    """Administrator switches per destination (pause / resume)."""

    __tablename__ = "destination_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(default=False)
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class PurgeJournal(Base):
    """Files whose rows a purge removed and that are not deleted yet. Written in the same
    transaction that removes the rows, emptied as the files go: a crash in between leaves
    entries that the next start (or purge) finishes, so the database never points at a
    missing file and no file is left behind."""

    __tablename__ = "purge_journal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(400))  # relative to data_dir
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Outbound(Base):
    """Delivery of one result to one destination (persisted, resumed after restart)."""

    __tablename__ = "outbound"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        # the exporters' claim: due deliveries, oldest first
        Index("ix_outbound_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: Set while a C-STORE is under way; still set after a crash = the outcome is unknown.
    in_flight_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: The exporter that claimed this delivery ("host:pid") and until when (heartbeat).
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
