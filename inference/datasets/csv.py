"""A generic CSV: one row per image with ``path`` (relative to the CSV's folder or absolute),
``exam_id`` (or ``study_id``), ``laterality`` (L/R), ``view`` (CC/MLO), and optional
``birads`` (1-5), ``diagnosis`` (normal/benign/malignant) and ``split``. Header names are
matched without regard to case, spaces or hyphens, and common other names are understood
(``file``, ``file_path``, ``image_path``, ``filename`` for the path; ``side`` or
``image_laterality`` for the laterality; ``view_position`` for the view; ``breast_birads``,
``bi_rads``; ``pathology``, ``breast_diagnosis``; ``StudyInstanceUID``, ``accession``).
A view value may carry the laterality ("RCC", "L-MLO") and the laterality may be spelled
out ("LEFT").
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from inference.datasets.records import (
    ExamRecord,
    add_image,
    check_files,
    parse_birads,
    parse_density,
    parse_diagnosis,
)


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


_ALIASES = {  # canonical -> accepted (normalised) header names, in order of preference
    "path": (
        "path",
        "file",
        "file_path",
        "filepath",
        "image_path",
        "image",
        "filename",
        "file_name",
        "dicom_path",
    ),
    "exam_id": (
        "exam_id",
        "study_id",
        "studyinstanceuid",
        "study_instance_uid",
        "study_uid",
        "accession",
        "accession_number",
        "exam",
    ),
    "laterality": ("laterality", "side", "image_laterality", "imagelaterality", "breast"),
    "view": ("view", "view_position", "viewposition", "projection"),
    "birads": ("birads", "bi_rads", "breast_birads", "assessment"),
    "diagnosis": ("diagnosis", "breast_diagnosis", "pathology"),
    "density": ("density", "breast_density", "breast density", "acr", "composition"),
    "split": ("split", "subset", "set", "fold_name"),
}


def _column_map(
    fieldnames: list[str] | None, csv_path: Path, required: tuple[str, ...]
) -> dict[str, str]:
    """canonical name -> the file's own header name."""
    present = {_norm(f): f for f in fieldnames or []}
    out = {}
    for canon, names in _ALIASES.items():
        for n in names:
            if n in present:
                out[canon] = present[n]
                break
    for key in required:
        if key not in out:
            raise ValueError(
                f"{csv_path}: column {key!r} missing (accepted names: "
                f"{', '.join(_ALIASES[key])}; found: {', '.join(fieldnames or [])})"
            )
    return out


def read_csv(csv_path: str | Path) -> list[ExamRecord]:
    """A generic CSV (or a folder holding ``labels.csv``); see the module's docstring."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found")
    records: dict[str, ExamRecord] = {}
    skipped = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = _column_map(list(reader.fieldnames or []), csv_path, ("path", "laterality", "view"))
        get = lambda row, key: (row.get(cols[key]) or "").strip() if key in cols else ""  # noqa: E731
        for i, row in enumerate(reader):
            p = Path(get(row, "path"))
            if not get(row, "path"):
                raise ValueError(f"{csv_path}: row {i + 2}: empty path")
            # Without an exam column, images of one folder are one exam.
            exam_id = get(row, "exam_id") or str(p.parent)
            ok = add_image(
                records,
                exam_id,
                get(row, "laterality"),
                get(row, "view"),
                p if p.is_absolute() else csv_path.parent / p,
                parse_birads(get(row, "birads")),
                parse_diagnosis(get(row, "diagnosis")),
                get(row, "split"),
                parse_density(get(row, "density")),
            )
            skipped += not ok
    return check_files(records, csv_path, skipped)
