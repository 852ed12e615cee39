"""View classification and the exam-assembly policy.

Which slot (L-CC, L-MLO, R-CC, R-MLO) an instance may fill comes from its header alone, by
:func:`inference.views.classify` (the classifier the Python API and the data readers use
too). For Processing (by SOP class or PresentationIntentType) images fill a slot only when no
For Presentation image exists for it.
"""

from __future__ import annotations

import re
from collections import defaultdict

from pydicom.dataset import Dataset

from inference.views import (  # noqa: F401  (re-exported: the node's view vocabulary)
    BREAST_TOMOSYNTHESIS,
    KNOWN_VIEWS,
    MAMMO_FOR_PRESENTATION,
    MAMMO_FOR_PROCESSING,
    MAMMO_SOP_CLASSES,
    MODIFIER_CODES,
    VIEW_CODES,
    ViewInfo,
    classify,
)
from storage.models import SLOTS, Instance
from storage.state import SlotAssignment


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


def assign_slots(instances: list[Instance]) -> SlotAssignment:
    """Decide which instance fills each slot of one exam.

    Per slot: For Presentation beats For Processing; among those, the latest acquisition
    wins, then the one received last.
    """
    by_slot: dict[str, list[Instance]] = defaultdict(list)
    problems: list[str] = []
    notes: list[str] = []
    for inst in instances:
        if inst.role == "candidate" and inst.slot in SLOTS:
            by_slot[inst.slot].append(inst)
        elif inst.role == "unclassified":
            problems.append(f"instance {inst.sop_instance_uid}: {inst.note}")
    slots: dict[str, str | None] = {s: None for s in SLOTS}
    for slot, candidates in by_slot.items():
        presentation = [c for c in candidates if not c.for_processing]
        pool = presentation or candidates
        ordered = sorted(pool, key=lambda c: (c.acquisition_key or "", c.id or 0))
        winner = ordered[-1]
        slots[slot] = winner.sop_instance_uid
        for loser in ordered[:-1]:
            notes.append(f"{slot}: repeated view, {winner.sop_instance_uid} (latest "
                         f"acquisition) replaces {loser.sop_instance_uid}")
        if presentation and len(presentation) < len(candidates):
            notes.append(f"{slot}: For Processing image not used, a For Presentation "
                         f"image exists")
    return SlotAssignment(slots=slots, notes=notes, problems=problems)
