"""The worker: claims ready exams, reads them with the model in its own process, and records
the result objects for export.

Inference runs in a separate process (one, spawned at start, holding the model): torch and the
scan never compete with the network threads for the GIL, a model crash cannot take the daemon
down, and the daemon itself stays small. One exam's failure marks it ``failed`` with the
reason and the worker moves on; an exam left ``processing`` by a crash goes back to ``ready``
at the next start (storage.state.ExamStore.recover).
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.compat import kill_pool_processes
from node.config import Config
from node.health import Health
from node.implementation import stamp_file_meta
from storage.db import transient_database_error
from storage.files import FileStore
from storage.records import ProducedObject
from storage.state import ExamStore

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from pydicom.dataset import Dataset

    from inference.api import MammoModel
    from storage.wakeup import Wake

log = logging.getLogger("mammo_node.worker")

#: A model that could not load is tried again this often.
MODEL_RETRY_SECONDS = 10
#: The reason of an exam not read for its implant (state ``skipped``).
IMPLANT_SKIPPED = ("implant present: not read ([inference] implants = skip); mammo-node "
                   "complete reads it on request")


def skip_reason(cfg: Config, context: dict[str, Any]) -> str | None:
    """Why the site's rules leave this exam unread (state ``skipped``), or None: an implant
    with ``[inference] implants = "skip"``, unless someone asked for the reading
    (``mammo-node complete``: ``read_on_request``)."""
    if context.get("read_on_request"):
        return None
    if context.get("implant") and cfg.inference.implants == "skip":
        return IMPLANT_SKIPPED
    return None


@dataclass(frozen=True)
class ExamJob:
    """What the inference process needs to read one exam version (picklable)."""

    data_dir: str
    study_uid: str
    version: int
    paths: dict[str, str]                  # slot -> path relative to data_dir
    sr: tuple[str, ...] = ("mammo-cad", "tid1500")
    attention_maps: bool = True
    parametric_maps: bool = False
    presentation_states: bool = False
    max_marks: int = 3
    previous: dict[str, str] = field(default_factory=dict)  # kind -> path of the SR replaced
    kinds: dict[str, str] = field(default_factory=dict)     # slot -> image kind
    implant: bool = False
    volume_2d: str = "missing"                 # how a "computed" slot is made from its volume
    notes: tuple[str, ...] = ()                # said in the reading (priors, volume-only views)


class _InferenceState:
    """Everything the inference process holds between calls: the model, and the reading of
    the exam in hand, which the SR phase makes and the SC phase reuses (one exam at a
    time: the worker submits the two phases of one exam back to back)."""

    def __init__(self, model: MammoModel) -> None:
        self.model = model
        self._key: tuple[str, int] | None = None
        self._reading: tuple | None = None

    def reading(self, job: ExamJob) -> tuple:
        key = (job.study_uid, job.version)
        if self._key != key or self._reading is None:
            self._reading = _read(self.model, job)
            self._key = key
        return self._reading

    def forget(self) -> None:
        self._key = self._reading = None


_STATE: _InferenceState | None = None  # set in the inference process by _init_model
_WARM_SECONDS: float | None = None      # how long its warm-up exam took (_init_model)


def _state() -> _InferenceState:
    if _STATE is None:
        raise RuntimeError("the inference process has no model (initialiser did not run)")
    return _STATE


def _die_with_parent(parent: int) -> None:
    """The inference process must not outlive the daemon (SIGKILL included).

    ``parent`` is the daemon's pid as the daemon itself saw it: reading ``os.getppid()``
    here instead would, if the daemon died while this process was still starting, give the
    pid of init (or a subreaper) and watch that forever. PR_SET_PDEATHSIG is armed first, the
    parent checked after it: a daemon that died before the arming is caught by the check, one
    that dies after it by the kernel.
    """
    import ctypes
    import signal

    try:  # Linux: the kernel sends us SIGKILL when the parent dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:  # where PR_SET_PDEATHSIG is missing: poll for re-parenting
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_model(parent: int, checkpoint: str, device: str, numba_cache: str,
                operating_point: float | None = None, warm: dict | None = None) -> None:
    global _STATE
    _die_with_parent(parent)
    # numba caches the compiled scan kernels on disk; beside the package is often read-only
    # for a service account, so the cache defaults to the node's data folder (read by numba
    # when it is first imported, just below).
    os.environ.setdefault("NUMBA_CACHE_DIR", numba_cache)
    from inference.api import MammoModel

    model = MammoModel(checkpoint or None, device=device, operating_point=operating_point)
    model.warm_up()  # compile / load the scan kernels now, not during the first exam
    _STATE = _InferenceState(model)
    if warm is not None:
        global _WARM_SECONDS
        t0 = time.perf_counter()
        _warm_exam(**warm)
        _WARM_SECONDS = time.perf_counter() - t0


def _warm_exam(sr: tuple[str, ...], attention_maps: bool, parametric_maps: bool) -> None:
    """Read one synthetic four-view exam (one view RLE-compressed) end to end, into a
    folder that is then removed: every import, decoder, the segmentation, the model, the
    attention maps and each result builder run once before the worker reports the model
    loaded (so before /readyz is ready), not during the first real exam (issue 21)."""
    import shutil
    import tempfile

    from pydicom.uid import RLELossless

    from inference.synthetic import make_exam, write

    folder = Path(tempfile.mkdtemp(prefix="mammo-warm-"))
    try:
        exam = make_exam(seed=2024, rows=640, cols=512)
        exam[0].compress(RLELossless)
        paths = {}
        for ds in exam:
            slot = f"{ds.ImageLaterality}-{ds.ViewPosition}"
            paths[slot] = str(write(ds, folder / f"{slot}.dcm").relative_to(folder))
        job = ExamJob(data_dir=str(folder), study_uid=str(exam[0].StudyInstanceUID),
                      version=1, paths=paths, sr=sr, attention_maps=attention_maps,
                      parametric_maps=parametric_maps)
        process_exam_srs(job)
        process_exam_scs(job)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _model_info() -> dict[str, Any]:
    from inference.scan import backend_name

    model = _state().model
    info = model.info
    return {"sha256": info.sha256, "arch": info.config.arch, "task": info.config.task,
            "demo": info.is_demo, "device": str(model.device),
            "scan": backend_name(model.device), "warm_seconds": _WARM_SECONDS}


def _save(ds: Dataset, path: Path) -> None:
    stamp_file_meta(ds)  # the node wrote it, not highdicom (PS3.10 7.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def _read(model: MammoModel, job: ExamJob) -> tuple:
    """The exam's sources, the model's reading and its plain-data summary."""
    from pydicom import dcmread

    from inference.views import KIND_LABELS
    from inference.volume import computed_2d
    from node.results import BreastSummary, Mark, ReadingSummary

    root = Path(job.data_dir)
    computed = {slot for slot, kind in job.kinds.items() if kind == "computed"}
    sources = {slot: computed_2d(root / rel, job.volume_2d) if slot in computed
               else dcmread(root / rel) for slot, rel in job.paths.items()}
    notes = list(job.notes)
    for slot in sorted(computed & set(sources)):
        notes.append(f"{slot} computed from the tomosynthesis volume "
                     f"({sources[slot].DerivationDescription})")
    trained = model.info.metadata.get("image_kinds")
    if trained:
        other = sorted({k for s, k in job.kinds.items() if s in sources and k not in trained})
        if other:
            notes.append(f"read from {', '.join(KIND_LABELS.get(k, k) for k in other)} "
                         f"image(s); the model was trained on "
                         f"{', '.join(KIND_LABELS.get(k, k) for k in trained)}")
    # Attention maps at <= 1024 px a side: what the Secondary Captures draw and the
    # Parametric Maps store; full-resolution maps of 13-megapixel views cost ~0.15 s each.
    from inference.api import MAP_SIDE

    reading = model.predict_exam(sources, keep_display=True, map_side=MAP_SIDE,
                                 max_marks=job.max_marks)
    info = model.info
    summary = ReadingSummary(
        breasts={b: BreastSummary(present=r.present, birads=r.birads,
                                  birads_probabilities=dict(r.birads_probabilities or {}),
                                  diagnosis=r.diagnosis,
                                  diagnosis_probabilities=dict(r.diagnosis_probabilities or {}),
                                  score=r.score, density=getattr(r, "density", None),
                                  density_probabilities=dict(
                                      getattr(r, "density_probabilities", None) or {}))
                 for b, r in reading.breasts.items()},
        fusion_weights=reading.fusion_weights, missing_views=reading.missing_views,
        model_name=reading.model["name"], model_version=str(info.metadata.get("version", "?")),
        model_sha256=info.sha256, not_for_clinical_use=info.is_demo,
        attention_regions={slot: region for slot, m in reading.attention_maps.items()
                           if (region := hottest_region(m, reading.map_factors.get(slot, 1)))
                           is not None},
        seconds={k: round(v, 4) for k, v in reading.seconds.items()},
        score=reading.score, operating_point=reading.operating_point,
        above_operating_point=reading.above_operating_point,
        density=getattr(reading, "density", None),
        marks={slot: [Mark(**dataclasses.asdict(m)) for m in ms]
               for slot, ms in reading.marks.items()},
        view_kinds={slot: job.kinds.get(slot, "conventional") for slot in sources},
        notes=notes, implant=job.implant)
    return sources, reading, summary


def hottest_region(amap: ArrayLike, factor: int = 1) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) around the attention above half its maximum, in pixel coordinates of
    the image (a map ``factor`` times smaller than the image is scaled up)."""
    import numpy as np

    m = np.asarray(amap, dtype=np.float32)
    if m.size == 0 or not np.isfinite(m).all() or float(m.max()) <= 0:
        return None
    ys, xs = np.nonzero(m >= 0.5 * float(m.max()))
    return (float(xs.min() * factor), float(ys.min() * factor),
            float((xs.max() + 1) * factor), float((ys.max() + 1) * factor))


