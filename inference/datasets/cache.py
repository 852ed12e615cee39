"""Exams as model inputs (the torch Dataset) over a cache of preprocessed views.

Preprocessed views are cached as float16 ``.npy`` files, keyed by the file's resolved path,
modification time and size, the input size and ``PREPROCESS_VERSION``, so later epochs skip
decoding. An image that fails to decode during training is masked out (warned once per file)
instead of ending a long run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from inference.datasets.records import ExamRecord
from inference.preprocess import PREPROCESS_VERSION, preprocess
from inference.tasks import BREASTS, VIEWS, birads_to_class

log = logging.getLogger("mammo_node.data")


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
        return {"images": images, "mask": mask, "birads": birads, "diagnosis": diag,
                "birads_raw": raw}
