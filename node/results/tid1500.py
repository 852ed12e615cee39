"""TID 1500 Imaging Measurement Report (Comprehensive SR, highdicom ``MeasurementReport``): one
measurement group per breast read, anchored on an image region so OHIF draws it."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.results import vocabulary as v
from node.results.identity import MANUFACTURER, SOFTWARE_VERSION, SR_SERIES_NUMBER, result_uid
from node.results.reading import (
    ABSENT,
    BreastSummary,
    ReadingSummary,
    check_reading,
    kind_label,
)


def check_sources(sources: dict[str, Dataset]) -> None:
    """Raise ``ValueError`` naming the slot / attribute a source image lacks."""
    if not sources:
        raise ValueError("sources: no image read")
    for slot, ds in sources.items():
        if slot[:1] not in ("L", "R") or "-" not in slot:
            raise ValueError(f"sources: {slot!r} is not a view slot such as 'L-CC'")
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            if not ds.get(kw):
                raise ValueError(f"sources[{slot!r}].{kw}: missing")


def exam_score_items(
    reading: ReadingSummary,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The exam-level score, operating point and verdict. They join the measurement group of
    the exam's most suspicious breast (whose score the exam's is): a group without an image
    region stops OHIF 3.13 from drawing any of the report."""
    measurements = [
        hd.sr.Measurement(name=v.EXAM_SCORE, value=float(reading.score or 0.0), unit=v.SCORE_UNIT)
    ]
    evals = []
    if reading.operating_point is not None:
        measurements.append(
            hd.sr.Measurement(
                name=v.OPERATING_POINT, value=float(reading.operating_point), unit=v.SCORE_UNIT
            )
        )
        evals.append(
            hd.sr.QualitativeEvaluation(
                name=v.ABOVE_OPERATING_POINT, value=v.YES if reading.above_operating_point else v.NO
            )
        )
    if reading.density:
        evals.append(
            hd.sr.QualitativeEvaluation(
                name=v.BREAST_COMPOSITION, value=v.density_code(reading.density)
            )
        )
    return measurements, evals


