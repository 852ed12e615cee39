"""Readers for the public mammography data sets, in the layouts they are downloaded in.

Each returns :class:`inference.data.ExamRecord` lists (four view slots, per-breast BI-RADS
1-5 and diagnosis, a split), like the VinDr and CSV readers. Label mapping and exam grouping:

``rsna`` (RSNA Screening Mammography Breast Cancer Detection, Kaggle 2022):
    ``train.csv`` (site_id, patient_id, image_id, laterality, view, age, cancer, biopsy,
    invasive, BIRADS, implant, density, machine_id, difficult_negative_case) and
    ``train_images/<patient_id>/<image_id>.dcm``. One exam per patient. Diagnosis: cancer 1 ->
    malignant; cancer 0 with biopsy 1 -> benign; otherwise normal. BI-RADS: the screening
    assessment (1 -> 1, 2 -> 2; 0 = recall, no category), cancer 1 -> 5. No test labels are
    published: a fixed 20 % of patients (by a hash of the patient id) is the test split.
    Views other than CC / MLO (ML, LM, AT, ...) are not used.

``cbis-ddsm`` (CBIS-DDSM, TCIA): the four case-description CSVs
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

``cmmd`` (The Chinese Mammography Database, TCIA): the tree ``<root>/CMMD/<ID1>/<study>/
    <series>/1-N.dcm`` and the clinical table ``CMMD_clinicaldata_revision.xlsx`` (or the same
    table saved as CSV): ID1, LeftRight, Age, number, abnormality, classification, subtype.
    One exam per ID1; laterality and view from each image's header (the node's classifier).
    classification Benign / Malignant -> the breast's diagnosis; BI-RADS is not given. All
    images are the training split (no official split).

``inbreast`` (INbreast): ``AllDICOMs/<file name>_<patient hash>_MG_<L|R>_<CC|ML|MLO>_ANON.dcm``
    and the table ``INbreast.csv`` (semicolon separated: Patient ID; Patient age; Laterality;
    View; Acquisition date; File Name; ACR; Bi-Rads) or ``INbreast.xls[x]`` saved as CSV.
    One exam per patient hash and acquisition date. Bi-Rads 1-5 (4a/4b/4c -> 4) per image,
    the worst per breast; 6 (known malignancy) -> BI-RADS 5 and diagnosis malignant. "ML" in
    INbreast names is its MLO view. All training split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from inference.data import (
    ExamRecord,
    _add,
    _check_files,
    parse_birads,
    parse_density,
    parse_diagnosis,
)

log = logging.getLogger("mammo_node.data")


def _rows_csv(path: Path, delimiter: str | None = None) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    if delimiter is None:
        first = text.splitlines()[0] if text else ""
        delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def read_xlsx(path: Path) -> list[dict[str, str]]:
    """The first sheet of an .xlsx file as rows of strings (header = first row). A small
    reader of the Office Open XML parts, so that one table needs no spreadsheet library."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(path) as z:
        shared: list[str] = []
        if "xl/sharedStrings.xml" in z.namelist():
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            for si in root.findall("m:si", ns):
                shared.append("".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")))
        sheets = sorted(n for n in z.namelist() if re.match(r"xl/worksheets/sheet\d+\.xml$", n))
        if not sheets:
            raise ValueError(f"{path}: no worksheet")
        root = ElementTree.fromstring(z.read(sheets[0]))
    table: list[list[str]] = []
    for row in root.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for c in row.findall("m:c", ns):
            letters = re.match(r"[A-Z]*", c.get("r", "")).group(0) or "A"  # type: ignore[union-attr]
            col = 0
            for ch in letters:
                col = col * 26 + ord(ch) - 64
            v = c.find("m:v", ns)
            text = v.text if v is not None and v.text is not None else ""
            if c.get("t") == "s" and text:
                text = shared[int(text)]
            elif c.get("t") == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            cells[col - 1] = text.strip()
        if cells:
            table.append([cells.get(i, "") for i in range(max(cells) + 1)])
    if not table:
        return []
    header = table[0]
    return [{h: (r[i] if i < len(r) else "") for i, h in enumerate(header)} for r in table[1:]]


def _table(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() == ".xlsx":
        return read_xlsx(path)
    if path.suffix.lower() == ".xls":
        raise ValueError(f"{path}: the old binary .xls format; save it as .xlsx or CSV")
    return _rows_csv(path)


def _find(root: Path, names: list[str]) -> Path:
    for n in names:
        for cand in (root / n, *root.glob(f"*/{n}")):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"{root}: none of {', '.join(names)} found")


# ------------------------------------------------------------------------------------ RSNA
def _fixed_split(key: str, test_fraction: float = 0.2) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "training"


def read_rsna(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    csv_path = root / "train.csv" if root.is_dir() else root
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: not the RSNA layout (train.csv + "
                                f"train_images/<patient_id>/<image_id>.dcm)")
    base = csv_path.parent
    records: dict[str, ExamRecord] = {}
    skipped = 0
    for row in _rows_csv(csv_path, ","):
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
        skipped += not _add(records, pid, row["laterality"], row["view"], path, birads,
                            diagnosis, _fixed_split(pid), parse_density(row.get("density")))
    return _check_files(records, csv_path, skipped)


# ------------------------------------------------------------------------------- CBIS-DDSM
_CBIS_CSVS = {"mass_case_description_train_set.csv": "training",
              "mass_case_description_test_set.csv": "test",
              "calc_case_description_train_set.csv": "training",
              "calc_case_description_test_set.csv": "test"}


def _get(row: dict[str, str], *names: str) -> str:
    low = {re.sub(r"[\s_]+", " ", k.strip().lower()): v for k, v in row.items()}
    for n in names:
        if n in low:
            return low[n]
    return ""


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
        for row in _rows_csv(csv_path, ","):
            pid = _get(row, "patient id")
            lat = _get(row, "left or right breast")
            view = _get(row, "image view")
            rel = _get(row, "image file path")
            if not (pid and lat and view and rel):
                raise ValueError(f"{csv_path}: a row without patient_id / left or right "
                                 f"breast / image view / image file path")
            path = resolve(rel)
            if path is None:
                unresolved += 1
                path = tree / rel.strip()  # reported as missing by _check_files
            pathology = _get(row, "pathology").upper()
            diagnosis = parse_diagnosis("malignant" if pathology == "MALIGNANT" else
                                        "benign" if pathology.startswith("BENIGN") else "")
            a = _get(row, "assessment")
            birads = parse_birads(a) if a not in ("", "0") else None
            # Density 1-4: "breast_density" in the mass CSVs, "breast density" in the calc
            # ones (_get folds underscores and spaces).
            skipped += not _add(records, f"{pid}|{split}", lat, view, path, birads, diagnosis,
                                split, parse_density(_get(row, "breast density")))
    if unresolved:
        log.warning("%s: %d image path(s) of the CSVs not found in the download tree "
                    "(matched by case folder and series UID)", root, unresolved)
    return _check_files(records, root, skipped)


# ------------------------------------------------------------------------------------ CMMD
def read_cmmd(root: str | Path) -> list[ExamRecord]:
    from pydicom import dcmread

    from inference.views import classify

    root = Path(root)
    table = _find(root, ["CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv"])
    tree = root / "CMMD" if (root / "CMMD").is_dir() else root
    labels: dict[tuple[str, str], int | None] = {}
    for row in _table(table):
        pid, lat = _get(row, "id1"), _get(row, "leftright").upper()[:1]
        if not pid or lat not in ("L", "R"):
            continue
        labels[(pid, lat)] = parse_diagnosis(_get(row, "classification"))
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
            skipped += not _add(records, pid, lat, info.view or "", f, None,
                                labels.get((pid, lat)), "training")
        rec = records.setdefault(pid, ExamRecord(exam_id=pid, split="training"))
        for (p, lat), d in labels.items():
            if p == pid and d is not None:
                rec.diagnosis[lat] = max(d, rec.diagnosis.get(lat) or 0)
    return _check_files(records, table, skipped)


# -------------------------------------------------------------------------------- INbreast
_INBREAST_NAME = re.compile(r"^(\d+)_([0-9a-f]+)_MG_([LR])_(CC|MLO|ML)_ANON\.dcm$", re.I)


def read_inbreast(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    folder = root / "AllDICOMs"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: not the INbreast layout")
    table = _find(root, ["INbreast.csv", "INbreast.xlsx"])
    rows = {_get(r, "file name"): r for r in _table(table)}
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
        raw = _get(row, "bi-rads", "birads").lower()
        n = int(raw[0]) if raw[:1].isdigit() else None
        birads = 5 if n == 6 else n if n in (1, 2, 3, 4, 5) else None
        diagnosis = 2 if n == 6 else None
        exam = f"{patient}|{_get(row, 'acquisition date')}"
        skipped += not _add(records, exam, lat, "MLO" if view.upper() == "ML" else view,
                            f, birads, diagnosis, "training",
                            parse_density(_get(row, "acr")))  # ACR 1-4
    return _check_files(records, table, skipped)
