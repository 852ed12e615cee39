#!/usr/bin/env python3
"""Preprocessing time per image and per exam: the phantoms of ``benchmarks/latency.py`` vs
digitised film (issue 21 item 3).

What the worker's ``preprocess`` stage does for each view (``inference.api.predict_exam``):
the display (Modality LUT, window or the percentile fallback, MONOCHROME1) and
``preprocess_array`` (breast segmentation, crop, resize into the demo checkpoint's 512 x 256).
Decoding is not included (the same for both). Two exams: the latency benchmark's phantoms
(``--rows/--cols``, default its ``--real-size`` 4,700 x 2,900, 12 bits, windowed) and films of
``mammo-node synth --film`` (4,400-4,700 x 2,600-2,900 each, 16 and 12 bits, no window: grain,
film edges, scanner borders, a label, a large dark background). Per image: the median of
``--repeats`` runs, one thread; per exam: the four views side by side in four threads as
``predict_exam`` runs them. The ratio film / phantom is the figure (the goal: <= 1).

    python benchmarks/preprocess.py --film [--repeats 5] [--rows 4700 --cols 2900]
    python benchmarks/preprocess.py --film --films /tmp/films      # write the films once
    PYTHONPATH=/work/main python benchmarks/preprocess.py --film --films /tmp/films  # main

Without ``--film`` only the phantoms are timed. The tree it measures is the first on
``PYTHONPATH`` (this checkout when unset): ``PYTHONPATH=/other/tree`` times another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# benchmarks/ itself off the path (its inference.py would shadow the package); this checkout
# after PYTHONPATH, so that PYTHONPATH=/other/tree times that tree.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.append(str(Path(__file__).resolve().parent.parent))

from inference.display import decode, to_display  # noqa: E402
from inference.preprocess import preprocess_array  # noqa: E402
from inference.synthetic import make_mammogram, phantom  # noqa: E402

SLOTS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
SIZE = (512, 256)


def phantom_exam(rows: int, cols: int) -> list:
    rng = np.random.default_rng(1)  # as benchmarks/latency.py builds its exams
    bases = {v: phantom(rows, cols, v, rng) for v in ("CC", "MLO")}
    return [make_mammogram(lat, view, pixels=bases[view]) for lat, view in SLOTS]


def film_exam(folder: str | None) -> list:
    """The four films, written to / read from ``folder`` when given (``--films``)."""
    from pydicom import dcmread

    if folder and (Path(folder) / "3.dcm").exists():
        return [dcmread(Path(folder) / f"{i}.dcm") for i in range(4)]
    from inference.synthetic import film_size, write

    out = []
    for i, (lat, view) in enumerate(SLOTS):
        rows, cols = film_size(100 + i)
        out.append(
            make_mammogram(
                lat,
                view,
                rows=rows,
                cols=cols,
                seed=100 + i,
                film=True,
                bits_stored=16 if i % 2 == 0 else 12,
            )
        )
        if folder:
            write(out[-1], Path(folder) / f"{i}.dcm")
    return out


def one(ds, pixels: np.ndarray) -> None:
    preprocess_array(to_display(ds, pixels), SIZE)


def timed(exam: list, repeats: int) -> tuple[float, float]:
    """(median seconds per image, median seconds per exam of four views in four threads)."""
    pixels = [decode(ds) for ds in exam]
    for ds, px in zip(exam, pixels):  # warm: imports, allocator
        one(ds, px)
    per_image = []
    for _ in range(repeats):
        for ds, px in zip(exam, pixels):
            t0 = time.perf_counter()
            one(ds, px)
            per_image.append(time.perf_counter() - t0)
    per_exam = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(one, exam, pixels))
            per_exam.append(time.perf_counter() - t0)
    return statistics.median(per_image), statistics.median(per_exam)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--film", action="store_true", help="also time digitised film")
    ap.add_argument("--rows", type=int, default=4700)
    ap.add_argument("--cols", type=int, default=2900)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--films",
        metavar="DIR",
        help="keep the films there (written when "
        "missing, read when present): the same films timed on another tree",
    )
    args = ap.parse_args()
    import inference

    print(
        f"tree: {Path(inference.__file__).resolve().parent.parent}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    ph = phantom_exam(args.rows, args.cols)
    p_img, p_exam = timed(ph, args.repeats)
    print(
        f"phantom {args.rows}x{args.cols}: {p_img * 1000:.0f} ms per image, "
        f"{p_exam * 1000:.0f} ms per exam (4 views, 4 threads)",
        flush=True,
    )
    if args.film:
        fm = film_exam(args.films)
        f_img, f_exam = timed(fm, args.repeats)
        sizes = ", ".join(f"{ds.Rows}x{ds.Columns}/{ds.BitsStored}" for ds in fm)
        print(
            f"film ({sizes}): {f_img * 1000:.0f} ms per image, {f_exam * 1000:.0f} ms per exam",
            flush=True,
        )
        print(
            f"film / phantom: x{f_img / p_img:.2f} per image, x{f_exam / p_exam:.2f} per exam "
            f"(goal <= 1); load {os.getloadavg()[0]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
