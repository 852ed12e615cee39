"""Breast segmentation: keep the breast, blank everything else.

Film and digital mammograms carry more than the breast: burned-in view labels ("LCC",
"RMLO"), lead markers, rulers, the bright edges of digitised film, collimator shadows. They are
as bright as tissue, so cropping to "what is brighter than the background" keeps them, and a
model's attention happily lands on letters. The breast is the largest connected region of
tissue, attached to the chest-wall edge; everything else goes.

Steps, on a copy decimated to at most :data:`WORK_SIDE` pixels a side (the statistics and
shapes need no more; full resolution would cost ~1 s on a 13-megapixel view):

1. a threshold between background and tissue (Otsu on the decimated image);
2. the chest-wall side: the left or right half with more tissue;
3. bands along the three other image edges that are mostly bright (film edges, collimator
   shadows, rulers laid along the edge) are peeled off row by row / column by column;
4. a small opening cuts thin bridges (a label touching the skin);
5. the largest connected component, its holes filled, grown into the dim skin line
   (hysteresis: neighbouring pixels above a lower threshold, within a few pixels).

The pectoral muscle is bright and joined to the breast, so it stays. Input is a display image
in [0, 1] where brighter is denser (MONOCHROME1 already inverted by ``to_display``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: The longest side of the image the segmentation works on.
WORK_SIDE = 512
#: A band along an edge is peeled while this fraction of its line is bright ...
_BAND_FRACTION = 0.7
#: ... up to this fraction of the image's extent.
_BAND_MAX = 0.12


@dataclass
class BreastMask:
    """The breast mask at the working resolution, and how it maps onto the image."""

    mask: np.ndarray  # bool (h, w), decimated
    shape: tuple[int, int]  # the image's (rows, cols)
    chest_wall_left: bool  # tissue hugs column 0

    @property
    def step(self) -> tuple[float, float]:
        return self.shape[0] / self.mask.shape[0], self.shape[1] / self.mask.shape[1]

    def full(self) -> np.ndarray:
        """The mask at the image's size (nearest neighbour)."""
        return self.region(0, self.shape[0], 0, self.shape[1])

    def region(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The mask over image rows r0:r1, columns c0:c1 (nearest neighbour)."""
        rows, cols = self.shape
        h, w = self.mask.shape
        ri = np.minimum((np.arange(r0, r1) * h) // rows, h - 1)
        ci = np.minimum((np.arange(c0, c1) * w) // cols, w - 1)
        # Rows first (a small array), then one 1-D take per row: 7x faster at 13 megapixels
        # than one broadcast 2-D fancy index, the same values.
        return np.take(self.mask[ri], ci, axis=1)

    def bbox(self) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1) of the breast in image pixels (the whole image when empty)."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0 or cols.size == 0:
            return 0, self.shape[0], 0, self.shape[1]
        sr, sc = self.step
        return (
            int(rows[0] * sr),
            min(self.shape[0], int(np.ceil((rows[-1] + 1) * sr))),
            int(cols[0] * sc),
            min(self.shape[1], int(np.ceil((cols[-1] + 1) * sc))),
        )

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())


def decimate(img: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """Block-mean the image so that its longer side is at most ``side`` (cheap: one pass)."""
    f = max(1, int(np.ceil(max(img.shape) / side)))
    if f == 1:
        return np.asarray(img, dtype=np.float32)
    return block_mean(img, f)


def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """The mean of each ``f`` x ``f`` block (rows and columns past the last whole block
    dropped), float32. Summed down the rows first (whole contiguous rows at a time, no copy
    of the image even when its width is no multiple of ``f``), then across: 4x faster on a
    13-megapixel view than one mean over both block axes, equal to float32 rounding."""
    rows, cols = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    if f <= 1 or rows == 0 or cols == 0:
        return np.asarray(img, dtype=np.float32)
    # (blocks, f, columns) as a view of the image itself, whatever its strides (a crop, a
    # mirrored view): no copy of it, nor a float copy of a bool mask.
    rs, cs = img.strides
    v = np.lib.stride_tricks.as_strided(
        img, shape=(rows // f, f, img.shape[1]), strides=(rs * f, rs, cs), writeable=False
    )
    s = v.sum(axis=1, dtype=np.float32)[:, :cols]
    out = s.reshape(rows // f, cols // f, f).sum(axis=2, dtype=np.float32)
    out *= np.float32(1.0 / (f * f))
    return out


def otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def _peel(bright: np.ndarray, chest_left: bool) -> np.ndarray:
    """Clear bands along the top, bottom and nipple-side edges that are mostly bright."""
    out = bright.copy()
    h, w = out.shape
    lim_r, lim_c = max(1, int(_BAND_MAX * h)), max(1, int(_BAND_MAX * w))
    for i in range(lim_r):  # top
        if out[i].mean() < _BAND_FRACTION:
            break
        out[i] = False
    for i in range(h - 1, h - 1 - lim_r, -1):  # bottom
        if out[i].mean() < _BAND_FRACTION:
            break
        out[i] = False
    cols = range(w - 1, w - 1 - lim_c, -1) if chest_left else range(lim_c)
    for j in cols:  # the edge opposite the chest wall
        if out[:, j].mean() < _BAND_FRACTION:
            break
        out[:, j] = False
    return out


def _open_square(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary opening by a (2r+1) square, as a row segment then a column segment (the square
    is their product: the same pixels as ``binary_opening`` with the square, ~3x faster)."""
    row, col = np.ones((1, 2 * r + 1), bool), np.ones((2 * r + 1, 1), bool)
    eroded = ndimage.binary_erosion(ndimage.binary_erosion(mask, row), col)
    return ndimage.binary_dilation(ndimage.binary_dilation(eroded, row), col)


def segment_breast(img: np.ndarray) -> BreastMask:
    """The breast of a display image in [0, 1] (see the module docstring)."""
    small = decimate(img)
    h, w = small.shape
    if small.size == 0 or float(small.max() - small.min()) < 1e-6:
        return BreastMask(np.ones((max(h, 1), max(w, 1)), bool), img.shape, True)
    thr = otsu(small)
    bg = float(np.percentile(small, 2))
    thr = max(thr, bg + 0.02)
    bright = small > thr
    chest_left = bool(bright[:, : w // 2].sum() >= bright[:, w - w // 2 :].sum())
    bright = _peel(bright, chest_left)
    r = max(1, round(min(h, w) / 170))  # ~3 px at 512: cuts hairline bridges only
    opened = _open_square(bright, r)
    labels, n = ndimage.label(opened)
    if n == 0:
        labels, n = ndimage.label(bright)
        if n == 0:
            return BreastMask(np.ones((h, w), bool), img.shape, chest_left)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    # The breast: the largest component; among near-equals the one on the chest-wall edge.
    edge_col = labels[:, 0] if chest_left else labels[:, -1]
    on_edge = set(np.unique(edge_col[edge_col > 0]).tolist())
    best = max(range(1, n + 1), key=lambda k: sizes[k - 1] * (1.5 if k in on_edge else 1.0))
    core = labels == best
    core = ndimage.binary_fill_holes(core)
    # The skin line: dimmer than the threshold, next to the tissue.
    low = bg + 0.35 * (thr - bg)
    grow = max(2, round(min(h, w) / 60))
    # ``grow`` cross-shaped dilations: every pixel within that taxicab distance of the core
    # (one distance transform instead of ``grow`` passes).
    near = ndimage.distance_transform_cdt(~core, metric="taxicab") <= grow
    mask = ndimage.binary_fill_holes(core | (near & (small > low) & _peel(small > low, chest_left)))
    lab2, _ = ndimage.label(mask)
    keep = np.unique(lab2[core])
    mask = np.isin(lab2, keep[keep > 0])
    return BreastMask(mask.astype(bool), img.shape, chest_left)
