"""The attention map of a view as a DICOM Parametric Map (highdicom ``pm``)."""

from __future__ import annotations

import copy
import math

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.results.identity import (
    MANUFACTURER,
    PM_SERIES_NUMBER,
    SOFTWARE_VERSION,
    result_uid,
)
from node.results.reading import ReadingSummary, check_reading
from node.results.vocabulary import NO_UNITS

#: The largest side of a Parametric Map; bigger images get a map at an integer fraction.
PM_MAX_SIDE = 1024


def build_parametric_map(
    source: Dataset,
    slot: str,
    attention: np.ndarray,
    reading: ReadingSummary,
    study_uid: str,
    version: int,
    instance_number: int,
) -> Dataset:
    """The attention map of one view as a DICOM Parametric Map (highdicom), for viewers that
    lay it over the mammogram with their own colour map: 32-bit float attention in [0, 1]
    with its Real World Value Mapping, at the image's geometry or an integer fraction of
    it (``PM_MAX_SIDE``), referencing its source image.

    Mammograms have no Frame of Reference; the map defines its own (a name-based UID),
    aligned with its source pixel for pixel: its origin is the source's first pixel, its
    spacing the source's pixel spacing times the fraction (highdicom builds the spatial
    functional groups from a copy of the source that carries these, never stored)."""
    check_reading(reading)
    if np.ndim(attention) != 2:
        raise ValueError(f"attention: expected a 2-D map, got shape {np.shape(attention)}")
    rows, cols = int(source.Rows), int(source.Columns)
    f = max(1, math.ceil(max(rows, cols) / PM_MAX_SIDE))
    m = np.clip(np.nan_to_num(np.asarray(attention, dtype=np.float32)), 0.0, 1.0)
    if m.shape != (rows // f, cols // f):  # else already at the map's size
        if m.shape != (rows, cols):
            m = np.asarray(Image.fromarray(m).resize((cols, rows), Image.Resampling.BILINEAR))
        if f > 1:
            m = np.asarray(Image.fromarray(m).resize((cols // f, rows // f), Image.Resampling.BOX))
    # 32-bit float values (Float Pixel Data): OHIF 3.13 overlays only those.
    values = np.ascontiguousarray(m, dtype=np.float32)
    spacing = [
        float(v)
        for v in (source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [1.0, 1.0])
    ]
    ref = copy.deepcopy(source)
    ref.FrameOfReferenceUID = result_uid(study_uid, version, f"pm-for-{slot}")
    ref.ImagePositionPatient = [0.0, 0.0, 0.0]
    ref.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ref.PixelSpacing = spacing
    ref.SliceThickness = 1.0
    kwargs: dict = {}
    if f > 1:
        kwargs = {
            "plane_positions": [
                hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, (0.0, 0.0, 0.0))
            ],
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
            ),
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=(spacing[0] * f, spacing[1] * f), slice_thickness=1.0
            ),
        }
    pm = hd.pm.ParametricMap(
        source_images=[ref],
        pixel_array=values,
        series_instance_uid=result_uid(study_uid, version, "pm-series"),
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=result_uid(study_uid, version, f"pm-{slot}"),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{reading.model_name} {reading.model_version}"[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=reading.model_sha256[:16],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            hd.pm.RealWorldValueMapping(
                lut_label="ATTENTION",
                lut_explanation="AI attention (0 = none, 1 = highest)",
                unit=NO_UNITS,
                value_range=(0.0, 1.0),
                slope=1.0,
                intercept=0.0,
            )
        ],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ATTENTION",
        content_description=f"AI attention map {slot} (not for diagnosis)",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **kwargs,
    )
    pm.Laterality = slot[0]
    pm.SeriesDescription = "AI attention maps, parametric (not for diagnosis)"
    pm.ImageComments = (
        f"Attention map of {reading.model_name} {reading.model_version} "
        f"(sha256 {reading.model_sha256[:16]}), {values.shape[1]} x "
        f"{values.shape[0]} = 1/{f} of the source; not for diagnosis"
    )
    return pm
