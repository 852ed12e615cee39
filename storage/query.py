"""DICOM attribute matching (PS3.4 C.2.2.2) as SQL: the database does the matching, the
grouping by query level and the result cap, so a query never loads more rows than it answers
and no pattern can take more than the database's own linear LIKE.

The caller (``node.qr``) turns each query key into a :class:`Match`; this module only knows
columns and operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, false, func, select
from sqlalchemy.orm import aliased

from storage.models import Instance

Op = Literal["in", "eq", "eq_ci", "like", "like_ci", "range", "prefix", "int", "modalities"]

#: Instance columns a query may name.
COLUMNS = {"patient_id", "patient_name", "study_instance_uid", "study_date", "study_time",
           "accession_number", "series_instance_uid", "modality", "series_number",
           "sop_instance_uid", "sop_class_uid", "instance_number"}

GROUP_COLUMN = {"PATIENT": "patient_id", "STUDY": "study_instance_uid",
                "SERIES": "series_instance_uid", "IMAGE": "sop_instance_uid"}


@dataclass(frozen=True)
class Match:
    """One matching condition on an instance column.

    ``like`` / ``like_ci`` take a DICOM pattern (``*`` and ``?``); ``range`` a (low, high)
    pair of strings where either may be empty; ``in`` a list; ``modalities`` a list of
    modalities of which the study must hold at least one (ModalitiesInStudy).
    """

    column: str
    op: Op
    value: Any
    #: For ``range`` on times: compare with ':' removed (old ACR-NEMA time format).
    strip_colons: bool = False


def like_pattern(dicom: str) -> str:
    """A DICOM wildcard pattern as an SQL LIKE pattern with ``\\`` as the escape."""
    out = []
    for c in dicom:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c in "%_\\":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _condition(m: Match):
    if m.column not in COLUMNS:
        raise ValueError(f"unknown column {m.column!r}")
    col = getattr(Instance, m.column)
    if m.op == "in":
        return col.in_(list(m.value))
    if m.op == "eq":
        return col == m.value
    if m.op == "eq_ci":
        return func.lower(col) == str(m.value).lower()
    if m.op == "like":
        return col.like(like_pattern(m.value), escape="\\")
    if m.op == "like_ci":
        return func.lower(col).like(like_pattern(m.value).lower(), escape="\\")
    if m.op == "prefix":
        return col.like(like_pattern(m.value) + "%", escape="\\")
    if m.op == "int":
        try:
            return col == int(m.value)
        except (TypeError, ValueError):
            return false()
    if m.op == "range":
        lo, hi = m.value
        expr = func.replace(col, ":", "") if m.strip_colons else col
        conds = [col.isnot(None), col != ""]
        if lo:
            conds.append(expr >= lo)
        if hi:
            conds.append(expr <= hi)
        return and_(*conds)
    if m.op == "modalities":
        other = aliased(Instance)
        wanted = [str(v).upper() for v in m.value]
        return Instance.study_instance_uid.in_(
            select(other.study_instance_uid).where(func.upper(other.modality).in_(wanted)))
    raise ValueError(f"unknown operator {m.op!r}")


def query_instances(session, level: str, matches: list[Match], limit: int | None = None,
                    offset: int = 0) -> tuple[list[Instance], bool]:
    """Instances of the first ``limit`` entities (after ``offset``) at ``level`` that match
    every condition, in order of arrival; and whether more entities matched than returned."""
    group = getattr(Instance, GROUP_COLUMN[level])
    conds = [_condition(m) for m in matches]
    keys_q = (select(group).where(group.isnot(None), *conds).group_by(group)
              .order_by(func.min(Instance.id)))
    if offset:
        keys_q = keys_q.offset(offset)
    if limit is not None:
        keys_q = keys_q.limit(limit + 1)
    keys = list(session.scalars(keys_q))
    more = limit is not None and len(keys) > limit
    if more:
        keys = keys[:limit]
    if not keys:
        return [], False
    rows = list(session.scalars(select(Instance).where(group.in_(keys), *conds)
                                .order_by(Instance.id)))
    return rows, more
