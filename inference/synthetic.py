"""Synthetic mammograms: a breast phantom with optional lesions, in real vendors' header dialects.

Used by the tests, the benchmarks and ``mammo-node synth``. Nothing here is patient data.

Header dialects (``dialect=``):

* ``"standard"``: ImageLaterality + ViewPosition + ViewCodeSequence (SNOMED CT codes);
* ``"code-only"``: ViewPosition empty, only ViewCodeSequence (as some vendors do);
* ``"srt"``: ViewCodeSequence with the legacy SNOMED-RT ("SRT") codes, no ViewPosition;
* ``"legacy"``: Laterality (0020,0060) instead of ImageLaterality, ViewPosition only.

``photometric="MONOCHROME1"`` stores inverted pixel values. ``transfer_syntax`` may be any
syntax pydicom can encode here: uncompressed, deflated, RLE, JPEG-LS lossless, JPEG 2000
lossless.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MAMMO_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

_VIEW_SCT = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
    "ML": ("399260004", "medial-lateral"),
    "XCCL": ("399192008", "cranio-caudal exaggerated laterally"),
}
_VIEW_SRT = {
    "CC": ("R-10242", "cranio-caudal"),
    "MLO": ("R-10226", "medio-lateral oblique"),
    "ML": ("R-10224", "medio-lateral"),
    "XCCL": ("R-1024A", "cranio-caudal exaggerated laterally"),
}
_MODIFIERS = {
    "spot": ("399055006", "spot compression"),
    "mag": ("399163009", "magnification"),
    "implant-displaced": ("399209000", "implant displaced"),
}

UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # synthetic data only


@dataclass
class Lesion:
    """A synthetic finding: position as fractions of the breast's extent."""

    kind: str = "mass"  # mass | spiculated | calcifications
    x: float = 0.5  # 0 = chest wall, 1 = nipple
    y: float = 0.5  # 0 = top, 1 = bottom
    radius: float = 0.06  # fraction of the image height
    contrast: float = 0.35


