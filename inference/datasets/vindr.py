"""VinDr-Mammo layout, a generic CSV, and the torch Dataset over exams.

VinDr-Mammo: ``images/<study_id>/<image_id>.dicom`` and ``breast-level_annotations.csv``
with ``study_id, series_id, image_id, laterality, view_position, height, width,
breast_birads, breast_density, split`` (``breast_diagnosis`` is read when present, as our
synthetic data writes it).
"""

from __future__ import annotations

import csv
from pathlib import Path

from inference.datasets.records import (
    ExamRecord,
    add_image,
    check_files,
    parse_birads,
    parse_density,
    parse_diagnosis,
    parse_laterality,
    parse_view,
)
from inference.tasks import BREASTS


def read_vindr(root: str | Path) -> list[ExamRecord]:
    """The VinDr-Mammo layout under ``root``."""
    root = Path(root)
    csv_path = root / "breast-level_annotations.csv"
    if not csv_path.exists():
        raise FileNotFoundError(
            f"{csv_path} not found: not a VinDr-Mammo layout (use --format csv for a generic CSV)"
        )
    records: dict[str, ExamRecord] = {}
    skipped = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [
            c
            for c in ("study_id", "image_id", "laterality", "view_position")
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(f"{csv_path}: column(s) {', '.join(missing)} missing")
        for row in reader:
            path = root / "images" / row["study_id"].strip() / f"{row['image_id'].strip()}.dicom"
            ok = add_image(
                records,
                row["study_id"].strip(),
                row["laterality"],
                row["view_position"],
                path,
                parse_birads(row.get("breast_birads")),
                parse_diagnosis(row.get("breast_diagnosis")),
                row.get("split") or "",
                parse_density(row.get("breast_density")),
            )
            skipped += not ok
    _read_vindr_findings(root, records)
    return check_files(records, csv_path, skipped)


def _read_vindr_findings(root: Path, records: dict[str, ExamRecord]) -> None:
    """VinDr's ``finding_annotations.csv`` (boxes xmin..ymax per image, ``finding_birads``):
    the boxes of BI-RADS 4-5 findings (VinDr has no pathology: suspicious stands for
    malignant) become the exam's lesions, for localisation (FROC) in ``evaluate``."""
    path = root / "finding_annotations.csv"
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            rec = records.get((row.get("study_id") or "").strip())
            b = parse_birads(row.get("finding_birads"))
            lat, v = (
                parse_laterality(row.get("laterality")),
                parse_view(row.get("view_position") or "")[1],
            )
            try:
                box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (KeyError, TypeError, ValueError):
                continue  # no box (a finding without a location)
            if rec is None or b is None or b < 4 or lat not in BREASTS or v is None:
                continue
            rec.lesions.setdefault(f"{lat}-{v}", []).append(box)  # type: ignore[arg-type]
