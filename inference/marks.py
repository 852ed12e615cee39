"""Marks: the regions of a view that drive its breast's malignancy output, with region scores.

From the model's evidence maps (``HybridCnnVssm.region_evidence``: attention weight x the
feature's contribution to the breast's suspicion logit, CAM-style), per breast:

1. each view's positive evidence, upsampled to the model input and bounded by the breast mask;
2. cut into connected regions (8-connected) where it exceeds half of that view's peak;
3. each region's **region score** = the breast's 0-100 score x the region's peak evidence /
   the breast's peak evidence (over both views): the most evidential region carries the
   breast's score, weaker ones proportionally less; regions under a fifth of the breast's peak
   or scoring under 1 are dropped;
4. at most ``max_marks`` per breast, by falling score (ties: view, then position);
5. centre (the evidence-weighted centroid) and outline (the region's convex hull) mapped back
   to the source image's pixel coordinates (padding, scale, crop and mirroring undone).

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
    index: int                                  # 1, 2, ... by falling score, per breast
    score: float                                # region score 0-100
    center: tuple[float, float]
    outline: list[tuple[float, float]] = field(default_factory=list)  # convex, not closed
    above_operating_point: bool = False
    area_px: float = 0.0                        # source pixels inside the region (approx.)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain), counter-clockwise, of (n, 2) points."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.asarray(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]
              ) -> float:
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


def find_marks(evidence: dict[str, np.ndarray], geometry: dict[str, Geometry],
               breast_scores: dict[str, float | None], max_marks: int = 3,
               operating_point: float | None = None,
               source_factor: dict[str, int] | None = None) -> dict[str, list[Mark]]:
    """slot -> its marks. ``evidence``: slot -> (h, w) map; ``breast_scores``: "L"/"R" ->
    0-100; ``source_factor``: slot -> source pixels per geometry pixel (an image decoded at
    a reduced resolution level)."""
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
            for peak, region, ev in _regions(maps[s]):
                if peak < MIN_PEAK_FRACTION * breast_peak:
                    continue
                ys, xs = np.nonzero(region)
                w = ev[ys, xs].astype(np.float64)
                cx = float((xs + 0.5) @ w / w.sum())
                cy = float((ys + 0.5) @ w / w.sum())
                corners = np.concatenate([np.stack([xs + dx, ys + dy], 1)
                                          for dx in (0, 1) for dy in (0, 1)])
                found.append((-peak, s, cy, cx, corners, len(xs)))
        found.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
        found = [t for t in found if float(score) * -t[0] / breast_peak >= MIN_REGION_SCORE]
        for i, (neg_peak, s, cy, cx, corners, n_px) in enumerate(found[:max_marks]):
            g, f = geometry[s], factors.get(s, 1)
            hull = _hull(corners)
            outline = input_to_original(hull, g) * f
            center = input_to_original(np.array([[cx, cy]]), g)[0] * f
            region_score = round(float(score) * (-neg_peak) / breast_peak, 1)
            marks[s].append(Mark(
                slot=s, index=i + 1, score=region_score,
                center=(round(float(center[0]), 2), round(float(center[1]), 2)),
                outline=[(round(float(x), 2), round(float(y), 2)) for x, y in outline],
                above_operating_point=operating_point is not None
                and region_score >= operating_point,
                area_px=round(n_px / max(g.scale, 1e-9) ** 2 * f * f, 1)))
    return marks
