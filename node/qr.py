"""Query/Retrieve SCP: C-FIND (Patient Root and Study Root; PATIENT, STUDY, SERIES, IMAGE),
C-MOVE to configured destinations and C-GET, over every instance the node holds (received
images and produced results).

Matching (PS3.4 C.2.2.2): single value (case-insensitive for PN), wildcards ``*`` and ``?``,
date/time ranges (``A-B``, ``-B``, ``A-``), UID lists (``\\``-separated), universal (empty).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import Config
from storage.files import FileStore
from storage.models import Instance
from storage.state import ExamStore

log = logging.getLogger("mammo_node.qr")

QR_CONTEXTS = [
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
]
PATIENT_ROOT = {str(PatientRootQueryRetrieveInformationModelFind),
                str(PatientRootQueryRetrieveInformationModelMove),
                str(PatientRootQueryRetrieveInformationModelGet)}

PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_MISMATCH = 0xA900
UNABLE = 0xC000
MOVE_DEST_UNKNOWN = 0xA801

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# keyword -> (level, Instance column, VR kind)
ATTRS: dict[str, tuple[str, str, str]] = {
    "PatientID": ("PATIENT", "patient_id", "LO"),
    "PatientName": ("PATIENT", "patient_name", "PN"),
    "StudyInstanceUID": ("STUDY", "study_instance_uid", "UI"),
    "StudyDate": ("STUDY", "study_date", "DA"),
    "StudyTime": ("STUDY", "study_time", "TM"),
    "AccessionNumber": ("STUDY", "accession_number", "SH"),
    "SeriesInstanceUID": ("SERIES", "series_instance_uid", "UI"),
    "Modality": ("SERIES", "modality", "CS"),
    "SeriesNumber": ("SERIES", "series_number", "IS"),
    "SOPInstanceUID": ("IMAGE", "sop_instance_uid", "UI"),
    "SOPClassUID": ("IMAGE", "sop_class_uid", "UI"),
    "InstanceNumber": ("IMAGE", "instance_number", "IS"),
}
UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def _contexts(rows: list[Instance]) -> list:
    """Presentation contexts for sending ``rows``: each SOP class in its stored transfer
    syntax, with the uncompressed ones as fallbacks (at most 128, as DICOM allows)."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for ts in (r.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in by_class[r.sop_class_uid]:
                by_class[r.sop_class_uid].append(ts)
    return [build_context(cls, ts) for cls, ts in list(by_class.items())[:128]]


class QueryError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _wildcard(pattern: str, value: str, fold: bool) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.IGNORECASE if fold else 0) is not None


