"""Query/Retrieve SCP: C-FIND (Patient Root and Study Root; PATIENT, STUDY, SERIES, IMAGE),
C-MOVE to configured destinations and C-GET, over every instance the node holds (received
images and produced results).

Matching (PS3.4 C.2.2.2): single value (case-insensitive for PN), wildcards ``*`` and ``?``,
date/time ranges (``A-B``, ``-B``, ``A-``), UID lists (``\\``-separated), universal (empty).
"""

from __future__ import annotations

import logging
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

from node import audit as A
from node.compat import wait_until_sent
from node.config import Config
from node.security import AccessControl
from node.status import CANCELLED, IDENTIFIER_MISMATCH, NOT_AUTHORIZED, PENDING
from storage.files import FileStore
from storage.models import Instance
from storage.query import Match
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


LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# keyword -> (level, Instance column, VR kind)
ATTRS: dict[str, tuple[str, str, str]] = {
    "PatientID": ("PATIENT", "patient_id", "LO"),
    "PatientName": ("PATIENT", "patient_name", "PN"),
    "PatientBirthDate": ("PATIENT", "patient_birth_date", "DA"),
    "PatientSex": ("PATIENT", "patient_sex", "CS"),
    "StudyInstanceUID": ("STUDY", "study_instance_uid", "UI"),
    "StudyDate": ("STUDY", "study_date", "DA"),
    "StudyTime": ("STUDY", "study_time", "TM"),
    "AccessionNumber": ("STUDY", "accession_number", "SH"),
    "StudyDescription": ("STUDY", "study_description", "LO"),
    "StudyID": ("STUDY", "study_id", "SH"),
    "ReferringPhysicianName": ("STUDY", "referring_physician_name", "PN"),
    "SeriesInstanceUID": ("SERIES", "series_instance_uid", "UI"),
    "Modality": ("SERIES", "modality", "CS"),
    "SeriesNumber": ("SERIES", "series_number", "IS"),
    "SeriesDescription": ("SERIES", "series_description", "LO"),
    "SOPInstanceUID": ("IMAGE", "sop_instance_uid", "UI"),
    "SOPClassUID": ("IMAGE", "sop_class_uid", "UI"),
    "InstanceNumber": ("IMAGE", "instance_number", "IS"),
    "Rows": ("IMAGE", "rows", "US"),
    "Columns": ("IMAGE", "columns", "US"),
    "BitsAllocated": ("IMAGE", "bits_allocated", "US"),
    "NumberOfFrames": ("IMAGE", "number_of_frames", "IS"),
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


def key_match(keyword: str, query: str) -> Match | None:
    """One query key as a database condition by the rules of its VR (PS3.4 C.2.2.2);
    None for universal matching."""
    _, column, vr = ATTRS[keyword]
    q = str(query).strip()
    if q == "" or q == "*":
        return None
    if vr == "UI":
        return Match(column, "in", [u.strip() for u in q.split("\\") if u.strip()])
    if vr in ("DA", "TM") and "-" in q:
        lo, _, hi = (x.strip() for x in q.partition("-"))
        if vr == "TM":
            lo, hi = lo.replace(":", ""), hi.replace(":", "")
            hi = hi.ljust(6, "9") if hi else hi
        return Match(column, "range", (lo, hi), strip_colons=vr == "TM")
    if vr == "TM":
        return Match(column, "prefix", q.replace(":", ""))
    if "*" in q or "?" in q:
        return Match(column, "like_ci" if vr == "PN" else "like", q)
    if vr == "PN":
        return Match(column, "eq_ci", q)
    if vr in ("IS", "US"):
        return Match(column, "int", q)
    return Match(column, "eq", q)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class QueryRetrieveSCP:
    """C-FIND / C-MOVE / C-GET handlers over the node's store."""

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore,
                 access: AccessControl | None = None, audit=None) -> None:
        self.cfg, self.files, self.exams = cfg, files, exams
        self.audit = audit or A.NullAudit()
        self.access = access or AccessControl(cfg, self.audit)

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

    def match(self, level: str, keys: dict[str, str], limit: int | None = None,
              offset: int = 0) -> tuple[list[Instance], bool]:
        """Instances of the entities at ``level`` matching every key at or above it (in the
        database, capped there); and whether more entities matched than ``limit``.
        ``ModalitiesInStudy`` keeps the studies holding an instance of a listed modality."""
        depth = LEVELS.index(level)
        matches = []
        for k, q in keys.items():
            if k in ATTRS and LEVELS.index(ATTRS[k][0]) <= depth:
                m = key_match(k, q)
                if m is not None:
                    matches.append(m)
        modalities = keys.get("ModalitiesInStudy", "").strip()
        if modalities and modalities != "*" and depth >= 1:
            matches.append(Match("study_instance_uid", "modalities",
                                 [m.strip() for m in modalities.split("\\") if m.strip()]))
        return self.exams.query(level, matches, limit, offset)

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
                    vr = ATTRS[kw][2]
                    if vr == "US":
                        ds.add_new(elem.tag, "US", value)
                    else:
                        setattr(ds, kw, _text(value) if vr != "IS" or value is not None
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
        if not self.access.allowed(event, "find"):
            yield NOT_AUTHORIZED, None
            return
        who = self.access.who(event)
        cap = self.cfg.node.max_query_results
        try:
            level, keys = self._parse(event.identifier, str(event.request.AffectedSOPClassUID))
            rows, more = self.match(level, keys, limit=cap)
        except QueryError as exc:
            log.warning("C-FIND refused: %s", exc)
            self.audit.event(A.QUERY, A.MINOR_FAILURE, peer=who, reason=str(exc))
            yield exc.status, None
            return
        studies = sorted({r.study_instance_uid for r in rows})
        self.audit.event(A.QUERY, A.SUCCESS, peer=who, service="C-FIND", level=level,
                         keys={k: v for k, v in keys.items() if ATTRS.get(k, ("",))[0]
                               not in ("PATIENT",) and v},
                         matched_studies=len(studies), capped=more or None)
        if more:
            log.warning("C-FIND from %s matched more than [node] max_query_results (%d): "
                        "only the first %d are answered", who["ae_title"], cap, cap)
        n = 0
        for ds in self._answers(level, keys, event.identifier, rows):
            if n % 16 == 0 and n:
                wait_until_sent(event.assoc)  # so that a C-CANCEL can be read (node.compat)
            if event.is_cancelled:
                log.info("C-FIND cancelled after %d match(es)", n)
                yield CANCELLED, None
                return
            n += 1
            yield PENDING, ds
        log.info("C-FIND %s level from %s: %d match(es)", level,
                 event.assoc.requestor.ae_title, n)

    def _retrieve_rows(self, event: evt.Event) -> list[Instance]:
        """Rows of a C-MOVE / C-GET. Its unique keys must be single values or UID lists
        (PS3.4 C.4.2.2.1): universal matching or wildcards there are refused, so that no
        ``PatientID=*`` retrieves the whole archive."""
        model = str(event.request.AffectedSOPClassUID)
        level, keys = self._parse(event.identifier, model)
        top = 0 if model in PATIENT_ROOT else 1
        for lv in LEVELS[top:LEVELS.index(level) + 1]:
            k = UNIQUE_KEY[lv]
            v = keys.get(k, "").strip()
            if "*" in v or "?" in v:
                raise QueryError(IDENTIFIER_MISMATCH, f"wildcards are not allowed in the unique "
                                                      f"key {k} of a retrieve")
            if lv == level and not v:
                raise QueryError(IDENTIFIER_MISMATCH, f"a retrieve at {level} level needs "
                                                      f"{k} (universal matching is refused)")
        rows, _ = self.match(level, keys)
        return rows

    def _datasets(self, rows: list[Instance], event: evt.Event, service: str = "",
                  to: str = ""):
        """The datasets of a retrieve; at its end (or cancel) the PS3.15 A.5.3.4 completion
        event, DICOM Instances Transferred."""
        unreadable, cancelled = 0, False
        for r in rows:
            if event.is_cancelled:
                cancelled = True
                yield CANCELLED, None
                break
            try:
                yield PENDING, dcmread(self.files.abspath(r.path))
            except Exception as exc:
                log.error("cannot read %s for retrieve: %s", r.sop_instance_uid, exc)
                unreadable += 1
                yield PENDING, None  # counted as a failed sub-operation
        if service:
            self.audit.event(A.INSTANCES_TRANSFERRED,
                             A.SUCCESS if not (unreadable or cancelled) else A.MINOR_FAILURE,
                             action="retrieve", service=service, peer=self.access.who(event),
                             to=to, studies=sorted({r.study_instance_uid for r in rows}),
                             instances=len(rows), unreadable=unreadable or None,
                             cancelled=cancelled or None)

    def _audit_retrieve(self, event: evt.Event, service: str, rows: list[Instance],
                        to: str) -> None:
        self.audit.event(A.BEGIN_TRANSFER, A.SUCCESS, service=service,
                         peer=self.access.who(event), to=to,
                         studies=sorted({r.study_instance_uid for r in rows}),
                         instances=len(rows))

    def on_move(self, event: evt.Event):
        if not self.access.allowed(event, "move"):
            yield None, None  # pynetdicom then answers "move destination unknown"
            return
        dest_ae = str(event.move_destination).strip()
        dest = next((d for d in self.cfg.destinations if d.ae_title == dest_ae), None)
        if dest is None:
            log.warning("C-MOVE to unknown destination %r refused", dest_ae)
            yield None, None
            return
        try:
            rows = self._retrieve_rows(event)
        except QueryError as exc:
            log.warning("C-MOVE refused: %s", exc)
            yield dest.host, dest.port
            yield 1  # one failing sub-operation: zero would be answered as an empty success
            yield exc.status, None
            return
        kwargs = {"contexts": _contexts(rows), "ae_title": dest.ae_title}
        if dest.tls:
            from node.security import client_context

            kwargs["tls_args"] = (client_context(self.cfg), dest.host)
        yield dest.host, dest.port, kwargs
        yield len(rows)
        log.info("C-MOVE of %d instance(s) to %s", len(rows), dest_ae)
        self._audit_retrieve(event, "C-MOVE", rows, dest_ae)
        yield from self._datasets(rows, event, "C-MOVE", dest_ae)

    def on_get(self, event: evt.Event):
        # A refusal is announced as one sub-operation that fails: with zero, pynetdicom
        # would answer an empty success.
        if not self.access.allowed(event, "get"):
            yield 1
            yield NOT_AUTHORIZED, None
            return
        try:
            rows = self._retrieve_rows(event)
        except QueryError as exc:
            log.warning("C-GET refused: %s", exc)
            yield 1
            yield exc.status, None
            return
        yield len(rows)
        log.info("C-GET of %d instance(s) by %s", len(rows), event.assoc.requestor.ae_title)
        to = str(event.assoc.requestor.ae_title).strip()
        self._audit_retrieve(event, "C-GET", rows, to)
        yield from self._datasets(rows, event, "C-GET", to)
