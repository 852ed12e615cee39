"""Queries over every instance the node holds, protocol-neutral: the matching keys, the
answers and the caps that C-FIND (:mod:`node.qr`) and QIDO-RS (:mod:`node.dicomweb`) both
call.

One attribute table (:data:`ATTRIBUTES`) says, for each key, its level, its VR and where its
value comes from (an instance column, or computed over the entity's instances); matching,
the returned values and the list of supported keys are all derived from it.

Matching (PS3.4 C.2.2.2): single value (case-insensitive for PN), wildcards ``*`` and ``?``
(not for UIDs, dates, times and numbers), date and time ranges (``A-B``, ``-B``, ``A-``), UID
lists and multiple values (``\\``-separated), universal (empty or ``*``). A key of a level
below the query's is matched relationally: an entity matches when one of its instances does.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from node.status import IDENTIFIER_MISMATCH
from storage.models import Instance
from storage.query import GROUP_COLUMN, Found, Match
from storage.reports import Reports

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: C-FIND: unable to process, the database failed (PS3.4 C.4.1.1.4: Cxxx).
DATABASE_FAILURE = 0xC320


@dataclass(frozen=True)
class Attribute:
    """A key the node matches on or returns."""

    keyword: str
    level: str
    vr: str
    #: The Instance column holding the value; None for a value computed over the entity.
    column: str | None = None
    #: Computed: ("STUDY", "series") = the number of distinct series of the study;
    #: ("STUDY", "modalities") = the study's modalities (also matched: ModalitiesInStudy).
    computed: tuple[str, str] | None = None

    @property
    def matchable(self) -> bool:
        return self.column is not None or self.computed == ("STUDY", "modalities")

    @property
    def depth(self) -> int:
        return LEVELS.index(self.level)


def _a(
    keyword: str,
    level: str,
    vr: str,
    column: str | None = None,
    computed: tuple[str, str] | None = None,
) -> Attribute:
    return Attribute(keyword, level, vr, column, computed)


#: Every key the node supports, in the order answers list them.
ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _a("PatientID", "PATIENT", "LO", "patient_id"),
        _a("PatientName", "PATIENT", "PN", "patient_name"),
        _a("PatientBirthDate", "PATIENT", "DA", "patient_birth_date"),
        _a("PatientSex", "PATIENT", "CS", "patient_sex"),
        _a("NumberOfPatientRelatedStudies", "PATIENT", "IS", computed=("PATIENT", "studies")),
        _a("NumberOfPatientRelatedSeries", "PATIENT", "IS", computed=("PATIENT", "series")),
        _a("NumberOfPatientRelatedInstances", "PATIENT", "IS", computed=("PATIENT", "instances")),
        _a("StudyInstanceUID", "STUDY", "UI", "study_instance_uid"),
        _a("StudyDate", "STUDY", "DA", "study_date"),
        _a("StudyTime", "STUDY", "TM", "study_time"),
        _a("AccessionNumber", "STUDY", "SH", "accession_number"),
        _a("StudyDescription", "STUDY", "LO", "study_description"),
        _a("StudyID", "STUDY", "SH", "study_id"),
        _a("ReferringPhysicianName", "STUDY", "PN", "referring_physician_name"),
        _a("ModalitiesInStudy", "STUDY", "CS", computed=("STUDY", "modalities")),
        _a("NumberOfStudyRelatedSeries", "STUDY", "IS", computed=("STUDY", "series")),
        _a("NumberOfStudyRelatedInstances", "STUDY", "IS", computed=("STUDY", "instances")),
        _a("SeriesInstanceUID", "SERIES", "UI", "series_instance_uid"),
        _a("Modality", "SERIES", "CS", "modality"),
        _a("SeriesNumber", "SERIES", "IS", "series_number"),
        _a("SeriesDescription", "SERIES", "LO", "series_description"),
        _a("NumberOfSeriesRelatedInstances", "SERIES", "IS", computed=("SERIES", "instances")),
        _a("SOPInstanceUID", "IMAGE", "UI", "sop_instance_uid"),
        _a("SOPClassUID", "IMAGE", "UI", "sop_class_uid"),
        _a("InstanceNumber", "IMAGE", "IS", "instance_number"),
        _a("Rows", "IMAGE", "US", "rows"),
        _a("Columns", "IMAGE", "US", "columns"),
        _a("BitsAllocated", "IMAGE", "US", "bits_allocated"),
        _a("NumberOfFrames", "IMAGE", "IS", "number_of_frames"),
    )
}
#: Keys a query may match on.
MATCHING_KEYS = tuple(k for k, a in ATTRIBUTES.items() if a.matchable)
#: Keys only returned (counts): a value for one is refused.
RETURN_KEYS = tuple(k for k, a in ATTRIBUTES.items() if not a.matchable)
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
#: Elements of a C-FIND identifier that are not keys.
NOT_KEYS = frozenset(
    {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveView"}
)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_INT = re.compile(r"^[+-]?[0-9]+$")


class QueryError(Exception):
    """A query refused for its keys: C-FIND 0xA900, HTTP 400."""

    def __init__(self, message: str, status: int = IDENTIFIER_MISMATCH) -> None:
        super().__init__(message)
        self.status = status


class QueryUnavailable(Exception):
    """The database failed while answering: C-FIND 0xC320, HTTP 503 (retry later)."""

    status = DATABASE_FAILURE


def keyword_of(name: str) -> str:
    """A keyword, or an 8-hex-digit tag (QIDO allows both), as a keyword; a tag the
    dictionary does not know stays as given."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return keyword_for_tag(int(name, 16)) or name
    return name


