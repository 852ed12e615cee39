"""The outbound queue: one row per result object and destination, claimed by exporters.

An exporter looks at what is due (:meth:`Deliveries.due_transfers`) or claims it
(:meth:`Deliveries.claim_transfers`: ``FOR UPDATE SKIP LOCKED``, then a lease its heartbeat
renews), marks a C-STORE in flight, then sent or failed (exponential backoff, then
``gave_up``). ``mammo-node resend`` queues a study's results again; a destination can be
paused from the dashboard. Every state change goes through
:func:`storage.transitions.set_outbound_state`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection

from sqlalchemy import or_, select, true, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.leases import owner_is_dead, process_owner
from storage.models import DestinationSetting, Exam, Outbound, Result, utcnow
from storage.records import Delivery
from storage.transitions import OutboundState, add_event, get_row, set_outbound_state


class Deliveries:
    """The delivery queue of result objects to destinations, and its claims."""

    def __init__(self, db: Database, owner: str | None = None) -> None:
        self.db = db
        #: This process as the holder of the deliveries it claims.
        self.owner = owner or process_owner()

    def due_transfers(
        self, limit: int = 100, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[Delivery]:
        """Deliveries whose time has come, oldest first (a look, not a claim)."""
        with self.db.session() as s:
            return self._due(s, limit, exclude, claim=False)

    def claim_transfers(
        self,
        limit: int = 20,
        lease_seconds: float = 60.0,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> list[Delivery]:
        """Claim due deliveries for this exporter (``FOR UPDATE SKIP LOCKED``, then a lease):
        several exporters never send the same object; one that dies leaves its claims to
        the others when the lease runs out."""
        with self.db.write() as s:
            rows = self._due(s, limit, exclude, claim=True)
            if rows:
                s.execute(
                    update(Outbound)
                    .where(Outbound.id.in_([r.id for r in rows]))
                    .values(
                        lease_owner=self.owner,
                        lease_until=utcnow() + dt.timedelta(seconds=lease_seconds),
                    )
                )
            return rows

    def renew_transfer_leases(self, lease_seconds: float) -> int:
        """The exporter's heartbeat: extend the claims it still holds."""
        with self.db.write() as s:
            return s.execute(
                update(Outbound)
                .where(  # type: ignore[attr-defined]
                    Outbound.lease_owner == self.owner,
                    Outbound.state.in_((OutboundState.PENDING.value, OutboundState.RETRYING.value)),
                )
                .values(lease_until=utcnow() + dt.timedelta(seconds=lease_seconds))
            ).rowcount

    def release_transfers(self) -> None:
        """Give back this exporter's unsent claims (at shutdown), and wake the other
        exporters for them (a bulk update passes no flush, so the commit hook says nothing)."""
        with self.db.write() as s:
            freed = s.execute(
                update(Outbound)
                .where(Outbound.lease_owner == self.owner)  # type: ignore[attr-defined]
                .values(lease_owner=None, lease_until=None)
            ).rowcount
        if freed:
            from storage import wakeup

            wakeup.notify(self.db, wakeup.DELIVERIES_DUE)

    @staticmethod
    def _due(s: Session, limit: int, exclude: Collection[str], claim: bool) -> list[Delivery]:
        now = utcnow()
        q = (
            select(
                Outbound.id,
                Outbound.destination,
                Outbound.attempts,
                Result.path,
                Result.sop_instance_uid,
                Outbound.in_flight_since,
                Result.sop_class_uid,
                Exam.study_instance_uid,
            )
            .join(Result, Result.id == Outbound.result_id)
            .join(Exam, Exam.id == Result.exam_id)
            .where(
                Outbound.state.in_((OutboundState.PENDING.value, OutboundState.RETRYING.value)),
                Outbound.next_attempt_at <= now,
                or_(Outbound.lease_until.is_(None), Outbound.lease_until < now),
                Outbound.destination.not_in(list(exclude)) if exclude else true(),
            )
            .order_by(Outbound.next_attempt_at, Outbound.id)
            .limit(limit)
        )
        if claim:
            q = q.with_for_update(skip_locked=True, of=Outbound)
        return [
            Delivery(
                id=r[0],
                destination=r[1],
                attempts=r[2],
                path=r[3],
                sop_instance_uid=r[4],
                interrupted=r[5] is not None,
                sop_class_uid=r[6],
                study_instance_uid=r[7],
            )
            for r in s.execute(q).all()
        ]

    def mark_in_flight(self, outbound_id: int, lease_seconds: float = 60.0) -> bool:
        """A C-STORE of this delivery starts now (and the claim is extended). False when
        another exporter holds it (this one's lease ran out and it was taken over)."""
        with self.db.write() as s:
            row = get_row(s, Outbound, outbound_id)
            if row.lease_owner not in (None, self.owner):
                return False
            now = utcnow()
            row.in_flight_since = now
            row.lease_owner, row.lease_until = self.owner, now + dt.timedelta(seconds=lease_seconds)
            return True

    def _delivery_event(self, s: Session, row: Outbound, text: str) -> None:
        res = s.get(Result, row.result_id)
        exam = s.get(Exam, res.exam_id) if res is not None else None
        if exam is not None and res is not None:
            add_event(
                exam, "delivery", f"{res.kind} {res.sop_instance_uid} to {row.destination}: {text}"
            )

    def mark_sent(self, outbound_id: int) -> None:
        with self.db.write() as s:
            row = get_row(s, Outbound, outbound_id)
            self._delivery_event(s, row, f"sent (attempt {row.attempts + 1})")
            set_outbound_state(row, OutboundState.SENT)
            row.sent_at, row.last_error = utcnow(), None
            row.in_flight_since = None
            row.attempts += 1

    def mark_failed(
        self,
        outbound_id: int,
        error: str,
        max_attempts: int,
        initial_delay: float,
        max_delay: float,
    ) -> str:
        """Schedule a retry with exponential backoff, or give up; returns the new state."""
        with self.db.write() as s:
            row = get_row(s, Outbound, outbound_id)
            row.attempts += 1
            row.in_flight_since = None
            row.last_error = error[:2000]
            self._delivery_event(s, row, f"attempt {row.attempts} failed: {error[:300]}")
            if row.attempts >= max_attempts:
                set_outbound_state(row, OutboundState.GAVE_UP)
            else:
                delay = min(max_delay, initial_delay * 2 ** (row.attempts - 1))
                set_outbound_state(row, OutboundState.RETRYING)
                row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
            return row.state

    def requeue_study(self, study_uid: str) -> int:
        """Queue every result of the study's latest version again (``mammo-node resend``)."""
        with self.db.write() as s:
            exam = s.scalar(select(Exam).where(Exam.study_instance_uid == study_uid))
            if exam is None:
                return 0
            n = 0
            for row in s.scalars(
                select(Outbound)
                .join(Result, Result.id == Outbound.result_id)
                .where(
                    Result.exam_id == exam.id,
                    Result.version == exam.version,
                    Result.purged_at.is_(None),
                )
            ):
                set_outbound_state(row, OutboundState.PENDING)
                row.attempts, row.next_attempt_at = 0, utcnow()
                row.last_error = None
                n += 1
            return n

    def set_paused(self, destination: str, paused: bool) -> None:
        with self.db.write() as s:
            row = s.get(DestinationSetting, destination)
            if row is None:
                row = DestinationSetting(name=destination)
                s.add(row)
            row.paused, row.changed_at = paused, utcnow()

    def paused_destinations(self) -> set[str]:
        with self.db.session() as s:
            return set(
                s.scalars(
                    select(DestinationSetting.name).where(DestinationSetting.paused.is_(True))
                )
            )

    def recover(self) -> int:
        """At an exporter's start: deliveries claimed by a dead exporter of this host are
        freed now (those of other hosts' exporters when their lease runs out). Returns how
        many."""
        n = 0
        with self.db.write() as s:
            for row in s.scalars(
                select(Outbound)
                .where(Outbound.lease_owner.isnot(None))
                .with_for_update(skip_locked=True)
            ):
                if owner_is_dead(row.lease_owner):
                    row.lease_owner = row.lease_until = None
                    n += 1
        return n