def _upsample(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to (rows, cols)."""
    gr, gc = grid.shape
    ry = np.linspace(0, gr - 1, rows)
    rx = np.linspace(0, gc - 1, cols)
    y0 = np.floor(ry).astype(int).clip(0, gr - 2)
    x0 = np.floor(rx).astype(int).clip(0, gc - 2)
    fy = (ry - y0)[:, None].astype(np.float32)
    fx = (rx - x0)[None, :].astype(np.float32)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _outline(rng: np.random.Generator) -> tuple[float, float, float]:
    """A phantom's first three draws: how far the breast reaches toward the nipple, its half
    height and its vertical centre (``lesion_boxes`` replays them)."""
    return rng.uniform(0.62, 0.85), rng.uniform(0.70, 0.92), rng.uniform(-0.08, 0.08)


def lesion_boxes(
    laterality: str, rows: int, cols: int, seed: int, lesions: list[Lesion] | tuple[Lesion, ...]
) -> list[tuple[float, float, float, float, float, float]]:
    """Where the lesions of ``make_mammogram(laterality, ..., seed=seed, lesions=...)`` lie,
    in its pixel coordinates ((0, 0) the top-left corner of the top-left pixel): per lesion
    (centre x, centre y, x0, y0, x1, y1), the box where its profile exceeds 1/e."""
    depth, half, cy = _outline(np.random.default_rng(seed))
    out = []
    for les in lesions:
        col = les.x * depth * (cols - 1)
        row = ((les.y * 2.0 - 1.0) * half + cy + 1.0) / 2.0 * (rows - 1)
        if laterality == "R":
            col = cols - 1 - col
        x, y = col + 0.5, row + 0.5
        rx, ry = 2.0 * les.radius * rows, les.radius * rows  # d = 1 along each axis
        out.append(
            (
                x,
                y,
                max(0.0, x - rx),
                max(0.0, y - ry),
                min(float(cols), x + rx),
                min(float(rows), y + ry),
            )
        )
    return out


#: The fibroglandular share of the breast per BI-RADS density (5th edition: A < 25 %,
#: B 25-50 %, C 50-75 %, D > 75 %), the middle of each band.
FIBROGLANDULAR = {"A": 0.12, "B": 0.37, "C": 0.62, "D": 0.87}


def phantom(
    rows: int,
    cols: int,
    view: str,
    rng: np.random.Generator,
    lesions: list[Lesion] | tuple[Lesion, ...] = (),
    fibroglandular: float | None = None,
) -> np.ndarray:
    """A breast phantom, chest wall at column 0, as float32 in [0, 1] (1 = dense).
    ``fibroglandular``: the share of the breast that is dense tissue (``FIBROGLANDULAR``
    per density label); None: the phantom's own mild texture, as before."""
    yy = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    depth, half, cy = _outline(rng)
    r = np.sqrt((xx / depth) ** 2 + ((yy - cy) / half) ** 2)
    breast = np.clip((1.0 - r) * 12.0, 0.0, 1.0)  # soft skin edge
    thickness = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0))

    texture = np.zeros((rows, cols), np.float32)
    for cells, weight in ((6, 0.5), (14, 0.3), (34, 0.2)):
        g = rng.standard_normal((cells, max(2, int(cells * cols / rows)))).astype(np.float32)
        texture += weight * _upsample(g, rows, cols)
    density = rng.uniform(0.25, 0.6)  # drawn always: the stream stays the same
    if fibroglandular is not None:
        density = float(fibroglandular)
    # Fibroglandular tissue: where the texture is high, a share ``density`` of the breast
    # brighter (denser) than fat.
    img = breast * (0.25 + 0.35 * thickness + density * 0.25 * np.tanh(texture))
    if fibroglandular is not None:
        cut = (
            np.quantile(texture[breast > 0.5], 1.0 - np.clip(density, 0.0, 1.0))
            if (breast > 0.5).any()
            else np.inf
        )
        gland = np.clip((texture - cut) * 4.0, 0.0, 1.0) * breast
        img = img + 0.22 * gland

    if view == "MLO":  # pectoral muscle: a bright triangle at the top of the chest wall
        pw = rng.uniform(0.18, 0.3)
        ph = rng.uniform(0.45, 0.7)
        tri = (xx / pw + (yy + 1.0) / (2 * ph)) < 1.0
        img = np.where(tri & (breast > 0), np.maximum(img, 0.75), img)

    for les in lesions:
        ly = (les.y * 2.0 - 1.0) * half + cy
        lx = les.x * depth
        rad = les.radius * 2.0
        d = np.sqrt(((xx - lx) * cols / rows) ** 2 + (yy - ly) ** 2) / max(rad, 1e-3)
        if les.kind == "calcifications":
            spots = np.zeros_like(img)
            for _ in range(12):
                sx = lx + rng.normal(0, rad * 0.4) * rows / cols
                sy = ly + rng.normal(0, rad * 0.4)
                ds = np.sqrt(((xx - sx) * cols / rows) ** 2 + (yy - sy) ** 2)
                spots = np.maximum(spots, np.exp(-((ds / 0.008) ** 2)))
            img = img + les.contrast * 1.5 * spots * breast
        else:
            blob = np.exp(-(d**4)) if les.kind == "mass" else np.exp(-(d**2))
            if les.kind == "spiculated":
                ang = np.arctan2(yy - ly, (xx - lx) * cols / rows)
                spikes = np.clip(np.cos(ang * 9 + rng.uniform(0, 6.28)), 0, 1) ** 8
                blob = np.maximum(blob, spikes * np.exp(-d * 0.9) * (d < 2.5))
            img = img + les.contrast * blob * breast
    noise = rng.normal(0.0, 0.01, size=img.shape).astype(np.float32)
    return np.clip(img + noise * breast, 0.0, 1.0).astype(np.float32)


#: 5x7 bitmaps of the letters burned-in view labels use.
_FONT = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "C": ["01111", "10000", "10000", "10000", "10000", "10000", "01111"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
}
#: What :func:`add_artifacts` can burn in.
ARTIFACTS = ("label", "marker", "ruler", "film_edge", "collimator")


def _text(img: np.ndarray, text: str, top: int, left: int, px: int, value: float) -> None:
    for k, ch in enumerate(text):
        for i, row in enumerate(_FONT[ch]):
            for j, bit in enumerate(row):
                if bit == "1":
                    r, c = top + i * px, left + (k * 6 + j) * px
                    img[r : r + px, c : c + px] = value


