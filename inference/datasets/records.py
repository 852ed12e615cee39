"""The records every data-set reader returns, and the label and view parsing they share.

:class:`ExamRecord`: one exam, four view slots (``inference.tasks.VIEWS``), per-breast BI-RADS
1-5 and diagnosis, a split. :func:`add_image` files one image row into its exam;
:func:`check_files` drops rows whose file is missing (one warning that counts them). Exams
with missing views are kept: the model masks what is missing.

Torch-free: the readers (and whoever only lists a data set) need no torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from inference.tasks import BREASTS, DIAGNOSIS_CLASSES, VIEWS

log = logging.getLogger("mammo_node.data")

TRAIN_SPLITS = {"training", "train"}
TEST_SPLITS = {"test", "testing"}


@dataclass
class ExamRecord:
    exam_id: str
    paths: dict[str, Path] = field(default_factory=dict)  # slot -> file
    birads: dict[str, int | None] = field(default_factory=dict)  # "L"/"R" -> 1..5
    diagnosis: dict[str, int | None] = field(default_factory=dict)  # -> class index
    split: str = ""
    density: dict[str, int | None] = field(default_factory=dict)  # -> 0..3 (A..D)
    #: slot -> boxes (x0, y0, x1, y1) of its malignant / suspicious lesions, in the image's
    #: pixels, where the data set gives them (VinDr finding_annotations.csv, synth)
    lesions: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)


def parse_birads(value: str | None) -> int | None:
    """ "BI-RADS 4", "4", "birads4", "4a" -> 4; anything else -> None."""
    if value is None:
        return None
    m = re.search(r"([0-6])", str(value))
    if not m:
        return None
    b = int(m.group(1))
    return b if 1 <= b <= 5 else None


_DIAGNOSIS_ALIASES = {
    "negative": "normal",
    "healthy": "normal",
    "no finding": "normal",
    "benign_without_callback": "benign",
    "malignancy": "malignant",
    "cancer": "malignant",
}
# No numeric codes: "1" means benign in one data set and cancer in another (RSNA's 0/1), and
# a silently wrong label is worse than an unlabelled breast.


def parse_diagnosis(value: str | None) -> int | None:
    """ "normal" / "benign" / "malignant" (and a few usual synonyms) -> class index."""
    v = (value or "").strip().lower()
    v = _DIAGNOSIS_ALIASES.get(v, v)
    return DIAGNOSIS_CLASSES.index(v) if v in DIAGNOSIS_CLASSES else None


def parse_density(value: str | int | float | None) -> int | None:
    """BI-RADS breast density as a class index 0-3 (A-D): "DENSITY C" (VinDr), "C" (RSNA),
    "3" / 3 (CBIS-DDSM's 1-4, INbreast's ACR 1-4), "ACR 3", "heterogeneously dense";
    anything else (empty, "0", "nan") -> None (no label: the density loss skips it)."""
    if value is None:
        return None
    v = str(value).strip().upper()
    words = {"FAT": 0, "SCATTERED": 1, "HETEROGENEOUS": 2, "EXTREMELY": 3}
    for w, i in words.items():
        if w in v:
            return i
    v = re.sub(r"^(DENSITY|ACR|BI-?RADS)[\s_:-]*", "", v).strip()
    if v in ("A", "B", "C", "D"):
        return "ABCD".index(v)
    m = re.fullmatch(r"([1-4])(\.0+)?", v)
    return int(m.group(1)) - 1 if m else None


def parse_laterality(value: str | None) -> str | None:
    """ "L", "left", "R ", "RIGHT" -> "L" / "R"; anything else -> None."""
    v = (value or "").strip().upper()
    if v in ("L", "LEFT", "LT"):
        return "L"
    if v in ("R", "RIGHT", "RT"):
        return "R"
    return None


def parse_view(value: str | None) -> tuple[str | None, str | None]:
    """ "CC" -> (None, "CC"); "RMLO", "L-CC", "l_mlo" -> ("R", "MLO"), ("L", "CC"), ...

    The words the node's classifier reads in ViewPosition (:mod:`inference.views`), plus the
    laterality-last spellings some CSVs use ("CCL", "MLOR"). Only CC and MLO are screening
    views; ML, XCCL etc. give (lat, None).
    """
    from inference.views import parse_view_position

    v = (value or "").strip().upper()
    lat, view, mods = parse_view_position(v)
    if view is None:
        compact = re.sub(r"[\s\-_/]+", "", v)
        if compact[-1:] in ("L", "R") and compact[:-1] in ("CC", "MLO"):  # "CCL", "MLOR"
            lat, view, mods = compact[-1], compact[:-1], []
        else:
            lat2, view, mods = parse_view_position(compact)
            lat = lat or lat2
    return lat, view if view in ("CC", "MLO") and not mods else None


def add_image(
    records: dict[str, ExamRecord],
    exam_id: str,
    lat: str,
    view: str,
    path: Path,
    birads: int | None,
    diagnosis: int | None,
    split: str,
    density: int | None = None,
) -> bool:
    """Add one image row; False when its laterality/view are not one of the four slots."""
    vlat, v = parse_view(view)
    lat_ = parse_laterality(lat) or vlat
    rec = records.setdefault(exam_id, ExamRecord(exam_id=exam_id, split=split.strip().lower()))
    if lat_ in BREASTS:
        if birads is not None:
            rec.birads[lat_] = max(birads, rec.birads.get(lat_) or 0)
        if diagnosis is not None:
            rec.diagnosis[lat_] = max(diagnosis, rec.diagnosis.get(lat_) or 0)
        if density is not None:
            rec.density[lat_] = max(density, rec.density.get(lat_) or 0)
    slot = f"{lat_}-{v}"
    if slot in VIEWS:
        rec.paths.setdefault(slot, path)
        return True
    return False


def _existing(path: Path) -> Path | None:
    """``path``, or the same name with the other usual DICOM suffix, if it exists."""
    if path.exists():
        return path
    for alt in (path.with_suffix(".dcm"), path.with_suffix(".dicom"), path.with_suffix("")):
        if alt != path and alt.is_file():
            return alt
    return None


def check_files(
    records: dict[str, ExamRecord], source: Path, skipped_views: int
) -> list[ExamRecord]:
    """Drop rows whose file is missing (warned once, counted); drop exams left empty."""
    missing: list[Path] = []
    for rec in records.values():
        for slot, path in list(rec.paths.items()):
            found = _existing(path)
            if found is None:
                missing.append(path)
                del rec.paths[slot]
            else:
                rec.paths[slot] = found
    if missing:
        log.warning(
            "%s: %d image file(s) listed but not found (first: %s); those views are "
            "treated as missing",
            source,
            len(missing),
            missing[0],
        )
    if skipped_views:
        log.info(
            "%s: %d row(s) are not CC/MLO views of L/R (extra views, unknown values): not used",
            source,
            skipped_views,
        )
    out = [r for r in records.values() if r.paths]
    if len(out) < len(records):
        log.warning(
            "%s: %d exam(s) without any usable image dropped", source, len(records) - len(out)
        )
    return out


def select_split(records: list[ExamRecord], split: str | None) -> list[ExamRecord]:
    if not split or split == "all":
        return records
    names = (
        TRAIN_SPLITS if split in TRAIN_SPLITS else TEST_SPLITS if split in TEST_SPLITS else {split}
    )
    return [r for r in records if r.split in names]
