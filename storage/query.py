"""DICOM attribute matching (PS3.4 C.2.2.2) as SQL: the database does the matching, the
grouping by query level, the result cap and the counts, so a query loads one row per entity
it answers (never every instance of them) and no pattern can take more than the database's
own linear LIKE.

The caller (:mod:`node.query`, which holds the one attribute table) turns each query key
into a :class:`Match`; this module only knows columns and operators.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import and_, distinct, func, select
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from storage.models import Instance

Op = Literal["in", "eq", "eq_ci", "like", "like_ci", "range", "prefix", "int", "modalities"]
#: What an entity count counts: its instances, or its distinct series / studies.
Counted = Literal["instances", "series", "studies"]

GROUP_COLUMN = {
    "PATIENT": "patient_id",
    "STUDY": "study_instance_uid",
    "SERIES": "series_instance_uid",
    "IMAGE": "sop_instance_uid",
}
_COUNTED = {"instances": None, "series": "series_instance_uid", "studies": "study_instance_uid"}


@dataclass(frozen=True)
class Match:
    """One matching condition on an instance column.

    ``like`` / ``like_ci`` take a DICOM pattern (``*`` and ``?``); ``range`` a (low, high)
    pair of strings where either may be empty; ``in`` a list; ``int`` an integer;
    ``modalities`` a list of modalities of which the study must hold at least one
    (ModalitiesInStudy).
    """

    column: str
    op: Op
    value: Any
    #: For ``range`` on times: compare with ':' removed (old ACR-NEMA time format).
    strip_colons: bool = False


@dataclass
class Found:
    """What a query found: one representative instance per matching entity (its first
    matching instance, in order of arrival), whether more entities matched than the limit,
    and the counts and modalities asked for, per entity key."""

    rows: list[Instance]
    more: bool
    #: (level, counted) -> entity key at that level -> count
    counts: dict[tuple[str, str], dict[Any, int]] = field(default_factory=dict)
    #: study_instance_uid -> its modalities, sorted
    modalities: dict[str, list[str]] = field(default_factory=dict)


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


def _column(name: str) -> Any:
    if name not in Instance.__table__.columns:
        raise ValueError(f"unknown column {name!r}")
    return getattr(Instance, name)


def _literal_prefix(pattern: str) -> str:
    """The characters of a DICOM pattern before its first wildcard."""
    for i, c in enumerate(pattern):
        if c in "*?":
            return pattern[:i]
    return pattern


def _condition(m: Match, dialect: str = "") -> ColumnElement[bool]:
    col = _column(m.column)
    if m.op == "in":
        return col.in_(list(m.value))
    if m.op == "eq":
        return col == m.value
    if m.op == "eq_ci":
        return func.lower(col) == str(m.value).lower()
    if m.op == "like":
        return col.like(like_pattern(m.value), escape="\\")
    if m.op == "like_ci":
        cond: Any = func.lower(col).like(like_pattern(m.value).lower(), escape="\\")
        prefix = _literal_prefix(str(m.value).lower())
        if prefix and dialect == "sqlite":
            # The same condition, also as a range SQLite can take from the lower() index
            # (its LIKE optimisation ignores expression indexes); code point order is
            # SQLite's BINARY collation, so the range holds every match.
            cond = and_(
                cond,
                func.lower(col) >= prefix,
                func.lower(col) < prefix[:-1] + chr(ord(prefix[-1]) + 1),
            )
        return cond
    if m.op == "prefix":
        return col.like(like_pattern(m.value) + "%", escape="\\")
    if m.op == "int":
        return col == int(m.value)
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
            select(other.study_instance_uid).where(func.upper(other.modality).in_(wanted))
        )
    raise ValueError(f"unknown operator {m.op!r}")


def find_entities(
    session: Any,
    level: str,
    matches: list[Match],
    limit: int | None = None,
    offset: int = 0,
    counts: frozenset[tuple[str, Counted]] = frozenset(),
    modalities: bool = False,
) -> Found:
    """The first ``limit`` entities (after ``offset``) at ``level`` that have an instance
    matching every condition, in order of arrival: one row each, plus the ``counts``
    ((level, what) pairs: e.g. ("STUDY", "series") for NumberOfStudyRelatedSeries) and the
    studies' modalities when asked. Counts cover every instance of the entity, matching or
    not. At most four statements, whatever the number of instances."""
    group = _column(GROUP_COLUMN[level])
    dialect = session.get_bind().dialect.name
    conds = [_condition(m, dialect) for m in matches]
    first = func.min(Instance.id)
    keys_q = select(group, first).where(group.isnot(None), *conds).group_by(group).order_by(first)
    if offset:
        keys_q = keys_q.offset(offset)
    if limit is not None:
        keys_q = keys_q.limit(limit + 1)
    found = list(session.execute(keys_q))
    more = limit is not None and len(found) > limit
    if more:
        found = found[:limit]
    if not found:
        return Found([], False)
    by_id = {
        r.id: r
        for r in session.scalars(select(Instance).where(Instance.id.in_([i for _, i in found])))
    }
    rows = [by_id[i] for _, i in found]
    out = Found(rows, more)
    by_level: dict[str, list[Counted]] = defaultdict(list)
    for lv, what in sorted(counts):
        by_level[lv].append(what)
    for lv, whats in by_level.items():
        gcol = _column(GROUP_COLUMN[lv])
        values = sorted({getattr(r, GROUP_COLUMN[lv]) for r in rows} - {None})
        exprs = [
            func.count(distinct(_column(c))) if (c := _COUNTED[w]) else func.count() for w in whats
        ]
        tables: list[dict[Any, int]] = [{} for _ in whats]
        for chunk in _chunks(values):
            for key, *ns in session.execute(
                select(gcol, *exprs).where(gcol.in_(chunk)).group_by(gcol)
            ):
                for t, n in zip(tables, ns, strict=True):
                    t[key] = int(n)
        for w, t in zip(whats, tables, strict=True):
            out.counts[(lv, w)] = t
    if modalities:
        studies = sorted({r.study_instance_uid for r in rows})
        mods: dict[str, set[str]] = defaultdict(set)
        for chunk in _chunks(studies):
            for study, modality in session.execute(
                select(Instance.study_instance_uid, Instance.modality)
                .distinct()
                .where(
                    Instance.study_instance_uid.in_(chunk),
                    Instance.modality.isnot(None),
                    Instance.modality != "",
                )
            ):
                mods[study].add(modality)
        out.modalities = {k: sorted(v) for k, v in mods.items()}
    return out


def _chunks(values: list, size: int = 500) -> Iterator[list]:
    """IN lists of at most ``size`` values (SQLite's bound-parameter limit is 32,766 since
    3.32, 999 before)."""
    for i in range(0, len(values), size):
        yield values[i : i + size]


def query_instances(session: Session, level: str, matches: list[Match]) -> list[Instance]:
    """Every instance of the entities at ``level`` matching every condition (a retrieve's
    instances), in order of arrival."""
    group = _column(GROUP_COLUMN[level])
    conds = [_condition(m) for m in matches]
    keys = select(group).where(group.isnot(None), *conds)
    return list(session.scalars(select(Instance).where(group.in_(keys)).order_by(Instance.id)))
