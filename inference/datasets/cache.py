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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from inference.datasets.records import ExamRecord
from inference.preprocess import PREPROCESS_VERSION, preprocess
from inference.tasks import BREASTS, VIEWS, birads_to_class

log = logging.getLogger("mammo_node.data")


def cache_file(cache_dir: Path, path: Path, size: tuple[int, int]) -> Path:
    """The cache entry of one view: keyed by its resolved path, modification time and size,
    the input size and the preprocessing version (a changed file or step is a new entry)."""
    st = path.stat()
    key = hashlib.sha1(
        f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{size}|{PREPROCESS_VERSION}".encode()
    ).hexdigest()
    return cache_dir / f"{key}.npy"


def load_view(path: Path, size: tuple[int, int], cache_dir: Path | None) -> torch.Tensor:
    """The preprocessed view (1, H, W), from the cache when it is there (written when not)."""
    if cache_dir is None:
        return preprocess(path, size)[0]
    f = cache_file(cache_dir, path, size)
    if f.exists():
        return torch.from_numpy(np.load(f).astype(np.float32))
    arr = preprocess(path, size)[0].numpy().astype(np.float16)
    tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(f)  # atomic: a run cut off leaves no half-written entry
    # The cached (float16) values, so that a cold and a warm cache give the same input.
    return torch.from_numpy(arr.astype(np.float32))


def _prepare_one(job: tuple[Path, tuple[int, int], Path]) -> tuple[str, str]:
    path, size, cache_dir = job
    try:
        load_view(path, size, cache_dir)
        return str(path), ""
    except Exception as exc:  # reported and counted; the others go on
        return str(path), f"{type(exc).__name__}: {exc}"


def _prepare_init() -> None:
    torch.set_num_threads(1)  # one core per process: the pool is the parallelism


def prepare_cache(
    data: str | Path,
    fmt: str,
    image_size: tuple[int, int],
    cache_dir: str | Path | None = None,
    workers: int = -1,
    progress: bool = True,
) -> dict[str, Any]:
    """``mammo-node prepare``: every view of a data set into the cache, in ``workers``
    processes (-1: one per core), with a progress bar. Resumable: a view already cached (same
    key as training computes) is skipped; an unreadable one is counted and warned about."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from inference.datasets import read_dataset

    size = (int(image_size[0]), int(image_size[1]))
    cache = Path(cache_dir) if cache_dir else Path(data) / ".mammo-cache"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = sorted({p for r in read_dataset(data, fmt) for p in r.paths.values()})
    todo = [p for p in paths if not cache_file(cache, p, size).exists()]
    n = workers if workers > 0 else (os.cpu_count() or 1)
    n = max(1, min(n, len(todo) or 1))
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc="prepare", unit="view", disable=not progress)
    jobs = [(p, size, cache) for p in todo]
    if n == 1:
        _prepare_init()
        results = map(_prepare_one, jobs)
        for path, err in results:
            if err:
                failed.append((path, err))
            bar.update()
    else:
        with ProcessPoolExecutor(n, initializer=_prepare_init) as pool:
            for path, err in pool.map(_prepare_one, jobs, chunksize=4):
                if err:
                    failed.append((path, err))
                bar.update()
    bar.close()
    for path, err in failed[:5]:
        log.warning("%s: cannot be read (%s); training treats it as a missing view", path, err)
    if len(failed) > 5:
        log.warning("%d more unreadable view(s)", len(failed) - 5)
    return {
        "cache_dir": str(cache),
        "views": len(paths),
        "cached": len(paths) - len(todo),
        "built": len(todo) - len(failed),
        "failed": len(failed),
        "workers": n,
        "seconds": time.perf_counter() - t0,
    }


class ExamDataset(Dataset):
    """Exams as model inputs: images (4, 1, H, W), mask (4,), birads (2,), diagnosis (2,).

    Preprocessed views are cached as float16 ``.npy`` files under ``cache_dir`` (keyed by
    path, size and modification time), so later epochs skip decoding.
    """

    def __init__(
        self,
        records: list[ExamRecord],
        image_size: tuple[int, int],
        task: str,
        cache_dir: str | Path | None = None,
    ) -> None:
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
        return load_view(path, self.size, self.cache_dir)

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
        birads, diag, dens = self.labels(i)
        raw = torch.tensor([rec.birads.get(b) or 0 for b in BREASTS])
        return {
            "images": images,
            "mask": mask,
            "birads": birads,
            "diagnosis": diag,
            "birads_raw": raw,
            "density": dens,
        }

    def labels(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(birads class, diagnosis, density) per breast (L, R) of exam ``i``, -1 where
        unknown: from the record alone (no image is read), so that training can count the
        labelled breasts of a batch before it is loaded."""
        rec = self.records[i]
        birads = torch.tensor([birads_to_class(self.task, rec.birads.get(b)) for b in BREASTS])
        diag = torch.tensor(
            [rec.diagnosis.get(b) if rec.diagnosis.get(b) is not None else -1 for b in BREASTS]
        )
        dens = torch.tensor(
            [rec.density.get(b) if rec.density.get(b) is not None else -1 for b in BREASTS]
        )
        return birads, diag, dens

    def labelled_counts(self) -> np.ndarray:
        """(exams, 3): labelled breasts per exam for BI-RADS, diagnosis, density."""
        out = np.zeros((len(self.records), 3), np.int64)
        for i in range(len(self.records)):
            for k, t in enumerate(self.labels(i)):
                out[i, k] = int((t >= 0).sum())
        return out