def key_match(keyword: str, query: str) -> Match | None:
    """One query key as a database condition by the rules of its VR (PS3.4 C.2.2.2);
    None for universal matching. Raises :class:`QueryError` for a value its VR does not
    allow, naming the key."""
    a = ATTRIBUTES.get(keyword)
    if a is None or not a.matchable:
        raise QueryError(_unsupported(keyword))
    q = str(query).strip()
    if q in ("", "*"):
        return None
    values = [v.strip() for v in q.split("\\")]
    if a.computed == ("STUDY", "modalities"):
        _no_wildcards(keyword, q)
        return Match("study_instance_uid", "modalities", [v for v in values if v])
    column = a.column
    assert column is not None
    vr = a.vr
    if vr == "UI":
        _no_wildcards(keyword, q)
        bad = [v for v in values if not _UID.match(v)]
        if bad:
            raise QueryError(f"{keyword}: {bad[0]!r} is not a UID (digits and dots)")
        return Match(column, "in", values)
    if vr in ("DA", "TM"):
        _no_wildcards(keyword, q)
        if len(values) > 1:
            raise QueryError(f"{keyword}: one value or one range, not a list")
        check = _DATE if vr == "DA" else _TIME

        def norm(v: str) -> str:
            v = v.replace(".", "") if vr == "DA" else v.replace(":", "")
            if v and not check.match(v):
                raise QueryError(
                    f"{keyword}: {q!r}: {v!r} is not a "
                    f"{'date (YYYYMMDD)' if vr == 'DA' else 'time (HHMMSS.FFFFFF)'}"
                )
            return v

        if "-" in q:
            lo, _, hi = (x.strip() for x in q.partition("-"))
            lo, hi = norm(lo), norm(hi)
            if not lo and not hi:
                return None
            if vr == "TM" and hi:
                hi = hi.ljust(6, "9") if "." not in hi else hi
            return Match(column, "range", (lo, hi), strip_colons=vr == "TM")
        v = norm(q)
        return Match(column, "prefix", v) if vr == "TM" else Match(column, "eq", v)
    if vr in ("IS", "US"):
        _no_wildcards(keyword, q)
        if len(values) > 1 or not _INT.match(values[0]):
            raise QueryError(f"{keyword}: {q!r} is not an integer")
        return Match(column, "int", int(values[0]))
    if vr == "PN":
        if len(values) > 1:
            raise QueryError(f"{keyword}: one name, not a list")
        return Match(column, "like_ci" if "*" in q or "?" in q else "eq_ci", q)
    # CS, LO, SH: exact (case-sensitive), wildcards, or a list of single values.
    if len(values) > 1:
        _no_wildcards(keyword, q)
        return Match(column, "in", values)
    return Match(column, "like" if "*" in q or "?" in q else "eq", q)


def _no_wildcards(keyword: str, q: str) -> None:
    if "*" in q or "?" in q:
        raise QueryError(f"{keyword}: wildcards are not allowed for a {ATTRIBUTES[keyword].vr} key")


def _unsupported(name: str) -> str:
    if name in RETURN_KEYS:
        return f"{name} is a return key only: it cannot take a value"
    return f"unsupported query key {name!r}; supported: {', '.join(sorted(MATCHING_KEYS))}"


