"""Protocol-neutral ingest: validate, place, record, assemble one received dataset.

C-STORE (:mod:`node.scp`) and STOW-RS (:mod:`node.dicomweb`) both hand a file here: the whole
encoded dataset is validated in a stream (:mod:`node.validate`: element lengths, pixel data
length, functional groups, Deflated data inflated block by block and refused past ``[node]
max_dataset_mb``; a C-STORE's blocks already while they arrived, so its file is not walked
again),
the header is parsed without pixel data, the file is moved into the store and its row
recorded in one transaction, the exam is assembled (:mod:`node.assembly`), and only then is the
success answered. A refusal removes the file, records nothing, is counted and audited.

A STOW-RS part is a byte range of the spooled request body: :func:`part_to_file` copies it
to its own file in a stream, each block validated before it is written (the C-STORE's
:class:`node.validate.StreamCheck`; a Part 10 part is then not walked again) and, for a part
sent without the Part 10 preamble, writes the file meta information in front of it (read from
the header only, never the whole dataset).
"""

from __future__ import annotations

import errno
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node import audit as A
from node.assembly import acquisition_key, assign_policy, classify
from node.config import Config
from node.implementation import stamp_file_meta
from node.status import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from node.validate import (
    DEFLATED,
    DatasetInvalid,
    StreamCheck,
    check_dataset,
    check_image_pixel_module,
    raw_dataset_encoding,
    walk_raw_dataset,
)
from storage.db import is_disk_full
from storage.exams import Exams
from storage.files import FileStore, InvalidUID
from storage.records import InstanceRecord

if TYPE_CHECKING:
    from node.metrics import NodeMetrics

log = logging.getLogger("mammo_node.ingest")

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-+~@%]+){2,}[/\\]?")


def public_message(message: str) -> str:
    """A refusal reason fit for a peer or a client (C-STORE ErrorComment, STOW-RS Warning):
    no server paths (they say where data lives)."""
    return _PATH_RE.sub("<path>", message)


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


def read_header(
    path: Path, max_bytes: int = 0, scratch: Path | None = None, validated: bool = False
) -> Dataset:
    """Validate a received file whole (:func:`node.validate.check_dataset`: every element's
    length honoured, pixel data complete, Deflated inflation bounded) and parse its header
    without loading pixel data (large values are deferred, read lazily from the file).
    ``validated``: its bytes were validated while they arrived (a C-STORE's
    :class:`node.validate.StreamCheck`), the walk is not done again."""
    try:
        inflated = None if validated else check_dataset(path, max_bytes, scratch=scratch)
    except DatasetInvalid as exc:
        raise StoreError(exc.status, str(exc)) from exc
    try:
        if inflated is not None:  # Deflated: the header from the inflated copy, not memory
            from pydicom.filereader import read_dataset, read_file_meta_info

            with open(inflated, "rb") as f:
                ds = read_dataset(f, is_implicit_VR=False, is_little_endian=True, defer_size=4096)
            ds.file_meta = read_file_meta_info(path)
        else:
            ds = dcmread(path, defer_size=4096)
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        OSError,
        NotImplementedError,
        AttributeError,
        IndexError,
        RecursionError,
    ) as exc:
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


def instance_record(
    ds: Dataset,
    store: FileStore,
    calling_aet: str,
    cmd_sop_class: str,
    cmd_sop_instance: str,
    transfer_syntax: str,
    size: int,
) -> InstanceRecord:
    """Validate identity attributes and build the instance row's values."""
    sop_class = _str(ds, "SOPClassUID")
    sop_instance = _str(ds, "SOPInstanceUID")
    if sop_class != cmd_sop_class:
        raise StoreError(
            DATASET_MISMATCH,
            f"SOPClassUID {sop_class!r} differs from the request's "
            f"Affected SOP Class {cmd_sop_class!r}",
        )
    if sop_instance != cmd_sop_instance:
        raise StoreError(
            DATASET_MISMATCH,
            f"SOPInstanceUID {sop_instance!r} differs from the request's "
            f"Affected SOP Instance {cmd_sop_instance!r}",
        )
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
    # Values as the header has them: storage.exams.fit_row cuts them to the columns (which
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


@dataclass
class Outcome:
    """What became of one dataset: the DICOM status, the reason in words, and the identity
    the header gave (None where it could not be read)."""

    status: int
    message: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


#: The blocks a STOW-RS part is copied (and validated) in.
PART_BLOCK = 4 << 20


