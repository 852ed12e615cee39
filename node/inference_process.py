"""The code that runs inside the inference process (node.worker starts it, one per worker,
spawned, and supervises it: claims, leases, timeouts, restarts).

The process's initializer (:func:`init_model`) loads the model once, compiles the scan
kernels and reads a warm-up exam; then each exam is two calls, :func:`process_exam_srs` (read
the exam with the model, write its SR documents and presentation state) and
:func:`process_exam_scs` (the attention-map Secondary Captures and Parametric Maps from the
same reading; while it builds them, the next ready exam, when the worker names one, is decoded
and preprocessed in a thread beside it: :meth:`_InferenceState.read_ahead`). An
:class:`ExamJob` says what to read and what to write, as plain data; the
objects written come back as ``storage.records.ProducedObject`` rows. This is the node's side
of ``inference.api``: the model, torch and the scan are imported here, inside the process, never
in the daemon; the database is not touched here.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.implementation import stamp_file_meta
from storage.records import ProducedObject

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from pydicom.dataset import Dataset

    from inference.api import MammoModel, PreparedExam


@dataclass(frozen=True)
class ExamJob:
    """What the inference process needs to read one exam version (picklable)."""

    data_dir: str
    study_uid: str
    version: int
    paths: dict[str, str]  # slot -> path relative to data_dir
    sr: tuple[str, ...] = ("mammo-cad", "tid1500")
    attention_maps: bool = True
    parametric_maps: bool = False
    presentation_states: bool = False
    max_marks: int = 3
    previous: dict[str, str] = field(default_factory=dict)  # kind -> path of the SR replaced
    kinds: dict[str, str] = field(default_factory=dict)  # slot -> image kind
    implant: bool = False
    volume_2d: str = "missing"  # how a "computed" slot is made from its volume
    notes: tuple[str, ...] = ()  # said in the reading (priors, volume-only views)


#: Threads the reading ahead decodes and preprocesses the next exam's views with: one, so
#: that the exam in hand's images are built as fast as without it (measured on 2 cores,
#: 4,700 x 2,900 back to back, three runs each: its SC phase 0.44-0.52 s with 1 thread,
#: 0.55-0.68 s with 2, 0.59-0.74 s with 4; the next exam's SRs 1.37-1.68 / 1.49-1.65 /
#: 1.52-1.56 s after the last C-STORE: the same within the noise).
AHEAD_THREADS = 1


@dataclass
class _Loaded:
    """An exam's sources, decoded and preprocessed for the model (no model run yet)."""

    sources: dict[str, Dataset]
    prepared: PreparedExam
    notes: list[str]  # what the loading says in the reading (views computed from volumes)


def _load_key(job: ExamJob) -> tuple:
    """What an exam's loading depends on: a read ahead is used only for the same files."""
    return (
        job.data_dir,
        job.study_uid,
        job.version,
        tuple(sorted(job.paths.items())),
        tuple(sorted(job.kinds.items())),
        job.volume_2d,
    )


