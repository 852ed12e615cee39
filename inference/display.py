"""Decoding and display of a DICOM image without torch: pixels (compressed syntaxes through
the pylibjpeg / pyjpegls plugins, JPEG 2000 at a reduced resolution level), Modality LUT, VOI
LUT or window (LINEAR, LINEAR_EXACT, SIGMOID), MONOCHROME1 inversion, through one lookup table
per image. What WADO rendering and the Secondary Captures use in the listener, and what
:mod:`inference.preprocess` builds the model's input on; a listener-role process never
imports torch (``tests/integration/test_node_ingest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


class PreprocessError(ValueError):
    """An image that cannot be decoded or turned into a model input (the message says why)."""


def load(ds_or_path: Dataset | str | Path) -> Dataset:
    if isinstance(ds_or_path, Dataset):
        return ds_or_path
    return dcmread(ds_or_path)


def guess_slot(ds: Dataset) -> str | None:
    """ "L-CC", "L-MLO", "R-CC" or "R-MLO" from the header, or None: the node's own
    classifier (:func:`inference.views.classify`), whatever the SOP class."""
    from inference.views import classify

    return classify(ds, any_sop_class=True).slot


def _first(value: Any) -> float:
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
        entries = np.asarray(
            data if isinstance(data, (list, tuple, MultiValue)) else [data], dtype=np.float64
        )
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
    if (
        ts not in JPEG_2000
        or k == 0
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or int(ds.get("PixelRepresentation", 0)) != 0
        or int(ds.get("BitsAllocated", 16)) != 16
    ):
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
    arr = _one_frame(ds, decode(ds) if arr is None else arr)
    lut = _lookup(ds, arr)
    if lut is not None:
        table, index = lut
        return _take(table, index)
    arr = arr.astype(np.float32)
    return _display(arr, ds, arr[::4, ::4])


def to_display8(ds: Dataset, arr: np.ndarray | None = None) -> np.ndarray:
    """:func:`to_display` as 8 bits a pixel (``(to_display(ds) * 255).astype(uint8)``, the
    same values), built without a floating-point image where the pixels are integers: what
    a rendered image or a thumbnail is made of, and what a decode cache can hold (a quarter
    of the float image's memory)."""
    arr = _one_frame(ds, decode(ds) if arr is None else arr)
    lut = _lookup(ds, arr)
    if lut is not None:
        table, index = lut
        return _take((table * 255).astype(np.uint8), index)
    arr = arr.astype(np.float32)
    return (_display(arr, ds, arr[::4, ::4]) * 255).astype(np.uint8)


def _one_frame(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:  # multi-frame: the first frame; colour is not a mammogram
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise PreprocessError("colour image: not a mammogram")
        arr = arr[0]
    if arr.ndim != 2:
        raise PreprocessError(f"unexpected pixel array shape {arr.shape}")
    return arr


def _take(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take(table, index)`` a band of rows at a time: numpy widens the index to 64 bits
    first, which for a whole 13-megapixel view is a 100 MB temporary streamed through memory
    (and, with a 16-bit film's 65,536-entry table, the slowest step of the display); a band
    of ~64k pixels keeps it in the cache. The same values.

    ``index`` is in range by construction (:func:`_lookup`: the table has one entry per value
    from the image's minimum to its maximum), so ``mode="clip"`` changes no value: it is
    there because numpy buffers ``out`` under the default ``mode="raise"``."""
    if index.ndim != 2:
        return np.take(table, index)
    out = np.empty(index.shape, table.dtype)
    step = max(1, (1 << 16) // max(1, index.shape[1]))
    for i in range(0, index.shape[0], step):
        np.take(table, index[i : i + step], out=out[i : i + step], mode="clip")
    return out


def _lookup(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer pixels: the display is a function of the stored value alone, so it is
    computed once per possible value and looked up (one pass over the image instead of a
    handful of float passes); statistics come from a decimated sample. (table, index of
    each pixel in it); None for other pixels."""
    if not (arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2 and arr.size > (1 << 16)):
        return None
    lo = min(int(arr.min()), 0)
    table = _display(
        np.arange(lo, int(arr.max()) + 1, dtype=np.float32), ds, _IntegerSample(arr[::4, ::4], lo)
    )
    index = arr if lo == 0 else (arr.astype(np.int32) - lo)
    return table, index


class _IntegerSample:
    """A decimated sample of integer pixels whose percentiles come from its histogram (one
    counting pass) instead of sorting a float copy: numpy's linear-interpolation percentile,
    the same values to float32 rounding. The histogram is counted only when percentiles are
    asked for (an image with a usable window never needs it)."""

    def __init__(self, sample: np.ndarray, lo: int) -> None:
        self.sample, self.lo = sample, lo

    def percentiles(self, qs: list[float]) -> list[float]:
        flat = self.sample.ravel()
        cum = np.cumsum(np.bincount(flat if self.lo == 0 else flat.astype(np.int32) - self.lo))
        n = int(cum[-1])
        out = []
        for q in qs:
            pos = q / 100.0 * (n - 1)
            k = int(np.floor(pos))
            a = int(np.searchsorted(cum, k, side="right"))
            b = int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))
            out.append(self.lo + a + (pos - k) * (b - a))
        return out


def _display(values: np.ndarray, ds: Dataset, sample: np.ndarray | _IntegerSample) -> np.ndarray:
    """Stored values -> display values in [0, 1] (Modality LUT, VOI, MONOCHROME1);
    ``sample``: stored values the percentile fallback (no usable window) is computed on."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    arr = values * np.float32(slope) + np.float32(intercept)
    out = _window(arr, ds)
    if out is None or float(out.max() - out.min()) < 1e-6:
        if isinstance(sample, _IntegerSample):  # an affine map keeps the order when slope > 0
            plo, phi = sample.percentiles([0.5, 99.8] if slope > 0 else [99.5, 0.2])
            lo, hi = plo * slope + intercept, phi * slope + intercept
        else:
            lo, hi = np.percentile(sample * np.float32(slope) + np.float32(intercept), [0.5, 99.8])
        if hi <= lo:
            hi = lo + 1.0
        out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)
