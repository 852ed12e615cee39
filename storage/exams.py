"""Exams: instances recorded into their study's exam, the patient an exam is of, priors,
the grouping timer, and an exam's life with a worker (claim, lease, retry, finish, skip,
complete with its results) and an administrator's (reprocess, complete, resolve).

Every state change goes through :func:`storage.transitions.set_exam_state`. A worker claims
a ``ready`` exam with ``SELECT ... FOR UPDATE SKIP LOCKED`` and holds it with a lease
(:mod:`storage.leases`) that its heartbeat renews; an exam whose lease ran out (its worker
died) is taken over by the next claim. Only the lease holder may finish an exam.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.leases import owner_is_dead, process_owner
from storage.models import SLOTS, Exam, Instance, Outbound, Result, utcnow
from storage.records import InstanceRecord, ProducedObject
from storage.transitions import (
    READ_STATES,
    ExamNotFound,
    ExamState,
    OutboundState,
    add_event,
    exam_for_update,
    get_row,
    set_exam_state,
)

log = logging.getLogger("mammo_node.storage")


class Claim(NamedTuple):
    """An exam version a worker holds (:meth:`Exams.claim_next_ready`)."""

    exam_id: int
    version: int


class PriorStudy(NamedTuple):
    """A prior of a patient: its study and StudyDate (DICOM DA, or None)."""

    study_uid: str
    study_date: str | None


@dataclass(frozen=True)
class PatientStudy:
    """Another exam of the same patient, as the dashboard links it."""

    study: str
    date: str | None
    state: str


class SlotPaths(NamedTuple):
    """An exam's slot images: its study, version and slot -> path (relative to data_dir)."""

    study_uid: str
    version: int
    paths: dict[str, str]


@dataclass(frozen=True)
class ReadingContext:
    """What a reading says about its images."""

    #: slot -> image kind (only slots with an image)
    kinds: dict[str, str]
    implant: bool
    #: the StudyDates of the patient's priors, YYYY-MM-DD where well formed, oldest first
    priors: list[str]
    #: views still without an image that had only a volume
    volume_only: list[str]
    read_on_request: bool


class Reopened(NamedTuple):
    """An exam to be read again (``mammo-node reprocess``): its new version and state."""

    version: int
    state: str


class Completed(NamedTuple):
    """An exam processed now (``mammo-node complete``): the views missing, its state."""

    missing: list[str]
    state: str


class Resolved(NamedTuple):
    """A patient conflict ended (``mammo-node resolve``)."""

    detached: int
    state: str
    version: int


@dataclass
class SlotAssignment:
    """What the exam-assembly policy decided for one exam."""

    slots: dict[str, str | None]
    #: Why each slot holds what it holds when there was a choice (e.g. a repeated view).
    notes: list[str] = field(default_factory=list)
    #: Problems worth an administrator's attention (missing laterality, unknown view, ...).
    problems: list[str] = field(default_factory=list)
    #: slot -> image kind of the instance chosen ("computed": a 2D image from a volume).
    kinds: dict[str, str] = field(default_factory=dict)
    #: An image of the exam says a breast implant is present.
    implant: bool = False
    #: Slots with only a tomosynthesis volume, left missing ([grouping] volume_2d).
    volume_only: list[str] = field(default_factory=list)


AssignFn = Callable[[list[Instance]], SlotAssignment]


@dataclass
class AddResult:
    duplicate: bool
    instance_id: int | None = None
    exam_study_uid: str | None = None
    exam_state: str | None = None
    exam_version: int | None = None
    reopened: bool = False
    #: The instance carries another patient than its exam: the exam is held.
    conflict: bool = False
    #: An instance already stored came again with another patient identity: the old and the
    #: new identity (PatientID and issuer, never names), for the audit trail.
    corrected_from: str | None = None
    corrected_to: str | None = None


def same_patient(
    a_id: str | None, a_issuer: str | None, b_id: str | None, b_issuer: str | None
) -> bool:
    """Whether two (PatientID, IssuerOfPatientID) pairs name one patient. The IDs must be
    equal (a missing ID equals only a missing ID); issuers must be equal where both exist."""
    if (a_id or "") != (b_id or ""):
        return False
    return not (a_issuer and b_issuer and a_issuer != b_issuer)


def person_name_key(name: str | None) -> str:
    """A Person Name compared as a person: the alphabetic group, components trimmed, empty
    trailing components dropped, case ignored (``Alpha^Ann^^`` is ``ALPHA^ANN``)."""
    parts = [c.strip() for c in (name or "").split("=")[0].split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts).upper()


@dataclass(frozen=True)
class PatientIdentity:
    """Who an instance is of: PatientID with its issuer, and, for the instances that carry
    no PatientID, the name and birth date."""

    patient_id: str
    issuer: str | None = None
    name: str = ""
    birth_date: str = ""

    @classmethod
    def of(cls, row: Instance | InstanceRecord) -> PatientIdentity:
        return cls(
            (getattr(row, "patient_id", None) or "").strip(),
            getattr(row, "issuer_of_patient_id", None) or None,
            person_name_key(getattr(row, "patient_name", None)),
            (getattr(row, "patient_birth_date", None) or "").strip(),
        )

    def same_person(self, other: PatientIdentity) -> bool:
        """Both with a PatientID: the IDs (and issuers, where both have one) decide. An empty
        PatientID on either side: the names must be equal, and the birth dates where both
        carry one (two anonymous images of different names are two patients)."""
        if self.patient_id and other.patient_id:
            return same_patient(self.patient_id, self.issuer, other.patient_id, other.issuer)
        if self.name != other.name:
            return False
        return not (self.birth_date and other.birth_date and self.birth_date != other.birth_date)

    def describe(self) -> str:
        """For notes and the audit trail (never for INFO logs): the ID, or that there is
        none."""
        if self.patient_id:
            return f"PatientID '{self.patient_id}'" + (
                f" (issuer '{self.issuer}')" if self.issuer else ""
            )
        return "no PatientID"


