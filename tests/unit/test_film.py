"""Digitised screen film (``mammo-node synth --film``, issue 21 item 3): real film sizes, no
window, grain, film edges, scanner borders and a label; the breast mask leaves the film's own
artifacts out; the fast preprocessing path gives the model the input the straightforward one
did, within the stated tolerance."""

from __future__ import annotations

import csv
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.display import to_display
from inference.preprocess import _bbox, preprocess_array
from inference.segment import segment_breast
from inference.synthetic import (
    FILM_COLS,
    FILM_ROWS,
    Lesion,
    film_image,
    film_lesion_boxes,
    film_size,
    make_mammogram,
)
from inference.synthetic_dataset import write_synthetic_dataset

pytestmark = pytest.mark.unit


def _reference(
    img: np.ndarray,
    size: tuple[int, int],
    segment: bool = True,
    crop: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int, int]]:
    """The model input as release 0.3 made it: the whole masked crop at full resolution, one
    antialiased resize (the slow path the fast one is held to). ``crop``: that crop (in the
    mirrored image, as Geometry.crop) instead of the one it would choose."""
    rows, cols = img.shape
    if segment:
        breast = segment_breast(img)
        flipped = not breast.chest_wall_left
        r0, r1, b0, b1 = breast.bbox()
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (b1 - b0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        o0, o1 = (max(0, b0 - pad_c), cols) if flipped else (0, min(cols, b1 + pad_c))
        if crop is not None:
            r0, r1 = crop[0], crop[1]
            o0, o1 = (cols - crop[3], cols - crop[2]) if flipped else (crop[2], crop[3])
        keep = breast.full()[r0:r1, o0:o1]
        crop_px = np.where(keep, img[r0:r1, o0:o1], np.float32(0.0)).astype(np.float32)
        if flipped:
            crop_px, keep = crop_px[:, ::-1], keep[:, ::-1]
        c0, c1 = (cols - o1, cols - o0) if flipped else (o0, o1)
    else:
        thr = max(0.05, float(np.percentile(img[::4, ::4], 5)) + 0.05)
        mask = img > thr
        flipped = bool(mask[:, cols // 2 :].sum() > mask[:, : cols // 2].sum())
        if flipped:
            img, mask = img[:, ::-1], mask[:, ::-1]
        r0, r1, c0, c1 = _bbox(mask)
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (c1 - c0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        c0, c1 = 0, min(cols, c1 + pad_c)
        crop_px, keep = img[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    crop_px, keep = np.ascontiguousarray(crop_px), np.ascontiguousarray(keep)
    H, W = size
    scale = min(H / crop_px.shape[0], W / crop_px.shape[1])
    nh, nw = max(1, round(crop_px.shape[0] * scale)), max(1, round(crop_px.shape[1] * scale))
    t = F.interpolate(
        torch.from_numpy(crop_px)[None, None],
        size=(nh, nw),
        mode="bilinear",
        align_corners=False,
        antialias=scale < 1,
    )[0, 0]
    out = torch.zeros(H, W)
    top = (H - nh) // 2
    out[top : top + nh, :nw] = t
    m = np.zeros((H, W), bool)
    m[top : top + nh, :nw] = (
        F.interpolate(
            torch.from_numpy(keep.astype(np.float32))[None, None], size=(nh, nw), mode="area"
        )[0, 0].numpy()
        > 0.5
    )
    return out, m, (r0, r1, c0, c1)


@functools.cache
def _films() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Two full-size films, (laterality, display, breast, artifacts) in stored orientation:
    a left CC at 16 bits and a right MLO at 12 bits stored as MONOCHROME1."""
    out = []
    for lat, view, seed, bits, photometric in (
        ("L", "CC", 11, 16, "MONOCHROME2"),
        ("R", "MLO", 12, 12, "MONOCHROME1"),
    ):
        rows, cols = film_size(seed)
        ds = make_mammogram(
            lat,
            view,
            rows=rows,
            cols=cols,
            seed=seed,
            film=True,
            bits_stored=bits,
            photometric=photometric,
        )
        assert FILM_ROWS[0] <= ds.Rows <= FILM_ROWS[1]
        assert FILM_COLS[0] <= ds.Columns <= FILM_COLS[1]
        assert "WindowCenter" not in ds and ds.BitsStored == bits and ds.DetectorType == "FILM"
        _, breast, art = film_image(rows, cols, view, seed, label=f"{lat}{view}")
        if lat == "R":
            breast, art = breast[:, ::-1], art[:, ::-1]
        out.append((lat, to_display(ds), breast, art))
    return out


@pytest.fixture
def films() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(Built once per process: a function cache, not a module fixture, so that the module
    also runs with ``-p no:xdist``, where tests/conftest.py's xdist_group mark is unknown.)"""
    return _films()


def test_film_looks_like_film(films):
    for _lat, display, breast, art in films:
        assert not (breast & art).any()
        background = ~breast & ~art
        # a large dark, uneven background with grain in it; bright film edges and a label
        assert background.mean() > 0.4
        bg = display[background]
        assert np.median(bg) < 0.25 and bg.std() > 0.005
        assert art.mean() > 0.02 and np.median(display[art]) > 0.6
        assert display[breast].mean() > np.median(bg) + 0.15


def test_the_film_breast_mask_leaves_out_its_edges_and_label(films):
    for lat, display, breast, art in films:
        mask = segment_breast(display)
        full = mask.full()
        assert mask.chest_wall_left == (lat == "L")
        assert (full & art).sum() == 0, f"{int((full & art).sum())} artifact px kept"
        iou = (full & breast).sum() / (full | breast).sum()
        assert iou > 0.9, iou


def test_fast_preprocessing_matches_the_full_resolution_path(films):
    """The stated tolerance (inference.preprocess.preprocess_array): over the same crop,
    every input pixel within 0.05 of the full-resolution path (display units, [0, 1]), mean
    below 0.001, the breast mask in the input within 1 % of its pixels; the crop is the
    full-resolution path's, trimmed by less than a block on its far sides (against that
    crop the mean difference stays below 0.002)."""
    for _lat, display, _, _ in films:
        for size in ((512, 256), (1024, 832)):
            x, geom = preprocess_array(display, size)
            ref, ref_mask, ref_crop = _reference(display, size, crop=geom.crop)
            assert ref_crop == geom.crop
            diff = np.abs(x[0].numpy() * 0.5 + 0.5 - ref.numpy())
            assert diff.max() < 0.05 and diff.mean() < 0.001, (size, diff.max(), diff.mean())
            assert geom.input_mask is not None
            assert (geom.input_mask != ref_mask).sum() <= 0.01 * ref_mask.sum()
            own, _, own_crop = _reference(display, size)
            assert own_crop[0] == geom.crop[0] and 0 <= own_crop[1] - geom.crop[1] < 16
            assert 0 <= (own_crop[3] - own_crop[2]) - (geom.crop[3] - geom.crop[2]) < 16
            assert np.abs(x[0].numpy() * 0.5 + 0.5 - own.numpy()).mean() < 0.002


def test_unsegmented_preprocessing_is_unchanged(films):
    """Checkpoints trained without segmentation (release 0.1.0) get exactly the old input."""
    _lat, display, _, _ = films[0]
    x, geom = preprocess_array(display, (512, 256), segment=False)
    ref, ref_mask, ref_crop = _reference(display, (512, 256), segment=False)
    assert geom.crop == ref_crop and (geom.input_mask == ref_mask).all()
    assert torch.equal(x[0] * 0.5 + 0.5, ref) or float((x[0] * 0.5 + 0.5 - ref).abs().max()) < 1e-6


def test_film_lesion_boxes_hold_the_lesions():
    rows, cols, seed = 1150, 700, 5
    les = [Lesion("mass", 0.5, 0.4, 0.05, 0.3)]
    for lat in ("L", "R"):
        with_l = make_mammogram(lat, "CC", rows=rows, cols=cols, seed=seed, film=True, lesions=les)
        plain = make_mammogram(lat, "CC", rows=rows, cols=cols, seed=seed, film=True)
        d = np.abs(to_display(with_l) - to_display(plain))
        ys, xs = np.nonzero(d > 0.5 * d.max())
        ((cx, cy, x0, y0, x1, y1),) = film_lesion_boxes(lat, rows, cols, seed, les)
        assert x0 <= xs.mean() <= x1 and y0 <= ys.mean() <= y1
        assert abs(xs.mean() + 0.5 - cx) < 10 and abs(ys.mean() + 0.5 - cy) < 10


def test_synth_film_writes_real_film_sizes(tmp_path):
    csv_path = write_synthetic_dataset(tmp_path, 1, seed=3, progress=False, film=True)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 3
    from pydicom import dcmread

    sizes = set()
    for r in rows:
        ds = dcmread(tmp_path / "images" / r["study_id"] / f"{r['image_id']}.dicom")
        assert (ds.Rows, ds.Columns) == (int(r["height"]), int(r["width"]))
        assert FILM_ROWS[0] <= ds.Rows <= FILM_ROWS[1]
        assert FILM_COLS[0] <= ds.Columns <= FILM_COLS[1]
        assert ds.BitsStored in (12, 16) and "WindowCenter" not in ds
        sizes.add((ds.Rows, ds.Columns))
    assert len(sizes) > 1  # each film its own size


def test_the_display_lookup_in_bands_equals_one_take():
    from inference.display import _lookup, _take, decode

    ds = make_mammogram("L", "CC", rows=1150, cols=701, seed=2, film=True, bits_stored=16)
    lut = _lookup(ds, decode(ds))
    assert lut is not None
    table, index = lut
    assert table.size > 4096  # a 16-bit film's table
    assert np.array_equal(_take(table, index), np.take(table, index))
    assert np.array_equal(to_display(ds), np.take(table, index))


@pytest.mark.parametrize("lo, slope", [(0, 1.0), (-1024, 1.0), (0, -0.5)])
def test_percentiles_from_the_histogram_equal_numpys(lo, slope):
    from inference.display import _IntegerSample

    rng = np.random.default_rng(7)
    sample = (rng.gamma(2.0, 3000.0, size=(300, 277)).clip(0, 60000) + lo).astype(
        np.int32 if lo < 0 else np.uint16
    )
    ours = _IntegerSample(sample, min(lo, 0)).percentiles([0.5, 99.8] if slope > 0 else [99.5, 0.2])
    want = np.percentile(sample.astype(np.float64) * slope, [0.5, 99.8])
    assert np.allclose([v * slope for v in ours], want, rtol=0, atol=1e-6)