class _InferenceState:
    """Everything the inference process holds between calls: the model, the reading of the
    exam in hand, which the SR phase makes and the SC phase reuses (one exam at a time: the
    worker submits the two phases of one exam back to back), and at most one exam read
    ahead (decoded and preprocessed in a thread while the exam in hand's images are built)."""

    def __init__(self, model: MammoModel) -> None:
        self.model = model
        self._key: tuple[str, int] | None = None
        self._reading: tuple | None = None
        self._ahead: tuple[tuple, Future[_Loaded]] | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None

    def reading(self, job: ExamJob) -> tuple:
        key = (job.study_uid, job.version)
        if self._key != key or self._reading is None:
            self._reading = None  # the previous exam's arrays go before this one's are made
            loaded, waited = self._take_ahead(job)
            self._reading = _read(self.model, job, loaded, waited)
            self._key = key
        return self._reading

    def read_ahead(self, job: ExamJob) -> None:
        """Start decoding and preprocessing ``job``'s exam in a thread; the next
        :meth:`reading` of the same files takes it instead of loading them again. Whatever
        was read ahead before and not taken is dropped."""
        # A test's crash in the reading ahead, at its start: inside this call (where a real
        # decoder's crash may land just after it), so the worker's handling is tested.
        _failpoint(job, ("crash",))
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        # One thread: the exam in hand's images and their export keep the other core(s).
        self._ahead = (
            _load_key(job),
            self._ahead_pool.submit(_load, self.model, job, AHEAD_THREADS),
        )

    def _take_ahead(self, job: ExamJob) -> tuple[_Loaded | None, float | None]:
        """The exam read ahead if it is this one (waiting for it to finish) and the seconds
        waited; (None, None) if it is another exam or its loading failed (it is loaded again
        on this exam's own path, where a failure is this exam's)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != _load_key(job):
            return None, None
        t0 = time.perf_counter()
        try:
            return ahead[1].result(), time.perf_counter() - t0
        except Exception:
            return None, None

    def forget(self) -> None:
        self._key = self._reading = None


_STATE: _InferenceState | None = None  # set in the inference process by init_model
_WARM_SECONDS: float | None = None  # how long its warm-up exam took (init_model)


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


def init_model(
    parent: int,
    checkpoint: str,
    device: str,
    numba_cache: str,
    operating_point: float | None = None,
    warm: dict | None = None,
) -> None:
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


def _warm_exam(
    sr: tuple[str, ...],
    attention_maps: bool,
    parametric_maps: bool,
    presentation_states: bool = False,
    max_marks: int = 3,
) -> None:
    """Read one synthetic four-view exam (one view RLE-compressed, one lesion) end to end,
    into a folder that is then removed: every import, decoder, the segmentation, the model,
    the attention maps, the marks and each result builder the node is configured for (the
    presentation state included) run once before the worker reports the model
    loaded (so before /readyz is ready), not during the first real exam (issue 21)."""
    import shutil
    import tempfile

    from pydicom.uid import RLELossless

    from inference.synthetic import Lesion, make_exam, write

    folder = Path(tempfile.mkdtemp(prefix="mammo-warm-"))
    try:
        # A lesion in the left breast: the demo checkpoint marks it, so the marks' paths
        # (SR regions, the presentation state's graphics, the outlines) are warmed too.
        exam = make_exam(
            seed=2024,
            rows=640,
            cols=512,
            lesions={"L": [Lesion("spiculated", 0.45, 0.4, 0.06, 0.35)]},
        )
        exam[0].compress(RLELossless)
        paths = {}
        for ds in exam:
            slot = f"{ds.ImageLaterality}-{ds.ViewPosition}"
            paths[slot] = str(write(ds, folder / f"{slot}.dcm").relative_to(folder))
        job = ExamJob(
            data_dir=str(folder),
            study_uid=str(exam[0].StudyInstanceUID),
            version=1,
            paths=paths,
            sr=sr,
            attention_maps=attention_maps,
            parametric_maps=parametric_maps,
            presentation_states=presentation_states,
            max_marks=max_marks,
        )
        process_exam_srs(job)
        process_exam_scs(job)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def model_info() -> dict[str, Any]:
    from inference.scan import backend_name

    model = _state().model
    info = model.info
    return {
        "sha256": info.sha256,
        "arch": info.config.arch,
        "task": info.config.task,
        "demo": info.is_demo,
        "device": str(model.device),
        "scan": backend_name(model.device),
        "warm_seconds": _WARM_SECONDS,
    }


def _save(ds: Dataset, path: Path) -> None:
    stamp_file_meta(ds)  # the node wrote it, not highdicom (PS3.10 7.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)


def _load(model: MammoModel, job: ExamJob, threads: int = 4) -> _Loaded:
    """Read the exam's files, decode and preprocess them for the model (the views side by
    side in up to ``threads`` threads)."""
    from pydicom import dcmread

    from inference.api import MAP_SIDE
    from inference.volume import computed_2d

    _failpoint(job, ("crash", "hang"))
    root = Path(job.data_dir)
    computed = {slot for slot, kind in job.kinds.items() if kind == "computed"}
    sources = {
        slot: computed_2d(root / rel, job.volume_2d) if slot in computed else dcmread(root / rel)
        for slot, rel in job.paths.items()
    }
    notes = [
        f"{slot} computed from the tomosynthesis volume ({sources[slot].DerivationDescription})"
        for slot in sorted(computed & set(sources))
    ]
    # Attention maps at <= 1024 px a side: what the Secondary Captures draw and the
    # Parametric Maps store; full-resolution maps of 13-megapixel views cost ~0.15 s each.
    return _Loaded(sources, model.prepare_exam(sources, map_side=MAP_SIDE, threads=threads), notes)


def _read(
    model: MammoModel, job: ExamJob, loaded: _Loaded | None = None, waited: float | None = None
) -> tuple:
    """The exam's sources, the model's reading and its plain-data summary: of ``loaded``,
    when the exam was read ahead (``waited``: the seconds waited for it), else loaded here."""
    from inference.views import KIND_LABELS
    from node.results import BreastSummary, Mark, ReadingSummary

    if loaded is None:
        loaded = _load(model, job)
    sources = loaded.sources
    notes = list(job.notes) + loaded.notes
    trained = model.info.metadata.get("image_kinds")
    if trained:
        other = sorted({k for s, k in job.kinds.items() if s in sources and k not in trained})
        if other:
            notes.append(
                f"read from {', '.join(KIND_LABELS.get(k, k) for k in other)} "
                f"image(s); the model was trained on "
                f"{', '.join(KIND_LABELS.get(k, k) for k in trained)}"
            )
    reading = model.read_prepared(loaded.prepared, keep_display=True, max_marks=job.max_marks)
    if waited is not None:  # decoded and preprocessed ahead: this is what it still cost
        reading.seconds["ahead_wait"] = waited
    info = model.info
    summary = ReadingSummary(
        breasts={
            b: BreastSummary(
                present=r.present,
                birads=r.birads,
                birads_probabilities=dict(r.birads_probabilities or {}),
                diagnosis=r.diagnosis,
                diagnosis_probabilities=dict(r.diagnosis_probabilities or {}),
                score=r.score,
                density=getattr(r, "density", None),
                density_probabilities=dict(getattr(r, "density_probabilities", None) or {}),
            )
            for b, r in reading.breasts.items()
        },
        fusion_weights=reading.fusion_weights,
        missing_views=reading.missing_views,
        model_name=reading.model["name"],
        model_version=str(info.metadata.get("version", "?")),
        model_sha256=info.sha256,
        not_for_clinical_use=info.is_demo,
        attention_regions={
            slot: region
            for slot, m in reading.attention_maps.items()
            if (region := hottest_region(m, reading.map_factors.get(slot, 1))) is not None
        },
        seconds={k: round(v, 4) for k, v in reading.seconds.items()},
        score=reading.score,
        operating_point=reading.operating_point,
        above_operating_point=reading.above_operating_point,
        density=getattr(reading, "density", None),
        marks={
            slot: [Mark(**dataclasses.asdict(m)) for m in ms] for slot, ms in reading.marks.items()
        },
        view_kinds={slot: job.kinds.get(slot, "conventional") for slot in sources},
        notes=notes,
        implant=job.implant,
    )
    return sources, reading, summary


def hottest_region(amap: ArrayLike, factor: int = 1) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) around the attention above half its maximum, in pixel coordinates of
    the image (a map ``factor`` times smaller than the image is scaled up)."""
    import numpy as np

    m = np.asarray(amap, dtype=np.float32)
    if m.size == 0 or not np.isfinite(m).all() or float(m.max()) <= 0:
        return None
    ys, xs = np.nonzero(m >= 0.5 * float(m.max()))
    return (
        float(xs.min() * factor),
        float(ys.min() * factor),
        float((xs.max() + 1) * factor),
        float((ys.max() + 1) * factor),
    )