def _copy(src: IO[bytes], dst: IO[bytes], length: int, check: StreamCheck | None = None) -> None:
    """``length`` bytes from ``src`` to ``dst`` in blocks; each block goes through ``check``
    (when given) before it is written, so that a malformed dataset is refused at the block
    that shows it, the rest never written (:class:`StoreError` with the validation's
    status)."""
    left = length
    while left:
        block = src.read(min(left, PART_BLOCK))
        if not block:
            raise StoreError(CANNOT_UNDERSTAND, "part ends before its announced length")
        if check is not None:
            try:
                check.feed(block)
            except DatasetInvalid as exc:
                raise StoreError(
                    exc.status,
                    f"{exc} (refused while the part was copied, in "
                    f"the block at byte {length - left} of {length})",
                ) from exc
            except Exception:  # a bug here must not refuse data: the file is walked whole
                log.exception(
                    "validation while copying a STOW-RS part failed; the file is "
                    "validated whole instead"
                )
                check = None
        dst.write(block)
        left -= len(block)
    if check is not None:
        try:
            check.finish()
        except DatasetInvalid as exc:
            raise StoreError(exc.status, str(exc)) from exc


def part_identity(body: Path, offset: int, length: int) -> tuple[str | None, str | None]:
    """(SOP Class, SOP Instance UID) from the file meta information of a Part 10 part of a
    spooled body (only its first bytes read), for the answer to a part refused before its
    header was parsed; (None, None) where it has none."""
    import struct
    from io import BytesIO

    try:
        with open(body, "rb") as f:
            f.seek(offset)
            head = f.read(min(length, 144))
            if (
                len(head) < 144
                or head[128:132] != b"DICM"
                or head[132:138] != b"\x02\x00\x00\x00UL"
            ):
                return None, None
            (meta_len,) = struct.unpack("<I", head[140:144])
            if meta_len > min(length, 1 << 16):
                return None, None
            meta = head + f.read(meta_len)
        ds = dcmread(BytesIO(meta), force=True)
        return (
            _str(ds.file_meta, "MediaStorageSOPClassUID"),
            _str(ds.file_meta, "MediaStorageSOPInstanceUID"),
        )
    except Exception:  # only a courtesy for the answer: never a reason to fail
        return None, None


def stream_validated(check: StreamCheck | None) -> bool:
    """Every byte went through ``check`` and passed: the whole-file walk is not needed
    (except for a Deflated dataset, whose header is read from the inflated copy that walk
    writes)."""
    return check is not None and check.error is None and check.done and check.syntax != DEFLATED


def part_to_file(
    body: Path,
    offset: int,
    length: int,
    directory: Path,
    max_bytes: int = 0,
    check: StreamCheck | None = None,
) -> Path:
    """A byte range of a spooled multipart body as a DICOM Part 10 file of its own, copied
    in blocks. A Part 10 part goes block by block through ``check`` (a
    :class:`node.validate.StreamCheck`, as a C-STORE's blocks do) before each block is
    written: a malformed one (per-frame functional groups that do not match its frames,
    pixel data too short) is refused at the block that shows it, its file removed. A part
    without the 128-byte preamble and ``DICM`` (what pydicom's dcmwrite writes by default)
    is walked in a stream (:func:`node.validate.walk_raw_dataset`) and gets file meta
    information from its header (read without pixel data, large values deferred): it is
    never loaded whole, and ``check`` is not used (it reads Part 10 files). Raises
    :class:`StoreError`."""
    if max_bytes and length > max_bytes:
        raise StoreError(
            OUT_OF_RESOURCES, f"dataset larger than [node] max_dataset_mb ({max_bytes >> 20} MB)"
        )
    with open(body, "rb") as f:
        f.seek(offset)
        head = f.read(min(length, 132))
        f.seek(offset)
        out = tempfile.NamedTemporaryFile(
            dir=directory, prefix="stow-", suffix=".dcm", delete=False
        )
        path = Path(out.name)
        try:
            if head[128:132] == b"DICM":
                with out:
                    _copy(f, out, length, check)
                return path
            raw = tempfile.NamedTemporaryFile(dir=directory, prefix="stow-raw-", delete=False)
            raw_path = Path(raw.name)
            try:
                with raw:
                    _copy(f, raw, length)
                with out:
                    _wrap_raw(raw_path, out)
            finally:
                raw_path.unlink(missing_ok=True)
            return path
        except BaseException:
            out.close()
            path.unlink(missing_ok=True)
            raise


