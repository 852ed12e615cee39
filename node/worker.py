"""The worker: claims ready exams, has the inference process read them, and records the
result objects for export; it supervises that process (leases, timeouts, restarts).

Inference runs in a separate process (one, spawned at start, holding the model; its code is
:mod:`node.inference_process`): torch and the scan never compete with the network threads for
the GIL, a model crash cannot take the daemon down, and the daemon itself stays small. One
exam's failure marks it ``failed`` with the reason and the worker moves on; an exam left
``processing`` by a crash goes back to ``ready`` at the next start
(storage.exams.Exams.recover).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from node.compat import kill_pool_processes
from node.config import Config
from node.health import Health
from node.inference_process import (
    ExamJob,
    init_model,
    model_info,
    process_exam_scs,
    process_exam_srs,
)
from storage.db import transient_database_error
from storage.exams import Claim, Exams, ReadingContext
from storage.files import FileStore

if TYPE_CHECKING:
    from node.metrics import NodeMetrics
    from storage.wakeup import Wake

log = logging.getLogger("mammo_node.worker")

#: A model that could not load is tried again this often.
MODEL_RETRY_SECONDS = 10
#: The reason of an exam not read for its implant (state ``skipped``).
IMPLANT_SKIPPED = (
    "implant present: not read ([inference] implants = skip); mammo-node "
    "complete reads it on request"
)


def skip_reason(cfg: Config, context: ReadingContext) -> str | None:
    """Why the site's rules leave this exam unread (state ``skipped``), or None: an implant
    with ``[inference] implants = "skip"``, unless someone asked for the reading
    (``mammo-node complete``: ``read_on_request``)."""
    if context.read_on_request:
        return None
    if context.implant and cfg.inference.implants == "skip":
        return IMPLANT_SKIPPED
    return None


class Heartbeat:
    """Renews a claim (an exam's or deliveries' lease) every third of the lease while the
    work in hand goes on, in a thread of its own: ``with Heartbeat(renew, lease, what):``."""

    def __init__(self, renew: Callable[[], object], lease_seconds: float, what: str) -> None:
        self.renew, self.interval, self.what = renew, max(0.2, lease_seconds / 3), what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.renew():
                    log.warning(
                        "%s: the claim was lost (taken over by another process or "
                        "changed); its outcome will not be recorded",
                        self.what,
                    )
                    return
            except Exception:
                log.exception("%s: heartbeat failed (database unreachable?); retrying", self.what)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: Failures worth another attempt: the inference process died or hung, or a file could not
#: be read (a network file system that hiccups). Anything else (a model or builder error on
#: this exam's data) fails the exam at once.
_TRANSIENT = (BrokenProcessPool, FutureTimeout, OSError)


class Worker(threading.Thread):
    """Claims ``ready`` exams oldest first and processes them one at a time.

    Heals itself: an exam that runs past ``[inference] timeout_seconds`` has its inference
    process killed and replaced (the exams behind it go on); a transient failure puts the
    exam back to ``ready`` with a growing delay, up to ``[inference] max_attempts``; a model
    that cannot load leaves every exam ``ready``, says why (log, health) and is tried again.
    """

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        exams: Exams,
        stop: threading.Event,
        wake: Wake | None = None,
        on_results: Wake | None = None,
        health: Health | None = None,
        metrics: NodeMetrics | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        super().__init__(name="worker", daemon=True)
        self.cfg, self.files, self.exams, self.stop = cfg, files, exams, stop
        #: Set when an exam becomes ready (storage.wakeup.Listener: NOTIFY on PostgreSQL);
        #: without one, the worker looks again every ``poll_seconds``.
        self.wake: Wake = wake or threading.Event()
        self.on_results: Wake = on_results or threading.Event()  # set when results are queued
        self.poll = poll_seconds
        self.health = health or Health()
        self.metrics = metrics
        self.pool: ProcessPoolExecutor | None = None
        #: Exams not to read ahead again: the inference process died while one was.
        self._not_ahead: set[Claim] = set()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=mp.get_context("spawn"),
            initializer=init_model,
            initargs=(
                os.getpid(),
                self.cfg.inference.checkpoint,
                self.cfg.inference.device,
                str(self.cfg.data_dir / "cache" / "numba"),
                self.cfg.inference.operating_point,
                {
                    "sr": tuple(self.cfg.results.sr),
                    "attention_maps": self.cfg.results.attention_maps,
                    "parametric_maps": self.cfg.results.parametric_maps,
                    "presentation_states": self.cfg.results.presentation_states,
                    "max_marks": self.cfg.results.max_marks_per_breast,
                }
                if self.cfg.inference.warm_up_exam
                else None,
            ),
        )

    def _start_model(self) -> bool:
        """Start the inference process and load the model; False (said why) on failure."""
        self.pool = self._new_pool()
        try:
            info = self.pool.submit(model_info).result(timeout=300)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.error(
                "cannot load the model (%s); exams stay ready until it loads (next try in %d s)",
                reason,
                MODEL_RETRY_SECONDS,
            )
            self.health.model_failed(reason)
            kill_pool_processes(self.pool)
            self.pool = None
            return False
        self.health.model_ok(info)
        warm = info.get("warm_seconds")
        log.info(
            "model loaded in the inference process: %s %s on %s (scan: %s), sha256 %s%s; %s",
            info["arch"],
            info["task"],
            info["device"],
            info["scan"],
            info["sha256"][:16],
            " (demo checkpoint: NOT FOR CLINICAL USE)" if info["demo"] else "",
            f"warm-up exam read in {warm:.2f} s"
            if warm is not None
            else "no warm-up exam ([inference] warm_up_exam = false)",
        )
        return True

    def _restart(self, why: str) -> None:
        log.warning("restarting the inference process: %s", why)
        if self.pool is not None:
            kill_pool_processes(self.pool)
        self.pool = None
        self.health.inference_restarts += 1
        if self.metrics is not None:
            self.metrics.inference_restarts.inc()
        self._start_model()

    def run(self) -> None:
        self._start_model()
        while not self.stop.is_set():
            if self.pool is None:
                if self.stop.wait(MODEL_RETRY_SECONDS):
                    break
                self._start_model()
                continue
            self.wake.clear()
            inf = self.cfg.inference
            try:
                claim = self.exams.claim_next_ready(inf.lease_seconds, inf.max_attempts)
            except Exception:
                log.exception("cannot claim an exam (database unreachable?); retrying")
                self.stop.wait(MODEL_RETRY_SECONDS)
                continue
            if claim is None:
                woken = self.wake.wait(self.poll)
                if self.metrics is not None and not self.stop.is_set():
                    self.metrics.wakeups.labels("worker", "notified" if woken else "poll").inc()
                continue
            exam_id, version = claim
            lease = inf.lease_seconds
            # Guarded as the exporter's loop is: nothing an exam does may end this thread.
            try:
                with Heartbeat(
                    functools.partial(self.exams.renew_lease, exam_id, version, lease),
                    lease,
                    f"exam id {exam_id} v{version}",
                ):
                    self._process(exam_id, version)
            except Exception as exc:
                if transient_database_error(exc):
                    self._database_lost(exam_id, version, exc)
                else:
                    # A bug of ours: logged; the exam's lease runs out and it is taken over
                    # (counting an attempt), the thread goes on with the next one.
                    log.exception(
                        "worker: unexpected error on exam id %s v%d; going on", exam_id, version
                    )
                    self.stop.wait(1.0)
        if self.pool is not None:
            kill_pool_processes(self.pool)

    def _database_lost(self, exam_id: int, version: int, exc: BaseException) -> None:
        """The database failed under a reading (server restarted, SQLite locked past its
        timeout): not the exam's fault, so it is neither failed nor charged an attempt.
        Wait until the database answers, then give the exam back to ``ready``; it is read
        again from the start (result UIDs are name-based: the same objects, not copies)."""
        log.error(
            "exam id %s v%d: the database failed (%s: %s); the exam is read again once it answers",
            exam_id,
            version,
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        if self.metrics is not None:
            self.metrics.exam_failures.labels("transient").inc()
        went_away = False
        while not self.stop.is_set():
            try:
                if self.exams.db.ping():
                    why = f"database error: {type(exc).__name__}"
                    if went_away:  # an outage: not the exam's fault, no attempt charged
                        self.exams.release_claim(exam_id, version, why)
                    else:
                        # The database answers at once: the error repeats (a read-only file,
                        # a broken schema), so it counts as an attempt with backoff; a
                        # release without one would loop on the same exam forever.
                        self.exams.retry_later(
                            exam_id,
                            version,
                            why,
                            self.cfg.inference.max_attempts,
                            self.cfg.inference.retry_delay_seconds,
                        )
                    return
                went_away = True
            except Exception as again:
                went_away = True
                if not transient_database_error(again):
                    log.exception("cannot give exam id %s back; its lease will run out", exam_id)
                    return
            self.stop.wait(1.0)

    def _process(self, exam_id: int, version: int) -> None:
        study, version, paths = self.exams.slot_paths(exam_id)
        if not paths:
            if self.exams.finish(
                exam_id, version, ok=False, reason="no image fills any of the four view slots"
            ):
                self._count("failed")
            log.warning("exam %s v%d failed: no usable view", study, version)
            return
        context = self.exams.reading_context(exam_id)
        skip = skip_reason(self.cfg, context)
        if skip is not None:
            if self.exams.skip(exam_id, version, skip):
                self._count("skipped")
            log.info("exam %s v%d skipped: %s", study, version, skip.split(";")[0])
            return
        # The SRs of the version this one replaces (referenced as predecessor documents).
        previous = {
            r.kind: r.path
            for r in self.exams.results_of(study)
            if r.kind.startswith("sr-") and r.version < version
        }
        job = self._job(study, version, paths, context, previous)
        pool = self.pool
        assert pool is not None
        timeout = self.cfg.inference.timeout_seconds
        t0 = time.perf_counter()
        dests = [d.name for d in self.cfg.destinations]
        ahead: tuple[Claim, ExamJob] | None = None
        try:
            # The SRs first, queued for export at once; then the Secondary Captures.
            srs, reading = pool.submit(process_exam_srs, job).result(timeout=timeout)
            t_sr = time.perf_counter() - t0
            if not self.exams.complete(exam_id, version, srs, dests, finish=False, reading=reading):
                log.info(
                    "exam %s v%d was reopened while processing; its new version follows",
                    study,
                    version,
                )
                return
            self.on_results.set()
            # While this exam's images are built, the next one is decoded and preprocessed.
            ahead = self._ahead_job(exam_id)
            produced = pool.submit(process_exam_scs, job, ahead and ahead[1]).result(
                timeout=timeout
            )
            if self.metrics is not None:
                self.metrics.inference.labels("read_and_sr").observe(t_sr)
                self.metrics.inference.labels("secondary_captures").observe(
                    time.perf_counter() - t0 - t_sr
                )
                self.metrics.inference.labels("total").observe(time.perf_counter() - t0)
        except Exception as exc:
            if transient_database_error(exc):
                raise  # the run loop waits for the database (_database_lost)
            if ahead is not None and isinstance(exc, (BrokenProcessPool, FutureTimeout)):
                self._ahead_failed(exc, exam_id, study, version, ahead)
                return
            self._failed(exc, exam_id, study, version, timeout)
            return
        if self.exams.complete(exam_id, version, produced, dests):
            self.on_results.set()
            self._count("done")
            stages = dict(reading.get("seconds") or {})
            stages["sc"] = time.perf_counter() - t0 - t_sr
            log.info(
                "exam %s v%d done in %.2f s (%s): %d object(s) queued for %d destination(s)",
                study,
                version,
                time.perf_counter() - t0,
                ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "total"),
                len(srs) + len(produced),
                len(dests),
            )
        else:
            log.info(
                "exam %s v%d was reopened while processing; its new version follows", study, version
            )

    def _job(
        self,
        study: str,
        version: int,
        paths: dict[str, str],
        context: ReadingContext,
        previous: dict[str, str],
    ) -> ExamJob:
        """What the inference process needs to read this exam version."""
        notes = [
            f"{slot}: only a tomosynthesis volume, read with this view missing"
            for slot in context.volume_only
        ]
        if context.priors:
            notes.append(f"priors available: {', '.join(context.priors)}")
        return ExamJob(
            data_dir=str(self.files.root),
            study_uid=study,
            version=version,
            paths=paths,
            sr=tuple(self.cfg.results.sr),
            attention_maps=self.cfg.results.attention_maps,
            parametric_maps=self.cfg.results.parametric_maps,
            presentation_states=self.cfg.results.presentation_states,
            max_marks=self.cfg.results.max_marks_per_breast,
            previous=previous,
            kinds=context.kinds,
            implant=context.implant,
            volume_2d=self.cfg.grouping.volume_2d,
            notes=tuple(notes),
        )

    def _ahead_job(self, exclude: int) -> tuple[Claim, ExamJob] | None:
        """The exam to read ahead while ``exclude``'s images are built: the next ready one
        never tried before (``[inference] read_ahead``), or None. Only an optimisation: it
        claims nothing (another worker may take the exam; the reading ahead is then
        dropped), and nothing that goes wrong here touches the exam in hand."""
        if not self.cfg.inference.read_ahead:
            return None
        try:
            peek = self.exams.peek_next_ready(exclude)
            if peek is None or peek in self._not_ahead:
                return None
            study, version, paths = self.exams.slot_paths(peek.exam_id)
            if not paths or version != peek.version:
                return None
            context = self.exams.reading_context(peek.exam_id)
            if skip_reason(self.cfg, context) is not None:
                return None
            return peek, self._job(study, version, paths, context, {})
        except Exception:
            log.debug("no exam read ahead", exc_info=True)
            return None

    def _ahead_failed(
        self,
        exc: Exception,
        exam_id: int,
        study: str,
        version: int,
        ahead: tuple[Claim, ExamJob],
    ) -> None:
        """The inference process died or hung while it built this exam's images and read
        the next one ahead: which of the two caused it is not known, so this exam goes back
        to ``ready`` without an attempt counted and the other is never read ahead again (if
        it is the cause, it is charged when read on its own)."""
        if len(self._not_ahead) > 1000:
            self._not_ahead.clear()
        self._not_ahead.add(ahead[0])
        what = "hung" if isinstance(exc, FutureTimeout) else "died"
        reason = f"the inference process {what} while exam {ahead[1].study_uid} was read ahead"
        if self.metrics is not None:
            self.metrics.exam_failures.labels("transient").inc()
        self._restart(f"exam {study} v{version}: {reason}")
        released = self.exams.release_claim(exam_id, version, reason)
        log.warning(
            "exam %s v%d: %s; %s",
            study,
            version,
            reason,
            "queued again (no attempt counted)" if released else "reopened meanwhile",
        )

    def _failed(
        self, exc: Exception, exam_id: int, study: str, version: int, timeout: float
    ) -> None:
        """An exam's reading failed: again later when the cause may pass (the inference
        process died or hung, a file could not be read), else failed with the reason (a model
        or builder error on this exam's data: this exam fails, the others go on)."""
        if isinstance(exc, _TRANSIENT):
            if self.metrics is not None:
                self.metrics.exam_failures.labels("transient").inc()
            if isinstance(exc, FutureTimeout):
                reason = f"inference took longer than {timeout:g} s"
                self._restart(f"exam {study} v{version}: {reason}")
            elif isinstance(exc, BrokenProcessPool):
                reason = "the inference process died"
                self._restart(f"exam {study} v{version}: {reason}")
            else:
                reason = f"{type(exc).__name__}: {exc}"[:300]
            state = self.exams.retry_later(
                exam_id,
                version,
                reason,
                self.cfg.inference.max_attempts,
                self.cfg.inference.retry_delay_seconds,
            )
            log.error(
                "exam %s v%d: %s; %s",
                study,
                version,
                reason,
                "gave up (failed)"
                if state == "failed"
                else "will retry"
                if state == "ready"
                else "reopened meanwhile",
            )
            if state == "failed":
                self._count("failed")
            return
        if self.metrics is not None:
            self.metrics.exam_failures.labels("error").inc()
        log.error("exam %s v%d failed", study, version, exc_info=exc)
        if self.exams.finish(
            exam_id, version, ok=False, reason=f"{type(exc).__name__}: {exc}"[:500]
        ):
            self._count("failed")

    def _count(self, outcome: str) -> None:
        """An exam this worker finished reading: done, failed or skipped."""
        if self.metrics is not None:
            self.metrics.exams_read.labels(outcome).inc()
