"""Data sets: the VinDr-Mammo layout, a generic CSV, and the torch Dataset over exams.

VinDr-Mammo: ``images/<study_id>/<image_id>.dicom`` and ``breast-level_annotations.csv``
with ``study_id, series_id, image_id, laterality, view_position, height, width,
breast_birads, breast_density, split`` (``breast_diagnosis`` is read when present, as our
synthetic data writes it).

Generic CSV: one row per image with ``path`` (relative to the CSV's folder or absolute),
``exam_id`` (or ``study_id``), ``laterality`` (L/R), ``view`` (CC/MLO), and optional
``birads`` (1-5), ``diagnosis`` (normal/benign/malignant) and ``split``.

Exams with missing views are kept: the model masks what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from inference.model import BREASTS, DIAGNOSIS_CLASSES, VIEWS, birads_to_class
from inference.preprocess import preprocess

TRAIN_SPLITS = {"training", "train"}
TEST_SPLITS = {"test", "testing"}


@dataclass
class ExamRecord:
    exam_id: str
    paths: dict[str, Path] = field(default_factory=dict)         # slot -> file
    birads: dict[str, int | None] = field(default_factory=dict)  # "L"/"R" -> 1..5
    diagnosis: dict[str, int | None] = field(default_factory=dict)  # -> class index
    split: str = ""


def parse_birads(value: str | None) -> int | None:
    """"BI-RADS 4", "4", "birads4", "4a" -> 4; anything else -> None."""
    if value is None:
        return None
    m = re.search(r"([0-6])", str(value))
    if not m:
        return None
    b = int(m.group(1))
    return b if 1 <= b <= 5 else None


def parse_diagnosis(value: str | None) -> int | None:
    v = (value or "").strip().lower()
    return DIAGNOSIS_CLASSES.index(v) if v in DIAGNOSIS_CLASSES else None


def _add(records: dict[str, ExamRecord], exam_id: str, lat: str, view: str, path: Path,
         birads: int | None, diagnosis: int | None, split: str) -> None:
    lat, view = lat.strip().upper()[:1], view.strip().upper()
    rec = records.setdefault(exam_id, ExamRecord(exam_id=exam_id, split=split.strip().lower()))
    if lat in BREASTS:
        if birads is not None:
            rec.birads[lat] = max(birads, rec.birads.get(lat) or 0)
        if diagnosis is not None:
            rec.diagnosis[lat] = max(diagnosis, rec.diagnosis.get(lat) or 0)
    slot = f"{lat}-{view}"
    if slot in VIEWS and slot not in rec.paths:
        rec.paths[slot] = path


def read_vindr(root: str | Path) -> list[ExamRecord]:
    root = Path(root)
    csv_path = root / "breast-level_annotations.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: not a VinDr-Mammo layout")
    records: dict[str, ExamRecord] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            path = root / "images" / row["study_id"] / f"{row['image_id']}.dicom"
            _add(records, row["study_id"], row["laterality"], row["view_position"], path,
                 parse_birads(row.get("breast_birads")),
                 parse_diagnosis(row.get("breast_diagnosis")), row.get("split", ""))
    return list(records.values())


def read_csv(csv_path: str | Path) -> list[ExamRecord]:
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    records: dict[str, ExamRecord] = {}
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            for key in ("path", "laterality", "view"):
                if key not in row:
                    raise ValueError(f"{csv_path}: column {key!r} missing")
            exam_id = row.get("exam_id") or row.get("study_id")
            if not exam_id:
                raise ValueError(f"{csv_path}: row {i + 2}: exam_id (or study_id) missing")
            p = Path(row["path"])
            _add(records, exam_id, row["laterality"], row["view"],
                 p if p.is_absolute() else csv_path.parent / p,
                 parse_birads(row.get("birads")), parse_diagnosis(row.get("diagnosis")),
                 row.get("split", ""))
    return list(records.values())


def read_dataset(data: str | Path, fmt: str = "vindr") -> list[ExamRecord]:
    if fmt == "vindr":
        return read_vindr(data)
    if fmt == "csv":
        return read_csv(data)
    raise ValueError(f"unknown data format {fmt!r} (vindr or csv)")


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
        self.size = tuple(image_size)
        self.task = task
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def _view(self, path: Path) -> torch.Tensor:
        if self.cache_dir is None:
            return preprocess(path, self.size)[0]
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.size}"
                           .encode()).hexdigest()
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
                images[k] = self._view(rec.paths[slot])
                mask[k] = True
        birads = torch.tensor([birads_to_class(self.task, rec.birads.get(b)) for b in BREASTS])
        diag = torch.tensor([rec.diagnosis.get(b) if rec.diagnosis.get(b) is not None else -1
                             for b in BREASTS])
        raw = torch.tensor([rec.birads.get(b) or 0 for b in BREASTS])
        return {"images": images, "mask": mask, "birads": birads, "diagnosis": diag,
                "birads_raw": raw}
