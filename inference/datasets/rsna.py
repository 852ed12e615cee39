"""``rsna`` (RSNA Screening Mammography Breast Cancer Detection, Kaggle 2022):
``train.csv`` (site_id, patient_id, image_id, laterality, view, age, cancer, biopsy,
invasive, BIRADS, implant, density, machine_id, difficult_negative_case) and
``train_images/<patient_id>/<image_id>.dcm``. One exam per patient. Diagnosis: cancer 1 ->
malignant; cancer 0 with biopsy 1 -> benign; otherwise normal. BI-RADS: the screening
assessment (1 -> 1, 2 -> 2; 0 = recall, no category), cancer 1 -> 5. No test labels are
published: a fixed 20 % of patients (by a hash of the patient id) is the test split.
Views other than CC / MLO (ML, LM, AT, ...) are not used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from inference.datasets.records import (
    ExamRecord,
    add_image,
    check_files,
    parse_birads,
    parse_density,
)
from inference.datasets.tables import rows_csv


def _fixed_split(key: str, test_fraction: float = 0.2) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "training"


def read_rsna(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    csv_path = root / "train.csv" if root.is_dir() else root
    if not csv_path.exists():
        raise FileNotFoundError(
            f"{csv_path} not found: not the RSNA layout (train.csv + "
            f"train_images/<patient_id>/<image_id>.dcm)"
        )
    base = csv_path.parent
    records: dict[str, ExamRecord] = {}
    skipped = 0
    for row in rows_csv(csv_path, ","):
        for col in ("patient_id", "image_id", "laterality", "view"):
            if col not in row:
                raise ValueError(f"{csv_path}: column {col!r} missing")
        pid = row["patient_id"]
        cancer = row.get("cancer", "") == "1"
        biopsy = row.get("biopsy", "") == "1"
        diagnosis = 2 if cancer else 1 if biopsy else 0
        b = row.get("BIRADS", "")
        birads = 5 if cancer else parse_birads(b) if b in ("1", "2") else None
        path = base / "train_images" / pid / f"{row['image_id']}.dcm"
        # RSNA's density: A-D (empty where unknown).
        skipped += not add_image(
            records,
            pid,
            row["laterality"],
            row["view"],
            path,
            birads,
            diagnosis,
            _fixed_split(pid),
            parse_density(row.get("density")),
        )
    return check_files(records, csv_path, skipped)
