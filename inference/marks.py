"""Marks: the regions of a view that drive its breast's malignancy output, with region scores.

From the model's evidence maps (``HybridCnnVssm.region_evidence``: attention weight x the
feature's contribution to the breast's suspicion logit, CAM-style), per breast:

1. each view's positive evidence, upsampled bilinearly to the model input and bounded by the
   breast mask;
2. cut into connected regions (8-connected) where it exceeds half of that view's peak;
3. each region's **region score** = the breast's 0-100 score x the region's peak evidence /
   the breast's peak evidence (over both views): the most evidential region carries the
   breast's score, weaker ones proportionally less; regions under a fifth of the breast's peak
   or scoring under 1 are dropped;
4. each region's **centre refined on the image** (:func:`refine_center`, when the view's model
   input is given): the evidence grid is coarse (one value per 32 input pixels, about a lesion's
   size) and its peak sits up to a cell off the finding, so the centre is taken where the image
   itself shows a bright blob (a masked difference of Gaussians, the classic CAD candidate
   filter, at three scales up to half a cell) inside the region grown by one cell, weighted by
   the evidence as a prior to choose the blob; the centre is the response-weighted centroid of
   that blob's top half. Where the image shows no blob there, the evidence-weighted centroid
   stands. Two marks
   of a view whose centres end within half a cell of each other are one finding: the weaker
   is dropped;
5. at most ``max_marks`` per breast, by falling score (ties: view, then position);
6. centre and outline (the convex hull of the region and the refined blob) mapped back to the
   source image's pixel coordinates (padding, scale, crop and mirroring undone).

Deterministic: no randomness, a fixed order everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from inference.preprocess import Geometry, input_to_original

#: A region's threshold: this fraction of its view's peak evidence.
REGION_FRACTION = 0.5
#: Regions whose peak is under this fraction of the breast's peak are not marked.
MIN_PEAK_FRACTION = 0.2
#: Nor regions whose score is under this (a breast the model finds normal has no marks).
MIN_REGION_SCORE = 1.0


@dataclass
class Mark:
    """One region, in the source image's pixel coordinates (x = column, y = row; (0, 0) the
    top-left corner of the top-left pixel)."""

    slot: str
    index: int  # 1, 2, ... by falling score, per breast
    score: float  # region score 0-100
    center: tuple[float, float]
    outline: list[tuple[float, float]] = field(default_factory=list)  # convex, not closed
    above_operating_point: bool = False
    area_px: float = 0.0  # source pixels inside the region (approx.)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain), counter-clockwise, of (n, 2) points."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.asarray(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1])


def _row_extremes(region: np.ndarray) -> np.ndarray:
    """The pixel corners that can lie on a region's convex hull: those of each row's first
    and last pixel (the hull of all of them is the hull of the whole region)."""
    rows = np.flatnonzero(region.any(axis=1))
    first = region[rows].argmax(axis=1)
    last = region.shape[1] - 1 - region[rows, ::-1].argmax(axis=1)
    return np.concatenate(
        [np.stack([x, rows + dy], 1) for x in (first, last + 1) for dy in (0, 1)]
    ).astype(np.float64)


def evidence_at_input(evidence: np.ndarray, geom: Geometry) -> np.ndarray:
    """A view's (h, w) evidence -> (H, W) over the model input, positive part, breast only."""
    H, W = geom.input_shape
    t = torch.from_numpy(np.ascontiguousarray(evidence, dtype=np.float32))[None, None]
    m = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    m = np.maximum(m, 0.0)
    if geom.input_mask is not None:
        m = m * geom.input_mask
    return m


