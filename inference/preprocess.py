"""From a DICOM mammogram to the model's input tensor, and back for attention maps.

Steps: decode pixels (compressed syntaxes through the pylibjpeg / pyjpegls plugins), Modality
LUT, VOI LUT or window (LINEAR, LINEAR_EXACT, SIGMOID), MONOCHROME1 inversion, breast
segmentation (:mod:`inference.segment`: labels, markers, rulers, film edges and collimator
shadows blanked), mirroring so that every breast has its chest wall on the left, cropping to
the breast, aspect-preserving resize into the checkpoint's input size (padding right /
bottom-centre), normalisation. :class:`Geometry` remembers the transform and the breast mask so
that a map computed at the model's resolution can be drawn on the original image, and only on
the breast (:func:`map_to_original`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from inference.display import (  # noqa: F401  (re-exported: callers import them from here)
    PreprocessError,
    _display,
    decode,
    decode_reduced,
    guess_slot,
    load,
    to_display,
)
from inference.segment import BreastMask, block_mean, segment_breast

MEAN, STD = 0.5, 0.5  # input normalisation: [0, 1] -> [-1, 1]
#: Changes whenever the model input made from an image changes (training caches key on it).
PREPROCESS_VERSION = "3-block-crop"  # 3: the crop averaged in whole blocks (< 0.05 from 2)


@dataclass
class Geometry:
    """How the original image maps to the model input."""

    original_shape: tuple[int, int]  # rows, cols of the DICOM image
    flipped: bool  # mirrored left-right before cropping
    crop: tuple[int, int, int, int]  # r0, r1, c0, c1 (in the possibly mirrored image)
    scale: float  # crop -> resized
    offset: tuple[int, int]  # top, left padding in the model input
    input_shape: tuple[int, int]  # H, W of the model input
    #: The breast (original orientation); attention maps are bounded by it.
    breast: BreastMask | None = None
    #: The breast in the model input (bool H x W).
    input_mask: np.ndarray | None = None


def _bbox(mask: np.ndarray, min_frac: float = 0.01) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.mean(axis=1) > min_frac)
    cols = np.flatnonzero(mask.mean(axis=0) > min_frac)
    if rows.size == 0 or cols.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


#: The antialiased resize is left at least this much reduction of its own (see _reduction).
_RESIZE_SHARE = 2.0


def _reduction(shape: tuple[int, int], size: tuple[int, int]) -> int:
    """The integer block size a crop of ``shape`` is averaged by before its resize into
    ``size``: as large as leaves the antialiased resize :data:`_RESIZE_SHARE` of the
    reduction."""
    H, W = size
    scale = min(H / shape[0], W / shape[1])
    return max(1, int(1.0 / (_RESIZE_SHARE * scale)))


def _masked_block_mean(img: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``block_mean(where(keep, img, 0), k)`` and ``block_mean(keep, k)`` without the masked
    full-resolution copy: blocks wholly inside the breast are plain means, wholly outside
    zero, and only the blocks the breast's edge crosses (a thin band) are summed pixel by
    pixel. ``img`` and ``keep``: the same shape, a multiple of ``k`` both ways."""
    means, frac = block_mean(img, k), block_mean(keep, k)
    # block_mean scales by float32(1 / k^2): a full block may come out a hair under 1 (k = 11,
    # 22, 44, ...), so whole and empty blocks are told apart with half a pixel's margin.
    half = 0.5 / (k * k)
    whole = frac >= 1.0 - half
    out = np.where(whole, means, np.float32(0.0))
    bi, bj = np.nonzero((frac > half) & ~whole)
    if bi.size:
        d = np.arange(k)
        rr = bi[:, None, None] * k + d[None, :, None]
        cc = bj[:, None, None] * k + d[None, None, :]
        out[bi, bj] = np.where(keep[rr, cc], img[rr, cc], np.float32(0.0)).sum(
            axis=(1, 2), dtype=np.float32
        ) / np.float32(k * k)
    return out, frac


