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
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.segment import BreastMask, segment_breast

MEAN, STD = 0.5, 0.5  # input normalisation: [0, 1] -> [-1, 1]
#: Changes whenever the model input made from an image changes (training caches key on it).
PREPROCESS_VERSION = "2-segmented"


class PreprocessError(ValueError):
    """An image that cannot be turned into a model input (the message says why)."""


@dataclass
class Geometry:
    """How the original image maps to the model input."""

    original_shape: tuple[int, int]        # rows, cols of the DICOM image
    flipped: bool                          # mirrored left-right before cropping
    crop: tuple[int, int, int, int]        # r0, r1, c0, c1 (in the possibly mirrored image)
    scale: float                           # crop -> resized
    offset: tuple[int, int]                # top, left padding in the model input
    input_shape: tuple[int, int]           # H, W of the model input
    #: The breast (original orientation); attention maps are bounded by it.
    breast: BreastMask | None = None
    #: The breast in the model input (bool H x W).
    input_mask: np.ndarray | None = None


def load(ds_or_path: Dataset | str | Path) -> Dataset:
    if isinstance(ds_or_path, Dataset):
        return ds_or_path
    return dcmread(ds_or_path)


def guess_slot(ds: Dataset) -> str | None:
    """"L-CC", "L-MLO", "R-CC" or "R-MLO" from the header, or None: the node's own
    classifier (:func:`inference.views.classify`), whatever the SOP class."""
    from inference.views import classify

    return classify(ds, any_sop_class=True).slot


def _first(value) -> float:
    """First value of a possibly multi-valued DS."""
    if isinstance(value, (MultiValue, list, tuple)):
        return float(value[0])
    return float(value)


def _lut_range(item: Dataset) -> tuple[float, float]:
    """Output range of a VOI LUT: its smallest and largest entries.

    Not ``2^bits - 1`` from the LUT Descriptor: several vendors declare 16 bits per entry and
    fill the table with 12-bit values, which would leave the image almost black.
    """
    bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
    data = item.get("LUTData", None)
    if data is None:
        return 0.0, float((1 << bits) - 1)
    if isinstance(data, (bytes, bytearray)):
        entries = np.frombuffer(data, dtype="<u2" if bits > 8 and len(data) % 2 == 0 else "u1")
    else:
        entries = np.asarray(data if isinstance(data, (list, tuple, MultiValue)) else [data],
                             dtype=np.float64)
    if entries.size == 0:
        return 0.0, float((1 << bits) - 1)
    return float(entries.min()), float(entries.max())