def exam_identity(exam: Exam, members: list[Instance]) -> PatientIdentity:
    """The exam's patient: its PatientID and issuer, with the name and birth date of its
    first image of that patient (what an image without a PatientID is compared with)."""
    ref = next(
        (
            m
            for m in members
            if same_patient(
                exam.patient_id, exam.issuer_of_patient_id, m.patient_id, m.issuer_of_patient_id
            )
        ),
        members[0] if members else None,
    )
    base = PatientIdentity.of(ref) if ref is not None else PatientIdentity("")
    return PatientIdentity(
        (exam.patient_id or "").strip(), exam.issuer_of_patient_id, base.name, base.birth_date
    )


def fit_row(model: type, row: dict[str, Any]) -> dict[str, Any]:
    """Strings cut to their column's length (a header value longer than its VR allows must
    not make PostgreSQL refuse the whole store)."""
    cols = model.__table__.c  # type: ignore[attr-defined]
    out = {}
    for k, v in row.items():
        length = getattr(cols[k].type, "length", None) if k in cols else None
        out[k] = v[:length] if isinstance(v, str) and length and len(v) > length else v
    return out


def _date(value: str | None) -> dt.date | None:
    """A DICOM DA value as a date (None when empty or malformed)."""
    try:
        return dt.datetime.strptime((value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


class Exams:
    """Instance and exam rows, and every state transition of an exam."""

    def __init__(
        self,
        db: Database,
        owner: str | None = None,
        prior_after_days: float | None = None,
        prior_gap_days: float | None = None,
    ) -> None:
        self.db = db
        #: This process as the holder of the exams and deliveries it claims.
        self.owner = owner or process_owner()
        #: [grouping] prior_after_days / prior_gap_days (None: that rule is off; the node
        #: sets them from its configuration, a bare store has them off).
        self.prior_after_days = prior_after_days
        self.prior_gap_days = prior_gap_days

    # -- ingest -------------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.db.session() as s:
            return (
                s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
                is not None
            )

    def add_instance(
        self, record: InstanceRecord, assign: AssignFn, place: Callable[[], object]
    ) -> AddResult:
        """Record one received instance and update its exam, atomically.

        ``place`` moves the file into the store; it runs after the duplicate check and
        before the commit, so a row never exists without its file. If it or the commit
        fails, nothing is recorded and the exception propagates (the caller removes the
        file). A SOPInstanceUID already stored is a no-op (``duplicate=True``); ``place``
        is not called.
        """
        for attempt in range(3):
            try:
                return self._add_instance(record, assign, place)
            except IntegrityError:
                # Another listener committed the same instance (or created the study's exam)
                # between our check and our insert: look again.
                if attempt == 2:
                    raise
                log.info(
                    "instance %s: concurrent insert by another process; checking again",
                    record.sop_instance_uid,
                )
        raise AssertionError("unreachable")

    def _add_instance(
        self, record: InstanceRecord, assign: AssignFn, place: Callable[[], object]
    ) -> AddResult:
        with self.db.write() as s:
            stored = s.scalar(
                select(Instance)
                .where(Instance.sop_instance_uid == record.sop_instance_uid)
                .with_for_update()
            )
            if stored is not None:
                new_identity = PatientIdentity.of(record)
                old_identity = PatientIdentity.of(stored)
                if stored.exam_id is None or new_identity.same_person(old_identity):
                    return AddResult(duplicate=True)
                return self._correct_identity(s, stored, record, old_identity, new_identity, place)
            place()
            inst = Instance(**fit_row(Instance, record.as_row()))
            s.add(inst)
            result = AddResult(duplicate=False)
            if inst.role != "other":
                self._update_exam(s, inst, assign, result)
            s.flush()
            result.instance_id = inst.id
            return result

    def _update_exam(self, s: Session, inst: Instance, assign: AssignFn, result: AddResult) -> None:
        now = utcnow()
        exam = s.scalar(
            select(Exam).where(Exam.study_instance_uid == inst.study_instance_uid).with_for_update()
        )
        new_exam = exam is None
        if exam is None:
            exam = Exam(
                study_instance_uid=inst.study_instance_uid,
                accession_number=inst.accession_number,
                patient_id=inst.patient_id,
                issuer_of_patient_id=inst.issuer_of_patient_id,
                study_date=inst.study_date or None,
                state=ExamState.RECEIVING.value,
                version=1,
                created_at=now,
                last_received_at=now,
                state_changed_at=now,
                notes_json="[]",
            )
            s.add(exam)
            s.flush()
        inst.exam_id = exam.id
        s.flush()
        add_event(
            exam,
            "received",
            f"{inst.sop_instance_uid} ({inst.slot or inst.role}) from {inst.calling_aet or '?'}",
            now,
        )
        members = list(
            s.scalars(select(Instance).where(Instance.exam_id == exam.id).order_by(Instance.id))
        )
        if (
            exam.issuer_of_patient_id is None
            and inst.issuer_of_patient_id
            and same_patient(exam.patient_id, None, inst.patient_id, None)
        ):
            exam.issuer_of_patient_id = inst.issuer_of_patient_id
        ref = exam_identity(exam, members)
        others = [m for m in members if not ref.same_person(PatientIdentity.of(m))]
        if others or exam.state == ExamState.CONFLICT:
            self._hold(exam, inst, members, others, now, result)
            return
        assignment = assign(members)
        before = exam.views
        changed = assignment.slots != before
        self._apply(exam, assignment)
        exam.last_received_at = now
        if exam.accession_number is None and inst.accession_number:
            exam.accession_number = inst.accession_number
        if exam.study_date is None and inst.study_date:
            exam.study_date = inst.study_date
        complete = not exam.missing
        # The prior rules, for a study's first image: the patient's other exams are looked
        # up once (one indexed query), for both rules, only when the age rule did not decide.
        patient: list[Exam] | None = None
        rule = None
        if new_exam:
            rule = self._age_rule(exam)
            if rule is None and self.prior_gap_days is not None:
                patient = self.patient_exams(s, exam, members)
                rule = self._gap_rule(exam, patient)
        if rule or exam.state == ExamState.PRIOR:
            if rule:
                self._make_prior(exam, *rule, now)
            result.exam_study_uid = exam.study_instance_uid
            result.exam_state = exam.state
            result.exam_version = exam.version
            return
        if patient:
            self._demote_older(exam, patient, now)
        if changed:
            if exam.state in READ_STATES:
                exam.version += 1
                exam.attempts, exam.next_attempt_at = 0, None
                exam.add_note(
                    f"reopened as version {exam.version}: instance "
                    f"{inst.sop_instance_uid} arrived after the exam was "
                    f"{exam.state}"
                )
                result.reopened = True
            set_exam_state(exam, ExamState.READY if complete else ExamState.RECEIVING, now)
        elif exam.state in READ_STATES:
            exam.add_note(
                f"instance {inst.sop_instance_uid} ({inst.role}) arrived after the "
                f"exam was {exam.state}; it changes no slot, the reading stands"
            )
        exam.reason = "; ".join(assignment.problems) or None
        result.exam_study_uid = exam.study_instance_uid
        result.exam_state = exam.state
        result.exam_version = exam.version

    def _correct_identity(
        self,
        s: Session,
        stored: Instance,
        record: InstanceRecord,
        old: PatientIdentity,
        new: PatientIdentity,
        place: Callable[[], object],
    ) -> AddResult:
        """The same SOP Instance re-sent with another patient (a demographics correction, or
        a mix-up): the new file and its identity replace the old ones, and the exam is held
        as a conflict until an operator resolves it; both identities stay in its notes and
        in the result (for the audit trail)."""
        now = utcnow()
        place()  # the corrected file takes the instance's place (a rename: atomic)
        for key in (
            "patient_id",
            "issuer_of_patient_id",
            "patient_name",
            "patient_birth_date",
            "patient_sex",
            "size_bytes",
            "transfer_syntax_uid",
        ):
            setattr(stored, key, fit_row(Instance, {key: getattr(record, key)})[key])
        stored.note = ((stored.note + "; ") if stored.note else "") + (
            f"re-sent with another patient: {old.describe()} -> {new.describe()}"
        )
        exam = get_row(s, Exam, int(stored.exam_id or 0))
        members = list(
            s.scalars(select(Instance).where(Instance.exam_id == exam.id).order_by(Instance.id))
        )
        exam.add_note(
            f"patient identity changed: instance {stored.sop_instance_uid} was "
            f"re-sent with {new.describe()} (it had {old.describe()}); the exam is "
            f"held until resolved"
        )
        add_event(
            exam,
            "received",
            f"{stored.sop_instance_uid} re-sent with another patient "
            f"identity from {record.calling_aet or '?'}",
            now,
        )
        result = AddResult(
            duplicate=False,
            instance_id=stored.id,
            corrected_from=old.describe(),
            corrected_to=new.describe(),
        )
        others = [
            m
            for m in members
            if not exam_identity(exam, members).same_person(PatientIdentity.of(m))
        ]
        self._hold(exam, stored, members, others or [stored], now, result)
        return result

    @staticmethod
    def _apply(exam: Exam, assignment: SlotAssignment) -> None:
        """The assembly policy's decision into the exam row (slots, kinds, notes)."""
        for slot in SLOTS:
            exam.set_slot(slot, assignment.slots.get(slot))
        exam.kinds_json = json.dumps(assignment.kinds)
        exam.implant = assignment.implant
        exam.volume_only_json = (
            json.dumps(assignment.volume_only) if assignment.volume_only else None
        )
        for note in assignment.notes:
            if note not in exam.notes:
                exam.add_note(note)

    def patient_exams(
        self,
        s: Session,
        exam: Exam,
        members: list[Instance] | None = None,
        states: tuple[str, ...] | None = None,
    ) -> list[Exam]:
        """Other exams of the exam's patient (optionally only those in ``states``): the same
        non-empty PatientID with compatible issuers (index ix_exams_patient); where either
        exam has no PatientID, the same name and birth date (both needed: a name alone is not
        enough to call a study someone's prior; index on instances.patient_birth_date). A
        few indexed queries whatever the number of exams; ``members``: the exam's instances
        when the caller has them."""
        out: dict[int, Exam] = {}
        in_states = [Exam.state.in_(states)] if states is not None else []
        if exam.patient_id:
            for e in s.scalars(
                select(Exam).where(
                    Exam.patient_id == exam.patient_id, Exam.id != exam.id, *in_states
                )
            ):
                if same_patient(
                    exam.patient_id, exam.issuer_of_patient_id, e.patient_id, e.issuer_of_patient_id
                ):
                    out[e.id] = e
        if members is None:
            members = list(
                s.scalars(select(Instance).where(Instance.exam_id == exam.id).order_by(Instance.id))
            )
        me = exam_identity(exam, members)
        if not (me.name and me.birth_date):
            return list(out.values())
        # Where both have a PatientID the IDs decided above: with one, only images without.
        anonymous = (
            [or_(Instance.patient_id.is_(None), Instance.patient_id == "")]
            if exam.patient_id
            else []
        )
        ids = set(
            s.scalars(
                select(Instance.exam_id)
                .where(
                    Instance.patient_birth_date == me.birth_date,
                    Instance.exam_id.is_not(None),
                    Instance.exam_id != exam.id,
                    *anonymous,
                )
                .distinct()
            )
        )
        no_id = or_(Exam.patient_id.is_(None), Exam.patient_id == "")
        candidates = (
            [
                e
                for e in s.scalars(
                    select(Exam).where(
                        Exam.id.in_(ids), *in_states, *([no_id] if exam.patient_id else [])
                    )
                )
                if e.id not in out
            ]
            if ids
            else []
        )
        if candidates:
            by_exam: dict[int, list[Instance]] = {}
            for m in s.scalars(
                select(Instance)
                .where(Instance.exam_id.in_([e.id for e in candidates]))
                .order_by(Instance.id)
            ):
                by_exam.setdefault(int(m.exam_id or 0), []).append(m)
            for e in candidates:
                other = exam_identity(e, by_exam.get(e.id, []))
                if other.name == me.name and other.birth_date == me.birth_date:
                    out[e.id] = e
        return list(out.values())

    def _age_rule(self, exam: Exam) -> tuple[str, str] | None:
        """("age", why) when the study's StudyDate is more than [grouping] prior_after_days
        old on arrival."""
        date = _date(exam.study_date)
        if date is None or self.prior_after_days is None:
            return None
        age = (utcnow().date() - date).days
        if age <= self.prior_after_days:
            return None
        return "age", (
            f"prior: StudyDate {date.isoformat()} is {age} days old ([grouping] "
            f"prior_after_days = {self.prior_after_days:g}); stored, not read "
            f"(mammo-node complete {exam.study_instance_uid} reads it)"
        )

    def _gap_reason(self, exam: Exam, newer: Exam, arrived: bool) -> str:
        """The gap rule's reason, naming the newer study that made ``exam`` a prior (the one
        that just arrived, or the newest the node holds)."""
        date, newer_date = _date(exam.study_date), _date(newer.study_date)
        assert date is not None and newer_date is not None
        held = "arrived" if arrived else "is held by the node"
        return (
            f"prior: study {newer.study_instance_uid} of the same patient from "
            f"{newer_date.isoformat()} {held}, {(newer_date - date).days} days newer "
            f"([grouping] prior_gap_days = {self.prior_gap_days:g}); stored, not read "
            f"(mammo-node complete {exam.study_instance_uid} reads it)"
        )

    def _gap_rule(self, exam: Exam, patient: list[Exam]) -> tuple[str, str] | None:
        """("gap", why) when the node holds a study of the patient at least [grouping]
        prior_gap_days newer than this one (the newest such study is named)."""
        date = _date(exam.study_date)
        if date is None or self.prior_gap_days is None:
            return None
        newer = [
            (d, e)
            for e in patient
            if (d := _date(e.study_date)) is not None and (d - date).days >= self.prior_gap_days
        ]
        if not newer:
            return None
        return "gap", self._gap_reason(exam, max(newer, key=lambda t: t[0])[1], arrived=False)

    def _make_prior(self, exam: Exam, rule: str, why: str, now: dt.datetime) -> None:
        exam.add_note(why)
        exam.reason = why
        exam.prior_rule = rule
        set_exam_state(exam, ExamState.PRIOR, now, why)

    def _demote_older(self, exam: Exam, patient: list[Exam], now: dt.datetime) -> None:
        """A new study of a patient: the patient's studies at least prior_gap_days older
        that are not read yet (and that nobody asked to read) become priors, with the gap
        rule's reason naming this study."""
        date = _date(exam.study_date)
        if date is None or self.prior_gap_days is None:
            return
        for other in patient:
            d = _date(other.study_date)
            if (
                d is None
                or other.state not in (ExamState.RECEIVING, ExamState.READY)
                or (date - d).days < self.prior_gap_days
                or other.read_on_request
            ):
                continue
            self._make_prior(other, "gap", self._gap_reason(other, exam, arrived=True), now)

    def priors_of(self, study_uid: str) -> list[PriorStudy]:
        """The priors of the study's patient, oldest first; ExamNotFound: no such study."""
        with self.db.session() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is None:
                raise ExamNotFound(study_uid)
            rows = [
                PriorStudy(e.study_instance_uid, e.study_date)
                for e in self.patient_exams(s, exam, states=(ExamState.PRIOR.value,))
            ]
        return sorted(rows, key=lambda r: r[1] or "")

    def patient_studies(self, study_uid: str) -> list[PatientStudy]:
        """The other exams of the study's patient, newest first: what the dashboard links an
        exam to. ExamNotFound: no such study."""
        with self.db.session() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is None:
                raise ExamNotFound(study_uid)
            rows = [
                PatientStudy(e.study_instance_uid, e.study_date, e.state)
                for e in self.patient_exams(s, exam)
            ]
        return sorted(rows, key=lambda r: r.date or "", reverse=True)

    def priors_by_study(self, study_uids: list[str]) -> dict[str, list[PriorStudy]]:
        """study -> its priors oldest first, for a page of exams that are not
        priors themselves: one indexed query for those with a PatientID, the
        name-and-birth-date lookup for the others."""
        out: dict[str, list[PriorStudy]] = {}
        with self.db.session() as s:
            exams = (
                list(
                    s.scalars(
                        select(Exam).where(
                            Exam.study_instance_uid.in_(study_uids),
                            Exam.state != ExamState.PRIOR.value,
                        )
                    )
                )
                if study_uids
                else []
            )
            ids = sorted({e.patient_id for e in exams if e.patient_id})
            priors = (
                list(
                    s.scalars(
                        select(Exam).where(
                            Exam.patient_id.in_(ids), Exam.state == ExamState.PRIOR.value
                        )
                    )
                )
                if ids
                else []
            )
            # Priors without a PatientID are matched by name and birth date, exam by exam,
            # only where the node holds any.
            anonymous = (
                s.scalar(
                    select(Exam.id)
                    .where(
                        Exam.state == ExamState.PRIOR.value,
                        or_(Exam.patient_id.is_(None), Exam.patient_id == ""),
                    )
                    .limit(1)
                )
                is not None
            )
            for e in exams:
                if e.patient_id and not anonymous:
                    found = [
                        p
                        for p in priors
                        if same_patient(
                            e.patient_id,
                            e.issuer_of_patient_id,
                            p.patient_id,
                            p.issuer_of_patient_id,
                        )
                    ]
                else:
                    found = self.patient_exams(s, e, states=(ExamState.PRIOR.value,))
                if found:
                    out[e.study_instance_uid] = sorted(
                        (PriorStudy(p.study_instance_uid, p.study_date) for p in found),
                        key=lambda r: r[1] or "",
                    )
        return out

    def _hold(
        self,
        exam: Exam,
        inst: Instance,
        members: list[Instance],
        others: list[Instance],
        now: dt.datetime,
        result: AddResult,
    ) -> None:
        """Images of two patients in one study: keep them, read nothing, say so. The slots
        stay as they were (no other patient's image ever fills one)."""
        exam.last_received_at = now
        if others:
            if exam.state != ExamState.CONFLICT:
                exam.add_note(
                    f"patient conflict: instance {inst.sop_instance_uid} and the "
                    f"exam's images carry different patients; the exam was "
                    f"{exam.state}, it is held until resolved"
                )
            set_exam_state(exam, ExamState.CONFLICT, now)
            exam.reason = (
                f"patient conflict: {len(others)} of {len(members)} instance(s) "
                f"belong to another patient than the exam's first image; no "
                f"reading until resolved (mammo-node resolve "
                f"{exam.study_instance_uid} --patient-id ID)"
            )
        result.conflict = True
        result.exam_study_uid = exam.study_instance_uid
        result.exam_state = exam.state
        result.exam_version = exam.version

    def resolve_patient(
        self,
        study_uid: str,
        patient_id: str,
        assign: AssignFn,
        issuer: str | None = None,
        patient_name: str | None = None,
    ) -> Resolved:
        """End a patient conflict: the exam keeps the instances of ``patient_id`` (and
        ``issuer`` when given); the others stay stored but leave the exam. The exam is read
        again (a new version when an earlier version was read). Returns the instances
        detached, the new state and the version. ExamNotFound: no such exam; ValueError: no
        instance of that patient in it."""
        now = utcnow()
        with self.db.write() as s:
            exam = exam_for_update(s, study_uid)
            members = list(
                s.scalars(select(Instance).where(Instance.exam_id == exam.id).order_by(Instance.id))
            )
            name = person_name_key(patient_name) if patient_name is not None else None
            keep = [
                m
                for m in members
                if same_patient(patient_id, issuer, m.patient_id, m.issuer_of_patient_id)
                and (name is None or person_name_key(m.patient_name) == name)
            ]
            if not keep:
                raise ValueError("no instance of that patient in this exam")
            if (
                not (patient_id or "").strip()
                and name is None
                and len({PatientIdentity.of(m) for m in keep}) > 1
            ):
                raise ValueError(
                    "the images without a Patient ID belong to different "
                    "patients: say which with --patient-name"
                )
            detached = [m for m in members if m not in keep]
            for m in detached:
                m.exam_id = None
                m.note = ((m.note + "; ") if m.note else "") + (
                    f"left exam {study_uid}: another patient (conflict resolved)"
                )
            exam.patient_id = patient_id
            exam.issuer_of_patient_id = issuer or next(
                (m.issuer_of_patient_id for m in keep if m.issuer_of_patient_id), None
            )
            assignment = assign(keep)
            self._apply(exam, assignment)
            read_before = (
                s.scalar(
                    select(func.count())
                    .select_from(Result)
                    .where(Result.exam_id == exam.id, Result.version == exam.version)
                )
                or 0
            )
            if read_before:
                exam.version += 1
            exam.attempts, exam.next_attempt_at = 0, None
            exam.add_note(
                f"patient conflict resolved: {len(keep)} instance(s) kept, "
                f"{len(detached)} detached; read as version {exam.version}"
            )
            exam.reason = "; ".join(assignment.problems) or None
            exam.last_received_at = now
            set_exam_state(exam, ExamState.RECEIVING if exam.missing else ExamState.READY, now)
            return Resolved(len(detached), exam.state, exam.version)

    # -- grouping timer -----------------------------------------------------------------
    def promote_stable(self, stable_seconds: float) -> list[str]:
        """Move exams that received nothing for ``stable_seconds`` to ``ready``."""
        now = utcnow()
        cutoff = now - dt.timedelta(seconds=stable_seconds)
        promoted: list[str] = []
        with self.db.write() as s:
            # SKIP LOCKED: with several listeners, each partial exam is promoted by one.
            for exam in s.scalars(
                select(Exam)
                .where(Exam.state == ExamState.RECEIVING.value, Exam.last_received_at <= cutoff)
                .with_for_update(skip_locked=True)
            ):
                missing = exam.missing
                if missing:
                    msg = (
                        f"partial exam: missing {', '.join(missing)} after "
                        f"{stable_seconds:g} s without new images"
                    )
                    exam.reason = f"{exam.reason}; {msg}" if exam.reason else msg
                set_exam_state(exam, ExamState.READY, now)
                promoted.append(exam.study_instance_uid)
        return promoted

    # -- worker side (used by the results pipeline) ---------------------------------------
    def claim_next_ready(self, lease_seconds: float = 60.0, max_attempts: int = 3) -> Claim | None:
        """Claim the oldest ``ready`` exam, or a ``processing`` one whose worker's lease ran
        out, for ``lease_seconds``: the :class:`Claim`, or None. An exam taken over counts
        an attempt (an exam that keeps killing its workers ends ``failed``)."""
        now = utcnow()
        with self.db.write() as s:
            exam = s.scalar(
                select(Exam)
                .where(
                    or_(
                        and_(
                            Exam.state == ExamState.READY.value,
                            or_(Exam.next_attempt_at.is_(None), Exam.next_attempt_at <= now),
                        ),
                        and_(
                            Exam.state == ExamState.PROCESSING.value,
                            or_(Exam.lease_until.is_(None), Exam.lease_until < now),
                        ),
                    )
                )
                .order_by(Exam.state_changed_at, Exam.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if exam is None:
                return None
            if exam.state == ExamState.PROCESSING:
                exam.attempts = (exam.attempts or 0) + 1
                msg = (
                    f"taken over from {exam.lease_owner or 'an unknown worker'} by "
                    f"{self.owner}: its lease ran out (attempt {exam.attempts})"
                )
                log.warning("exam %s v%d %s", exam.study_instance_uid, exam.version, msg)
                add_event(exam, "state", msg, now)
                if exam.attempts >= max_attempts:
                    reason = f"the worker reading it stopped {exam.attempts} times (lease ran out)"
                    set_exam_state(exam, ExamState.FAILED, now, reason)
                    exam.reason = reason
                    return None
            set_exam_state(exam, ExamState.PROCESSING, now)
            exam.lease_owner = self.owner
            exam.lease_until = now + dt.timedelta(seconds=lease_seconds)
            return Claim(exam.id, exam.version)

    def peek_next_ready(self, exclude: int) -> Claim | None:
        """The ``ready`` exam :meth:`claim_next_ready` would most likely claim next, other
        than ``exclude``, without claiming it (the worker reads it ahead): only an exam
        never tried before, so that one which crashed a reading is not read ahead again."""
        now = utcnow()
        with self.db.session() as s:
            row = s.execute(
                select(Exam.id, Exam.version)
                .where(
                    Exam.state == ExamState.READY.value,
                    or_(Exam.next_attempt_at.is_(None), Exam.next_attempt_at <= now),
                    or_(Exam.attempts.is_(None), Exam.attempts == 0),
                    Exam.id != exclude,
                )
                .order_by(Exam.state_changed_at, Exam.id)
                .limit(1)
            ).first()
        return None if row is None else Claim(row[0], row[1])

    def renew_lease(self, exam_id: int, version: int, lease_seconds: float) -> bool:
        """The worker's heartbeat: extend its claim; False when it no longer holds it."""
        with self.db.write() as s:
            n = s.execute(
                update(Exam)
                .where(  # type: ignore[attr-defined]
                    Exam.id == exam_id,
                    Exam.version == version,
                    Exam.state == ExamState.PROCESSING.value,
                    Exam.lease_owner == self.owner,
                )
                .values(lease_until=utcnow() + dt.timedelta(seconds=lease_seconds))
            ).rowcount
        return bool(n)

    def _held(self, exam: Exam | None, version: int) -> bool:
        """Whether ``exam`` is this version, processing, and claimed by this process."""
        return (
            exam is not None
            and exam.version == version
            and exam.state == ExamState.PROCESSING
            and exam.lease_owner == self.owner
        )

    def retry_later(
        self, exam_id: int, version: int, reason: str, max_attempts: int, delay: float
    ) -> str | None:
        """A reading that failed for a transient reason: ``ready`` again after ``delay``
        (doubling with each attempt), or ``failed`` once ``max_attempts`` are used. Returns
        the new state, or None when the exam was reopened meanwhile."""
        now = utcnow()
        with self.db.write() as s:
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or not self._held(exam, version):
                return None
            exam.attempts = (exam.attempts or 0) + 1
            if exam.attempts >= max_attempts:
                set_exam_state(exam, ExamState.FAILED, now, reason)
                exam.reason = f"{reason} (gave up after {exam.attempts} attempts)"
            else:
                wait = delay * 2 ** (exam.attempts - 1)
                exam.next_attempt_at = now + dt.timedelta(seconds=wait)
                exam.add_note(f"attempt {exam.attempts} failed ({reason}); retrying in {wait:g} s")
                set_exam_state(exam, ExamState.READY, now, f"retry: {reason}")
            return exam.state

    def release_claim(self, exam_id: int, version: int, reason: str) -> bool:
        """Give a claimed exam back to ``ready`` at once, without counting an attempt: its
        reading was cut off by something outside the exam (the database went away). False
        when this process no longer holds it (taken over, or reopened meanwhile)."""
        now = utcnow()
        with self.db.write() as s:
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or not self._held(exam, version):
                return False
            exam.add_note(f"reading interrupted ({reason}); queued again")
            set_exam_state(exam, ExamState.READY, now, f"interrupted: {reason}")
            return True

    def reprocess(self, study_uid: str) -> Reopened:
        """Read an exam again as a new version (``mammo-node reprocess``).
        ExamNotFound: no such exam; ValueError: held by a patient conflict or no view."""
        now = utcnow()
        with self.db.write() as s:
            exam = exam_for_update(s, study_uid)
            if exam.state == ExamState.CONFLICT:
                raise ValueError("the exam is held by a patient conflict: resolve it first")
            if not any(exam.views.values()):
                raise ValueError("no image fills any of the four view slots")
            exam.version += 1
            exam.attempts, exam.next_attempt_at = 0, None
            exam.add_note(f"reprocess requested: read again as version {exam.version}")
            set_exam_state(exam, ExamState.READY, now)
            return Reopened(exam.version, exam.state)

    def complete_now(self, study_uid: str) -> Completed:
        """Process an exam now (``mammo-node complete``): a partial one instead of waiting, a
        prior or an exam skipped by the site's rule because someone asks for its reading
        (``read_on_request``: the worker reads it whatever [inference] implants says, no
        newer study makes it a prior again). Returns the missing views and the state. ExamNotFound /
        ValueError as :meth:`reprocess`."""
        now = utcnow()
        with self.db.write() as s:
            exam = exam_for_update(s, study_uid)
            if exam.state not in (ExamState.RECEIVING, ExamState.PRIOR, ExamState.SKIPPED):
                raise ValueError(f"the exam is {exam.state}, not receiving, prior or skipped")
            if not any(exam.views.values()):
                raise ValueError("no image fills any of the four view slots")
            missing = exam.missing
            gone = ", ".join(missing) or "no view"
            if exam.state == ExamState.RECEIVING:
                msg = f"completed by request with {gone} missing"
                exam.reason = f"{exam.reason}; {msg}" if exam.reason else msg
            else:
                msg = f"{exam.state} read on request ({gone} missing)"
                exam.add_note(msg)
                exam.reason = msg
                exam.read_on_request = True
            set_exam_state(exam, ExamState.READY, now, msg)
            return Completed(missing, exam.state)

    def skip(self, exam_id: int, version: int, reason: str) -> bool:
        """End processing of ``version`` without a reading, by the site's rule (state
        ``skipped``, ``reason`` says which); False when this process no longer holds it."""
        with self.db.write() as s:
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or not self._held(exam, version):
                return False
            set_exam_state(exam, ExamState.SKIPPED, utcnow(), reason)
            exam.reason = reason
            return True

    def finish(self, exam_id: int, version: int, ok: bool, reason: str | None = None) -> bool:
        """End processing of ``version``; False when the exam was reopened meanwhile (or
        another worker took it over)."""
        with self.db.write() as s:
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or not self._held(exam, version):
                return False
            set_exam_state(
                exam, ExamState.DONE if ok else ExamState.FAILED, utcnow(), None if ok else reason
            )
            if not ok:
                exam.reason = reason or "processing failed"
            return True

    def complete(
        self,
        exam_id: int,
        version: int,
        results: list[ProducedObject],
        destinations: list[str],
        finish: bool = True,
        reading: dict | None = None,
    ) -> bool:
        """Record a reading's result objects, queue them for every destination and (with
        ``finish``) mark the exam ``done``, in one transaction. ``finish=False`` queues a
        first part (the SRs) while the rest is still being built. False (nothing recorded)
        when the exam was reopened meanwhile. Results already recorded (a retry) are reused,
        never doubled."""
        with self.db.write() as s:
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or not self._held(exam, version):
                return False
            source = s.scalar(
                select(Instance).where(Instance.exam_id == exam_id).order_by(Instance.id).limit(1)
            )
            if reading is not None:
                exam.reading_json = json.dumps(reading)
                score = reading.get("score")
                exam.exam_score = float(score) if isinstance(score, (int, float)) else None
            for r in results:
                row = s.scalar(select(Result).where(Result.sop_instance_uid == r.sop_instance_uid))
                if row is None:
                    row = Result(
                        exam_id=exam_id,
                        version=version,
                        kind=r.kind,
                        sop_class_uid=r.sop_class_uid,
                        sop_instance_uid=r.sop_instance_uid,
                        series_instance_uid=r.series_instance_uid,
                        path=r.path,
                    )
                    s.add(row)
                    s.flush()
                    self._add_result_instance(s, r, exam, source)
                for dest in destinations:
                    if (
                        s.scalar(
                            select(Outbound.id).where(
                                Outbound.result_id == row.id, Outbound.destination == dest
                            )
                        )
                        is None
                    ):
                        s.add(
                            Outbound(
                                result_id=row.id,
                                destination=dest,
                                state=OutboundState.PENDING.value,
                                attempts=0,
                                next_attempt_at=utcnow(),
                            )
                        )
            if finish:
                set_exam_state(exam, ExamState.DONE, utcnow())
            return True

    @staticmethod
    def _add_result_instance(
        s: Session, r: ProducedObject, exam: Exam, source: Instance | None
    ) -> None:
        """A produced object is also an instance the node holds (found by C-FIND, sent by
        C-MOVE / C-GET), with the patient and study attributes of its source images."""
        if (
            s.scalar(select(Instance.id).where(Instance.sop_instance_uid == r.sop_instance_uid))
            is not None
        ):
            return
        s.add(
            Instance(
                sop_instance_uid=r.sop_instance_uid,
                sop_class_uid=r.sop_class_uid,
                study_instance_uid=exam.study_instance_uid,
                series_instance_uid=r.series_instance_uid,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=r.path,
                size_bytes=r.size_bytes,
                calling_aet=None,
                patient_id=source.patient_id if source else exam.patient_id,
                patient_name=source.patient_name if source else None,
                accession_number=exam.accession_number,
                study_date=source.study_date if source else None,
                study_time=source.study_time if source else None,
                modality=r.modality,
                series_number=r.series_number,
                instance_number=r.instance_number,
                role="result",
                exam_id=None,
                patient_birth_date=source.patient_birth_date if source else None,
                patient_sex=source.patient_sex if source else None,
                study_description=source.study_description if source else None,
                study_id=source.study_id if source else None,
                referring_physician_name=source.referring_physician_name if source else None,
                series_description=r.series_description,
                rows=r.rows,
                columns=r.columns,
            )
        )

    def slot_paths(self, exam_id: int) -> SlotPaths:
        """An exam's slot images (ExamNotFound: no such exam)."""
        with self.db.session() as s:
            exam = get_row(s, Exam, exam_id)
            paths: dict[str, str] = {}
            for slot, uid in exam.views.items():
                if uid:
                    path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid))
                    if path is not None:
                        paths[slot] = path
            return SlotPaths(exam.study_instance_uid, exam.version, paths)

    def reading_context(self, exam_id: int) -> ReadingContext:
        """What a reading says about its images: slot -> image kind, implant, the
        patient's priors (StudyDates) and the views that had only a volume."""
        with self.db.session() as s:
            exam = get_row(s, Exam, exam_id)
            study = exam.study_instance_uid
            kinds = {k: v for k, v in exam.view_kinds.items() if v}
            implant = bool(exam.implant)
            volume_only = exam.volume_only  # only views still without an image
            read_on_request = bool(exam.read_on_request)
        priors = [d for _, d in self.priors_of(study)]
        return ReadingContext(
            kinds=kinds,
            implant=implant,
            priors=[
                f"{d[:4]}-{d[4:6]}-{d[6:8]}" if d and len(d) == 8 else (d or "?") for d in priors
            ],
            volume_only=volume_only,
            read_on_request=read_on_request,
        )

    def add_event(self, study_uid: str, kind: str, detail: str) -> None:
        """A line in an exam's timeline from outside a transition (an administrator's
        action)."""
        with self.db.write() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is not None:
                add_event(exam, kind, detail)

    def results_of(self, study_uid: str) -> list[Result]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Result)
                    .join(Exam, Exam.id == Result.exam_id)
                    .where(Exam.study_instance_uid == study_uid)
                    .order_by(Result.version, Result.id)
                )
            )

    def recover(self) -> int:
        """At a worker's start: exams left ``processing`` by a process of this host that is
        gone (or by a release without leases) go back to ``ready`` at once; those of other
        hosts' workers are taken over when their lease runs out. Returns how many went back
        (the delivery claims of dead exporters: :meth:`storage.deliveries.Deliveries.recover`)."""
        n = 0
        with self.db.write() as s:
            for exam in s.scalars(
                select(Exam)
                .where(Exam.state == ExamState.PROCESSING.value)
                .with_for_update(skip_locked=True)
            ):
                if not owner_is_dead(exam.lease_owner):
                    continue
                exam.add_note("processing interrupted (node restarted); queued again")
                set_exam_state(exam, ExamState.READY, utcnow())
                n += 1
        return n
