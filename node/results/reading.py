"""What the builders take: a model reading as plain data (no torch), checked on the way in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from node.results.vocabulary import DENSITY_CLASSES


@dataclass
class BreastSummary:
    """The model's reading of one breast (plain data, no torch)."""

    present: bool = False
    birads: str | None = None  # a class name, e.g. "BI-RADS 5"
    birads_probabilities: dict[str, float] = field(default_factory=dict)
    diagnosis: str | None = None  # "normal" / "benign" / "malignant"
    diagnosis_probabilities: dict[str, float] = field(default_factory=dict)
    score: float | None = None  # 0-100 (inference.scoring)
    density: str | None = None  # BI-RADS density "A".."D"; None: no head
    density_probabilities: dict[str, float] = field(default_factory=dict)


ABSENT = BreastSummary()


@dataclass
class Mark:
    """One region that drives the malignancy output, on one view, in the source image's pixel
    coordinates (column x, row y; (0, 0) the centre of the top-left pixel's corner)."""

    slot: str  # "L-CC" ...
    index: int  # 1, 2, ... by falling score, per breast
    score: float  # region score 0-100
    center: tuple[float, float]  # (x, y)
    outline: list[tuple[float, float]]  # closed polygon, (x, y) points, not repeated
    above_operating_point: bool = False  # region score >= the operating point
    area_px: float = 0.0  # source pixels inside the region


@dataclass
class ReadingSummary:
    """What the builders need from a model reading (plain data, no torch)."""

    breasts: dict[str, BreastSummary]  # "L" / "R"
    fusion_weights: dict[str, dict[str, float]]  # breast -> slot -> weight
    missing_views: list[str]
    model_name: str
    model_version: str
    model_sha256: str
    not_for_clinical_use: bool
    #: slot -> (x0, y0, x1, y1), pixel columns / rows of the source image: the box around the
    #: view's hottest attention (above half its maximum). The TID 1500 SR anchors a breast's
    #: measurements there when it has no mark, so viewers (OHIF) show where the model looked.
    attention_regions: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    #: Seconds per stage of the reading (decode, preprocess, inference, maps; sr added
    #: when the SRs are built): the worker's log line and the dashboard.
    seconds: dict[str, float] = field(default_factory=dict)
    #: The exam's 0-100 malignancy score, the operating point it is judged against (None:
    #: the checkpoint has none and none is configured) and the verdict.
    score: float | None = None
    operating_point: float | None = None
    above_operating_point: bool | None = None
    #: The exam's density (the denser breast's), None without a density head.
    density: str | None = None
    #: slot -> the view's marks (``inference.marks``), by falling score.
    marks: dict[str, list[Mark]] = field(default_factory=dict)
    #: slot -> image kind read (inference.views.IMAGE_KINDS; "computed": made from a volume).
    view_kinds: dict[str, str] = field(default_factory=dict)
    #: What the reader should know about the images read (another kind than the model was
    #: trained on, a computed view, a view with only a volume, priors available).
    notes: list[str] = field(default_factory=list)
    #: An image of the exam says a breast implant is present.
    implant: bool = False


def kind_label(reading: ReadingSummary, slot: str) -> str:
    """How a view's image kind is written in the results ("conventional 2D", ...)."""
    from inference.views import KIND_LABELS

    kind = reading.view_kinds.get(slot, "conventional")
    return KIND_LABELS.get(kind, kind)


def views_read(reading: ReadingSummary, slots: Iterable[str]) -> str:
    """The per-view statement: "L-CC conventional 2D, L-MLO synthesized 2D, ..."."""
    return ", ".join(f"{slot} {kind_label(reading, slot)}" for slot in sorted(slots))


def check_reading(reading: ReadingSummary) -> None:
    """Raise ``ValueError`` naming the attribute when a reading cannot make a result."""
    if not isinstance(reading, ReadingSummary):
        raise TypeError(f"reading: expected a ReadingSummary, got {type(reading).__name__}")
    for lat, b in reading.breasts.items():
        where = f"reading.breasts[{lat!r}]"
        if lat not in ("L", "R"):
            raise ValueError(f"reading.breasts: unknown breast {lat!r} (expected 'L' or 'R')")
        if b.present and b.birads and b.birads not in b.birads_probabilities:
            raise ValueError(
                f"{where}.birads_probabilities: no probability of its class {b.birads!r}"
            )
        if b.score is not None and not 0.0 <= float(b.score) <= 100.0:
            raise ValueError(f"{where}.score: {b.score!r} is outside 0-100")
        if b.density is not None and b.density not in DENSITY_CLASSES:
            raise ValueError(f"{where}.density: {b.density!r} is not one of {DENSITY_CLASSES}")
    if reading.score is not None and not 0.0 <= float(reading.score) <= 100.0:
        raise ValueError(f"reading.score: {reading.score!r} is outside 0-100")
    if reading.density is not None and reading.density not in DENSITY_CLASSES:
        raise ValueError(f"reading.density: {reading.density!r} is not one of {DENSITY_CLASSES}")
    for slot, marks in reading.marks.items():
        for i, m in enumerate(marks):
            where = f"reading.marks[{slot!r}][{i}]"
            if m.slot != slot:
                raise ValueError(f"{where}.slot: {m.slot!r} is filed under {slot!r}")
            if not 0.0 <= float(m.score) <= 100.0:
                raise ValueError(f"{where}.score: {m.score!r} is outside 0-100")
            if len(m.outline) < 3:
                raise ValueError(
                    f"{where}.outline: a polygon needs 3 points or more, got {len(m.outline)}"
                )
    if not reading.model_name:
        raise ValueError("reading.model_name: empty")


def score_line(reading: ReadingSummary) -> str:
    """E.g. "Exam score 73/100, above the operating point (41)"."""
    if reading.score is None:
        return "Exam score n/a"
    text = f"Exam score {reading.score:.0f}/100"
    if reading.operating_point is None:
        return text + " (no operating point)"
    where = "above" if reading.above_operating_point else "below"
    return f"{text}, {where} the operating point ({reading.operating_point:g})"


def overall_impression(reading: ReadingSummary) -> str:
    """One line for the whole exam, e.g. "AI reading: left BI-RADS 5 (p=1.00); right ..."."""
    parts = []
    for lat, side in (("L", "left"), ("R", "right")):
        b = reading.breasts.get(lat, ABSENT)
        if b.present and b.birads:
            p = b.birads_probabilities[b.birads]
            parts.append(f"{side} {b.birads} (p={p:.2f})")
        else:
            parts.append(f"{side} not imaged")
    text = "AI reading: " + "; ".join(parts) + ". " + score_line(reading)
    if reading.density:
        text += f". Breast density {reading.density}"
    if reading.missing_views:
        text += f". Missing views: {', '.join(reading.missing_views)}"
    if reading.view_kinds:
        text += f". Views read from: {views_read(reading, reading.view_kinds)}"
    if reading.implant:
        text += ". Implant present"
    for note in reading.notes:
        text += f". {note}"
    if reading.not_for_clinical_use:
        text += ". NOT FOR CLINICAL USE (demo model trained on synthetic phantoms)"
    return text + "."