@dataclass
class Query:
    """A parsed query: its level, the keys it matches on (keyword -> value as sent) and the
    keys it asks back, as (tag, VR, keyword) in the order asked."""

    level: str
    keys: dict[str, str] = field(default_factory=dict)
    returned: list[tuple[int, str, str]] = field(default_factory=list)
    charset: bool = False

    @property
    def depth(self) -> int:
        return LEVELS.index(self.level)

    def matches(self) -> list[Match]:
        out = []
        for kw, value in self.keys.items():
            m = key_match(kw, value)
            if m is not None:
                out.append(m)
        return out

    def wanted(self) -> list[Attribute]:
        """The table's attributes this query returns with a value (at or above its level)."""
        return [
            ATTRIBUTES[kw]
            for _, _, kw in self.returned
            if kw in ATTRIBUTES and ATTRIBUTES[kw].depth <= self.depth
        ]


def _value(elem: DataElement) -> str:
    if elem.value is None:
        return ""
    if elem.VM > 1:
        return "\\".join(str(v) for v in elem.value)
    return str(elem.value)


def _empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return all(_empty(e) for item in (elem.value or []) for e in item)
    return _value(elem).strip() in ("", "*")


def from_identifier(identifier: Dataset) -> Query:
    """A C-FIND identifier as a :class:`Query`. A value on a key the node does not match on
    is refused (naming it); such a key asked with no value is answered empty."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not one of {LEVELS}")
    q = Query(level, charset="SpecificCharacterSet" in identifier)
    for elem in identifier:
        kw = elem.keyword
        if kw in NOT_KEYS:
            continue
        a = ATTRIBUTES.get(kw)
        try:
            value, empty = _value(elem) if elem.VR != "SQ" else "", _empty(elem)
        except Exception as exc:  # a value pydicom cannot convert
            raise QueryError(f"{kw or elem.tag}: unreadable value ({exc})") from exc
        if a is not None and a.matchable and elem.VR != "SQ":
            q.keys[kw] = value
        elif not empty:
            raise QueryError(_unsupported(kw or f"({elem.tag.group:04X},{elem.tag.elem:04X})"))
        q.returned.append((int(elem.tag), elem.VR, kw))
    q.matches()  # every value checked before anything runs
    return q


def from_params(
    level: str, params: Iterable[tuple[str, str]], includefields: Iterable[str] = ()
) -> Query:
    """QIDO-RS query parameters (keyword or tag = value) as a :class:`Query` that returns
    every held key at or above ``level`` and the counts of ``level`` (the defaults of PS3.18
    Table 10.6.3-3 the node holds), plus the ``includefield`` ones the table knows
    (``all``: every key)."""
    q = Query(level)
    for name, value in params:
        kw = keyword_of(name)
        a = ATTRIBUTES.get(kw)
        if a is None or not a.matchable:
            raise QueryError(_unsupported(name))
        if a.vr == "UI":
            value = value.replace(",", "\\")  # QIDO lists UIDs with commas
        if kw in q.keys and value != q.keys[kw]:
            raise QueryError(f"{name} given twice with different values")
        q.keys[kw] = value
    include = {keyword_of(f.strip()) for v in includefields for f in v.split(",")}
    for kw, a in ATTRIBUTES.items():
        default = a.depth == q.depth or (a.depth < q.depth and a.column is not None)
        if default or kw in include or "all" in include:
            tag = tag_for_keyword(kw)
            assert tag is not None
            q.returned.append((tag, dictionary_VR(tag), kw))
    q.matches()
    return q


class QueryService:
    """Runs a :class:`Query` against the store and builds its answers."""

    def __init__(self, reports: Reports) -> None:
        self.reports = reports

    def find(self, query: Query, limit: int | None = None, offset: int = 0) -> Found:
        """The entities matching ``query`` (at most ``limit``), with what its answers need.
        Raises :class:`QueryUnavailable` when the database fails."""
        wanted = query.wanted()
        counts = frozenset(
            a.computed for a in wanted if a.computed and a.computed[1] != "modalities"
        )
        try:
            return self.reports.find_entities(
                query.level,
                query.matches(),
                limit,
                offset,
                counts,  # type: ignore[arg-type]
                modalities=any(a.computed == ("STUDY", "modalities") for a in wanted),
            )
        except SQLAlchemyError as exc:
            raise QueryUnavailable(f"the database failed: {type(exc).__name__}") from exc

    def instances(self, query: Query) -> list[Instance]:
        """Every instance of the matching entities (a retrieve)."""
        try:
            return self.reports.query_instances(query.level, query.matches())
        except SQLAlchemyError as exc:
            raise QueryUnavailable(f"the database failed: {type(exc).__name__}") from exc

    @staticmethod
    def answers(query: Query, found: Found) -> list[Dataset]:
        """One dataset per entity: every key asked, with its value at or above the query's
        level, empty otherwise; the unique keys of the levels down to the query's always."""
        out = []
        depth = query.depth
        for row in found.rows:
            ds = Dataset()
            ds.QueryRetrieveLevel = query.level
            for tag, vr, kw in query.returned:
                a = ATTRIBUTES.get(kw)
                if a is None or a.depth > depth:
                    ds.add_new(tag, vr, None)  # asked for, not held: zero length
                    continue
                ds.add_new(tag, dictionary_VR(tag), _held(a, row, found))
            for lv in LEVELS[1 : depth + 1]:
                k = UNIQUE_KEY[lv]
                if k not in ds:
                    setattr(ds, k, getattr(row, ATTRIBUTES[k].column or ""))
            if query.charset:
                ds.SpecificCharacterSet = "ISO_IR 192"
            out.append(ds)
        return out

    @staticmethod
    def encoded_answers(query: Query, found: Found, explicit: bool) -> Iterator[bytes]:
        """The same answers as :meth:`answers`, encoded straight from the rows (Little
        Endian, explicit or implicit VR): what C-FIND sends, without building a pydicom
        Dataset per answer (about 40 us an answer instead of 300; tests compare the two
        byte for byte after decoding)."""
        depth = query.depth
        plan: dict[int, tuple[str, Attribute | None]] = {}
        for tag, vr, kw in query.returned:
            a = ATTRIBUTES.get(kw)
            if a is not None and a.depth <= depth:
                plan[tag] = (dictionary_VR(tag), a)
            else:
                plan[tag] = (vr, None)
        for lv in LEVELS[1 : depth + 1]:
            unique = tag_for_keyword(UNIQUE_KEY[lv])
            assert unique is not None
            plan.setdefault(unique, ("UI", ATTRIBUTES[UNIQUE_KEY[lv]]))
        head = _element(0x00080052, "CS", query.level.encode(), explicit)
        order = sorted(plan.items())
        charset = _element(0x00080005, "CS", b"ISO_IR 192", explicit)
        for row in found.rows:
            parts = []
            utf8 = query.charset
            for tag, (vr, a) in order:
                value = None if a is None else _held(a, row, found)
                if value is None or value == "" or value == []:
                    data = b""
                elif vr == "US":
                    data = struct.pack("<H", int(value))
                else:
                    text = "\\".join(value) if isinstance(value, list) else str(value)
                    if not text.isascii():
                        utf8 = True
                    data = text.encode("utf-8")
                parts.append(_element(tag, vr, data, explicit) if tag != 0x00080052 else b"")
            # (0008,0005) and (0008,0052) precede every key but none of the table's.
            before = [p for (tag, _), p in zip(order, parts, strict=True) if tag < 0x00080052]
            after = [p for (tag, _), p in zip(order, parts, strict=True) if tag > 0x00080052]
            yield b"".join([charset if utf8 else b"", *before, head, *after])


#: VRs whose explicit-VR element header has a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


def _element(tag: int, vr: str, data: bytes, explicit: bool) -> bytes:
    if len(data) % 2:
        data += b"\0" if vr in ("UI", "OB", "UN") else b" "
    group_elem = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return group_elem + struct.pack("<I", len(data)) + data
    if vr in _LONG_VRS:
        return group_elem + vr.encode() + b"\0\0" + struct.pack("<I", len(data)) + data
    return group_elem + vr.encode() + struct.pack("<H", len(data)) + data


def _held(a: Attribute, row: Instance, found: Found) -> Any:
    if a.column is not None:
        value = getattr(row, a.column)
        if a.vr == "US":
            return value
        if a.vr == "IS":
            return "" if value is None else value
        return "" if value is None else str(value)
    assert a.computed is not None
    level, what = a.computed
    if what == "modalities":
        return found.modalities.get(row.study_instance_uid, [])
    return found.counts.get((level, what), {}).get(getattr(row, GROUP_COLUMN[level]), 0)
