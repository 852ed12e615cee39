"""Grayscale Softcopy Presentation State (highdicom ``pr``), one per exam: the object nearly
every PACS viewer draws. On each image read: each mark's outline and its region score, and
the exam score with its operating-point verdict as text."""

from __future__ import annotations

from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from inference.display import _first
from node.results.identity import (
    MANUFACTURER,
    PR_SERIES_NUMBER,
    SOFTWARE_VERSION,
    result_uid,
)
from node.results.reading import ReadingSummary, check_reading, score_line
from node.results.tid1500 import check_sources

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
_YELLOW = hd.color.CIELabColor.from_rgb(255, 255, 0)
_WHITE = hd.color.CIELabColor.from_rgb(255, 255, 255)


def _voi(sources: dict[str, Dataset]) -> list[hd.pr.SoftcopyVOILUTTransformation]:
    """Each image's own first window (a viewer shows it as the modality set it); images with
    a VOI LUT only, or nothing, are left to the viewer."""
    out = []
    for _, ds in sorted(sources.items()):
        if "WindowCenter" in ds and "WindowWidth" in ds:
            out.append(
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=_first(ds.WindowCenter),
                    window_width=max(1.0, _first(ds.WindowWidth)),
                    referenced_images=hd.ReferencedImageSequence([ds]),
                )
            )
    return out


def _inside(points: np.ndarray, ds: Dataset) -> np.ndarray:
    return np.stack(
        [np.clip(points[:, 0], 0.0, float(ds.Columns)), np.clip(points[:, 1], 0.0, float(ds.Rows))],
        axis=1,
    )


def build_presentation_state(
    sources: dict[str, Dataset], reading: ReadingSummary, study_uid: str, version: int
) -> Dataset:
    """The exam's GSPS: two graphic layers, "AI MARKS" (each mark's closed outline and its
    region score) and "AI EXAM SCORE" (the exam score, its verdict and the model on each
    image), referencing every image read."""
    check_sources(sources)
    check_reading(reading)
    for slot, ds in sources.items():
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise ValueError(
                f"sources[{slot!r}].SamplesPerPixel: a grayscale presentation "
                f"state needs 1, got {ds.SamplesPerPixel}"
            )
    marks_layer = hd.pr.GraphicLayer(
        layer_name="AI MARKS",
        order=1,
        description="AI marks with region scores 0-100",
        display_color=_YELLOW,
    )
    text_layer = hd.pr.GraphicLayer(
        layer_name="AI EXAM SCORE",
        order=2,
        description="AI exam score and verdict",
        display_color=_WHITE,
    )
    annotations = []
    verdict = score_line(reading)
    for slot, ds in sorted(sources.items()):
        rows, cols = float(ds.Rows), float(ds.Columns)
        graphics, texts = [], []
        for mark in reading.marks.get(slot, []):
            pts = _inside(np.asarray(mark.outline, dtype=float), ds)
            pts = np.vstack([pts, pts[:1]])  # closed
            uid = result_uid(study_uid, version, f"pr-mark-{slot}-{mark.index}")
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=pts,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=f"AI mark {slot} #{mark.index}",
                    tracking_uid=uid,
                )
            )
            x0, y0 = float(pts[:, 0].min()), float(pts[:, 1].min())
            h = max(12.0, rows / 40)
            top = y0 - 1.2 * h if y0 - 1.2 * h >= 0 else min(rows - h, float(pts[:, 1].max()))
            texts.append(
                hd.pr.TextObject(
                    text_value=f"{mark.score:.0f}"
                    + (" (above op)" if mark.above_operating_point else ""),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    bounding_box=(
                        max(0.0, x0),
                        max(0.0, top),
                        min(cols, x0 + h * 6),
                        min(rows, top + h),
                    ),
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                )
            )
        if graphics:
            annotations.append(
                hd.pr.GraphicAnnotation(
                    referenced_images=[ds],
                    graphic_layer=marks_layer,
                    graphic_objects=graphics,
                    text_objects=texts,
                )
            )
        line = f"{slot}: {verdict}" + (
            "  NOT FOR CLINICAL USE" if reading.not_for_clinical_use else ""
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[ds],
                graphic_layer=text_layer,
                text_objects=[
                    hd.pr.TextObject(
                        text_value=line[:1024],
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        bounding_box=(cols * 0.02, rows * 0.01, cols * 0.98, rows * 0.05),
                        text_justification=hd.pr.TextJustificationValues.LEFT,
                    )
                ],
            )
        )
    images = [ds for _, ds in sorted(sources.items())]
    voi = _voi(sources)
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=result_uid(study_uid, version, "pr-series"),
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=result_uid(study_uid, version, "pr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{reading.model_name} {reading.model_version}"[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=reading.model_sha256[:16],
        content_label="AI_MARKS",
        content_description="AI marks and exam score"[:64],
        graphic_annotations=annotations,
        graphic_layers=[marks_layer, text_layer],
        voi_lut_transformations=voi or None,
    )
    # highdicom takes the first image's size as every image's displayed area: one item per
    # size, so that views of other sizes are shown whole.
    by_size: dict[tuple[int, int], list[Dataset]] = defaultdict(list)
    for ds in images:
        by_size[(int(ds.Columns), int(ds.Rows))].append(ds)
    if len(by_size) > 1:
        items = []
        for (c, r), group in sorted(by_size.items()):
            item = Dataset()
            item.ReferencedImageSequence = hd.ReferencedImageSequence(group)
            item.PixelOriginInterpretation = "VOLUME"
            item.DisplayedAreaTopLeftHandCorner = [1, 1]
            item.DisplayedAreaBottomRightHandCorner = [c, r]
            item.PresentationSizeMode = "SCALE TO FIT"
            item.PresentationPixelAspectRatio = [1, 1]
            items.append(item)
        pr.DisplayedAreaSelectionSequence = items
    pr.SeriesDescription = "AI marks (presentation state)"
    # General Series Laterality (type 2C: the body part is paired): both breasts, so empty
    # unless every image read is of one breast.
    sides = {slot[0] for slot in sources}
    pr.Laterality = sides.pop() if len(sides) == 1 else ""
    return pr