def preprocess_array(
    img: np.ndarray,
    size: tuple[int, int],
    segment: bool = True,
    mean: float = MEAN,
    std: float = STD,
) -> tuple[torch.Tensor, Geometry]:
    """Display image in [0, 1] -> normalised (1, H, W) tensor and its geometry.

    ``segment``: keep only the breast (everything else blanked to background) before
    cropping; off, the crop is "brighter than the background" as in release 0.1.0.
    ``mean`` / ``std``: the normalisation the checkpoint was trained with.

    With ``segment``, only the crop is read at full resolution, once: it is averaged in
    integer blocks (:func:`_reduction`; the crop trimmed by less than a block on its far
    sides so that blocks tile it, which the geometry records), the breast's edge blocks
    masked pixel by pixel, and the antialiased resize works from there. Against one
    antialiased resize of the same masked crop at full resolution the input differs by less
    than 0.05 (mean < 0.001) in display units, the breast mask in the input by less than 1 %
    of its pixels (``tests/unit/test_film.py``).
    """
    rows, cols = img.shape
    H, W = size
    if segment:
        breast = segment_breast(img)
        flipped = not breast.chest_wall_left  # chest wall goes left
        r0, r1, b0, b1 = breast.bbox()
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (b1 - b0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        # keep the chest wall edge (column 0, or the last one before mirroring)
        o0, o1 = (max(0, b0 - pad_c), cols) if flipped else (0, min(cols, b1 + pad_c))
    else:
        breast = None
        # Background (air) is the darkest part; the breast is what stands out of it.
        thr = max(0.05, float(np.percentile(img[::4, ::4], 5)) + 0.05)
        mask = img > thr
        half = cols // 2
        flipped = bool(mask[:, half:].sum() > mask[:, :half].sum())
        view = mask[:, ::-1] if flipped else mask
        r0, r1, c0, c1 = _bbox(view)
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (c1 - c0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        c1 = min(cols, c1 + pad_c)
        o0, o1 = (cols - c1, cols) if flipped else (0, c1)
    k = _reduction((r1 - r0, o1 - o0), size) if segment else 1
    if k > 1:  # whole blocks: trimmed away from the chest wall, by less than a block
        r1 -= (r1 - r0) % k
        if flipped:
            o0 += (o1 - o0) % k
        else:
            o1 -= (o1 - o0) % k
    keep = breast.region(r0, r1, o0, o1) if breast is not None else mask[r0:r1, o0:o1]
    region = img[r0:r1, o0:o1]
    if k > 1:  # k > 1 only when segmenting, so breast is set
        crop, frac = _masked_block_mean(region, keep, k)
    else:
        crop = region if breast is None else np.where(keep, region, np.float32(0.0))
        frac = keep.astype(np.float32)
    if flipped:
        crop, frac = crop[:, ::-1], frac[:, ::-1]
    crop = np.ascontiguousarray(crop, dtype=np.float32)
    frac = np.ascontiguousarray(frac, dtype=np.float32)
    c0, c1 = (cols - o1, cols - o0) if flipped else (o0, o1)
    scale = min(H / (r1 - r0), W / (c1 - c0))
    nh, nw = max(1, round((r1 - r0) * scale)), max(1, round((c1 - c0) * scale))
    t = torch.from_numpy(crop)[None, None]
    t = F.interpolate(
        t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale * k < 1
    )[0, 0]
    out = torch.zeros(H, W)
    top = (H - nh) // 2
    out[top : top + nh, :nw] = t
    out = (out - mean) / std
    input_mask = np.zeros((H, W), bool)
    input_mask[top : top + nh, :nw] = (
        F.interpolate(torch.from_numpy(frac)[None, None], size=(nh, nw), mode="area")[0, 0].numpy()
        > 0.5
    )
    geom = Geometry(
        (rows, cols),
        flipped,
        (r0, r1, c0, c1),
        scale,
        (top, 0),
        (H, W),
        breast=breast,
        input_mask=input_mask,
    )
    return out[None], geom


def preprocess(
    ds_or_path: Dataset | str | Path, size: tuple[int, int]
) -> tuple[torch.Tensor, Geometry]:
    """A DICOM mammogram -> (1, H, W) float tensor for the model, and its geometry."""
    ds = load(ds_or_path)
    return preprocess_array(to_display(ds), size)


def reduced(geom: Geometry, f: int) -> Geometry:
    """The geometry of the same image ``f`` times smaller (rows // f, cols // f): maps drawn
    with it land on the reduced image pixel for pixel (up to rounding at the edges)."""
    if f <= 1:
        return geom
    rows, cols = geom.original_shape[0] // f, geom.original_shape[1] // f
    r0, r1, c0, c1 = geom.crop
    breast = None
    if geom.breast is not None:
        breast = BreastMask(geom.breast.mask, (rows, cols), geom.breast.chest_wall_left)
    return Geometry(
        (rows, cols),
        geom.flipped,
        (
            r0 // f,
            max(r0 // f + 1, min(rows, r1 // f)),
            c0 // f,
            max(c0 // f + 1, min(cols, c1 // f)),
        ),
        geom.scale * f,
        geom.offset,
        geom.input_shape,
        breast=breast,
        input_mask=geom.input_mask,
    )


def map_to_original(amap: np.ndarray | torch.Tensor, geom: Geometry) -> np.ndarray:
    """A map over the model input (any resolution) -> a map over the original image."""
    m = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
    H, W = geom.input_shape
    m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    r0, r1, c0, c1 = geom.crop
    top, left = geom.offset
    nh, nw = max(1, round((r1 - r0) * geom.scale)), max(1, round((c1 - c0) * geom.scale))
    region = m[top : top + nh, left : left + nw][None, None]
    region = F.interpolate(region, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)[
        0, 0
    ]
    if geom.breast is not None:  # attention lies on the breast only
        cols = geom.original_shape[1]
        o0, o1 = (cols - c1, cols - c0) if geom.flipped else (c0, c1)
        keep = geom.breast.region(r0, r1, o0, o1)
        region = region * torch.from_numpy(
            np.ascontiguousarray(keep[:, ::-1] if geom.flipped else keep)
        )
    full = torch.zeros(geom.original_shape)
    full[r0:r1, c0:c1] = region
    out = full.numpy()
    return out[:, ::-1].copy() if geom.flipped else out


def input_to_original(points: np.ndarray, geom: Geometry) -> np.ndarray:
    """Points (x, y) over the model input -> the original image, both in continuous pixel
    coordinates whose (0, 0) is the top-left corner of the top-left pixel (DICOM's SCOORD
    and presentation-state convention): the padding offset, the scale and the crop undone,
    then the mirroring."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    r0, r1, c0, c1 = geom.crop
    top, left = geom.offset
    nh, nw = max(1, round((r1 - r0) * geom.scale)), max(1, round((c1 - c0) * geom.scale))
    x = c0 + (pts[:, 0] - left) * (c1 - c0) / nw
    y = r0 + (pts[:, 1] - top) * (r1 - r0) / nh
    rows, cols = geom.original_shape
    if geom.flipped:
        x = cols - x
    return np.stack([np.clip(x, 0.0, cols), np.clip(y, 0.0, rows)], axis=1)


def original_to_input(points: np.ndarray, geom: Geometry) -> np.ndarray:
    """The inverse of :func:`input_to_original`: points (x, y) on the original image -> the
    model input (mirroring, crop, scale and padding applied), same pixel convention."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    r0, r1, c0, c1 = geom.crop
    top, left = geom.offset
    nh, nw = max(1, round((r1 - r0) * geom.scale)), max(1, round((c1 - c0) * geom.scale))
    rows, cols = geom.original_shape
    x = cols - pts[:, 0] if geom.flipped else pts[:, 0]
    return np.stack(
        [left + (x - c0) * nw / (c1 - c0), top + (pts[:, 1] - r0) * nh / (r1 - r0)], axis=1
    )
