"""``cbis-ddsm`` (CBIS-DDSM, TCIA): the four case-description CSVs
(``mass_case_description_{train,test}_set.csv``, ``calc_case_description_{train,test}_set
.csv``) and the TCIA download tree ``<root>/CBIS-DDSM/<case folder>/<study>/<series>/
*.dcm`` (or the case folders straight under the root). The CSVs' ``image file path`` names
the case folder, then the study and series UIDs, but the downloaded folders are named
"07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515": the full mammogram is
found, as users do, in the case folder by the series UID of its DICOM header (the
folders' trailing digits when a header cannot be read). One exam per patient and CSV
split (training / test); the breast's pathology MALIGNANT -> malignant, BENIGN /
BENIGN_WITHOUT_CALLBACK -> benign; ``assessment`` 1-5 -> BI-RADS (0 -> none); a breast with
several abnormalities takes the worst.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inference.datasets.records import (
    ExamRecord,
    add_image,
    check_files,
    parse_birads,
    parse_density,
    parse_diagnosis,
)
from inference.datasets.tables import get_field, rows_csv

log = logging.getLogger("mammo_node.data")


_CBIS_CSVS = {"mass_case_description_train_set.csv": "training",
              "mass_case_description_test_set.csv": "test",
              "calc_case_description_train_set.csv": "training",
              "calc_case_description_test_set.csv": "test"}


def _series_of(path: Path) -> str:
    try:
        from pydicom import dcmread

        return str(dcmread(path, stop_before_pixels=True,
                           specific_tags=["SeriesInstanceUID"]).get("SeriesInstanceUID", ""))
    except Exception:
        return ""


def read_cbis_ddsm(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    csvs = [(p, split) for name, split in _CBIS_CSVS.items()
            for p in [*root.glob(name), *root.glob(f"*/{name}")]]
    if not csvs:
        raise FileNotFoundError(f"{root}: no CBIS-DDSM case description CSV "
                                f"({', '.join(_CBIS_CSVS)})")
    tree = root / "CBIS-DDSM" if (root / "CBIS-DDSM").is_dir() else root
    records: dict[str, ExamRecord] = {}
    skipped = unresolved = 0
    series_index: dict[str, dict[str, Path]] = {}  # case folder -> series UID -> file

    def resolve(rel: str) -> Path | None:
        parts = [p for p in rel.replace("\\", "/").strip().split("/") if p]
        if not parts:
            return None
        case = tree / parts[0]
        if not case.is_dir():
            return None
        want = parts[2] if len(parts) > 2 else ""
        if parts[0] not in series_index:
            files = sorted(case.rglob("*.dcm"))
            series_index[parts[0]] = {_series_of(f) or f"?{i}": f for i, f in enumerate(files)}
        index = series_index[parts[0]]
        if want in index:
            return index[want]
        # Headers unreadable: the folder names end with the UIDs' last digits.
        tail = want.rsplit(".", 1)[-1][-5:]
        hits = [f for f in index.values() if f.parent.name.endswith(tail)]
        return hits[0] if len(hits) == 1 else None

    for csv_path, split in csvs:
        for row in rows_csv(csv_path, ","):
            pid = get_field(row, "patient id")
            lat = get_field(row, "left or right breast")
            view = get_field(row, "image view")
            rel = get_field(row, "image file path")
            if not (pid and lat and view and rel):
                raise ValueError(f"{csv_path}: a row without patient_id / left or right "
                                 f"breast / image view / image file path")
            path = resolve(rel)
            if path is None:
                unresolved += 1
                path = tree / rel.strip()  # reported as missing by _check_files
            pathology = get_field(row, "pathology").upper()
            diagnosis = parse_diagnosis("malignant" if pathology == "MALIGNANT" else
                                        "benign" if pathology.startswith("BENIGN") else "")
            a = get_field(row, "assessment")
            birads = parse_birads(a) if a not in ("", "0") else None
            # Density 1-4: "breast_density" in the mass CSVs, "breast density" in the calc
            # ones (get_field folds underscores and spaces).
            skipped += not add_image(records, f"{pid}|{split}", lat, view, path, birads,
                                     diagnosis, split,
                                     parse_density(get_field(row, "breast density")))
    if unresolved:
        log.warning("%s: %d image path(s) of the CSVs not found in the download tree "
                    "(matched by case folder and series UID)", root, unresolved)
    return check_files(records, root, skipped)
