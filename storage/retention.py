"""Retention: what may be deleted, when, and deleting it without ever leaving the database
pointing at a missing file.

Rules (``[retention]`` and ``[storage] purge_above_percent``):

* The **received images** of an exam may go ``keep_images_days`` after the exam is ``done``
  **and** every result of its current version reached every destination (the later of the
  two moments). An exam with a delivery that gave up keeps its images (and says so in its
  notes); an exam not read yet (receiving, ready, processing, failed, conflict) or not
  delivered yet keeps them, whatever the disk says.
* Instances outside any exam (other modalities, other SOP classes) may go
  ``keep_images_days`` after they arrived.
* A **prior** (an older study kept for comparison, state ``prior``: never read, so never
  ``done``) may go ``keep_images_days`` after its last image arrived; the current exam's
  reading that listed it stands (its results name the prior, they do not need its files).
  So may an exam **skipped** by the site's rule (``[inference] implants = "skip"``): nothing
  of it is to be delivered.
* The **produced objects** (SRs, SCs) of delivered exams may go ``keep_results_days`` after
  delivery (never when that is ``None``).
* Above ``purge_above_percent`` of disk use, the oldest purgeable studies go first, younger
  than ``keep_images_days`` if need be, until the use is below it.

A purge removes the rows and writes the files to :class:`PurgeJournal` in one transaction,
then deletes the files, then the journal entries. The exam row, its readings' Result rows
(``purged_at`` set, path emptied) and delivery rows stay: ``mammo-node exams`` still shows
the history. Purged instances are gone from C-FIND, QIDO-RS and WADO-RS.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select

from storage.db import Database
from storage.files import FileStore
from storage.models import Exam, Instance, Outbound, PurgeJournal, Result, utcnow

log = logging.getLogger("mammo_node.retention")

#: Exam states kept but never read (nothing to deliver): purged keep_images_days after their
#: last image arrived (storage.transitions.ExamState PRIOR and SKIPPED).
_UNREAD = ("prior", "skipped")


@dataclass
class Candidate:
    """One study (or stray instance group) that may be purged, and why / when."""

    study_uid: str
    exam_id: int | None
    since: dt.datetime  # done and delivered (or received, for stray instances)
    images: int
    bytes: int


@dataclass
class PurgeReport:
    studies: list[str] = field(default_factory=list)
    instances: int = 0
    results: int = 0
    bytes: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # study -> why its images stay


class Retention:
    def __init__(self, db: Database, files: FileStore) -> None:
        self.db, self.files = db, files

    # -- what may go ---------------------------------------------------------------------------
    def candidates(self, kept: dict[str, str] | None = None) -> list[Candidate]:
        """Every study whose received images may be purged now (oldest first), whatever its
        age; ``kept`` collects done exams that must keep theirs, with the reason."""
        out: list[Candidate] = []
        with self.db.session() as s:
            exams = {
                e.id: e
                for e in s.scalars(
                    select(Exam).where(Exam.state == "done", Exam.images_purged_at.is_(None))
                )
            }
            # Deliveries of each exam's current version, aggregated in one query.
            deliveries: dict[int, list[tuple[str, int, dt.datetime | None]]] = {}
            for exam_id, state, n, last in s.execute(
                select(Result.exam_id, Outbound.state, func.count(), func.max(Outbound.sent_at))
                .join(Outbound, Outbound.result_id == Result.id)
                .join(Exam, Exam.id == Result.exam_id)
                .where(
                    Exam.state == "done",
                    Exam.images_purged_at.is_(None),
                    Result.version == Exam.version,
                )
                .group_by(Result.exam_id, Outbound.state)
            ):
                deliveries.setdefault(exam_id, []).append((state, n, last))
            sizes = {
                exam_id: (n, int(size))
                for exam_id, n, size in s.execute(
                    select(
                        Instance.exam_id,
                        func.count(),
                        func.coalesce(func.sum(Instance.size_bytes), 0),
                    )
                    .join(Exam, Exam.id == Instance.exam_id)
                    .where(Exam.state.in_(("done", *_UNREAD)), Exam.images_purged_at.is_(None))
                    .group_by(Instance.exam_id)
                )
            }
            # Priors (kept for comparison) and skipped exams: never read; they go
            # keep_images_days after their last image arrived.
            for prior in s.scalars(
                select(Exam).where(Exam.state.in_(_UNREAD), Exam.images_purged_at.is_(None))
            ):
                n, size = sizes.get(prior.id, (0, 0))
                out.append(
                    Candidate(
                        prior.study_instance_uid,
                        prior.id,
                        prior.last_received_at or prior.state_changed_at,
                        n,
                        size,
                    )
                )
            for exam_id, exam in exams.items():
                rows = deliveries.get(exam_id, [])
                if any(st == "gave_up" for st, _, _ in rows):
                    if kept is not None:
                        kept[exam.study_instance_uid] = (
                            "a delivery gave up: images kept until it is resent"
                        )
                    continue
                if any(st != "sent" for st, _, _ in rows):
                    if kept is not None:
                        kept[exam.study_instance_uid] = "results not delivered yet"
                    continue
                since = max([exam.state_changed_at, *(t for _, _, t in rows if t is not None)])
                n, size = sizes.get(exam_id, (0, 0))
                out.append(Candidate(exam.study_instance_uid, exam_id, since, n, size))
            # Instances outside every exam (received, not results), grouped by study.
            seen = {c.study_uid for c in out}
            for study, first, n, size in s.execute(
                select(
                    Instance.study_instance_uid,
                    func.max(Instance.received_at),
                    func.count(),
                    func.coalesce(func.sum(Instance.size_bytes), 0),
                )
                .where(Instance.exam_id.is_(None), Instance.role != "result")
                .group_by(Instance.study_instance_uid)
            ):
                if study not in seen:
                    out.append(Candidate(study, None, first, n, int(size)))
        out.sort(key=lambda c: c.since)
        return out

    def note_kept(self, kept: dict[str, str]) -> None:
        """Say in each exam's notes why its images stay (once)."""
        with self.db.write() as s:
            for study, why in kept.items():
                exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study))
                if exam is not None and why.startswith("a delivery gave up"):
                    note = f"retention: {why}"
                    if note not in exam.notes:
                        exam.add_note(note)

    # -- purging ---------------------------------------------------------------------------
    def purge_study(self, cand: Candidate, now: dt.datetime) -> tuple[int, int]:
        """Remove one candidate's received instances; (instances, bytes)."""
        with self.db.write() as s:
            if cand.exam_id is not None:
                rows = list(s.scalars(select(Instance).where(Instance.exam_id == cand.exam_id)))
                exam = s.get(Exam, cand.exam_id)
                if exam is not None:
                    exam.images_purged_at = now
                    exam.add_note(f"retention: {len(rows)} received image(s) deleted")
            else:
                rows = list(
                    s.scalars(
                        select(Instance).where(
                            Instance.study_instance_uid == cand.study_uid,
                            Instance.exam_id.is_(None),
                            Instance.role != "result",
                        )
                    )
                )
            for r in rows:
                s.add(PurgeJournal(path=r.path))
                s.delete(r)
            size = sum(r.size_bytes or 0 for r in rows)
        self.finish_journal()
        return len(rows), size

    def purge_results(self, older_than: dt.datetime, now: dt.datetime) -> int:
        """Delete produced objects delivered before ``older_than`` (their rows stay)."""
        n = 0
        with self.db.write() as s:
            q = (
                select(Result)
                .where(Result.purged_at.is_(None))
                .where(
                    ~Result.id.in_(
                        select(Outbound.result_id).where(
                            (Outbound.state != "sent") | (Outbound.sent_at > older_than)
                        )
                    )
                )
                .where(Result.created_at <= older_than)
            )
            for res in s.scalars(q):
                inst = s.scalar(
                    select(Instance).where(Instance.sop_instance_uid == res.sop_instance_uid)
                )
                if inst is not None:
                    s.delete(inst)
                s.add(PurgeJournal(path=res.path))
                res.path, res.purged_at = "", now
                n += 1
        self.finish_journal()
        return n

    def finish_journal(self) -> int:
        """Delete the files the journal lists, then their entries (also after a crash)."""
        with self.db.session() as s:
            entries = list(s.execute(select(PurgeJournal.id, PurgeJournal.path)))
        for _, path in entries:
            if path:
                p = self.files.abspath(path)
                p.unlink(missing_ok=True)
                _prune_empty_dirs(p.parent, self.files.root)
        if entries:
            with self.db.write() as s:
                s.execute(delete(PurgeJournal).where(PurgeJournal.id.in_([i for i, _ in entries])))
        return len(entries)

    def disk_use_percent(self) -> float:
        """Disk use as df shows it: used / (used + available to us). (``total - free``
        overstates it where the file system reserves blocks or sits under a quota.)"""
        u = shutil.disk_usage(self.files.root)
        return 100.0 * u.used / (u.used + u.free) if u.used + u.free else 0.0

    def run(
        self,
        keep_images_days: float | None,
        keep_results_days: float | None,
        purge_above_percent: float | None,
        study: str | None = None,
        dry_run: bool = False,
        now: dt.datetime | None = None,
        disk_use: Callable[[], float] | None = None,
    ) -> PurgeReport:
        """Apply the rules once (see the module docstring); with ``study`` only that one."""
        now = now or utcnow()
        disk_use = disk_use or self.disk_use_percent
        report = PurgeReport()
        self.finish_journal()
        cands = self.candidates(report.kept)
        if study is not None:
            cands = [c for c in cands if c.study_uid == study]
        due = [
            c
            for c in cands
            if keep_images_days is not None and c.since <= now - dt.timedelta(days=keep_images_days)
        ]
        rest = [c for c in cands if c not in due]
        for c in due:
            report.studies.append(c.study_uid)
            report.instances += c.images
            report.bytes += c.bytes
            if not dry_run:
                self.purge_study(c, now)
        if purge_above_percent is not None:
            for c in rest:  # oldest first
                if dry_run or disk_use() <= purge_above_percent:
                    break
                log.warning(
                    "disk use above %g%%: purging study %s early (done and delivered)",
                    purge_above_percent,
                    c.study_uid,
                )
                report.studies.append(c.study_uid)
                report.instances += c.images
                report.bytes += c.bytes
                self.purge_study(c, now)
        if keep_results_days is not None and not dry_run and study is None:
            report.results = self.purge_results(now - dt.timedelta(days=keep_results_days), now)
        if not dry_run:
            self.note_kept(report.kept)
        return report


def _prune_empty_dirs(d: Path, root: Path) -> None:
    """Remove empty study / series folders up to, not including, the store's top folders
    (``instances``, ``results``)."""
    root = root.resolve()
    while d.parent.resolve() != root and d.resolve().is_relative_to(root):
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent
