"""Data sets: the VinDr-Mammo layout, a generic CSV, and the torch Dataset over exams.

VinDr-Mammo: ``images/<study_id>/<image_id>.dicom`` and ``breast-level_annotations.csv``
with ``study_id, series_id, image_id, laterality, view_position, height, width,
breast_birads, breast_density, split`` (``breast_diagnosis`` is read when present, as our
synthetic data writes it).

Generic CSV: one row per image with ``path`` (relative to the CSV's folder or absolute),
``exam_id`` (or ``study_id``), ``laterality`` (L/R), ``view`` (CC/MLO), and optional
``birads`` (1-5), ``diagnosis`` (normal/benign/malignant) and ``split``. Header names are
matched without regard to case, spaces or hyphens, and common other names are understood
(``file``, ``file_path``, ``image_path``, ``filename`` for the path; ``side`` or
``image_laterality`` for the laterality; ``view_position`` for the view; ``breast_birads``,
``bi_rads``; ``pathology``, ``breast_diagnosis``; ``StudyInstanceUID``, ``accession``).
A view value may carry the laterality ("RCC", "L-MLO") and the laterality may be spelled
out ("LEFT").

Exams with missing views are kept: the model masks what is missing. Rows whose file does not
exist are dropped with one warning that counts them; an image that fails to decode during
training is masked out (warned once per file) instead of ending a long run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from inference.model import BREASTS, DIAGNOSIS_CLASSES, VIEWS, birads_to_class
from inference.preprocess import PREPROCESS_VERSION, preprocess

log = logging.getLogger("mammo_node.data")

TRAIN_SPLITS = {"training", "train"}
TEST_SPLITS = {"test", "testing"}


@dataclass
class ExamRecord:
    exam_id: str
    paths: dict[str, Path] = field(default_factory=dict)         # slot -> file
    birads: dict[str, int | None] = field(default_factory=dict)  # "L"/"R" -> 1..5
    diagnosis: dict[str, int | None] = field(default_factory=dict)  # -> class index
    split: str = ""
    density: dict[str, int | None] = field(default_factory=dict)  # -> 0..3 (A..D)
    #: slot -> boxes (x0, y0, x1, y1) of its malignant / suspicious lesions, in the image's
    #: pixels, where the data set gives them (VinDr finding_annotations.csv, synth)
    lesions: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)


def parse_birads(value: str | None) -> int | None:
    """"BI-RADS 4", "4", "birads4", "4a" -> 4; anything else -> None."""
    if value is None:
        return None
    m = re.search(r"([0-6])", str(value))
    if not m:
        return None
    b = int(m.group(1))
    return b if 1 <= b <= 5 else None


_DIAGNOSIS_ALIASES = {"negative": "normal", "healthy": "normal", "no finding": "normal",
                      "benign_without_callback": "benign", "malignancy": "malignant",
                      "cancer": "malignant"}
# No numeric codes: "1" means benign in one data set and cancer in another (RSNA's 0/1), and
# a silently wrong label is worse than an unlabelled breast.


def parse_diagnosis(value: str | None) -> int | None:
    """"normal" / "benign" / "malignant" (and a few usual synonyms) -> class index."""
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
    """"L", "left", "R ", "RIGHT" -> "L" / "R"; anything else -> None."""
    v = (value or "").strip().upper()
    if v in ("L", "LEFT", "LT"):
        return "L"
    if v in ("R", "RIGHT", "RT"):
        return "R"
    return None


def parse_view(value: str | None) -> tuple[str | None, str | None]:
    """"CC" -> (None, "CC"); "RMLO", "L-CC", "l_mlo" -> ("R", "MLO"), ("L", "CC"), ...

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


def _add(records: dict[str, ExamRecord], exam_id: str, lat: str, view: str, path: Path,
         birads: int | None, diagnosis: int | None, split: str,
         density: int | None = None) -> bool:
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


def _check_files(records: dict[str, ExamRecord], source: Path, skipped_views: int
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
        log.warning("%s: %d image file(s) listed but not found (first: %s); those views are "
                    "treated as missing", source, len(missing), missing[0])
    if skipped_views:
        log.info("%s: %d row(s) are not CC/MLO views of L/R (extra views, unknown values): "
                 "not used", source, skipped_views)
    out = [r for r in records.values() if r.paths]
    if len(out) < len(records):
        log.warning("%s: %d exam(s) without any usable image dropped", source,
                    len(records) - len(out))
    return out
def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


_ALIASES = {  # canonical -> accepted (normalised) header names, in order of preference
    "path": ("path", "file", "file_path", "filepath", "image_path", "image", "filename",
             "file_name", "dicom_path"),
    "exam_id": ("exam_id", "study_id", "studyinstanceuid", "study_instance_uid", "study_uid",
                "accession", "accession_number", "exam"),
    "laterality": ("laterality", "side", "image_laterality", "imagelaterality", "breast"),
    "view": ("view", "view_position", "viewposition", "projection"),
    "birads": ("birads", "bi_rads", "breast_birads", "assessment"),
    "diagnosis": ("diagnosis", "breast_diagnosis", "pathology"),
    "density": ("density", "breast_density", "breast density", "acr", "composition"),
    "split": ("split", "subset", "set", "fold_name"),
}


def _column_map(fieldnames: list[str] | None, csv_path: Path, required: tuple[str, ...]
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
            raise ValueError(f"{csv_path}: column {key!r} missing (accepted names: "
                             f"{', '.join(_ALIASES[key])}; found: {', '.join(fieldnames or [])})")
    return out


def read_vindr(root: str | Path) -> list[ExamRecord]:
    """The VinDr-Mammo layout under ``root``."""
    root = Path(root)
    csv_path = root / "breast-level_annotations.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: not a VinDr-Mammo layout "
                                f"(use --format csv for a generic CSV)")
    records: dict[str, ExamRecord] = {}
    skipped = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("study_id", "image_id", "laterality", "view_position")
                   if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: column(s) {', '.join(missing)} missing")
        for row in reader:
            path = root / "images" / row["study_id"].strip() / f"{row['image_id'].strip()}.dicom"
            ok = _add(records, row["study_id"].strip(), row["laterality"], row["view_position"],
                      path, parse_birads(row.get("breast_birads")),
                      parse_diagnosis(row.get("breast_diagnosis")), row.get("split") or "",
                      parse_density(row.get("breast_density")))
            skipped += not ok
    _read_vindr_findings(root, records)
    return _check_files(records, csv_path, skipped)


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
            lat, v = parse_laterality(row.get("laterality")), parse_view(
                row.get("view_position") or "")[1]
            try:
                box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (KeyError, TypeError, ValueError):
                continue  # no box (a finding without a location)
            if rec is None or b is None or b < 4 or lat not in BREASTS or v is None:
                continue
            rec.lesions.setdefault(f"{lat}-{v}", []).append(box)  # type: ignore[arg-type]


def read_csv(csv_path: str | Path) -> list[ExamRecord]:
    """A generic CSV (or a folder holding ``labels.csv``); see the module docstring."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found")
    records: dict[str, ExamRecord] = {}
    skipped = 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = _column_map(list(reader.fieldnames or []), csv_path,
                           ("path", "laterality", "view"))
        get = lambda row, key: (row.get(cols[key]) or "").strip() if key in cols else ""  # noqa: E731
        for i, row in enumerate(reader):
            p = Path(get(row, "path"))
            if not get(row, "path"):
                raise ValueError(f"{csv_path}: row {i + 2}: empty path")
            # Without an exam column, images of one folder are one exam.
            exam_id = get(row, "exam_id") or str(p.parent)
            ok = _add(records, exam_id, get(row, "laterality"), get(row, "view"),
                      p if p.is_absolute() else csv_path.parent / p,
                      parse_birads(get(row, "birads")), parse_diagnosis(get(row, "diagnosis")),
                      get(row, "split"), parse_density(get(row, "density")))
            skipped += not ok
    return _check_files(records, csv_path, skipped)


def read_dataset(data: str | Path, fmt: str = "vindr") -> list[ExamRecord]:
    """Exams of a data set in one of the layouts (see :mod:`inference.readers` for the
    public data sets' own)."""
    from inference import readers

    table = {"vindr": read_vindr, "csv": read_csv, "cbis-ddsm": readers.read_cbis_ddsm,
             "rsna": readers.read_rsna, "cmmd": readers.read_cmmd,
             "inbreast": readers.read_inbreast}
    if fmt not in table:
        raise ValueError(f"unknown data format {fmt!r} ({', '.join(table)})")
    return table[fmt](data)


def select_split(records: list[ExamRecord], split: str | None) -> list[ExamRecord]:
    if not split or split == "all":
        return records
    names = TRAIN_SPLITS if split in TRAIN_SPLITS else TEST_SPLITS if split in TEST_SPLITS \
        else {split}
    return [r for r in records if r.split in names]


class ExamDataset(Dataset):
    """Exams as model inputs: images (4, 1, H, W), mask (4,), birads (2,), diagnosis (2,).

    Preprocessed views are cached as float16 ``.npy`` files under ``cache_dir`` (keyed by
    path, size and modification time), so later epochs skip decoding.
    """

    def __init__(self, records: list[ExamRecord], image_size: tuple[int, int], task: str,
                 cache_dir: str | Path | None = None) -> None:
        self.records = records
        self.size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.task = task
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._bad: set[Path] = set()
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def _view(self, path: Path) -> torch.Tensor | None:
        """The preprocessed view, or None (warned once) when it cannot be read."""
        try:
            return self._load(path)
        except Exception as exc:  # a corrupt or undecodable file must not end a long run
            if path not in self._bad:
                self._bad.add(path)
                log.warning("%s: cannot be read (%s); treated as a missing view", path, exc)
            return None

    def _load(self, path: Path) -> torch.Tensor:
        if self.cache_dir is None:
            return preprocess(path, self.size)[0]
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.size}|"
                           f"{PREPROCESS_VERSION}".encode()).hexdigest()
        f = self.cache_dir / f"{key}.npy"
        if f.exists():
            return torch.from_numpy(np.load(f).astype(np.float32))
        arr = preprocess(path, self.size)[0].numpy().astype(np.float16)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        tmp.replace(f)
        # The cached (float16) values, so that a cold and a warm cache give the same input.
        return torch.from_numpy(arr.astype(np.float32))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        H, W = self.size
        images = torch.zeros(len(VIEWS), 1, H, W)
        mask = torch.zeros(len(VIEWS), dtype=torch.bool)
        for k, slot in enumerate(VIEWS):
            if slot in rec.paths:
                view = self._view(rec.paths[slot])
                if view is not None:
                    images[k] = view
                    mask[k] = True
        birads = torch.tensor([birads_to_class(self.task, rec.birads.get(b)) for b in BREASTS])
        diag = torch.tensor([rec.diagnosis.get(b) if rec.diagnosis.get(b) is not None else -1
                             for b in BREASTS])
        raw = torch.tensor([rec.birads.get(b) or 0 for b in BREASTS])
        dens = torch.tensor([rec.density.get(b) if rec.density.get(b) is not None else -1
                             for b in BREASTS])
        return {"images": images, "mask": mask, "birads": birads, "diagnosis": diag,
                "birads_raw": raw, "density": dens}
