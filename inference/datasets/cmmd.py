"""``cmmd`` (The Chinese Mammography Database, TCIA): the tree ``<root>/CMMD/<ID1>/<study>/
<series>/1-N.dcm`` and the clinical table ``CMMD_clinicaldata_revision.xlsx`` (or the same
table saved as CSV): ID1, LeftRight, Age, number, abnormality, classification, subtype.
One exam per ID1; laterality and view from each image's header (the node's classifier).
classification Benign / Malignant -> the breast's diagnosis; BI-RADS is not given. All
images are the training split (no official split).
"""

from __future__ import annotations

from pathlib import Path

from inference.datasets.records import ExamRecord, add_image, check_files, parse_diagnosis
from inference.datasets.tables import find_file, get_field, read_table


def read_cmmd(root: str | Path) -> list[ExamRecord]:
    from pydicom import dcmread

    from inference.views import classify

    root = Path(root)
    table = find_file(root, ["CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv"])
    tree = root / "CMMD" if (root / "CMMD").is_dir() else root
    labels: dict[tuple[str, str], int | None] = {}
    for row in read_table(table):
        pid, lat = get_field(row, "id1"), get_field(row, "leftright").upper()[:1]
        if not pid or lat not in ("L", "R"):
            continue
        labels[(pid, lat)] = parse_diagnosis(get_field(row, "classification"))
    records: dict[str, ExamRecord] = {}
    skipped = 0
    for pid in sorted({p for p, _ in labels}):
        folder = tree / pid
        for f in sorted(folder.rglob("*.dcm")) if folder.is_dir() else []:
            try:
                ds = dcmread(f, stop_before_pixels=True)
            except Exception:
                skipped += 1
                continue
            info = classify(ds, any_sop_class=True)
            lat = info.laterality or ""
            skipped += not add_image(
                records, pid, lat, info.view or "", f, None, labels.get((pid, lat)), "training"
            )
        rec = records.setdefault(pid, ExamRecord(exam_id=pid, split="training"))
        for (p, lat), d in labels.items():
            if p == pid and d is not None:
                rec.diagnosis[lat] = max(d, rec.diagnosis.get(lat) or 0)
    return check_files(records, table, skipped)
