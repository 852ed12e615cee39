"""DICOM services of the node: C-ECHO and C-STORE SCP (pynetdicom event handlers).

pynetdicom streams each incoming dataset to a file under ``data_dir/incoming`` while it
arrives (``STORE_RECV_CHUNKED_DATASET``), so a 30 MB mammogram is never held whole in
memory. The C-STORE handler then reads the header only, classifies the view, moves the file
into the store and records its row in one transaction, and only then answers success.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node import audit as A
from node.compat import partial_dataset_file, receiving_file
from node.config import Config
from node.security import AccessControl
from node.status import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from node.validate import DatasetInvalid, check_dataset, check_image_pixel_module
from node.views import acquisition_key, assign_policy, classify
from storage.db import is_disk_full
from storage.files import FileStore, InvalidUID
from storage.records import InstanceRecord
from storage.state import ExamStore

log = logging.getLogger("mammo_node.scp")


#: Transfer syntaxes accepted for storage: uncompressed, deflated, and the compressed ones
#: mammography archives use. Files are stored as received.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old systems)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
]

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class RxRefused(OSError):
    """Why an incoming dataset stopped being written, with the C-STORE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class IncomingFile:
    """The file pynetdicom streams a dataset into, made safe against a full disk.

    pynetdicom writes each P-DATA fragment as it arrives; an ``ENOSPC`` there would kill
    the association. This wrapper records the first write error, truncates the partial file
    to give the space back, swallows the rest of the dataset, and lets the C-STORE handler
    answer "out of resources" (0xA700) instead. The same happens, before the disk is full,
    when the dataset grows past ``limit_bytes`` (``[node] max_dataset_mb``) or free space
    falls below the reserve while it arrives (checked every ``CHECK_EVERY`` bytes).
    """

    #: Set by the daemon from the configuration (class attributes: pynetdicom creates the
    #: instances itself, with tempfile's arguments only).
    directory: str | None = None   # data_dir/incoming: same file system as the store
    limit_bytes: int = 0
    disk_ok: Any = None
    CHECK_EVERY = 16 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dir", self.directory)
        kwargs.setdefault("prefix", "rx-")
        self._f = tempfile.NamedTemporaryFile(*args, **kwargs)
        self.name = self._f.name
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.written = 0
        self._next_check = self.CHECK_EVERY

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        try:
            self._f.truncate(0)  # give the space back at once
        except OSError:
            pass

    def write(self, data: bytes) -> int:
        if self.error is None:
            self.written += len(data)
            if self.limit_bytes and self.written > self.limit_bytes:
                self._failed(RxRefused(OUT_OF_RESOURCES, "dataset larger than [node] "
                                       f"max_dataset_mb ({self.limit_bytes >> 20} MB)"))
                return len(data)
            if self.written >= self._next_check:
                self._next_check += self.CHECK_EVERY
                if self.disk_ok is not None and not self.disk_ok():
                    self._failed(RxRefused(OUT_OF_RESOURCES, "free space fell below the "
                                           "reserve while the dataset arrived"))
                    return len(data)
            try:
                return self._f.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._f.flush()
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:
            self.error = self.error or exc


