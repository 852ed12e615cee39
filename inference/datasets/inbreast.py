"""``inbreast`` (INbreast): ``AllDICOMs/<file name>_<patient hash>_MG_<L|R>_<CC|ML|MLO>_ANON.dcm``
and the table ``INbreast.csv`` (semicolon separated: Patient ID; Patient age; Laterality;
View; Acquisition date; File Name; ACR; Bi-Rads) or ``INbreast.xls[x]`` saved as CSV.
One exam per patient hash and acquisition date. Bi-Rads 1-5 (4a/4b/4c -> 4) per image,
the worst per breast; 6 (known malignancy) -> BI-RADS 5 and diagnosis malignant. "ML" in
INbreast names is its MLO view. All training split.

Lesion locations (FROC in ``evaluate``): ``AllXML/<file name>.xml``, the plist INbreast gives
per image (``Images`` -> ``ROIs``, each with its ``Name`` and its contour's ``Point_px``
"(x, y)" strings, image pixels). On an image of Bi-Rads 4-6 (INbreast has no per-lesion
pathology: suspicious stands for malignant, as for VinDr), each ROI of a mass, spiculated
region, calcification cluster, architectural distortion or asymmetry becomes a box, the
extent of its contour; single calcifications (point ROIs) are not lesions of their own.
"""

from __future__ import annotations

import logging
import plistlib
import re
from pathlib import Path

from inference.datasets.records import ExamRecord, add_image, check_files, parse_density
from inference.datasets.tables import find_file, get_field, read_table

_INBREAST_NAME = re.compile(r"^(\d+)_([0-9a-f]+)_MG_([LR])_(CC|MLO|ML)_ANON\.dcm$", re.I)
#: ROI names (lower case, any part) that are lesions for localisation.
LESION_ROIS = ("mass", "spiculated", "cluster", "distortion", "asymmetr")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

log = logging.getLogger("mammo_node.data")


def xml_lesion_boxes(path: Path) -> list[tuple[float, float, float, float]]:
    """The boxes (x0, y0, x1, y1, image pixels) of the lesion ROIs (:data:`LESION_ROIS`) of
    one INbreast XML file; ValueError naming the file when it is not such a plist."""
    try:
        with open(path, "rb") as f:
            doc = plistlib.load(f)
    except Exception as e:
        raise ValueError(f"{path}: not an INbreast ROI plist ({e})") from e
    images = doc.get("Images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: no 'Images' array (not an INbreast ROI plist)")
    boxes = []
    for image in images:
        for roi in (image.get("ROIs") or []) if isinstance(image, dict) else []:
            name = str(roi.get("Name", "")).lower()
            if not any(k in name for k in LESION_ROIS):
                continue
            pts = [
                [float(v) for v in _NUMBER.findall(str(p))[:2]] for p in roi.get("Point_px") or []
            ]
            pts = [p for p in pts if len(p) == 2]
            if len(pts) < 2:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if max(xs) > min(xs) and max(ys) > min(ys):
                boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return boxes


def read_inbreast(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    folder = root / "AllDICOMs"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: not the INbreast layout")
    table = find_file(root, ["INbreast.csv", "INbreast.xlsx"])
    rows = {get_field(r, "file name"): r for r in read_table(table)}
    records: dict[str, ExamRecord] = {}
    skipped = 0
    for f in sorted(folder.glob("*.dcm")):
        m = _INBREAST_NAME.match(f.name)
        if not m:
            skipped += 1
            continue
        file_id, patient, lat, view = m.groups()
        row = rows.get(file_id)
        if row is None:
            skipped += 1
            continue
        raw = get_field(row, "bi-rads", "birads").lower()
        n = int(raw[0]) if raw[:1].isdigit() else None
        birads = 5 if n == 6 else n if n in (1, 2, 3, 4, 5) else None
        diagnosis = 2 if n == 6 else None
        exam = f"{patient}|{get_field(row, 'acquisition date')}"
        v = "MLO" if view.upper() == "ML" else view.upper()
        ok = add_image(
            records,
            exam,
            lat,
            v,
            f,
            birads,
            diagnosis,
            "training",
            parse_density(get_field(row, "acr")),
        )  # ACR 1-4
        skipped += not ok
        xml = root / "AllXML" / f"{file_id}.xml"
        slot = f"{lat.upper()}-{v}"
        if ok and records[exam].paths.get(slot) == f and n is not None and n >= 4 and xml.is_file():
            try:
                boxes = xml_lesion_boxes(xml)
            except ValueError as e:  # one bad file: that image has no boxes, the rest read
                log.warning("%s", e)
                continue
            if boxes:
                records[exam].lesions.setdefault(slot, []).extend(boxes)
    return check_files(records, table, skipped)