def _adder(job: ExamJob, produced: list[ProducedObject]) -> Callable[[Dataset, str], None]:
    root = Path(job.data_dir)
    out_dir = Path("results") / job.study_uid / f"v{job.version}"

    def add(ds: Dataset, kind: str) -> None:
        rel = out_dir / f"{ds.SOPInstanceUID}.dcm"
        _save(ds, root / rel)
        produced.append(
            ProducedObject(
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                path=str(rel),
                modality=str(ds.get("Modality", "") or "") or None,
                series_number=int(ds.get("SeriesNumber", 0) or 0),
                instance_number=int(ds.get("InstanceNumber", 0) or 0),
                size_bytes=(root / rel).stat().st_size,
                series_description=str(ds.get("SeriesDescription", "") or "") or None,
                rows=int(ds.Rows) if "Rows" in ds else None,
                columns=int(ds.Columns) if "Columns" in ds else None,
            )
        )

    return add


def _failpoint(job: ExamJob, only: tuple[str, ...] = ("gate", "hang", "crash")) -> None:
    """Fault injection for the tests of the worker's healing (never set in production):
    ``MAMMO_NODE_FAILPOINT=hang:<study>`` makes the inference of that study hang,
    ``crash:<study>`` kills the inference process in the middle of it (both also where the
    exam is read ahead), ``gate:<study>:<file>`` creates ``<file>.reached`` and holds the
    reading until ``<file>`` exists (a test acts on the node mid-exam, then lets it go on).
    Several, comma-separated, for several studies. ``only``: the kinds acted on here."""
    for spec in os.environ.get("MAMMO_NODE_FAILPOINT", "").split(","):
        what, _, rest = spec.partition(":")
        study, _, gate = rest.partition(":")
        if study != job.study_uid or what not in only:
            continue
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
        add(
            builders[kind](sources, summary, job.study_uid, job.version, replaces=replaces),
            f"sr-{kind}",
        )
    if job.presentation_states:
        add(build_presentation_state(sources, summary, job.study_uid, job.version), "pr")
    summary.seconds["sr"] = round(time.perf_counter() - t0, 4)
    return produced, dataclasses.asdict(summary)


def process_exam_scs(job: ExamJob, ahead: ExamJob | None = None) -> list[ProducedObject]:
    """Phase 2: the attention-map Secondary Captures (from the same reading); ``ahead``, the
    next exam the worker will read, is decoded and preprocessed meanwhile (issue 21)."""
    from node.results import build_parametric_map, build_sc

    produced: list[ProducedObject] = []
    state = _state()
    if ahead is not None:
        state.read_ahead(ahead)
    try:
        if job.attention_maps or job.parametric_maps:
            sources, reading, summary = state.reading(job)
            add = _adder(job, produced)
            for i, (slot, ds) in enumerate(sorted(sources.items())):
                if job.attention_maps:
                    add(
                        build_sc(
                            ds,
                            slot,
                            reading.displays[slot],
                            reading.attention_maps[slot],
                            summary,
                            job.study_uid,
                            job.version,
                            i + 1,
                        ),
                        "sc",
                    )
            if job.parametric_maps:
                for i, (slot, ds) in enumerate(sorted(sources.items())):
                    add(
                        build_parametric_map(
                            ds,
                            slot,
                            reading.attention_maps[slot],
                            summary,
                            job.study_uid,
                            job.version,
                            i + 1,
                        ),
                        "pm",
                    )
    finally:
        state.forget()
    return produced