def match_value(query: str, value: Any, vr: str) -> bool:
    """One attribute against one stored value, by the rules of its VR."""
    q = str(query).strip()
    if q == "" or q == "*":
        return True
    v = "" if value is None else str(value).strip()
    if vr == "UI":
        return v in {u.strip() for u in q.split("\\")}
    if vr in ("DA", "TM") and "-" in q:
        lo, _, hi = q.partition("-")
        if vr == "TM":  # compare as zero-padded HHMMSS.ffffff strings
            v, lo, hi = (x.replace(":", "")[:13] for x in (v, lo, hi))
            hi = hi.ljust(6, "9") if hi else hi
        if not v:
            return False
        return (not lo or v >= lo) and (not hi or v <= hi)
    if vr == "TM" and v:
        return v.replace(":", "").startswith(q.replace(":", ""))
    if "*" in q or "?" in q:
        return _wildcard(q, v, fold=vr == "PN")
    if vr == "PN":
        return q.lower() == v.lower()
    if vr == "IS":
        try:
            return int(q) == int(v)
        except ValueError:
            return False
    return q == v


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class QueryRetrieveSCP:
    """C-FIND / C-MOVE / C-GET handlers over the node's store."""

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore) -> None:
        self.cfg, self.files, self.exams = cfg, files, exams

    def handlers(self) -> list[tuple]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move),
                (evt.EVT_C_GET, self.on_get)]

    # -- matching -----------------------------------------------------------------------
    def _parse(self, identifier: Dataset, model: str) -> tuple[str, dict[str, str]]:
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVELS:
            raise QueryError(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel {level!r} is not one "
                                                  f"of {LEVELS}")
        if level == "PATIENT" and model not in PATIENT_ROOT:
            raise QueryError(IDENTIFIER_MISMATCH, "PATIENT level needs the Patient Root model")
        keys = {}
        for elem in identifier:
            if (elem.keyword in ATTRS or elem.keyword == "ModalitiesInStudy") \
                    and not elem.VR == "SQ":
                keys[elem.keyword] = "" if elem.value is None else (
                    "\\".join(str(v) for v in elem.value) if elem.VM > 1 else str(elem.value))
        return level, keys

    def match(self, level: str, keys: dict[str, str]) -> list[Instance]:
        """Instances matching every key at or above ``level``; ``ModalitiesInStudy`` keeps
        the studies holding at least one instance of a listed modality."""
        modalities = keys.get("ModalitiesInStudy", "").strip()
        rows = self._match(level, {k: v for k, v in keys.items() if k in ATTRS})
        if modalities and modalities != "*" and LEVELS.index(level) >= 1:
            wanted = {m.strip().upper() for m in modalities.split("\\")}
            studies = {r.study_instance_uid for r in self.exams.find_instances(
                study_uids=sorted({r.study_instance_uid for r in rows}) or ["-"])
                if (r.modality or "").upper() in wanted}
            rows = [r for r in rows if r.study_instance_uid in studies]
        return rows

    def _match(self, level: str, keys: dict[str, str]) -> list[Instance]:
        def uid_list(k: str) -> list[str] | None:
            v = keys.get(k, "").strip()
            return [u.strip() for u in v.split("\\")] if v and "*" not in v and "?" not in v \
                else None

        pid = keys.get("PatientID", "").strip()
        rows = self.exams.find_instances(
            study_uids=uid_list("StudyInstanceUID"), series_uids=uid_list("SeriesInstanceUID"),
            sop_uids=uid_list("SOPInstanceUID"),
            patient_id=pid if pid and "*" not in pid and "?" not in pid else None)
        depth = LEVELS.index(level)
        active = [(k, q) for k, q in keys.items()
                  if q.strip() not in ("", "*") and LEVELS.index(ATTRS[k][0]) <= depth]
        return [r for r in rows
                if all(match_value(q, getattr(r, ATTRS[k][1]), ATTRS[k][2]) for k, q in active)]

    def _answers(self, level: str, keys: dict[str, str], identifier: Dataset,
                 rows: list[Instance]) -> Iterator[Dataset]:
        group_key = {"PATIENT": lambda r: r.patient_id,
                     "STUDY": lambda r: r.study_instance_uid,
                     "SERIES": lambda r: r.series_instance_uid,
                     "IMAGE": lambda r: r.sop_instance_uid}[level]
        groups: dict[Any, list[Instance]] = defaultdict(list)
        for r in rows:
            groups[group_key(r)].append(r)
        for members in groups.values():
            first = members[0]
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            for elem in identifier:
                kw = elem.keyword
                if kw in ATTRS and LEVELS.index(ATTRS[kw][0]) <= LEVELS.index(level):
                    value = getattr(first, ATTRS[kw][1])
                    setattr(ds, kw, _text(value) if ATTRS[kw][2] != "IS" or value is not None
                            else "")
                elif kw == "ModalitiesInStudy" and level in ("PATIENT", "STUDY"):
                    ds.ModalitiesInStudy = sorted({m.modality for m in members if m.modality})
                elif kw == "NumberOfStudyRelatedSeries" and level == "STUDY":
                    ds.NumberOfStudyRelatedSeries = len({m.series_instance_uid for m in members})
                elif kw == "NumberOfStudyRelatedInstances" and level == "STUDY":
                    ds.NumberOfStudyRelatedInstances = len(members)
                elif kw == "NumberOfSeriesRelatedInstances" and level == "SERIES":
                    ds.NumberOfSeriesRelatedInstances = len(members)
                elif kw == "NumberOfPatientRelatedStudies" and level == "PATIENT":
                    ds.NumberOfPatientRelatedStudies = len({m.study_instance_uid
                                                            for m in members})
                elif kw == "NumberOfPatientRelatedInstances" and level == "PATIENT":
                    ds.NumberOfPatientRelatedInstances = len(members)
                elif kw not in ("QueryRetrieveLevel", "SpecificCharacterSet") and kw not in ds:
                    ds.add_new(elem.tag, elem.VR, None)  # asked for, not held: zero length
            # Unique keys of the levels above are always returned.
            for lv in LEVELS[1:LEVELS.index(level) + 1]:
                k = UNIQUE_KEY[lv]
                if k not in ds:
                    setattr(ds, k, getattr(first, ATTRS[k][1]))
            if "SpecificCharacterSet" in identifier:
                ds.SpecificCharacterSet = "ISO_IR 192"
            yield ds

    # -- handlers ------------------------------------------------------------------------
    def on_find(self, event: evt.Event):
        try:
            level, keys = self._parse(event.identifier, str(event.request.AffectedSOPClassUID))
            rows = self.match(level, keys)
        except QueryError as exc:
            log.warning("C-FIND refused: %s", exc)
            yield exc.status, None
            return
        n = 0
        for ds in self._answers(level, keys, event.identifier, rows):
            if event.is_cancelled:
                log.info("C-FIND cancelled after %d match(es)", n)
                yield CANCELLED, None
                return
            n += 1
            yield PENDING, ds
        log.info("C-FIND %s level from %s: %d match(es)", level,
                 event.assoc.requestor.ae_title, n)

    def _retrieve_rows(self, event: evt.Event) -> list[Instance]:
        level, keys = self._parse(event.identifier, str(event.request.AffectedSOPClassUID))
        if not any(keys.get(UNIQUE_KEY[lv], "").strip()
                   for lv in LEVELS[:LEVELS.index(level) + 1]):
            raise QueryError(IDENTIFIER_MISMATCH, f"a retrieve at {level} level needs a unique "
                                                  "key")
        return self.match(level, keys)

    def _datasets(self, rows: list[Instance], event: evt.Event):
        for r in rows:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            try:
                yield PENDING, dcmread(self.files.abspath(r.path))
            except Exception as exc:
                log.error("cannot read %s for retrieve: %s", r.sop_instance_uid, exc)
                yield PENDING, None  # counted as a failed sub-operation

    def on_move(self, event: evt.Event):
        dest_ae = str(event.move_destination).strip()
        dest = next((d for d in self.cfg.destinations if d.ae_title == dest_ae), None)
        if dest is None:
            log.warning("C-MOVE to unknown destination %r refused", dest_ae)
            yield None, None
            return
        try:
            rows = self._retrieve_rows(event)
        except QueryError as exc:
            yield dest.host, dest.port
            yield exc.status, None
            return
        yield dest.host, dest.port, {"contexts": _contexts(rows), "ae_title": dest.ae_title}
        yield len(rows)
        log.info("C-MOVE of %d instance(s) to %s", len(rows), dest_ae)
        yield from self._datasets(rows, event)

    def on_get(self, event: evt.Event):
        try:
            rows = self._retrieve_rows(event)
        except QueryError as exc:
            yield 0
            yield exc.status, None
            return
        yield len(rows)
        log.info("C-GET of %d instance(s) by %s", len(rows), event.assoc.requestor.ae_title)
        yield from self._datasets(rows, event)