def _breast_items(
    b: BreastSummary, lat: str, reading: ReadingSummary
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    evals = [
        hd.sr.QualitativeEvaluation(name=v.OVERALL_ASSESSMENT, value=v.birads_code(b.birads or ""))
    ]
    if b.diagnosis:
        evals.append(
            hd.sr.QualitativeEvaluation(name=v.AI_DIAGNOSIS, value=v.diagnosis_code(b.diagnosis))
        )
    if b.density:
        evals.append(
            hd.sr.QualitativeEvaluation(name=v.BREAST_COMPOSITION, value=v.density_code(b.density))
        )
    measurements = [
        hd.sr.Measurement(name=v.probability_of(cls), value=float(p), unit=v.NO_UNITS)
        for cls, p in b.birads_probabilities.items()
    ]
    for cls, p in b.diagnosis_probabilities.items():
        measurements.append(
            hd.sr.Measurement(name=v.probability_of(cls), value=float(p), unit=v.NO_UNITS)
        )
    for slot, w in reading.fusion_weights.get(lat, {}).items():
        measurements.append(
            hd.sr.Measurement(name=v.fusion_weight_of(slot), value=float(w), unit=v.NO_UNITS)
        )
    if b.score is not None:
        measurements.append(
            hd.sr.Measurement(name=v.BREAST_SCORE, value=float(b.score), unit=v.SCORE_UNIT)
        )
    return measurements, evals


def _polyline(points: list[tuple[float, float]]) -> np.ndarray:
    """A closed polyline (first point repeated last) as highdicom takes it."""
    arr = np.asarray(points, dtype=float)
    if len(arr) and not np.array_equal(arr[0], arr[-1]):
        arr = np.vstack([arr, arr[:1]])
    return arr


def build_tid1500(
    sources: dict[str, Dataset],
    reading: ReadingSummary,
    study_uid: str,
    version: int,
    replaces: Dataset | None = None,
) -> Dataset:
    """A Comprehensive SR (TID 1500 measurement report) with the per-breast reading and one
    planar ROI group per mark (its outline on its image, its region score)."""
    check_sources(sources)
    check_reading(reading)
    observer = hd.sr.ObserverContext(
        observer_type=v.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("observer", 0, reading.model_sha256),
            name=reading.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{reading.model_name} {reading.model_version}",
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    scored = [
        lat
        for lat in ("L", "R")
        if reading.breasts.get(lat, ABSENT).present and reading.breasts.get(lat, ABSENT).birads
    ]
    worst = max(scored, key=lambda lat: reading.breasts[lat].score or 0.0, default=None)
    for lat in ("L", "R"):
        b = reading.breasts.get(lat, ABSENT)
        if not b.present or not b.birads:
            continue
        views = [s for s in sources if s.startswith(lat)]
        measurements, evals = _breast_items(b, lat, reading)
        evals += [
            hd.sr.QualitativeEvaluation(
                name=v.image_kind_of(s),
                value=v.image_kind_code(
                    reading.view_kinds.get(s, "conventional"), kind_label(reading, s)
                ),
            )
            for s in sorted(views)
        ]
        if reading.implant:
            evals.append(hd.sr.QualitativeEvaluation(name=v.IMPLANT, value=v.YES))
        if reading.score is not None and lat == worst:
            exam_m, exam_e = exam_score_items(reading)
            measurements += exam_m
            evals += exam_e
        tracking = hd.sr.TrackingIdentifier(
            uid=result_uid(study_uid, version, f"tracking-{lat}"),
            identifier=f"{'Left' if lat == 'L' else 'Right'} breast",
        )
        sites = [hd.sr.FindingSite(anatomic_location=v.BREAST, laterality=v.LATERALITY[lat])]
        # Anchored on the view the fusion weighed most, at its hottest attention (TID 1410).
        weights = reading.fusion_weights.get(lat, {})
        anchored = [s for s in views if s in reading.attention_regions]
        if anchored:
            slot = max(anchored, key=lambda s: weights.get(s, 0.0))
            x0, y0, x1, y1 = reading.attention_regions[slot]
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=_polyline([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]),
                        source_image=hd.sr.SourceImageForRegion.from_source_image(sources[slot]),
                    ),
                    finding_type=v.BREAST,
                    finding_sites=sites,
                    measurements=measurements,
                    qualitative_evaluations=evals,
                )
            )
        else:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=v.BREAST,
                    finding_sites=sites,
                    measurements=measurements,
                    qualitative_evaluations=evals,
                    source_images=[
                        hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[s])
                        for s in views
                    ],
                )
            )
        for slot in sorted(s for s in views):
            for mark in reading.marks.get(slot, []):
                groups.append(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=hd.sr.TrackingIdentifier(
                            uid=result_uid(study_uid, version, f"tracking-{slot}-{mark.index}"),
                            identifier=f"AI mark {slot} #{mark.index}",
                        ),
                        referenced_region=hd.sr.ImageRegion(
                            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                            graphic_data=_polyline(mark.outline),
                            source_image=hd.sr.SourceImageForRegion.from_source_image(
                                sources[slot]
                            ),
                        ),
                        finding_type=v.ABNORMAL,
                        finding_sites=sites,
                        measurements=[
                            hd.sr.Measurement(
                                name=v.REGION_SCORE, value=float(mark.score), unit=v.SCORE_UNIT
                            )
                        ],
                        qualitative_evaluations=[
                            hd.sr.QualitativeEvaluation(
                                name=v.ABOVE_OPERATING_POINT,
                                value=v.YES if mark.above_operating_point else v.NO,
                            )
                        ],
                    )
                )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=v.MAMMOGRAPHY,
        imaging_measurements=groups,
        title=v.IMAGING_MEASUREMENT_REPORT,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources.values()),
        content=report[0],
        series_instance_uid=result_uid(study_uid, version, "sr1500-series"),
        series_number=SR_SERIES_NUMBER + 1,
        sop_instance_uid=result_uid(study_uid, version, "sr-tid1500"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[replaces] if replaces is not None else None,
    )
    sr.SeriesDescription = "AI reading (TID 1500)"
    sr.SoftwareVersions = SOFTWARE_VERSION
    return sr
