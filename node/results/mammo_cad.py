"""Mammography CAD SR (SOP class 1.2.840.10008.5.1.4.1.1.88.50), TID 4000 structure: the
Image Library (TID 4020), the CAD Processing and Findings Summary (TID 4001) with one
Individual Impression/Recommendation per breast and a Single Image Finding (TID 4006) per
mark, the Summary of Detections and the Summary of Analyses (TID 4015 / 4016).
highdicom has no builder for it: the content items are highdicom's, the document class is
the generic SR base (``node.compat``)."""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.compat import highdicom_sr_base
from node.results import vocabulary as v
from node.results.identity import MANUFACTURER, SOFTWARE_VERSION, SR_SERIES_NUMBER, result_uid
from node.results.reading import (
    ABSENT,
    Mark,
    ReadingSummary,
    check_reading,
    kind_label,
    overall_impression,
    views_read,
)
from node.results.tid1500 import _polyline, check_sources

MAMMO_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"


class MammographyCADSR(highdicom_sr_base()):  # type: ignore[misc]  # none in highdicom
    """Mammography CAD SR document (SOP class 1.2.840.10008.5.1.4.1.1.88.50)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sop_class_uid=MAMMO_CAD_SR, **kwargs)


def _rel(name: str) -> hd.sr.RelationshipTypeValues:
    return getattr(hd.sr.RelationshipTypeValues, name)


def _num(
    name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, rel: str = "CONTAINS"
) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name, value=round(float(value), 6), unit=unit, relationship_type=_rel(rel)
    )


def _code(
    name: hd.sr.CodedConcept, value: hd.sr.CodedConcept, rel: str = "CONTAINS"
) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=_rel(rel))


def _text(name: hd.sr.CodedConcept, value: str, rel: str = "CONTAINS") -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=_rel(rel))


def _selected_from(source: Dataset) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=v.ORIGINAL_SOURCE,
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=_rel("SELECTED_FROM"),
    )


def _scoord(
    name: hd.sr.CodedConcept, graphic_type: str, data: np.ndarray, source: Dataset
) -> hd.sr.ScoordContentItem:
    item = hd.sr.ScoordContentItem(
        name=name,
        graphic_type=getattr(hd.sr.GraphicTypeValues, graphic_type),
        graphic_data=data,
        pixel_origin_interpretation="VOLUME",
        relationship_type=_rel("HAS_PROPERTIES"),
    )
    item.ContentSequence = hd.sr.ContentSequence([_selected_from(source)])
    return item


def single_image_finding(mark: Mark, source: Dataset) -> hd.sr.CodeContentItem:
    """TID 4006 for one mark: "Selected region" with its Rendering Intent (Presentation
    Required above the operating point, Optional below), its Certainty of Finding (the
    region score, 0-100 %) and its centre (POINT) and outline (closed POLYLINE) on the image
    it was found on."""
    finding = _code(v.SINGLE_IMAGE_FINDING, v.SELECTED_REGION)  # CONTAINS (TID 4001)
    outline = _polyline(mark.outline)  # closed: the first point repeated
    finding.ContentSequence = hd.sr.ContentSequence(
        [
            _code(
                v.RENDERING_INTENT,
                v.PRESENTATION_REQUIRED if mark.above_operating_point else v.PRESENTATION_OPTIONAL,
                rel="HAS_CONCEPT_MOD",
            ),
            _num(v.CERTAINTY_OF_FINDING, mark.score, v.PERCENT, rel="HAS_PROPERTIES"),
            _num(v.REGION_SCORE, mark.score, v.SCORE_UNIT, rel="HAS_PROPERTIES"),
            _scoord(v.CENTER, "POINT", np.asarray([mark.center], dtype=float), source),
            _scoord(v.OUTLINE, "POLYLINE", outline, source),
        ]
    )
    return finding


def _image_library(
    sources: dict[str, Dataset], reading: ReadingSummary
) -> hd.sr.ContainerContentItem:
    library = hd.sr.ContainerContentItem(name=v.IMAGE_LIBRARY, relationship_type=_rel("CONTAINS"))
    entries = []
    for slot, ds in sorted(sources.items()):
        img = hd.sr.ImageContentItem(
            name=v.ORIGINAL_SOURCE,
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=_rel("CONTAINS"),
        )
        lat, view = slot.split("-")
        img.ContentSequence = hd.sr.ContentSequence(
            [
                _code(v.IMAGE_LATERALITY, v.LATERALITY[lat], rel="HAS_ACQ_CONTEXT"),
                _code(
                    v.IMAGE_VIEW, v.VIEW.get(view, v.MEDIO_LATERAL_OBLIQUE), rel="HAS_ACQ_CONTEXT"
                ),
                _text(v.IMAGE_KIND, kind_label(reading, slot), rel="HAS_ACQ_CONTEXT"),
            ]
        )
        entries.append(img)
    library.ContentSequence = hd.sr.ContentSequence(entries)
    return library


def _algorithm(reading: ReadingSummary) -> list[hd.sr.TextContentItem]:
    return [
        _text(v.ALGORITHM_NAME, reading.model_name, rel="HAS_PROPERTIES"),
        _text(v.ALGORITHM_VERSION, reading.model_version, rel="HAS_PROPERTIES"),
        _text(
            v.ALGORITHM_PARAMETERS,
            f"checkpoint sha256 {reading.model_sha256}",
            rel="HAS_PROPERTIES",
        ),
    ]


def build_mammo_cad(
    sources: dict[str, Dataset],
    reading: ReadingSummary,
    study_uid: str,
    version: int,
    replaces: Dataset | None = None,
) -> Dataset:
    """A Mammography CAD SR (TID 4000 structure) with the per-breast reading and its marks.

    Image Library of every source image (laterality and view as acquisition context);
    CAD Processing and Findings Summary with one Individual Impression/Recommendation per
    breast read (BI-RADS category and probabilities, probability of cancer when the model
    has a diagnosis head, density when it has a density head, view fusion weights, missing
    views) and a Single Image Finding per mark; Summary of Detections (Succeeded: the marks)
    and Summary of Analyses with the algorithm identification (name, version, checkpoint
    SHA-256).
    """
    check_sources(sources)
    check_reading(reading)
    impressions = []
    findings = False
    for lat in ("L", "R"):
        b = reading.breasts.get(lat, ABSENT)
        if not b.present or not b.birads:
            continue
        imp = hd.sr.ContainerContentItem(
            name=v.INDIVIDUAL_IMPRESSION, relationship_type=_rel("INFERRED_FROM")
        )
        items: list = [
            _code(v.RENDERING_INTENT, v.PRESENTATION_REQUIRED, rel="HAS_CONCEPT_MOD"),
            _code(v.BREAST_SIDE, v.LATERALITY[lat], rel="HAS_CONCEPT_MOD"),
            _code(v.AI_BIRADS, v.birads_code(b.birads)),
        ]
        for cls, p in b.birads_probabilities.items():
            items.append(_num(v.probability_of(cls), p, v.NO_UNITS))
        dprobs = b.diagnosis_probabilities
        if "malignant" in dprobs:
            items.append(_num(v.PROBABILITY_OF_CANCER, 100.0 * dprobs["malignant"], v.PERCENT))
        for cls, p in dprobs.items():
            items.append(_num(v.probability_of(cls), p, v.NO_UNITS))
        if b.diagnosis:
            items.append(_code(v.AI_DIAGNOSIS, v.diagnosis_code(b.diagnosis)))
        if b.density:
            items.append(_code(v.BREAST_COMPOSITION, v.density_code(b.density)))
        for slot, w in reading.fusion_weights.get(lat, {}).items():
            items.append(_num(v.fusion_weight_of(slot), w, v.NO_UNITS))
        if b.score is not None:
            items.append(_num(v.BREAST_SCORE, b.score, v.SCORE_UNIT))
        items.append(_text(v.MISSING_VIEWS, ", ".join(reading.missing_views) or "none"))
        if reading.not_for_clinical_use:
            items.append(
                _text(
                    v.DISCLAIMER, "Demo model trained on synthetic phantoms. NOT FOR CLINICAL USE."
                )
            )
        for slot in sorted(s for s in sources if s.startswith(lat)):
            for mark in reading.marks.get(slot, []):
                items.append(single_image_finding(mark, sources[slot]))
        imp.ContentSequence = hd.sr.ContentSequence(items)
        impressions.append(imp)
        findings = findings or b.birads not in ("BI-RADS 1",)
    summary = _code(v.CAD_SUMMARY, v.WITH_FINDINGS if findings else v.WITHOUT_FINDINGS)
    overall = _text(v.IMPRESSION, overall_impression(reading), rel="INFERRED_FROM")
    exam_items: list = [_text(v.VIEWS_READ, views_read(reading, sources), rel="INFERRED_FROM")]
    if reading.implant:
        exam_items.append(_code(v.IMPLANT, v.YES, rel="INFERRED_FROM"))
    if reading.score is not None:
        exam_items.append(_num(v.EXAM_SCORE, reading.score, v.SCORE_UNIT, rel="INFERRED_FROM"))
        if reading.operating_point is not None:
            exam_items.append(
                _num(v.OPERATING_POINT, reading.operating_point, v.SCORE_UNIT, rel="INFERRED_FROM")
            )
            exam_items.append(
                _code(
                    v.ABOVE_OPERATING_POINT,
                    v.YES if reading.above_operating_point else v.NO,
                    rel="INFERRED_FROM",
                )
            )
    if reading.density:
        exam_items.append(
            _code(v.BREAST_COMPOSITION, v.density_code(reading.density), rel="INFERRED_FROM")
        )
    summary.ContentSequence = hd.sr.ContentSequence([overall, *exam_items, *impressions])

    def succeeded(
        summary: hd.sr.CodedConcept,
        successful: hd.sr.CodedConcept,
        performed_name: hd.sr.CodedConcept,
        performed_code: hd.sr.CodedConcept,
    ) -> hd.sr.CodeContentItem:
        """Summary of Detections / of Analyses (TID 4000): succeeded, what was performed, by
        which algorithm."""
        item = _code(summary, v.SUCCEEDED)
        container = hd.sr.ContainerContentItem(
            name=successful, relationship_type=_rel("INFERRED_FROM")
        )
        performed = _code(performed_name, performed_code)
        performed.ContentSequence = hd.sr.ContentSequence(_algorithm(reading))
        container.ContentSequence = hd.sr.ContentSequence([performed])
        item.ContentSequence = hd.sr.ContentSequence([container])
        return item

    detections = succeeded(
        v.SUMMARY_OF_DETECTIONS, v.SUCCESSFUL_DETECTIONS, v.DETECTION_PERFORMED, v.AI_MARKS
    )
    analyses = succeeded(
        v.SUMMARY_OF_ANALYSES, v.SUCCESSFUL_ANALYSES, v.ANALYSIS_PERFORMED, v.FOUR_VIEW_BIRADS
    )

    root = hd.sr.ContainerContentItem(name=v.MAMMOGRAPHY_CAD_REPORT, template_id="4000")
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(language=v.ENGLISH_US),
            _image_library(sources, reading),
            summary,
            detections,
            analyses,
        ]
    )
    sr = MammographyCADSR(
        evidence=list(sources.values()),
        content=root,
        series_instance_uid=result_uid(study_uid, version, "srcad-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(study_uid, version, "sr-mammo-cad"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[replaces] if replaces is not None else None,
    )
    sr.SeriesDescription = "AI reading (Mammography CAD SR)"
    sr.SoftwareVersions = SOFTWARE_VERSION
    return sr