def add_artifacts(
    img: np.ndarray,
    rng: np.random.Generator,
    kinds: tuple[str, ...] | list[str],
    label: str = "LCC",
) -> np.ndarray:
    """Burn film / vendor artifacts into a phantom (chest wall at column 0), outside the
    breast where the real ones are: a view label and a lead marker in the corners on the
    nipple side, a ruler along the nipple-side edge, bright film edges along the top, bottom
    and nipple side, collimator shadows (bright, unexposed bands) at the top and bottom."""
    out = img.copy()
    rows, cols = out.shape
    tissue = out > 0.02
    free_cols = np.flatnonzero(~tissue.any(axis=0))
    x0 = int(free_cols[0]) if free_cols.size else int(cols * 0.85)  # where the breast ends
    for kind in kinds:
        if kind == "label":
            px = max(2, rows // 90)
            width = len(label) * 6 * px
            left = max(x0 + px, cols - width - int(0.04 * cols) - 1)
            top = (
                int(rng.uniform(0.05, 0.12) * rows)
                if rng.random() < 0.5
                else rows - int(rng.uniform(0.08, 0.15) * rows)
            )
            _text(out, label, top, left, px, float(rng.uniform(0.85, 1.0)))
        elif kind == "marker":
            rad = max(3, rows // 60)
            cy = int(rng.uniform(0.75, 0.9) * rows)
            cx = int(rng.uniform(max(x0 + 2 * rad, cols * 0.8), cols - 2 * rad))
            yy, xx = np.ogrid[:rows, :cols]
            out[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2] = 1.0
        elif kind == "ruler":
            wd = max(3, cols // 60)
            c0 = cols - int(0.06 * cols)
            out[int(0.1 * rows) : int(0.9 * rows), c0 : c0 + wd] = 0.8
            for r in range(int(0.1 * rows), int(0.9 * rows), max(4, rows // 40)):
                out[r : r + 2, c0 - wd : c0] = 0.8
        elif kind == "film_edge":
            band = max(2, int(rng.uniform(0.01, 0.025) * min(rows, cols)))
            value = float(rng.uniform(0.8, 0.95))
            out[:band, :] = value
            out[-band:, :] = value
            out[:, -band:] = value
        elif kind == "collimator":
            band = int(rng.uniform(0.02, 0.05) * rows)
            value = float(rng.uniform(0.45, 0.7))
            out[:band, :] = value  # nothing under the collimator is imaged
            out[-band:, :] = value
        else:
            raise ValueError(f"unknown artifact {kind!r}; one of {ARTIFACTS}")
    return out


#: Digitised screen-film mammograms (CBIS-DDSM's scans): rows x cols ranges.
FILM_ROWS, FILM_COLS = (4400, 4700), (2600, 2900)


def film_size(seed: int) -> tuple[int, int]:
    """A film scan's (rows, cols), drawn from ``seed`` within :data:`FILM_ROWS` x
    :data:`FILM_COLS` (any value: not a multiple of anything)."""
    rng = np.random.default_rng([seed, 0x5123])
    return (
        int(rng.integers(FILM_ROWS[0], FILM_ROWS[1] + 1)),
        int(rng.integers(FILM_COLS[0], FILM_COLS[1] + 1)),
    )


@dataclass
class FilmLayout:
    """Where the breast phantom lies on a film (chest wall at column ``c0``)."""

    rows: int
    cols: int
    r0: int
    c0: int
    height: int
    width: int


def film_layout(rows: int, cols: int, seed: int) -> FilmLayout:
    """The breast's box on a ``rows`` x ``cols`` film, drawn from its own stream of ``seed``
    (the phantom's stream stays the plain phantom's, so :func:`lesion_boxes` replays it)."""
    rng = np.random.default_rng([seed, 0xF11])
    height = int(rng.uniform(0.66, 0.82) * rows)
    width = int(rng.uniform(0.52, 0.68) * cols)
    r0 = (
        int(rng.uniform(0.06, 0.94 - height / rows) * rows)
        if height / rows < 0.88
        else int(0.06 * rows)
    )
    c0 = int(rng.uniform(0.0, 0.012) * cols)  # a thin scanner border on the chest-wall side
    return FilmLayout(rows, cols, r0, c0, height, width)


def film_lesion_boxes(
    laterality: str, rows: int, cols: int, seed: int, lesions: list[Lesion] | tuple[Lesion, ...]
) -> list[tuple[float, float, float, float, float, float]]:
    """:func:`lesion_boxes` for ``make_mammogram(..., film=True)``: on the film's pixels."""
    lay = film_layout(rows, cols, seed)
    out = []
    for x, y, x0, y0, x1, y1 in lesion_boxes("L", lay.height, lay.width, seed, lesions):
        xs = [lay.c0 + v for v in (x, x0, x1)]
        if laterality == "R":
            xs = [cols - v for v in xs]
            xs[1], xs[2] = xs[2], xs[1]
        out.append((xs[0], lay.r0 + y, xs[1], lay.r0 + y0, xs[2], lay.r0 + y1))
    return out


def film_image(
    rows: int,
    cols: int,
    view: str,
    seed: int,
    lesions: list[Lesion] | tuple[Lesion, ...] = (),
    label: str = "LCC",
    fibroglandular: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A digitised screen-film mammogram, chest wall at column 0, float32 in [0, 1] (1 =
    dense): the phantom of ``seed`` on a large, dark, non-uniform exposed background, film
    grain everywhere, bright unexposed film edges of uneven width along the top, bottom and
    nipple side, a dark scanner border beyond the film on some sides (and a thin one at the
    chest wall), a bright paper label with dark letters in a corner on the nipple side and a
    few dust specks. (image, the breast, the artifacts: film edges, label and specks.)"""
    lay = film_layout(rows, cols, seed)
    rng = np.random.default_rng([seed, 0xF12])
    ph = phantom(
        lay.height, lay.width, view or "CC", np.random.default_rng(seed), lesions, fibroglandular
    )
    # Exposed film: dark, brighter toward one corner, with a slow wavy unevenness.
    yy = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    level = float(rng.uniform(0.03, 0.10))
    gy, gx = rng.uniform(-0.04, 0.04, 2).astype(np.float32)
    wave = _upsample(rng.standard_normal((5, 4)).astype(np.float32), rows, cols)
    img = level + gy * yy + gx * xx + np.float32(rng.uniform(0.01, 0.025)) * wave
    breast = np.zeros((rows, cols), bool)
    box = (slice(lay.r0, lay.r0 + lay.height), slice(lay.c0, lay.c0 + lay.width))
    img[box] = np.maximum(img[box], ph)
    breast[box] = ph > 0.02
    # Film grain, over everything.
    img += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(
        rng.uniform(0.008, 0.02)
    )
    art = np.zeros((rows, cols), bool)
    # Unexposed film edges (bright, their inner edge slanted: the film lay askew) and the
    # scanner's dark border beyond the film on some of the sides.
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    top_w = rng.uniform(0.008, 0.03) * rows + rng.uniform(-0.006, 0.006) * rows * xx
    bot_w = rng.uniform(0.008, 0.03) * rows + rng.uniform(-0.006, 0.006) * rows * xx
    side_w = rng.uniform(0.01, 0.05) * cols + rng.uniform(-0.01, 0.01) * cols * yy
    edge = (r < top_w) | (r >= rows - bot_w) | (c >= cols - side_w)
    edge &= ~breast
    img[edge] = np.float32(rng.uniform(0.78, 0.95)) + img[edge] * 0.3
    art |= edge
    for side in ("top", "bottom", "nipple"):
        if rng.random() < 0.5:
            w = int(rng.uniform(0.002, 0.008) * (cols if side == "nipple" else rows)) + 1
            sl = {"top": np.s_[:w, :], "bottom": np.s_[-w:, :], "nipple": np.s_[:, -w:]}[side]
            img[sl] = np.float32(rng.uniform(0.0, 0.02))
    img[:, : lay.c0] = np.float32(rng.uniform(0.0, 0.02))  # scanner border, chest-wall side
    # The paper label: a bright card with dark letters, in the background on the nipple side.
    px = max(2, rows // 160)
    lw, lh = (len(label) * 6 + 3) * px, 10 * px
    free = np.flatnonzero(breast.any(axis=0))
    x_min = (int(free[-1]) if free.size else lay.c0) + 4 * px
    x_max = int(cols - float(side_w.max())) - lw - 2 * px
    left = int(rng.uniform(x_min, max(x_min, x_max) + 1))
    top = (
        int(rng.uniform(0.06, 0.12) * rows)
        if rng.random() < 0.5
        else int(rows - rng.uniform(0.08, 0.14) * rows) - lh
    )
    card = np.s_[top : top + lh, left : left + lw]
    img[card] = np.float32(rng.uniform(0.8, 0.92))
    _text(img, label, top + int(1.5 * px), left + 2 * px, px, 0.1)
    art[card] = True
    # Dust and scratches: small bright specks on the background.
    for _ in range(int(rng.integers(3, 9))):
        sy, sx = int(rng.integers(0, rows)), int(rng.integers(0, cols))
        rad = int(rng.integers(2, 6))
        spot = np.s_[max(0, sy - rad) : sy + rad, max(0, sx - rad) : sx + rad]
        if not breast[spot].any():
            img[spot] = np.float32(rng.uniform(0.6, 0.9))
            art[spot] = True
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False), breast, art


def make_mammogram(
    laterality: str,
    view: str,
    *,
    rows: int = 512,
    cols: int = 416,
    seed: int = 0,
    lesions: list[Lesion] | tuple[Lesion, ...] = (),
    dialect: str = "standard",
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    for_processing: bool = False,
    modifier: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Phantom^Synthetic",
    accession: str = "ACC0001",
    acquisition: dt.datetime | None = None,
    bits_stored: int = 12,
    pixels: np.ndarray | None = None,
    artifacts: tuple[str, ...] | list[str] = (),
    density: str | None = None,
    film: bool = False,
) -> Dataset:
    """One synthetic Digital Mammography X-Ray image as a pydicom Dataset (with file meta).

    ``laterality`` is "L" or "R" (or "" to leave it out); ``view`` "CC", "MLO", "ML",
    "XCCL" (or "" to leave it out). Left breasts face right (chest wall at column 0), right
    breasts face left, as they hang on a viewer. ``artifacts``: any of :data:`ARTIFACTS`
    burned in (see :func:`add_artifacts`). ``film``: a digitised screen-film mammogram of
    ``rows`` x ``cols`` (see :func:`film_image`; :func:`film_size` draws a real film's size) with no
    window in its header, as CBIS-DDSM's scans (the display falls back to percentiles).
    """
    rng = np.random.default_rng(seed)
    if pixels is None:
        if density is not None and density not in FIBROGLANDULAR:
            raise ValueError(f"density: one of {list(FIBROGLANDULAR)}, got {density!r}")
        label = f"{laterality}{view}".strip() if laterality and view in ("CC", "MLO") else "LCC"
        fib = FIBROGLANDULAR[density] if density else None
        if film:
            if artifacts:
                raise ValueError("film carries its own artifacts: give film or artifacts")
            img = film_image(rows, cols, view, seed, lesions, label, fib)[0]
        else:
            img = phantom(rows, cols, view or "CC", rng, lesions, fib)
        if artifacts:
            img = add_artifacts(img, rng, artifacts, label=label)
    else:
        img = np.asarray(pixels, dtype=np.float32)
        rows, cols = img.shape
    if laterality == "R":
        img = img[:, ::-1]
    maxval = (1 << bits_stored) - 1
    values = np.round(img * (maxval * 0.9) + maxval * 0.02).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (maxval - values).astype(np.uint16)

    acquisition = acquisition or dt.datetime(2026, 1, 15, 9, 30, 0)
    sop_class = UID(MAMMO_FOR_PROCESSING if for_processing else MAMMO_FOR_PRESENTATION)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid(prefix=UID_ROOT))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = acquisition.strftime("%Y%m%d")
    ds.StudyTime = "090000"
    ds.ContentDate = ds.AcquisitionDate = acquisition.strftime("%Y%m%d")
    ds.ContentTime = ds.AcquisitionTime = acquisition.strftime("%H%M%S.%f")
    ds.AccessionNumber = accession
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.Manufacturer = "mammo-node synthetic"
    ds.ManufacturerModelName = f"{'film' if film else 'phantom'}-{dialect}"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19650101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
        "76752008",
        "SCT",
        "Breast",
    )
    ds.AnatomicRegionSequence = [region]
    ds.OrganExposed = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.AcquisitionContextSequence = []
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.StudyInstanceUID = study_uid or generate_uid(prefix=UID_ROOT)
    ds.SeriesInstanceUID = series_uid or generate_uid(prefix=UID_ROOT)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = (
        (["A", "R"] if laterality != "R" else ["P", "L"])
        if view == "CC"
        else (["A", "FR"] if laterality != "R" else ["P", "FL"])
    )
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "FILM" if film else "DIRECT"
    spacing = [0.05, 0.05] if film else [0.1, 0.1]  # film scanned at 50 um
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing

    if dialect == "legacy":
        if laterality:
            ds.Laterality = laterality
    elif laterality:
        ds.ImageLaterality = laterality
    codes = _VIEW_SRT if dialect == "srt" else _VIEW_SCT
    if dialect in ("standard", "legacy"):
        ds.ViewPosition = view
    elif dialect == "code-only":
        ds.ViewPosition = ""
    if dialect != "legacy" and view in codes:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = codes[view]
        item.CodingSchemeDesignator = "SRT" if dialect == "srt" else "SCT"
        mods = []
        if modifier:
            m = Dataset()
            m.CodeValue, m.CodeMeaning = _MODIFIERS[modifier]
            m.CodingSchemeDesignator = "SCT"
            mods.append(m)
        item.ViewModifierCodeSequence = mods
        ds.ViewCodeSequence = [item]
    elif modifier:
        ds.ViewPosition = f"{view} {'ID' if modifier == 'implant-displaced' else 'M'}"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    if not film:  # a film scan carries no window (CBIS-DDSM's do not)
        ds.WindowCenter = int(maxval * 0.5)
        ds.WindowWidth = int(maxval * 0.9)
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = values.tobytes()
    set_transfer_syntax(ds, transfer_syntax)
    return ds


def set_transfer_syntax(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Encode ``ds`` (in place) in ``transfer_syntax``."""
    if transfer_syntax in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    else:
        ds.compress(transfer_syntax)
    return ds


def write(ds: Dataset, path: str | Path) -> Path:
    """Write a dataset as a DICOM Part 10 file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_exam(
    *,
    seed: int = 0,
    rows: int = 512,
    cols: int = 416,
    views: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO"),
    lesions: dict[str, list[Lesion]] | None = None,
    study_uid: str | None = None,
    accession: str | None = None,
    patient_id: str | None = None,
    **kwargs: Any,
) -> list[Dataset]:
    """A synthetic screening exam: one image per requested slot, sharing one study."""
    study_uid = study_uid or generate_uid(prefix=UID_ROOT)
    series_uid = generate_uid(prefix=UID_ROOT)
    out = []
    for i, slot in enumerate(views):
        lat, view = slot.split("-")
        out.append(
            make_mammogram(
                lat,
                view,
                rows=rows,
                cols=cols,
                seed=seed * 10 + i,
                lesions=(lesions or {}).get(lat, []),
                study_uid=study_uid,
                series_uid=series_uid,
                accession=accession or f"A{seed:07d}",
                patient_id=patient_id or f"SYN{seed:06d}",
                **kwargs,
            )
        )
        out[-1].InstanceNumber = i + 1
    return out


BREAST_TOMOSYNTHESIS_SOP = "1.2.840.10008.5.1.4.1.1.13.1.3"


def make_tomo_volume(
    laterality: str,
    view: str,
    *,
    frames: int = 8,
    rows: int = 64,
    cols: int = 52,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "SYNTH-0001",
    accession: str = "ACC0001",
    acquisition: dt.datetime | None = None,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """A synthetic Breast Tomosynthesis Image (enhanced multi-frame, 1.2.840.10008.5.1.4.1.1.
    13.1.3) of one view: ``frames`` slices of a phantom (each with its own noise), shared
    functional groups (pixel measures, frame anatomy with FrameLaterality, VOI LUT) and one
    per-frame item (frame content, plane position) per slice, as DBT systems send them.
    ``pixels`` (frames x rows x cols uint16) replaces the phantom (a large volume built
    without computing one)."""
    base = make_mammogram(
        laterality,
        view,
        rows=rows,
        cols=cols,
        seed=seed,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        accession=accession,
        acquisition=acquisition,
    )
    if pixels is None:
        rng = np.random.default_rng(seed)
        one = np.frombuffer(base.PixelData, dtype=np.uint16).reshape(rows, cols)
        stack = np.stack(
            [
                np.clip(one.astype(np.int32) + rng.integers(-40, 40, one.shape), 0, 4095).astype(
                    np.uint16
                )
                for _ in range(frames)
            ]
        )
    else:
        stack = pixels
        frames, rows, cols = stack.shape
    ds = base
    ds.file_meta.MediaStorageSOPClassUID = UID(BREAST_TOMOSYNTHESIS_SOP)
    ds.SOPClassUID = UID(BREAST_TOMOSYNTHESIS_SOP)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.SeriesDescription = f"{laterality}{view} Tomosynthesis Reconstruction"
    ds.Modality = "MG"
    for keyword in (
        "ImagerPixelSpacing",
        "PixelSpacing",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "PatientOrientation",
        "ImageLaterality",
        "ViewPosition",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ContentQualification = "PRODUCT"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "TOMOSYNTHESIS"
    ds.AcquisitionDateTime = f"{ds.AcquisitionDate}{str(ds.AcquisitionTime).split('.')[0]}"
    ds.PresentationLUTShape = "IDENTITY"
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.1, 0.1]
    pm.SliceThickness = 1.0
    shared.PixelMeasuresSequence = [pm]
    anat = Dataset()
    anat.FrameLaterality = laterality
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
        "76752008",
        "SCT",
        "Breast",
    )
    anat.AnatomicRegionSequence = [region]
    shared.FrameAnatomySequence = [anat]
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 2048, 3686
    shared.FrameVOILUTSequence = [voi]
    po = Dataset()
    po.ImageOrientationPatient = [0, 1, 0, 0, 0, -1] if view == "MLO" else [0, 1, 0, -1, 0, 0]
    shared.PlaneOrientationSequence = [po]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(frames):
        item = Dataset()
        fc = Dataset()
        fc.FrameAcquisitionNumber = 1
        fc.DimensionIndexValues = [i + 1]
        fc.FrameComments = f"slice {i + 1}"
        item.FrameContentSequence = [fc]
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, float(i)]
        item.PlanePositionSequence = [pp]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    dim = Dataset()
    dim.DimensionIndexPointer = 0x00200032
    dim.FunctionalGroupPointer = 0x00209113
    ds.DimensionIndexSequence = [dim]
    ds.PixelData = np.ascontiguousarray(stack, dtype=np.uint16).tobytes()
    return ds


def _volume_base(rows: int, cols: int) -> np.ndarray:
    y, x = np.ogrid[:rows, :cols]
    r = np.hypot((y - rows / 2) / (rows / 2), x / (0.9 * cols))
    return np.where(r < 1.0, 1400 + 900 * (1 - r), 60).astype(np.uint16)


def volume_frame(n: int, rows: int, cols: int, base: np.ndarray | None = None) -> np.ndarray:
    """Frame ``n`` (1-based) of :func:`write_tomo_volume`: a breast-like half disc with a
    dense block whose height moves with the slice and the frame number in the first pixels
    of the first row (every frame differs, so a test can tell which one it got)."""
    out = (_volume_base(rows, cols) if base is None else base).copy()
    h = max(1, min(rows, cols) // 12)
    cy = int(rows * (0.25 + 0.5 * ((n * 37) % 97) / 97))
    out[max(cy - h, 0) : cy + h, cols // 5 : cols // 5 + 2 * h] += 1200
    out[0, :8] = n
    return out


def write_tomo_volume(
    path: str | Path,
    laterality: str = "L",
    view: str = "CC",
    *,
    frames: int = 60,
    rows: int = 512,
    cols: int = 512,
    **kwargs: Any,
) -> Path:
    """A Breast Tomosynthesis volume of any size written to ``path`` frame by frame (a 2 GB
    volume never held in memory): the header of :func:`make_tomo_volume` with ``frames``
    per-frame items, then native 16-bit Pixel Data, frame ``n`` being
    :func:`volume_frame` (n, rows, cols)."""
    import struct

    from pydicom.filewriter import dcmwrite

    ds = make_tomo_volume(laterality, view, pixels=np.zeros((frames, 1, 1), np.uint16), **kwargs)
    ds.Rows, ds.Columns = rows, cols
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    length = frames * rows * cols * 2
    if length >= 0xFFFFFFFF:
        raise ValueError("a native Pixel Data value holds less than 4 GiB")
    with open(path, "wb") as f:
        dcmwrite(f, ds, enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        base = _volume_base(rows, cols)
        for n in range(1, frames + 1):
            f.write(volume_frame(n, rows, cols, base).tobytes())
    return path
