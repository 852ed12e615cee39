"""View classification and the exam-assembly policy.

Which slot (L-CC, L-MLO, R-CC, R-MLO) an instance may fill comes from its header alone, by
:func:`inference.views.classify` (the classifier the Python API and the data readers use
too). Per slot the image kind decides first ([grouping] prefer: conventional 2D, then
synthesized 2D, then For Processing), then the latest acquisition.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from inference.views import (  # noqa: F401  (re-exported: the node's view vocabulary)
    BREAST_PROJECTION_PRESENTATION,
    BREAST_PROJECTION_PROCESSING,
    BREAST_TOMOSYNTHESIS,
    IMAGE_KINDS,
    KIND_LABELS,
    KNOWN_VIEWS,
    MAMMO_FOR_PRESENTATION,
    MAMMO_FOR_PROCESSING,
    MAMMO_SOP_CLASSES,
    MODIFIER_CODES,
    SLOT_KINDS,
    VIEW_CODES,
    ViewInfo,
    classify,
)
from storage.exams import SlotAssignment
from storage.models import SLOTS, Instance

if TYPE_CHECKING:
    from node.config import Config


def acquisition_key(ds: Dataset) -> str:
    """Sortable acquisition time "YYYYMMDDHHMMSS.ffffff" (empty when unknown)."""

    def norm(date: str, time: str) -> str:
        date = re.sub(r"\D", "", date)[:8]
        time = time.split("+")[0].split("-")[0]
        whole, _, frac = time.partition(".")
        whole = re.sub(r"\D", "", whole)[:6].ljust(6, "0")
        frac = re.sub(r"\D", "", frac)[:6].ljust(6, "0")
        return f"{date}{whole}.{frac}" if len(date) == 8 else ""

    adt = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if len(adt) >= 8:
        return norm(adt[:8], adt[8:])
    for d, t in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        date = str(ds.get(d, "") or "").strip()
        if date:
            return norm(date, str(ds.get(t, "") or "").strip())
    return ""


DEFAULT_PREFER: tuple[str, ...] = ("conventional", "synthesized")


def kind_of(inst: Instance) -> str:
    """An instance's image kind (rows from before the kinds: by For Processing)."""
    if inst.image_kind:
        return inst.image_kind
    return "for_processing" if inst.for_processing else "conventional"


def _rank(prefer: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Kind -> rank: the preferred kinds in their order, then the other slot kinds in the
    default order (conventional, synthesized, For Processing)."""
    order = [*prefer, *(k for k in SLOT_KINDS if k not in prefer)]
    return {k: i for i, k in enumerate(order)}


def assign_policy(cfg: Config) -> Callable[[list[Instance]], SlotAssignment]:
    """:func:`assign_slots` with a configuration's [grouping] prefer and volume_2d."""
    return functools.partial(
        assign_slots, prefer=tuple(cfg.grouping.prefer), volume_2d=cfg.grouping.volume_2d
    )


def assign_slots(
    instances: list[Instance],
    prefer: tuple[str, ...] | list[str] = DEFAULT_PREFER,
    volume_2d: str = "missing",
) -> SlotAssignment:
    """Decide which instance fills each slot of one exam.

    Per slot: the image kind first, in ``prefer`` order ([grouping] prefer; conventional
    before synthesized by default, For Processing last); among images of that kind, the
    latest acquisition wins, then the one received last. A slot with only a tomosynthesis
    volume is missing, or (``volume_2d = "mip"``) filled by the volume, from which the
    worker computes a 2D image (kind "computed"). An exam with an implant (BreastImplantPresent
    YES or implant-displaced views) is read from its standard views and flagged.
    """
    rank = _rank(prefer)
    by_slot: dict[str, list[Instance]] = defaultdict(list)
    volumes: dict[str, list[Instance]] = defaultdict(list)
    problems: list[str] = []
    notes: list[str] = []
    implant = False
    for inst in instances:
        implant = implant or bool(inst.implant) or "ID" in (inst.view_modifiers or "").split(",")
        if inst.role == "candidate" and inst.slot in SLOTS:
            by_slot[inst.slot].append(inst)
        elif (
            kind_of(inst) == "volume"
            and inst.laterality in ("L", "R")
            and inst.view in ("CC", "MLO")
            and not inst.view_modifiers
        ):
            volumes[f"{inst.laterality}-{inst.view}"].append(inst)
        elif inst.role == "unclassified":
            problems.append(f"instance {inst.sop_instance_uid}: {inst.note}")
    slots: dict[str, str | None] = {s: None for s in SLOTS}
    kinds: dict[str, str] = {}
    for slot, candidates in by_slot.items():
        best = min(rank.get(kind_of(c), len(rank)) for c in candidates)
        pool = [c for c in candidates if rank.get(kind_of(c), len(rank)) == best]
        ordered = sorted(pool, key=lambda c: (c.acquisition_key or "", c.id or 0))
        winner = ordered[-1]
        slots[slot] = winner.sop_instance_uid
        kinds[slot] = kind_of(winner)
        for loser in ordered[:-1]:
            notes.append(
                f"{slot}: repeated view, {winner.sop_instance_uid} (latest "
                f"acquisition) replaces {loser.sop_instance_uid}"
            )
        for kind in sorted(
            {kind_of(c) for c in candidates} - {kinds[slot]}, key=lambda k: rank.get(k, len(rank))
        ):
            notes.append(
                f"{slot}: {KIND_LABELS.get(kind, kind)} image not used, the "
                f"{KIND_LABELS.get(kinds[slot], kinds[slot])} image is read "
                f"(preference {', '.join(prefer) or 'default'})"
            )
    volume_only: list[str] = []
    for slot, vols in volumes.items():
        if slots.get(slot):
            continue
        if volume_2d == "missing":
            volume_only.append(slot)
            notes.append(
                f"{slot}: only a tomosynthesis volume; read with this view missing "
                f'([grouping] volume_2d = "missing")'
            )
            continue
        winner = sorted(vols, key=lambda c: (c.acquisition_key or "", c.id or 0))[-1]
        slots[slot] = winner.sop_instance_uid
        kinds[slot] = "computed"
        notes.append(
            f"{slot}: only a tomosynthesis volume; a 2D image is computed from "
            f"{winner.sop_instance_uid} ({volume_2d})"
        )
    if implant:
        notes.append("implant present: read from the standard views")
    return SlotAssignment(
        slots=slots,
        notes=notes,
        problems=problems,
        kinds=kinds,
        implant=implant,
        volume_only=sorted(volume_only),
    )