def _wrap_raw(raw: Path, out: IO[bytes]) -> None:
    """Write preamble, file meta and the dataset of the preamble-less file ``raw`` to
    ``out``; the dataset bytes are copied, never parsed whole."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    size = raw.stat().st_size
    with open(raw, "rb", buffering=65536) as f:
        try:
            has_meta, implicit, little = raw_dataset_encoding(f, size)
            if not has_meta:
                walk_raw_dataset(f, size, implicit, little)
        except DatasetInvalid as exc:
            raise StoreError(exc.status, f"not a DICOM file: {exc}") from exc
    if has_meta:  # file meta without the preamble: validated whole by check_dataset
        out.write(b"\0" * 128 + b"DICM")
        with open(raw, "rb") as f:
            _copy(f, out, size)
        return
    try:
        ds = dcmread(raw, force=True, stop_before_pixels=True, defer_size=1024)
    except Exception as exc:
        raise StoreError(CANNOT_UNDERSTAND, f"not a DICOM file: {exc}") from exc
    sop_class, sop_instance = _str(ds, "SOPClassUID"), _str(ds, "SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise StoreError(CANNOT_UNDERSTAND, "no SOP Class / SOP Instance UID: not a DICOM file")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )
    stamp_file_meta(meta)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    out.write(b"\0" * 128 + b"DICM" + buf.getvalue())
    with open(raw, "rb") as f:
        _copy(f, out, size)


class Ingest:
    """Validate, place, record and assemble received datasets, whatever the protocol."""

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        exams: Exams,
        *,
        audit: A.AuditLog | A.NullAudit,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.files = files
        self.exams = exams
        self.assign = assign_policy(cfg)  # [grouping] prefer / volume_2d
        self.audit = audit
        self.metrics = metrics
        self.min_free = int(cfg.storage.min_free_mb * 1024 * 1024)
        self.max_bytes = int(cfg.node.max_dataset_mb * 1024 * 1024)

    def disk_ok(self) -> bool:
        """Free space above the reserve: a quick check, safe on a network thread."""
        return not self.min_free or self.files.free_bytes() >= self.min_free

    def store(
        self,
        path: Path,
        calling: str,
        sop_class: str | None = None,
        sop_instance: str | None = None,
        transfer_syntax: str | None = None,
        peer: dict | None = None,
        study: str | None = None,
        validated: bool = False,
    ) -> Outcome:
        """Validate, place and record the file at ``path`` (which is consumed: placed or
        removed). ``sop_class`` / ``sop_instance`` / ``transfer_syntax``: what the request
        announced (None: the file's own meta information); ``study``: the study the request
        is for (STOW-RS ``/studies/{study}``), another is refused; ``validated``: the file's
        bytes were validated while they arrived. A refusal is counted and audited here; a
        success is audited by :meth:`_store`."""
        out = self._store(
            path, calling, sop_class, sop_instance, transfer_syntax, peer, study, validated
        )
        if not out.ok:
            if self.metrics is not None:
                self.metrics.refused.labels(f"0x{out.status:04X}").inc()
            self.audit.event(
                A.INSTANCES_TRANSFERRED,
                A.MINOR_FAILURE,
                action="store",
                peer=peer or {"ae_title": calling},
                instance=out.sop_instance_uid or sop_instance,
                status=f"0x{out.status:04X}",
                reason=out.message[:200],
            )
        return out

    def refuse(
        self,
        status: int,
        message: str,
        calling: str,
        peer: dict | None = None,
        sop_class: str | None = None,
        sop_instance: str | None = None,
    ) -> Outcome:
        """A dataset refused before it reached :meth:`store` (a STOW part that is not one, or
        one refused while it was copied): counted and audited as a refusal of :meth:`store`
        is."""
        if self.metrics is not None:
            self.metrics.refused.labels(f"0x{status:04X}").inc()
        self.audit.event(
            A.INSTANCES_TRANSFERRED,
            A.MINOR_FAILURE,
            action="store",
            peer=peer or {"ae_title": calling},
            instance=sop_instance,
            status=f"0x{status:04X}",
            reason=message[:200],
        )
        return Outcome(status, message, sop_class_uid=sop_class, sop_instance_uid=sop_instance)

    def _store(
        self,
        path: Path,
        calling: str,
        sop_class: str | None,
        sop_instance: str | None,
        transfer_syntax: str | None,
        peer: dict | None,
        study: str | None,
        validated: bool = False,
    ) -> Outcome:
        t0 = time.perf_counter()
        record: InstanceRecord | None = None
        ds: Dataset | None = None
        try:
            if not self.disk_ok():
                raise StoreError(
                    OUT_OF_RESOURCES,
                    f"disk almost full: less than {self.cfg.storage.min_free_mb:g}"
                    " MB free in the store",
                )
            if getattr(self.audit, "fail_closed", False) and getattr(self.audit, "failing", False):
                raise StoreError(
                    OUT_OF_RESOURCES,
                    "the audit trail cannot be written ([audit] fail_closed): retry later",
                )
            ds = read_header(path, self.max_bytes, self.files.incoming, validated)
            meta = ds.file_meta
            if study is not None and _str(ds, "StudyInstanceUID") != study:
                raise StoreError(
                    DATASET_MISMATCH,
                    f"StudyInstanceUID "
                    f"{_str(ds, 'StudyInstanceUID')} is not the study of the "
                    "request",
                )
            record = instance_record(
                ds,
                self.files,
                calling,
                sop_class or str(meta.get("MediaStorageSOPClassUID", "")),
                sop_instance or str(meta.get("MediaStorageSOPInstanceUID", "")),
                transfer_syntax or str(meta.get("TransferSyntaxUID", "")),
                path.stat().st_size,
            )
            rel = record.path
            result = self.exams.add_instance(
                record, self.assign, place=lambda: self.files.place(path, rel)
            )
        except StoreError as exc:
            self._discard(path)
            return self._outcome(exc.status, str(exc), ds)
        except OSError as exc:
            self._discard(path, record.path if record else None)
            if exc.errno in _DISK_ERRNOS:
                return self._outcome(OUT_OF_RESOURCES, f"disk full: {exc.strerror}", ds)
            log.exception("store %s: I/O error", sop_instance)
            return self._outcome(PROCESSING_FAILURE, f"I/O error: {exc.strerror}", ds)
        except Exception as exc:
            self._discard(path, record.path if record else None)
            if is_disk_full(exc):  # the database's disk
                return self._outcome(OUT_OF_RESOURCES, "database disk full", ds)
            log.exception("store %s: unexpected error", sop_instance)
            return self._outcome(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}", ds)

        ms = (time.perf_counter() - t0) * 1000
        try:
            self.audit.event(
                A.INSTANCES_TRANSFERRED,
                A.SUCCESS,
                action="store",
                peer=peer or {"ae_title": calling},
                study=record.study_instance_uid,
                accession=record.accession_number,
                instance=record.sop_instance_uid,
                duplicate=result.duplicate or None,
            )
        except A.AuditUnavailable:
            # Stored and recorded already (the trail failed after the check below): the store
            # stands and is answered as such; the failure is in the node's log.
            log.error(
                "store %s: stored, but its audit line could not be written", record.sop_instance_uid
            )
        if self.metrics is not None and not result.duplicate:
            self.metrics.stored(calling, record.size_bytes)
        done = self._outcome(SUCCESS, "stored", ds)
        if result.duplicate:
            path.unlink(missing_ok=True)
            log.info(
                "%s from %s: already stored, kept the first copy", record.sop_instance_uid, calling
            )
            done.message = "already stored"
            return done
        if result.conflict:
            why = (
                "was re-sent with another patient identity"
                if result.corrected_from
                else "and the exam's images belong to different patients"
            )
            log.warning(
                "exam %s held: instance %s %s; no reading until resolved with "
                "'mammo-node resolve %s --patient-id ID'",
                result.exam_study_uid,
                record.sop_instance_uid,
                why,
                result.exam_study_uid,
            )
            self.audit.event(
                A.SECURITY_ALERT,
                A.MINOR_FAILURE,
                alert=("patient identity changed" if result.corrected_from else "patient conflict"),
                study=result.exam_study_uid,
                instance=record.sop_instance_uid,
                previous=result.corrected_from,
                now=result.corrected_to,
                peer=peer or {"ae_title": calling},
            )
        where = record.slot or record.role
        if result.exam_study_uid:
            log.info(
                "stored %s (%s) from %s in %.0f ms; exam %s v%d %s%s",
                record.sop_instance_uid,
                where,
                calling,
                ms,
                result.exam_study_uid,
                result.exam_version,
                result.exam_state,
                " (reopened)" if result.reopened else "",
            )
        else:
            log.info(
                "stored %s (%s, not part of an exam) from %s in %.0f ms",
                record.sop_instance_uid,
                record.modality or "?",
                calling,
                ms,
            )
        return done

    @staticmethod
    def _outcome(status: int, message: str, ds: Dataset | None) -> Outcome:
        if ds is None:
            return Outcome(status, message)
        return Outcome(
            status,
            message,
            _str(ds, "SOPClassUID"),
            _str(ds, "SOPInstanceUID"),
            _str(ds, "StudyInstanceUID"),
            _str(ds, "SeriesInstanceUID"),
        )

    def _discard(self, path: Path, record_path: str | None = None) -> None:
        path.unlink(missing_ok=True)
        if record_path:
            # The file may already have been moved when the commit failed.
            placed = self.files.abspath(record_path)
            if placed.exists() and not self.exams.has_instance(placed.stem):
                placed.unlink(missing_ok=True)