def _adder(job: ExamJob, produced: list[ProducedObject]) -> Callable[[Dataset, str], None]:
    root = Path(job.data_dir)
    out_dir = Path("results") / job.study_uid / f"v{job.version}"

    def add(ds: Dataset, kind: str) -> None:
        rel = out_dir / f"{ds.SOPInstanceUID}.dcm"
        _save(ds, root / rel)
        produced.append(ProducedObject(
            kind=kind, sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID), path=str(rel),
            modality=str(ds.get("Modality", "") or "") or None,
            series_number=int(ds.get("SeriesNumber", 0) or 0),
            instance_number=int(ds.get("InstanceNumber", 0) or 0),
            size_bytes=(root / rel).stat().st_size,
            series_description=str(ds.get("SeriesDescription", "") or "") or None,
            rows=int(ds.Rows) if "Rows" in ds else None,
            columns=int(ds.Columns) if "Columns" in ds else None))
    return add


def _failpoint(job: ExamJob) -> None:
    """Fault injection for the tests of the worker's healing (never set in production):
    ``MAMMO_NODE_FAILPOINT=hang:<study>`` makes the inference of that study hang,
    ``crash:<study>`` kills the inference process in the middle of it,
    ``gate:<study>:<file>`` creates ``<file>.reached`` and holds the reading until ``<file>``
    exists (a test acts on the node mid-exam, then lets it go on)."""
    spec = os.environ.get("MAMMO_NODE_FAILPOINT", "")
    what, _, rest = spec.partition(":")
    study, _, gate = rest.partition(":")
    if study != job.study_uid:
        return
    if what == "gate":
        Path(gate + ".reached").touch()
        deadline = time.monotonic() + 300
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    elif what == "hang":
        time.sleep(3600)
    elif what == "crash":
        os._exit(3)