class StoreError(Exception):
    """A dataset that is refused, with the C-STORE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _str(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword, None)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_header(path: Path, max_bytes: int = 0, scratch: Path | None = None) -> Dataset:
    """Validate a received file whole (:func:`node.validate.check_dataset`: every element's
    length honoured, pixel data complete, Deflated inflation bounded) and parse its header
    without loading pixel data (large values are deferred, read lazily from the file)."""
    try:
        inflated = check_dataset(path, max_bytes, scratch=scratch)
    except DatasetInvalid as exc:
        raise StoreError(exc.status, str(exc)) from exc
    try:
        if inflated is not None:  # Deflated: the header from the inflated copy, not memory
            from pydicom.filereader import read_dataset, read_file_meta_info

            with open(inflated, "rb") as f:
                ds = read_dataset(f, is_implicit_VR=False, is_little_endian=True,
                                  defer_size=4096)
            ds.file_meta = read_file_meta_info(path)
        else:
            ds = dcmread(path, defer_size=4096)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
            NotImplementedError, AttributeError, IndexError, RecursionError) as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            raise
        raise StoreError(CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}") from exc
    finally:
        if inflated is not None:
            inflated.unlink(missing_ok=True)
    if len(ds) == 0:
        raise StoreError(CANNOT_UNDERSTAND, "empty dataset")
    try:
        check_image_pixel_module(ds)
    except DatasetInvalid as exc:
        raise StoreError(exc.status, str(exc)) from exc
    return ds


def instance_record(ds: Dataset, store: FileStore, calling_aet: str,
                    cmd_sop_class: str, cmd_sop_instance: str,
                    transfer_syntax: str, size: int) -> InstanceRecord:
    """Validate identity attributes and build the instance row's values."""
    sop_class = _str(ds, "SOPClassUID")
    sop_instance = _str(ds, "SOPInstanceUID")
    if sop_class != cmd_sop_class:
        raise StoreError(DATASET_MISMATCH,
                         f"SOPClassUID {sop_class!r} differs from the request's "
                         f"Affected SOP Class {cmd_sop_class!r}")
    if sop_instance != cmd_sop_instance:
        raise StoreError(DATASET_MISMATCH,
                         f"SOPInstanceUID {sop_instance!r} differs from the request's "
                         f"Affected SOP Instance {cmd_sop_instance!r}")
    study, series = _str(ds, "StudyInstanceUID"), _str(ds, "SeriesInstanceUID")
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not value:
            raise StoreError(DATASET_MISMATCH, f"{name} (required) is missing")
    try:
        relpath = store.instance_relpath(study, series, sop_instance)  # type: ignore[arg-type]
    except InvalidUID as exc:
        raise StoreError(DATASET_MISMATCH, str(exc)) from exc
    view = classify(ds)
    assert sop_instance and sop_class and study and series  # checked above
    # Values as the header has them: storage.state.fit_row cuts them to the columns (which
    # are wider than the VRs where vendors overrun them), one place for the lengths.
    return InstanceRecord(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=transfer_syntax,
        path=relpath,
        size_bytes=size,
        calling_aet=calling_aet or None,
        patient_id=_str(ds, "PatientID"),
        issuer_of_patient_id=_str(ds, "IssuerOfPatientID"),
        patient_name=_str(ds, "PatientName"),
        accession_number=_str(ds, "AccessionNumber"),
        study_date=_str(ds, "StudyDate"),
        study_time=_str(ds, "StudyTime"),
        modality=_str(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        patient_birth_date=_str(ds, "PatientBirthDate"),
        patient_sex=_str(ds, "PatientSex"),
        study_description=_str(ds, "StudyDescription"),
        study_id=_str(ds, "StudyID"),
        referring_physician_name=_str(ds, "ReferringPhysicianName"),
        series_description=_str(ds, "SeriesDescription"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
        number_of_frames=_int(ds, "NumberOfFrames") if "PixelData" in ds else None,
        laterality=view.laterality[:1] if view.laterality else None,
        view=view.view,
        view_modifiers=",".join(view.modifiers) or None,
        for_processing=view.for_processing,
        acquisition_key=acquisition_key(ds) or None,
        role=view.role,
        image_kind=view.kind,
        implant=view.implant,
        slot=view.slot,
        note=view.note,
    )


class StorageSCP:
    """The C-ECHO / C-STORE service provider bound to one store."""

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore,
                 exam_ready: Any = None, access: AccessControl | None = None,
                 audit: Any = None, metrics: Any = None) -> None:
        self.cfg = cfg
        self.files = files
        self.exams = exams
        self.assign = assign_policy(cfg)  # [grouping] prefer / volume_2d
        self.exam_ready = exam_ready  # a threading.Event set when an exam becomes ready
        self.min_free = int(cfg.storage.min_free_mb * 1024 * 1024)
        self.audit = audit or A.NullAudit()
        self.metrics = metrics  # node.metrics.NodeMetrics or None
        self.make_room: Any = None  # set by the daemon: purge what retention allows
        self.access = access or AccessControl(cfg, self.audit, self.room_for_data)

    def disk_ok(self) -> bool:
        """Free space above the reserve: a quick check, safe on a network thread (it runs
        every 16 MB while a dataset arrives)."""
        return not self.min_free or self.files.free_bytes() >= self.min_free

    def room_for_data(self) -> bool:
        """At the start of an association or a STOW request: below the reserve, retention
        first purges what may go (``make_room``), then the space is checked again. Runs in
        the association's own thread or a worker thread, never on the HTTP event loop."""
        if self.disk_ok():
            return True
        if self.make_room is not None:
            self.make_room()
        return self.disk_ok()

    # -- handlers ------------------------------------------------------------------------
    def handlers(self) -> list[tuple]:
        return [
            *self.access.handlers(),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_ABORTED, self.on_aborted),
        ]

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS if self.access.allowed(event, "echo") else NOT_AUTHORIZED

    def on_accepted(self, event: evt.Event) -> None:
        a = event.assoc
        log.info("association accepted from %s (%s:%s)", a.requestor.ae_title,
                 a.requestor.address, a.requestor.port)

    def on_aborted(self, event: evt.Event) -> None:
        log.warning("association with %s aborted", event.assoc.requestor.ae_title)

    def on_conn_close(self, event: evt.Event) -> None:
        """Remove the partial file of a dataset whose transfer was interrupted."""
        f = partial_dataset_file(event.assoc)
        if f is not None:
            try:
                f.close()
                Path(f.name).unlink(missing_ok=True)
                log.warning("connection closed mid-dataset: partial data discarded")
            except OSError:
                log.exception("could not remove partial dataset %s", f.name)

    def on_store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        try:
            path = Path(event.dataset_path)
        except (AttributeError, TypeError):
            return self._fail(CANNOT_UNDERSTAND, "C-STORE request without a dataset", None)
        if not self.access.allowed(event, "store"):
            return self._fail(NOT_AUTHORIZED, "peer not granted store", path, req)
        rx_error = getattr(receiving_file(req), "error", None)
        if rx_error is not None:
            status = getattr(rx_error, "status", OUT_OF_RESOURCES)
            return self._fail(status, f"cannot take incoming data: {rx_error}", path, req)
        who = self.access.who(event)
        status, message = self.ingest(path, event.assoc.requestor.ae_title,
                                      str(getattr(req, "AffectedSOPClassUID", "")),
                                      str(getattr(req, "AffectedSOPInstanceUID", "")),
                                      str(event.context.transfer_syntax), peer=who)
        if status == SUCCESS:
            return SUCCESS
        if status == PROCESSING_FAILURE:
            return PROCESSING_FAILURE
        return self._fail(status, message, None, req)

    def ingest(self, path: Path, calling: str, sop_class: str | None = None,
               sop_instance: str | None = None,
               transfer_syntax: str | None = None,
               peer: dict | None = None) -> tuple[int, str]:
        """Validate, place and record one received file (C-STORE and STOW-RS alike); a
        refusal is an audit line too (a successful store is audited by :meth:`_ingest`)."""
        status, message = self._ingest(path, calling, sop_class, sop_instance,
                                       transfer_syntax, peer)
        if status != SUCCESS and self.metrics is not None:
            self.metrics.refused.labels(f"0x{status:04X}").inc()
        if status != SUCCESS:
            self.audit.event(A.INSTANCES_TRANSFERRED, A.MINOR_FAILURE, action="store",
                             peer=peer or {"ae_title": calling}, instance=sop_instance,
                             status=f"0x{status:04X}", reason=message[:200])
        return status, message

    def _ingest(self, path: Path, calling: str, sop_class: str | None,
                sop_instance: str | None, transfer_syntax: str | None,
                peer: dict | None) -> tuple[int, str]:
        """Validate, place and record one received file (C-STORE and STOW-RS alike).

        ``sop_class`` / ``sop_instance`` are what the request announced (None: take the
        file's own meta information). Returns (DICOM status, message); on any failure the
        file is removed and nothing is recorded.
        """
        t0 = time.perf_counter()
        record: InstanceRecord | None = None
        try:
            if self.min_free and self.files.free_bytes() < self.min_free:
                raise StoreError(OUT_OF_RESOURCES,
                                 f"disk almost full: less than {self.cfg.storage.min_free_mb:g}"
                                 f" MB free in {self.files.root}")
            ds = read_header(path, int(self.cfg.node.max_dataset_mb * 1024 * 1024),
                             self.files.incoming)
            meta = ds.file_meta
            record = instance_record(
                ds, self.files, calling,
                sop_class or str(meta.get("MediaStorageSOPClassUID", "")),
                sop_instance or str(meta.get("MediaStorageSOPInstanceUID", "")),
                transfer_syntax or str(meta.get("TransferSyntaxUID", "")),
                path.stat().st_size)
            rel = record.path
            result = self.exams.add_instance(
                record, self.assign, place=lambda: self.files.place(path, rel))
        except StoreError as exc:
            self._discard(path)
            return exc.status, str(exc)
        except OSError as exc:
            self._discard(path, record.path if record else None)
            if exc.errno in _DISK_ERRNOS:
                return OUT_OF_RESOURCES, f"disk full: {exc}"
            log.exception("store %s: I/O error", sop_instance)
            return PROCESSING_FAILURE, f"I/O error: {exc}"
        except Exception as exc:
            self._discard(path, record.path if record else None)
            if is_disk_full(exc):  # the database's disk
                return OUT_OF_RESOURCES, f"database disk full: {exc}"
            log.exception("store %s: unexpected error", sop_instance)
            return PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"

        ms = (time.perf_counter() - t0) * 1000
        self.audit.event(A.INSTANCES_TRANSFERRED, A.SUCCESS, action="store",
                         peer=peer or {"ae_title": calling}, study=record.study_instance_uid,
                         accession=record.accession_number,
                         instance=record.sop_instance_uid, duplicate=result.duplicate or None)
        if self.metrics is not None and not result.duplicate:
            self.metrics.stored(calling, record.size_bytes)
        if result.duplicate:
            path.unlink(missing_ok=True)
            log.info("%s from %s: already stored, kept the first copy",
                     record.sop_instance_uid, calling)
            return SUCCESS, "already stored"
        if result.exam_state == "ready" and self.exam_ready is not None:
            self.exam_ready.set()
        if result.conflict:
            why = ("was re-sent with another patient identity" if result.corrected_from
                   else "and the exam's images belong to different patients")
            log.warning("exam %s held: instance %s %s; no reading until resolved with "
                        "'mammo-node resolve %s --patient-id ID'", result.exam_study_uid,
                        record.sop_instance_uid, why, result.exam_study_uid)
            self.audit.event(A.SECURITY_ALERT, A.MINOR_FAILURE,
                             alert=("patient identity changed" if result.corrected_from
                                    else "patient conflict"),
                             study=result.exam_study_uid, instance=record.sop_instance_uid,
                             previous=result.corrected_from, now=result.corrected_to,
                             peer=peer or {"ae_title": calling})
        where = record.slot or record.role
        if result.exam_study_uid:
            log.info("stored %s (%s) from %s in %.0f ms; exam %s v%d %s%s",
                     record.sop_instance_uid, where, calling, ms, result.exam_study_uid,
                     result.exam_version, result.exam_state,
                     " (reopened)" if result.reopened else "")
        else:
            log.info("stored %s (%s, not part of an exam) from %s in %.0f ms",
                     record.sop_instance_uid, record.modality or "?", calling, ms)
        return SUCCESS, "stored"

    # -- helpers -------------------------------------------------------------------------
    def _discard(self, path: Path, record_path: str | None = None) -> None:
        path.unlink(missing_ok=True)
        if record_path:
            # The file may already have been moved when the commit failed.
            placed = self.files.abspath(record_path)
            if placed.exists() and not self.exams.has_instance(placed.stem):
                placed.unlink(missing_ok=True)

    def _fail(self, status: int, message: str, path: Path | None, req: Any = None) -> Dataset:
        if path is not None:
            self._discard(path)
        uid = getattr(req, "AffectedSOPInstanceUID", None) if req is not None else None
        log.warning("C-STORE %s refused (0x%04X): %s", uid, status, message)
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = message[:64]
        return rsp


def make_ae(cfg: Config) -> AE:
    """An AE with the node's presentation contexts and limits."""
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_pdu_size = cfg.node.max_pdu_size
    ae.maximum_associations = cfg.node.max_associations
    ae.network_timeout = cfg.node.network_timeout_seconds
    ae.acse_timeout = 30
    ae.dimse_timeout = cfg.node.network_timeout_seconds
    ae.add_supported_context(Verification)
    # Storage: as SCP (C-STORE in) and, when a C-GET requestor asks for it, as SCU.
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES, scu_role=True,
                                 scp_role=True)
    from node.qr import QR_CONTEXTS

    for sop_class in QR_CONTEXTS:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES[:3])
    # Calling / called AE titles and addresses are checked by node.security.AccessControl
    # (EVT_REQUESTED), which knows each peer's hosts and services.
    return ae