def _window(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Apply the first VOI LUT or window of the dataset; [0, 1] or None when there is none."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi_lut

        # The LUT is indexed by (integer) modality values; pydicom warns on float input.
        lut_in = np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr
        out = apply_voi_lut(lut_in, ds, index=0).astype(np.float32)
        lo, hi = _lut_range(ds.VOILUTSequence[0])
        if hi <= lo:
            return None
        return np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if w <= 0:
        return None
    fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if fn == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (arr - c) / w))).astype(np.float32)
    if fn == "LINEAR_EXACT":
        return np.clip((arr - c) / w + 0.5, 0.0, 1.0).astype(np.float32)
    if w <= 1:
        return (arr > c - 0.5).astype(np.float32)
    return np.clip((arr - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0).astype(np.float32)


JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def decode(ds: Dataset) -> np.ndarray:
    """The stored pixel values, through the fastest installed decoder: pylibjpeg-rle for RLE
    (4x pydicom's own), CharLS (pyjpegls) for JPEG-LS (3.4x pylibjpeg-libjpeg, which pydicom
    would pick first), pylibjpeg-openjpeg / -libjpeg for the rest."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    try:
        if ts in JPEG_LS:
            from pydicom.pixels import get_decoder, pixel_array

            if "pyjpegls" in get_decoder(ts).available_plugins:
                return pixel_array(ds, decoding_plugin="pyjpegls")
        return ds.pixel_array
    except Exception as exc:  # missing plugin, corrupt stream, no pixel data
        raise PreprocessError(f"cannot decode pixel data ({ts or '?'}): {exc}") from exc


def decode_reduced(ds: Dataset, min_side: int) -> tuple[np.ndarray, int]:
    """The pixel values at a reduced resolution where the codec has one to give: JPEG 2000
    keeps the image at halved resolutions (its wavelet levels), so an image far larger than
    ``min_side`` is decoded 2^k times smaller (k as large as keeps the longer side >=
    ``min_side``), at a fraction of the cost. (values, k-fold factor); other syntaxes, or
    anything unusual, decode at full size (factor 1)."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    k = 0
    while max(rows, cols) >> (k + 1) >= min_side:
        k += 1
    if (ts not in JPEG_2000 or k == 0 or int(ds.get("NumberOfFrames", 1) or 1) != 1
            or int(ds.get("SamplesPerPixel", 1)) != 1
            or int(ds.get("PixelRepresentation", 0)) != 0
            or int(ds.get("BitsAllocated", 16)) != 16):
        return decode(ds), 1
    try:
        from io import BytesIO

        from PIL import Image
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(BytesIO(frame)) as im:
            setattr(im, "reduce", k)  # noqa: B010  (Jpeg2KImageFile: decode this level)
            im.load()
            arr = np.asarray(im)
        if arr.dtype != np.uint16 or arr.ndim != 2:
            raise ValueError(f"unexpected {arr.dtype} {arr.shape}")
        # Pillow scales samples to 16 bits; back to the stored precision.
        shift = 16 - int(ds.get("BitsStored", 16) or 16)
        return (arr >> shift) if shift > 0 else arr, 1 << k
    except Exception:
        return decode(ds), 1


def to_display(ds: Dataset, arr: np.ndarray | None = None) -> np.ndarray:
    """Decoded, windowed image in [0, 1] where brighter means denser (MONOCHROME2 sense).
    ``arr``: the pixel values when already decoded (:func:`decode`)."""
    if arr is None:
        arr = decode(ds)
    if arr.ndim == 3:  # multi-frame: the first frame; colour is not a mammogram
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise PreprocessError("colour image: not a mammogram")
        arr = arr[0]
    if arr.ndim != 2:
        raise PreprocessError(f"unexpected pixel array shape {arr.shape}")
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2 and arr.size > (1 << 16):
        # Integer pixels: the display is a function of the stored value alone, so it is
        # computed once per possible value and looked up (one pass over the image instead
        # of a handful of float passes); statistics come from a decimated sample.
        lo = min(int(arr.min()), 0)
        table = _display(np.arange(lo, int(arr.max()) + 1, dtype=np.float32), ds,
                         arr[::4, ::4].astype(np.float32))
        index = arr if lo == 0 else (arr.astype(np.int32) - lo)
        return np.take(table, index)
    arr = arr.astype(np.float32)
    return _display(arr, ds, arr[::4, ::4])


def _display(values: np.ndarray, ds: Dataset, sample: np.ndarray) -> np.ndarray:
    """Stored values -> display values in [0, 1] (Modality LUT, VOI, MONOCHROME1);
    ``sample``: stored values the percentile fallback (no usable window) is computed on."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    arr = values * np.float32(slope) + np.float32(intercept)
    out = _window(arr, ds)
    if out is None or float(out.max() - out.min()) < 1e-6:
        lo, hi = np.percentile(sample * np.float32(slope) + np.float32(intercept), [0.5, 99.8])
        if hi <= lo:
            hi = lo + 1.0
        out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def _bbox(mask: np.ndarray, min_frac: float = 0.01) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.mean(axis=1) > min_frac)
    cols = np.flatnonzero(mask.mean(axis=0) > min_frac)
    if rows.size == 0 or cols.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def preprocess_array(img: np.ndarray, size: tuple[int, int], segment: bool = True,
                     mean: float = MEAN, std: float = STD) -> tuple[torch.Tensor, Geometry]:
    """Display image in [0, 1] -> normalised (1, H, W) tensor and its geometry.

    ``segment``: keep only the breast (everything else blanked to background) before
    cropping; off, the crop is "brighter than the background" as in release 0.1.0.
    ``mean`` / ``std``: the normalisation the checkpoint was trained with."""
    rows, cols = img.shape
    if segment:
        # Only the crop is touched at full resolution: blanked outside the breast, mirrored.
        breast = segment_breast(img)
        flipped = not breast.chest_wall_left  # chest wall goes left
        r0, r1, b0, b1 = breast.bbox()
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (b1 - b0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        # keep the chest wall edge (column 0, or the last one before mirroring)
        o0, o1 = (max(0, b0 - pad_c), cols) if flipped else (0, min(cols, b1 + pad_c))
        keep = breast.region(r0, r1, o0, o1)
        crop = np.where(keep, img[r0:r1, o0:o1], np.float32(0.0)).astype(np.float32,
                                                                         copy=False)
        if flipped:
            crop, keep = crop[:, ::-1], keep[:, ::-1]
        crop, keep = np.ascontiguousarray(crop), np.ascontiguousarray(keep)
        c0, c1 = (cols - o1, cols - o0) if flipped else (o0, o1)
    else:
        breast = None
        # Background (air) is the darkest part; the breast is what stands out of it.
        thr = max(0.05, float(np.percentile(img[::4, ::4], 5)) + 0.05)
        mask = img > thr
        half = cols // 2
        flipped = bool(mask[:, half:].sum() > mask[:, :half].sum())
        if flipped:
            img, mask = img[:, ::-1], mask[:, ::-1]
        r0, r1, c0, c1 = _bbox(mask)
        pad_r, pad_c = int(0.02 * (r1 - r0)), int(0.02 * (c1 - c0))
        r0, r1 = max(0, r0 - pad_r), min(rows, r1 + pad_r)
        c0, c1 = 0, min(cols, c1 + pad_c)
        crop = np.ascontiguousarray(img[r0:r1, c0:c1])
        keep = np.ascontiguousarray(mask[r0:r1, c0:c1])
    H, W = size
    scale = min(H / crop.shape[0], W / crop.shape[1])
    nh, nw = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    t = torch.from_numpy(crop)[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=scale < 1)[0, 0]
    out = torch.zeros(H, W)
    top = (H - nh) // 2
    out[top:top + nh, :nw] = t
    out = (out - mean) / std
    input_mask = np.zeros((H, W), bool)
    m = torch.from_numpy(keep.astype(np.float32))
    input_mask[top:top + nh, :nw] = F.interpolate(m[None, None], size=(nh, nw),
                                                  mode="area")[0, 0].numpy() > 0.5
    geom = Geometry((rows, cols), flipped, (r0, r1, c0, c1), scale, (top, 0), (H, W),
                    breast=breast, input_mask=input_mask)
    return out[None], geom


def preprocess(ds_or_path: Dataset | str | Path,
               size: tuple[int, int]) -> tuple[torch.Tensor, Geometry]:
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
    return Geometry((rows, cols), geom.flipped,
                    (r0 // f, max(r0 // f + 1, min(rows, r1 // f)),
                     c0 // f, max(c0 // f + 1, min(cols, c1 // f))),
                    geom.scale * f, geom.offset, geom.input_shape, breast=breast,
                    input_mask=geom.input_mask)


def map_to_original(amap: np.ndarray | torch.Tensor, geom: Geometry) -> np.ndarray:
    """A map over the model input (any resolution) -> a map over the original image."""
    m = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
    H, W = geom.input_shape
    m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    r0, r1, c0, c1 = geom.crop
    top, left = geom.offset
    nh, nw = max(1, round((r1 - r0) * geom.scale)), max(1, round((c1 - c0) * geom.scale))
    region = m[top:top + nh, left:left + nw][None, None]
    region = F.interpolate(region, size=(r1 - r0, c1 - c0), mode="bilinear",
                           align_corners=False)[0, 0]
    if geom.breast is not None:  # attention lies on the breast only
        cols = geom.original_shape[1]
        o0, o1 = (cols - c1, cols - c0) if geom.flipped else (c0, c1)
        keep = geom.breast.region(r0, r1, o0, o1)
        region = region * torch.from_numpy(np.ascontiguousarray(
            keep[:, ::-1] if geom.flipped else keep))
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
