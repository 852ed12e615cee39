"""``inbreast`` (INbreast): ``AllDICOMs/<file name>_<patient hash>_MG_<L|R>_<CC|ML|MLO>_ANON.dcm``
and the table ``INbreast.csv`` (semicolon separated: Patient ID; Patient age; Laterality;
View; Acquisition date; File Name; ACR; Bi-Rads) or ``INbreast.xls[x]`` saved as CSV.
One exam per patient hash and acquisition date. Bi-Rads 1-5 (4a/4b/4c -> 4) per image,
the worst per breast; 6 (known malignancy) -> BI-RADS 5 and diagnosis malignant. "ML" in
INbreast names is its MLO view. All training split.
"""

from __future__ import annotations

import re
from pathlib import Path

from inference.datasets.records import ExamRecord, add_image, check_files, parse_density
from inference.datasets.tables import find_file, get_field, read_table

_INBREAST_NAME = re.compile(r"^(\d+)_([0-9a-f]+)_MG_([LR])_(CC|MLO|ML)_ANON\.dcm$", re.I)


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
        skipped += not add_image(records, exam, lat,
                                 "MLO" if view.upper() == "ML" else view, f, birads, diagnosis,
                                 "training", parse_density(get_field(row, "acr")))  # ACR 1-4
    return check_files(records, table, skipped)
