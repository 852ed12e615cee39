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

Lesion locations (FROC in ``evaluate``): each MALIGNANT abnormality's ROI mask (``ROI mask
file path``: its own case folder "<case>_<abnormality id>", then the study and series UIDs),
its box the extent of the mask's foreground. The CSVs are known to swap the mask and the
cropped image (and the download often puts both in one series, "1-1.dcm" / "1-2.dcm"), so the
mask is found as users do: among the files of both series, the two-valued image of the full
mammogram's size. An abnormality whose mask is not found that way (missing, or the few whose
mask has another size than its mammogram) has no box (counted in one warning).
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
    parse_laterality,
    parse_view,
)
from inference.datasets.tables import get_field, rows_csv

log = logging.getLogger("mammo_node.data")


_CBIS_CSVS = {
    "mass_case_description_train_set.csv": "training",
    "mass_case_description_test_set.csv": "test",
    "calc_case_description_train_set.csv": "training",
    "calc_case_description_test_set.csv": "test",
}


def _series_of(path: Path) -> str:
    try:
        from pydicom import dcmread

        return str(
            dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
                "SeriesInstanceUID", ""
            )
        )
    except Exception:
        return ""


def _shape_of(path: Path) -> tuple[int, int] | None:
    try:
        from pydicom import dcmread

        ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception:
        return None


def mask_box(path: Path) -> tuple[float, float, float, float] | None:
    """The box (x0, y0, x1, y1: pixel edges, (0, 0) the top-left corner) of a two-valued
    mask image's foreground (its higher value), or None when the image is not two-valued
    (a cropped image, a mammogram) or has no foreground."""
    import numpy as np
    from pydicom import dcmread

    try:
        arr = dcmread(path).pixel_array
    except Exception:
        return None
    if arr.ndim != 2:
        return None
    lo, hi = arr.min(), arr.max()
    fg = arr == hi
    if lo == hi or not (fg | (arr == lo)).all():
        return None
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def read_cbis_ddsm(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    csvs = [
        (p, split)
        for name, split in _CBIS_CSVS.items()
        for p in [*root.glob(name), *root.glob(f"*/{name}")]
    ]
    if not csvs:
        raise FileNotFoundError(
            f"{root}: no CBIS-DDSM case description CSV ({', '.join(_CBIS_CSVS)})"
        )
    tree = root / "CBIS-DDSM" if (root / "CBIS-DDSM").is_dir() else root
    records: dict[str, ExamRecord] = {}
    skipped = unresolved = no_mask = 0
    # case folder -> series UID -> its files
    series_index: dict[str, dict[str, list[Path]]] = {}

    def series_files(rel: str) -> list[Path]:
        """The files of the series ``rel`` (a CSV path) names in its case folder."""
        parts = [p for p in rel.replace("\\", "/").strip().split("/") if p]
        if not parts:
            return []
        case = tree / parts[0]
        if not case.is_dir():
            return []
        want = parts[2] if len(parts) > 2 else ""
        if parts[0] not in series_index:
            index: dict[str, list[Path]] = {}
            for i, f in enumerate(sorted(case.rglob("*.dcm"))):
                index.setdefault(_series_of(f) or f"?{i}", []).append(f)
            series_index[parts[0]] = index
        index = series_index[parts[0]]
        if want in index:
            return index[want]
        # Headers unreadable: the folder names end with the UIDs' last digits.
        tail = want.rsplit(".", 1)[-1][-5:]
        folders = {f.parent for fs in index.values() for f in fs if f.parent.name.endswith(tail)}
        return (
            sorted(f for fs in index.values() for f in fs if f.parent in folders)
            if len(folders) == 1
            else []
        )

    def resolve(rel: str) -> Path | None:
        files = series_files(rel)
        return files[0] if files else None

    def lesion_box(row: dict[str, str], image: Path) -> tuple[float, float, float, float] | None:
        want = _shape_of(image)
        seen: set[Path] = set()
        for col in ("roi mask file path", "cropped image file path"):
            for f in series_files(get_field(row, col)):
                if f in seen or (want is not None and _shape_of(f) != want):
                    continue
                seen.add(f)
                box = mask_box(f)
                if box is not None:
                    return box
        return None

    for csv_path, split in csvs:
        for row in rows_csv(csv_path, ","):
            pid = get_field(row, "patient id")
            lat = get_field(row, "left or right breast")
            view = get_field(row, "image view")
            rel = get_field(row, "image file path")
            if not (pid and lat and view and rel):
                raise ValueError(
                    f"{csv_path}: a row without patient_id / left or right "
                    f"breast / image view / image file path"
                )
            path = resolve(rel)
            if path is None:
                unresolved += 1
                path = tree / rel.strip()  # reported as missing by _check_files
            pathology = get_field(row, "pathology").upper()
            diagnosis = parse_diagnosis(
                "malignant"
                if pathology == "MALIGNANT"
                else "benign"
                if pathology.startswith("BENIGN")
                else ""
            )
            a = get_field(row, "assessment")
            birads = parse_birads(a) if a not in ("", "0") else None
            # Density 1-4: "breast_density" in the mass CSVs, "breast density" in the calc
            # ones (get_field folds underscores and spaces).
            ok = add_image(
                records,
                f"{pid}|{split}",
                lat,
                view,
                path,
                birads,
                diagnosis,
                split,
                parse_density(get_field(row, "breast density")),
            )
            skipped += not ok
            rec = records[f"{pid}|{split}"]
            slot = f"{parse_laterality(lat) or parse_view(view)[0]}-{parse_view(view)[1]}"
            if ok and pathology == "MALIGNANT" and rec.paths.get(slot) == path and path.is_file():
                box = lesion_box(row, path)
                if box is None:
                    no_mask += 1
                else:
                    rec.lesions.setdefault(slot, []).append(box)
    if unresolved:
        log.warning(
            "%s: %d image path(s) of the CSVs not found in the download tree "
            "(matched by case folder and series UID)",
            root,
            unresolved,
        )
    if no_mask:
        log.warning(
            "%s: %d malignant abnormalit(y/ies) without a usable ROI mask (none of "
            "their mammogram's size with two values): no box for localisation",
            root,
            no_mask,
        )
    return check_files(records, root, skipped)