def _regions(e: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(peak, boolean region, its evidence) per connected region of ``e``."""
    peak = float(e.max()) if e.size else 0.0
    if peak <= 0.0:
        return []
    labels, n = ndimage.label(e >= REGION_FRACTION * peak, structure=np.ones((3, 3), bool))
    out = []
    for k in range(1, n + 1):
        region = labels == k
        out.append((float(e[region].max()), region, np.where(region, e, 0.0)))
    return out


#: The blob filter's inner scales, as fractions of the evidence grid's cell (DoG sigma, 2 sigma).
BLOB_SCALES = (0.125, 0.25, 0.5)
#: A blob counts where its response reaches this, in display units (the windowed image's
#: 0-1 range): about 1/60 of a faint mass's contrast, ten times what a flat breast gives.
MIN_BLOB_RESPONSE = 0.005


def _masked_blur(img: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``img`` over ``mask`` only (normalised convolution): the breast's
    edge, where the image drops to the blanked background, is not seen as contrast."""
    num = ndimage.gaussian_filter(img * mask, sigma, mode="constant", truncate=3.0)
    den = ndimage.gaussian_filter(mask, sigma, mode="constant", truncate=3.0)
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)


def blob_response(img: np.ndarray, mask: np.ndarray, cell: float) -> np.ndarray:
    """Bright-blob response of a model input image (display units) over the breast: the
    largest difference of Gaussians (sigma, 2 sigma) over ``BLOB_SCALES`` x ``cell``, positive
    part. A DoG with a fixed ratio answers a blob of any size with the same height at its own
    scale, so the scales compare; masses and calcification clusters are brighter than their
    surroundings in every vendor's presentation image (MONOCHROME1 is inverted before this).
    Computed on the image binned so that the smallest sigma is about 2 pixels, then upsampled
    bilinearly."""
    H, W = img.shape
    k = max(1, int(min(BLOB_SCALES) * cell // 2))
    h, w = -(-H // k), -(-W // k)
    pad = ((0, h * k - H), (0, w * k - W))
    m = np.pad(mask.astype(np.float32), pad).reshape(h, k, w, k).mean((1, 3))
    x = np.pad(img.astype(np.float32) * mask, pad).reshape(h, k, w, k).mean((1, 3))
    x = np.where(m > 0, x / np.maximum(m, 1e-6), 0.0)  # the breast's mean in each bin
    inner = [max(1.0, f * cell / k) for f in BLOB_SCALES]
    # each scale's outer blur is the next one's inner: every sigma blurred once
    blurred = {s: _masked_blur(x, m, s) for s in sorted(set(inner) | {2 * s for s in inner})}
    out = np.zeros_like(x)
    for s in inner:
        out = np.maximum(out, blurred[s] - blurred[2 * s])
    out = out * (m > 0.5)
    if k > 1:
        t = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None, None]
        out = F.interpolate(t, size=(h * k, w * k), mode="bilinear", align_corners=False)[
            0, 0, :H, :W
        ].numpy()
    return out * mask


def refine_center(
    region: np.ndarray, evidence: np.ndarray, blobs: np.ndarray, cell: float
) -> tuple[float, float, np.ndarray] | None:
    """(x, y, top part) of the blob that the evidence region points at, in model-input pixel
    coordinates, or None where the image shows no blob near it. ``evidence``: the view's map at
    the input size; ``blobs``: :func:`blob_response`; the search reaches one ``cell`` beyond the
    region (where the coarse evidence may be off); inside it, the blob response x the evidence
    (normalised to the region's peak, at least a tenth: a blob just off the region still
    counts) picks the blob (the product's peak); the centre is the blob-response-weighted
    centroid of the blob's connected top half around that peak (the evidence no longer
    weighs in: its slope would pull the centre back towards the coarse peak)."""
    near = ndimage.distance_transform_edt(~region) <= cell
    peak = float(evidence[region].max())
    prior = np.clip(evidence / max(peak, 1e-12), 0.1, 1.0)
    c = np.where(near & (blobs >= MIN_BLOB_RESPONSE), blobs * prior, 0.0)
    if float(c.max()) <= 0.0:
        return None
    iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
    b = np.where(near, blobs, 0.0)
    labels, _ = ndimage.label(b >= 0.5 * b[iy, ix], structure=np.ones((3, 3), bool))
    part = labels == labels[iy, ix]
    ys, xs = np.nonzero(part)
    w = b[ys, xs]
    return float((xs + 0.5) @ w / w.sum()), float((ys + 0.5) @ w / w.sum()), part


def find_marks(
    evidence: dict[str, np.ndarray],
    geometry: dict[str, Geometry],
    breast_scores: dict[str, float | None],
    max_marks: int = 3,
    operating_point: float | None = None,
    source_factor: dict[str, int] | None = None,
    images: dict[str, np.ndarray] | None = None,
) -> dict[str, list[Mark]]:
    """slot -> its marks. ``evidence``: slot -> (h, w) map; ``breast_scores``: "L"/"R" ->
    0-100; ``source_factor``: slot -> source pixels per geometry pixel (an image decoded at
    a reduced resolution level); ``images``: slot -> the view's (H, W) model input in display
    units (the preprocessed image the model read, before its normalisation: 0-1, blanked
    outside the breast), for centres refined on the image (:func:`refine_center`); without
    it, the evidence-weighted centroid."""
    if max_marks < 0:
        raise ValueError(f"max_marks: must be >= 0, got {max_marks}")
    factors = source_factor or {}
    marks: dict[str, list[Mark]] = {slot: [] for slot in evidence}
    for lat in ("L", "R"):
        score = breast_scores.get(lat)
        slots = sorted(s for s in evidence if s.startswith(lat) and s in geometry)
        if score is None or not slots or max_marks == 0:
            continue
        maps = {s: evidence_at_input(evidence[s], geometry[s]) for s in slots}
        breast_peak = max(float(m.max()) for m in maps.values())
        if breast_peak <= 0.0:
            continue
        found = []
        for s in slots:
            g = geometry[s]
            cell = g.input_shape[0] / max(1, evidence[s].shape[0])
            blobs = None  # computed for a view with a region to refine only
            for peak, region, ev in _regions(maps[s]):
                if peak < MIN_PEAK_FRACTION * breast_peak:
                    continue
                if blobs is None and images is not None and s in images:
                    img = np.asarray(images[s], dtype=np.float32).reshape(g.input_shape)
                    mask = (
                        g.input_mask if g.input_mask is not None else np.ones(g.input_shape, bool)
                    )
                    blobs = blob_response(img, mask, cell)
                ys, xs = np.nonzero(region)
                w = ev[ys, xs].astype(np.float64)
                cx = float((xs + 0.5) @ w / w.sum())
                cy = float((ys + 0.5) @ w / w.sum())
                shape = region
                refined = refine_center(region, maps[s], blobs, cell) if blobs is not None else None
                if refined is not None:
                    cx, cy, part = refined
                    shape = region | part
                corners = _row_extremes(shape)
                found.append((-peak, s, cy, cx, corners, int(region.sum()), cell))
        found.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
        # One finding, one mark: a weaker region whose centre ends within half a cell of a
        # stronger one's, on the same view, is the same blob.
        distinct: list[tuple] = []
        for t in found:
            if not any(
                u[1] == t[1] and np.hypot(u[2] - t[2], u[3] - t[3]) < 0.5 * t[6] for u in distinct
            ):
                distinct.append(t)
        found = [t for t in distinct if float(score) * -t[0] / breast_peak >= MIN_REGION_SCORE]
        for i, (neg_peak, s, cy, cx, corners, n_px, _) in enumerate(found[:max_marks]):
            g, f = geometry[s], factors.get(s, 1)
            hull = _hull(corners)
            outline = input_to_original(hull, g) * f
            center = input_to_original(np.array([[cx, cy]]), g)[0] * f
            region_score = round(float(score) * (-neg_peak) / breast_peak, 1)
            marks[s].append(
                Mark(
                    slot=s,
                    index=i + 1,
                    score=region_score,
                    center=(round(float(center[0]), 2), round(float(center[1]), 2)),
                    outline=[(round(float(x), 2), round(float(y), 2)) for x, y in outline],
                    above_operating_point=operating_point is not None
                    and region_score >= operating_point,
                    area_px=round(n_px / max(g.scale, 1e-9) ** 2 * f * f, 1),
                )
            )
    return marks
