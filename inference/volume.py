"""A 2D image computed from a breast tomosynthesis volume, for a view that has no 2D image
([grouping] volume_2d): a slab maximum-intensity ("mip") or average ("average") projection
of the volume's central slab, frame by frame (the volume is never held whole in memory).

The result is a 2D dataset with the volume's identity (SOP Class / Instance UID, patient,
study, laterality, view), so the results reference the volume they were read from; its
ImageType says DERIVED and its DerivationDescription how it was made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import ExplicitVRLittleEndian

from inference.views import frame_laterality

#: The central part of the volume projected (the frames nearest the detector and the
#: compression paddle hold skin and noise).
SLAB_FRACTION = 0.5
METHODS = {"mip": "slab maximum-intensity projection", "average": "slab average projection"}


def slab(frames: int, fraction: float = SLAB_FRACTION) -> range:
    """The frame indices of the central slab of a volume of ``frames`` frames."""
    n = max(1, round(frames * fraction))
    start = max(0, (frames - n) // 2)
    return range(start, min(frames, start + n))


def computed_2d(source: Dataset | str | Path, method: str = "mip") -> Dataset:
    """A 2D dataset projected from a tomosynthesis volume (a path, or a dataset read with
    its ``filename``)."""
    if method not in METHODS:
        raise ValueError(f"volume_2d method must be one of {', '.join(METHODS)}, got {method!r}")
    path = source if isinstance(source, (str, Path)) else source.filename
    if not path:
        raise ValueError("the volume must be read from a file")
    header = dcmread(path, stop_before_pixels=True)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    acc: np.ndarray | None = None
    indices = list(slab(frames))
    for frame in iter_pixels(path, indices=indices):
        f = frame.astype(np.float32)
        if acc is None:
            acc = f.copy()
        elif method == "mip":
            np.maximum(acc, f, out=acc)
        else:
            acc += f
    if acc is None:
        raise ValueError("the volume has no frames")
    if method == "average":
        acc /= len(indices)
    bits = int(header.get("BitsStored", 16) or 16)
    pixels = np.clip(np.rint(acc), 0, (1 << bits) - 1).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = header.file_meta
    for elem in header:
        if elem.keyword in (
            "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence",
            "NumberOfFrames",
            "FrameIncrementPointer",
            "DimensionIndexSequence",
            "DimensionOrganizationSequence",
        ):
            continue
        ds.add(elem)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (
        1,
        str(header.get("PhotometricInterpretation", "MONOCHROME2")),
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = (
        f"{METHODS[method]} of frames {indices[0] + 1}-{indices[-1] + 1} of {frames}"
    )
    if "ImageLaterality" not in ds:
        lat = frame_laterality(header)
        if lat:
            ds.ImageLaterality = lat
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword not in ds:
            for item in (header.get("SharedFunctionalGroupsSequence", None) or [])[:1]:
                for voi in item.get("FrameVOILUTSequence", None) or []:
                    if keyword in voi:
                        setattr(ds, keyword, voi.get(keyword))
    return ds