def process_exam_srs(job: ExamJob) -> tuple[list[ProducedObject], dict]:
    """Phase 1, in the inference process: read the exam, write its SR documents. Returns them
    with the reading as plain data (kept with the exam for the dashboard)."""
    from pydicom import dcmread

    _failpoint(job)

    from node.results import build_mammo_cad, build_presentation_state, build_tid1500

    sources, _, summary = _state().reading(job)
    t0 = time.perf_counter()
    root = Path(job.data_dir)
    produced: list[ProducedObject] = []
    add = _adder(job, produced)
    builders = {"mammo-cad": build_mammo_cad, "tid1500": build_tid1500}
    for kind in job.sr:
        prev = job.previous.get(f"sr-{kind}")
        replaces = dcmread(root / prev) if prev and (root / prev).exists() else None
        add(builders[kind](sources, summary, job.study_uid, job.version,
                           replaces=replaces), f"sr-{kind}")
    if job.presentation_states:
        add(build_presentation_state(sources, summary, job.study_uid, job.version), "pr")
    summary.seconds["sr"] = round(time.perf_counter() - t0, 4)
    return produced, dataclasses.asdict(summary)


def process_exam_scs(job: ExamJob) -> list[ProducedObject]:
    """Phase 2: the attention-map Secondary Captures (from the same reading)."""
    from node.results import build_parametric_map, build_sc

    produced: list[ProducedObject] = []
    state = _state()
    try:
        if job.attention_maps or job.parametric_maps:
            sources, reading, summary = state.reading(job)
            add = _adder(job, produced)
            for i, (slot, ds) in enumerate(sorted(sources.items())):
                if job.attention_maps:
                    add(build_sc(ds, slot, reading.displays[slot],
                                 reading.attention_maps[slot], summary, job.study_uid,
                                 job.version, i + 1), "sc")
            if job.parametric_maps:
                for i, (slot, ds) in enumerate(sorted(sources.items())):
                    add(build_parametric_map(ds, slot, reading.attention_maps[slot], summary,
                                             job.study_uid, job.version, i + 1), "pm")
    finally:
        state.forget()
    return produced


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
                    log.warning("%s: the claim was lost (taken over by another process or "
                                "changed); its outcome will not be recorded", self.what)
                    return
            except Exception:
                log.exception("%s: heartbeat failed (database unreachable?); retrying",
                              self.what)

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

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore,
                 stop: threading.Event, wake: Wake | None = None,
                 on_results: Wake | None = None,
                 health: Health | None = None, metrics: Any = None,
                 poll_seconds: float = 1.0) -> None:
        super().__init__(name="worker", daemon=True)
        self.cfg, self.files, self.exams, self.stop = cfg, files, exams, stop
        #: Set when an exam becomes ready (storage.wakeup.Listener: NOTIFY on PostgreSQL);
        #: without one, the worker looks again every ``poll_seconds``.
        self.wake: Wake = wake or threading.Event()
        self.on_results: Wake = on_results or threading.Event()  # set when results are queued
        self.poll = poll_seconds
        self.health = health or Health()
        self.metrics = metrics  # node.metrics.NodeMetrics or None
        self.pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                   initializer=_init_model,
                                   initargs=(os.getpid(), self.cfg.inference.checkpoint,
                                             self.cfg.inference.device,
                                             str(self.cfg.data_dir / "cache" / "numba"),
                                             self.cfg.inference.operating_point,
                                             {"sr": tuple(self.cfg.results.sr),
                                              "attention_maps": self.cfg.results.attention_maps,
                                              "parametric_maps":
                                                  self.cfg.results.parametric_maps}
                                             if self.cfg.inference.warm_up_exam else None))

    def _start_model(self) -> bool:
        """Start the inference process and load the model; False (said why) on failure."""
        self.pool = self._new_pool()
        try:
            info = self.pool.submit(_model_info).result(timeout=300)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.error("cannot load the model (%s); exams stay ready until it loads (next try "
                      "in %d s)", reason, MODEL_RETRY_SECONDS)
            self.health.model_failed(reason)
            kill_pool_processes(self.pool)
            self.pool = None
            return False
        self.health.model_ok(info)
        warm = info.get("warm_seconds")
        log.info("model loaded in the inference process: %s %s on %s (scan: %s), "
                 "sha256 %s%s; %s", info["arch"], info["task"],
                 info["device"], info["scan"], info["sha256"][:16],
                 " (demo checkpoint: NOT FOR CLINICAL USE)" if info["demo"] else "",
                 f"warm-up exam read in {warm:.2f} s" if warm is not None
                 else "no warm-up exam ([inference] warm_up_exam = false)")
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
                    self.metrics.wakeups.labels("worker", "notified" if woken
                                                else "poll").inc()
                continue
            exam_id, version = claim
            lease = inf.lease_seconds
            # Guarded as the exporter's loop is: nothing an exam does may end this thread.
            try:
                with Heartbeat(functools.partial(self.exams.renew_lease, exam_id, version,
                                                 lease), lease, f"exam id {exam_id} v{version}"):
                    self._process(exam_id, version)
            except Exception as exc:
                if transient_database_error(exc):
                    self._database_lost(exam_id, version, exc)
                else:
                    # A bug of ours: logged; the exam's lease runs out and it is taken over
                    # (counting an attempt), the thread goes on with the next one.
                    log.exception("worker: unexpected error on exam id %s v%d; going on",
                                  exam_id, version)
                    self.stop.wait(1.0)
        if self.pool is not None:
            kill_pool_processes(self.pool)

    def _database_lost(self, exam_id: int, version: int, exc: BaseException) -> None:
        """The database failed under a reading (server restarted, SQLite locked past its
        timeout): not the exam's fault, so it is neither failed nor charged an attempt.
        Wait until the database answers, then give the exam back to ``ready``; it is read
        again from the start (result UIDs are name-based: the same objects, not copies)."""
        log.error("exam id %s v%d: the database failed (%s: %s); the exam is read again "
                  "once it answers", exam_id, version, type(exc).__name__,
                  str(exc).splitlines()[0][:200] if str(exc) else "")
        if self.metrics is not None:
            self.metrics.exam_failures.labels("transient").inc()
        went_away = False
        while not self.stop.is_set():
            try:
                if self.exams.ping():
                    why = f"database error: {type(exc).__name__}"
                    if went_away:  # an outage: not the exam's fault, no attempt charged
                        self.exams.release_claim(exam_id, version, why)
                    else:
                        # The database answers at once: the error repeats (a read-only file,
                        # a broken schema), so it counts as an attempt with backoff; a
                        # release without one would loop on the same exam forever.
                        self.exams.retry_later(exam_id, version, why,
                                               self.cfg.inference.max_attempts,
                                               self.cfg.inference.retry_delay_seconds)
                    return
                went_away = True
            except Exception as again:
                went_away = True
                if not transient_database_error(again):
                    log.exception("cannot give exam id %s back; its lease will run out",
                                  exam_id)
                    return
            self.stop.wait(1.0)

    def _process(self, exam_id: int, version: int) -> None:
        study, version, paths = self.exams.slot_paths(exam_id)
        if not paths:
            if self.exams.finish(exam_id, version, ok=False,
                                 reason="no image fills any of the four view slots"):
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
        notes = [f"{slot}: only a tomosynthesis volume, read with this view missing"
                 for slot in context["volume_only"]]
        if context["priors"]:
            notes.append(f"priors available: {', '.join(context['priors'])}")
        # The SRs of the version this one replaces (referenced as predecessor documents).
        previous = {r.kind: r.path for r in self.exams.results_of(study)
                    if r.kind.startswith("sr-") and r.version < version}
        job = ExamJob(data_dir=str(self.files.root), study_uid=study, version=version,
                      paths=paths, sr=tuple(self.cfg.results.sr),
                      attention_maps=self.cfg.results.attention_maps,
                      parametric_maps=self.cfg.results.parametric_maps,
                      presentation_states=self.cfg.results.presentation_states,
                      max_marks=self.cfg.results.max_marks_per_breast, previous=previous,
                      kinds=context["kinds"], implant=context["implant"],
                      volume_2d=self.cfg.grouping.volume_2d, notes=tuple(notes))
        pool = self.pool
        assert pool is not None
        timeout = self.cfg.inference.timeout_seconds
        t0 = time.perf_counter()
        dests = [d.name for d in self.cfg.destinations]
        try:
            # The SRs first, queued for export at once; then the Secondary Captures.
            srs, reading = pool.submit(process_exam_srs, job).result(timeout=timeout)
            t_sr = time.perf_counter() - t0
            if not self.exams.complete(exam_id, version, srs, dests, finish=False,
                                       reading=reading):
                log.info("exam %s v%d was reopened while processing; its new version follows",
                         study, version)
                return
            self.on_results.set()
            produced = pool.submit(process_exam_scs, job).result(timeout=timeout)
            if self.metrics is not None:
                self.metrics.inference.labels("read_and_sr").observe(t_sr)
                self.metrics.inference.labels("secondary_captures").observe(
                    time.perf_counter() - t0 - t_sr)
                self.metrics.inference.labels("total").observe(time.perf_counter() - t0)
        except Exception as exc:
            if transient_database_error(exc):
                raise  # the run loop waits for the database (_database_lost)
            self._failed(exc, exam_id, study, version, timeout)
            return
        if self.exams.complete(exam_id, version, produced, dests):
            self.on_results.set()
            self._count("done")
            stages = dict(reading.get("seconds") or {})
            stages["sc"] = time.perf_counter() - t0 - t_sr
            log.info("exam %s v%d done in %.2f s (%s): %d object(s) queued for %d "
                     "destination(s)", study, version, time.perf_counter() - t0,
                     ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "total"),
                     len(srs) + len(produced), len(dests))
        else:
            log.info("exam %s v%d was reopened while processing; its new version follows",
                     study, version)

    def _failed(self, exc: Exception, exam_id: int, study: str, version: int,
                timeout: float) -> None:
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
            state = self.exams.retry_later(exam_id, version, reason,
                                           self.cfg.inference.max_attempts,
                                           self.cfg.inference.retry_delay_seconds)
            log.error("exam %s v%d: %s; %s", study, version, reason,
                      "gave up (failed)" if state == "failed" else "will retry"
                      if state == "ready" else "reopened meanwhile")
            if state == "failed":
                self._count("failed")
            return
        if self.metrics is not None:
            self.metrics.exam_failures.labels("error").inc()
        log.error("exam %s v%d failed", study, version, exc_info=exc)
        if self.exams.finish(exam_id, version, ok=False,
                             reason=f"{type(exc).__name__}: {exc}"[:500]):
            self._count("failed")

    def _count(self, outcome: str) -> None:
        """An exam this worker finished reading: done, failed or skipped."""
        if self.metrics is not None:
            self.metrics.exams_read.labels(outcome).inc()
