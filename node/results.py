"""Result objects for one exam reading: attention-map Secondary Captures and SR documents.

Every UID is derived from the exam (StudyInstanceUID), its version and the object's role, so a
retry or a restart rebuilds byte-for-byte the same identities and the PACS never receives a
second copy; a new version of a reading gets new UIDs and references the one it replaces.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node import __version__
from node.compat import highdicom_sr_base

MANUFACTURER = "mammo-node"
SOFTWARE_VERSION = f"mammo-node {__version__}"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SC_MAX_ROWS = 1536  # attention-map images are for review, not diagnosis: keep them light


_UID_NAMESPACE = uuid.UUID("6f1c7c0e-3d4b-5a8e-9b61-6d616d6d6f00")


#: BI-RADS categories as DICOM's Mammography Assessment context group (CID 6026) codes them:
#: SNOMED CT "Mammography assessment (Category N)". Code meanings are shortened to the 64
#: characters a Code Meaning (LO) holds.
BIRADS_SCT = {
    "1": ("397140005", "Mammography assessment (Category 1) - Negative"),
    "2": ("397141009", "Mammography assessment (Category 2) - Benign finding"),
    "3": ("397143007", "Mammography assessment (Category 3) - Probably benign finding"),
    "4": ("397144001", "Mammography assessment (Category 4) - Suspicious abnormality"),
    "5": ("397145000", "Mammography assessment (Category 5) - Suggestive of malignancy"),
}
PRIVATE_SCHEME = "99MAMMONODE"


def birads_code(category: str) -> hd.sr.CodedConcept:
    """A model's BI-RADS class ("BI-RADS 4") as its standard SNOMED CT code. A grouped class
    ("BI-RADS 4-5", of the 3-class tasks) has no single standard code: it keeps a private
    code whose meaning says so."""
    n = category.replace("BI-RADS", "").strip()
    if n in BIRADS_SCT:
        value, meaning = BIRADS_SCT[n]
        return hd.sr.CodedConcept(value, "SCT", meaning)
    return hd.sr.CodedConcept(category.replace(" ", "-"), PRIVATE_SCHEME,
                              f"AI {category} (grouped; no single SNOMED code)"[:64])


def result_uid(study_uid: str, version: int, role: str) -> str:
    """A deterministic UID for ``role`` of version ``version`` of an exam: the 2.25 form of a
    name-based (SHA-1, version 5) UUID, as PS3.5 B.2 allows. The same inputs give the same
    UID in any process, so a retry or a restart never mints a second identity."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{study_uid}|{version}|{role}').int}"


@dataclass
class BreastSummary:
    """The model's reading of one breast (plain data, no torch)."""

    present: bool = False
    birads: str | None = None                   # a class name, e.g. "BI-RADS 5"
    birads_probabilities: dict[str, float] = field(default_factory=dict)
    diagnosis: str | None = None                # "normal" / "benign" / "malignant"
    diagnosis_probabilities: dict[str, float] = field(default_factory=dict)
    score: float | None = None                  # 0-100 (inference.scoring)


_ABSENT = BreastSummary()


@dataclass
class ReadingSummary:
    """What the builders need from a model reading (plain data, no torch)."""

    breasts: dict[str, BreastSummary]           # "L" / "R"
    fusion_weights: dict[str, dict[str, float]]  # breast -> slot -> weight
    missing_views: list[str]
    model_name: str
    model_version: str
    model_sha256: str
    not_for_clinical_use: bool
    #: slot -> (x0, y0, x1, y1), pixel columns / rows of the source image: the box around the
    #: view's hottest attention (above half its maximum). The TID 1500 SR anchors each
    #: breast's measurements there, so viewers (OHIF) show where the model looked.
    attention_regions: dict[str, tuple[float, float, float, float]] = field(
        default_factory=dict)
    #: Seconds per stage of the reading (decode, preprocess, inference, maps; sr added
    #: when the SRs are built): the worker's log line and the dashboard.
    seconds: dict[str, float] = field(default_factory=dict)
    #: The exam's 0-100 malignancy score, the operating point it is judged against (None:
    #: the checkpoint has none and none is configured) and the verdict.
    score: float | None = None
    operating_point: float | None = None
    above_operating_point: bool | None = None
    #: slot -> image kind read (inference.views.IMAGE_KINDS; "computed": made from a volume).
    view_kinds: dict[str, str] = field(default_factory=dict)
    #: What the reader should know about the images read (another kind than the model was
    #: trained on, a computed view, a view with only a volume, priors available).
    notes: list[str] = field(default_factory=list)
    #: An image of the exam says a breast implant is present.
    implant: bool = False


def kind_label(reading: ReadingSummary, slot: str) -> str:
    """How a view's image kind is written in the results ("conventional 2D", ...)."""
    from inference.views import KIND_LABELS

    kind = reading.view_kinds.get(slot, "conventional")
    return KIND_LABELS.get(kind, kind)


def views_read(reading: ReadingSummary, slots: Any) -> str:
    """The per-view statement: "L-CC conventional 2D, L-MLO synthesized 2D, ..."."""
    return ", ".join(f"{slot} {kind_label(reading, slot)}" for slot in sorted(slots))


# --------------------------------------------------------------------------- colour map
def _heat_float(m: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp for values in [0, 1] -> uint8 RGB."""
    m = np.clip(m, 0.0, 1.0)
    r = np.clip(1.5 * m * 2 - 1.0, 0, 1)
    g = np.clip(1.5 - np.abs(m * 4 - 2.0), 0, 1)
    b = np.clip(1.0 - m * 2.5, 0, 1) * 0.9 + 0.1 * (m < 0.4)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


_HEAT_LUT = _heat_float(np.linspace(0.0, 1.0, 256))  # (256, 3): index with a uint8 map


def _heat(m: np.ndarray) -> np.ndarray:
    return _HEAT_LUT[(np.clip(m, 0.0, 1.0) * 255).astype(np.uint8)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_overlay(display: np.ndarray, attention: np.ndarray, lines: list[str],
                   max_rows: int = SC_MAX_ROWS) -> np.ndarray:
    """Mammogram (in [0, 1]) with the attention map blended in, a legend and text burned in."""
    rows, cols = display.shape
    scale = min(1.0, max_rows / rows)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    step = max(1, int(1 / scale))  # decimate first: resizing 8 Mpx images is slow
    gray = Image.fromarray((np.clip(display[::step, ::step], 0, 1) * 255).astype(np.uint8)
                           ).resize(size, Image.Resampling.BILINEAR)
    if attention.shape == display.shape:
        attention = attention[::step, ::step]  # else a reduced map: resized as it is
    amap = Image.fromarray((np.clip(attention, 0, 1) * 255).astype(np.uint8)
                           ).resize(size, Image.Resampling.BILINEAR)
    a8 = np.asarray(amap)
    alpha = ((a8.astype(np.uint16) * 140) >> 8)[..., None]          # 0 .. 0.55 * 255
    g = np.asarray(gray).astype(np.uint16)[..., None]
    rgb = ((g * (255 - alpha) + _HEAT_LUT[a8].astype(np.uint16) * alpha) // 255
           ).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    fs = max(12, size[1] // 60)
    font = _font(fs)
    y = fs // 2
    for line in lines:
        draw.text((fs // 2 + 1, y + 1), line, fill=(0, 0, 0), font=font)
        draw.text((fs // 2, y), line, fill=(255, 255, 255), font=font)
        y += int(fs * 1.3)
    # Legend: a colour bar from low to high attention, bottom left.
    bw, bh = max(60, size[0] // 4), max(8, fs // 2)
    x0, y0 = fs // 2, size[1] - bh - 2 * fs
    bar = _heat(np.linspace(0, 1, bw)[None, :].repeat(bh, 0))
    img.paste(Image.fromarray(bar), (x0, y0))
    draw.text((x0, y0 + bh + 2), "attention: low", fill=(255, 255, 255), font=font)
    draw.text((x0 + bw - fs * 2, y0 - fs - 2), "high", fill=(255, 255, 255), font=font)
    return np.asarray(img)


def build_sc(source: Dataset, slot: str, display: np.ndarray, attention: np.ndarray,
             reading: ReadingSummary, study_uid: str, version: int,
             instance_number: int) -> Dataset:
    """One attention-map Secondary Capture for one view, in the source study."""
    lat = slot[0]
    b = reading.breasts.get(lat, _ABSENT)
    lines = [
        f"{slot}  {reading.model_name} {reading.model_version}  -  NOT FOR DIAGNOSIS",
        f"{lat} breast: {b.birads or 'n/a'}"
        + (f" (p={b.birads_probabilities[b.birads]:.2f})" if b.birads else "")
        + f"   weight of this view: {reading.fusion_weights.get(lat, {}).get(slot, 0.0):.2f}",
        score_line(reading),
        f"read from: {kind_label(reading, slot)}" + ("   implant present" if reading.implant
                                                     else ""),
    ]
    if reading.not_for_clinical_use:
        lines.append("Demo model trained on synthetic phantoms: NOT FOR CLINICAL USE")
    rgb = render_overlay(display, attention, lines)
    orientation = source.get("PatientOrientation", None)
    # highdicom takes one direction letter per axis: "FR" (foot-right) becomes "F".
    po: tuple[str, str] = (str(orientation[0])[:1], str(orientation[1])[:1]) \
        if orientation and len(orientation) == 2 \
        and all(str(v)[:1] in "APLRHF" and str(v) for v in orientation) \
        else ("A", "R") if lat == "L" else ("P", "L")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(study_uid, version, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(study_uid, version, f"sc-{slot}"),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=po,
        laterality=lat,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "AI attention maps (not for diagnosis)"
    sc.ImageComments = (f"Attention map of {reading.model_name} {reading.model_version} "
                        f"(sha256 {reading.model_sha256[:16]}); not for diagnosis")[:10240]
    sc.DerivationDescription = "Attention map overlay of the source mammogram"
    src = Dataset()
    src.ReferencedSOPClassUID = source.SOPClassUID
    src.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [src]
    _stamp(sc)
    return sc


PM_SERIES_NUMBER = 9904
#: The largest side of a Parametric Map; bigger images get a map at an integer fraction.
PM_MAX_SIDE = 1024


def build_parametric_map(source: Dataset, slot: str, attention: np.ndarray,
                         reading: ReadingSummary, study_uid: str, version: int,
                         instance_number: int) -> Dataset:
    """The attention map of one view as a DICOM Parametric Map (highdicom), for viewers that
    lay it over the mammogram with their own colour map: 32-bit float attention in [0, 1]
    with its Real World Value Mapping, at the image's geometry or an integer fraction of
    it (``PM_MAX_SIDE``), referencing its source image.

    Mammograms have no Frame of Reference; the map defines its own (a name-based UID),
    aligned with its source pixel for pixel: its origin is the source's first pixel, its
    spacing the source's pixel spacing times the fraction (highdicom builds the spatial
    functional groups from a copy of the source that carries these, never stored)."""
    import copy
    import math

    from PIL import Image

    rows, cols = int(source.Rows), int(source.Columns)
    f = max(1, math.ceil(max(rows, cols) / PM_MAX_SIDE))
    m = np.clip(np.nan_to_num(np.asarray(attention, dtype=np.float32)), 0.0, 1.0)
    if m.shape != (rows // f, cols // f):  # else already at the map's size
        if m.shape != (rows, cols):
            m = np.asarray(Image.fromarray(m).resize((cols, rows), Image.Resampling.BILINEAR))
        if f > 1:
            m = np.asarray(Image.fromarray(m).resize((cols // f, rows // f),
                                                     Image.Resampling.BOX))
    # 32-bit float values (Float Pixel Data): OHIF 3.13 overlays only those.
    values = np.ascontiguousarray(m, dtype=np.float32)
    spacing = [float(v) for v in (source.get("PixelSpacing") or
                                  source.get("ImagerPixelSpacing") or [1.0, 1.0])]
    ref = copy.deepcopy(source)
    ref.FrameOfReferenceUID = result_uid(study_uid, version, f"pm-for-{slot}")
    ref.ImagePositionPatient = [0.0, 0.0, 0.0]
    ref.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ref.PixelSpacing = spacing
    ref.SliceThickness = 1.0
    kwargs: dict = {}
    if f > 1:
        kwargs = {
            "plane_positions": [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                         (0.0, 0.0, 0.0))],
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=(spacing[0] * f, spacing[1] * f), slice_thickness=1.0)}
    pm = hd.pm.ParametricMap(
        source_images=[ref], pixel_array=values,
        series_instance_uid=result_uid(study_uid, version, "pm-series"),
        series_number=PM_SERIES_NUMBER,
        sop_instance_uid=result_uid(study_uid, version, f"pm-{slot}"),
        instance_number=instance_number, manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{reading.model_name} {reading.model_version}"[:64],
        software_versions=SOFTWARE_VERSION, device_serial_number=reading.model_sha256[:16],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[hd.pm.RealWorldValueMapping(
            lut_label="ATTENTION", lut_explanation="AI attention (0 = none, 1 = highest)",
            unit=hd.sr.CodedConcept("1", "UCUM", "no units"), value_range=(0.0, 1.0),
            slope=1.0, intercept=0.0)],
        window_center=0.5, window_width=1.0, content_label="ATTENTION",
        content_description=f"AI attention map {slot} (not for diagnosis)",
        transfer_syntax_uid=ExplicitVRLittleEndian, **kwargs)
    pm.Laterality = slot[0]
    pm.SeriesDescription = "AI attention maps, parametric (not for diagnosis)"
    pm.ImageComments = (f"Attention map of {reading.model_name} {reading.model_version} "
                        f"(sha256 {reading.model_sha256[:16]}), {values.shape[1]} x "
                        f"{values.shape[0]} = 1/{f} of the source; not for diagnosis")
    return pm


def _stamp(ds: Dataset) -> None:
    now = dt.datetime.now()
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.SoftwareVersions = SOFTWARE_VERSION


SCORE_UNIT = ("{score}", "UCUM", "score")
_YES, _NO = ("373066001", "SCT", "Yes"), ("373067005", "SCT", "No")


def score_line(reading: ReadingSummary) -> str:
    """E.g. "Exam score 73/100, above the operating point (41)"."""
    if reading.score is None:
        return "Exam score n/a"
    text = f"Exam score {reading.score:.0f}/100"
    if reading.operating_point is None:
        return text + " (no operating point)"
    where = "above" if reading.above_operating_point else "below"
    return f"{text}, {where} the operating point ({reading.operating_point:g})"


def overall_impression(reading: ReadingSummary) -> str:
    """One line for the whole exam, e.g. "AI reading: left BI-RADS 5 (p=1.00); right ..."."""
    parts = []
    for lat, side in (("L", "left"), ("R", "right")):
        b = reading.breasts.get(lat, _ABSENT)
        if b.present and b.birads:
            p = b.birads_probabilities[b.birads]
            parts.append(f"{side} {b.birads} (p={p:.2f})")
        else:
            parts.append(f"{side} not imaged")
    text = "AI reading: " + "; ".join(parts) + ". " + score_line(reading)
    if reading.missing_views:
        text += f". Missing views: {', '.join(reading.missing_views)}"
    if reading.view_kinds:
        text += f". Views read from: {views_read(reading, reading.view_kinds)}"
    if reading.implant:
        text += ". Implant present"
    for note in reading.notes:
        text += f". {note}"
    if reading.not_for_clinical_use:
        text += ". NOT FOR CLINICAL USE (demo model trained on synthetic phantoms)"
    return text + "."


# --------------------------------------------------------------------------- TID 1500 SR
def _exam_score_items(reading: ReadingSummary
                      ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The exam-level score, operating point and verdict. They join the measurement group of
    the exam's most suspicious breast (whose score the exam's is): a group without an image
    region stops OHIF 3.13 from drawing any of the report."""
    unit = hd.sr.CodedConcept(*SCORE_UNIT)
    measurements = [hd.sr.Measurement(
        name=hd.sr.CodedConcept("EXAM-SCORE", "99MAMMONODE", "AI exam malignancy score"),
        value=float(reading.score or 0.0), unit=unit)]
    evals = []
    if reading.operating_point is not None:
        measurements.append(hd.sr.Measurement(
            name=hd.sr.CodedConcept("OPERATING-POINT", "99MAMMONODE", "Operating point"),
            value=float(reading.operating_point), unit=unit))
        evals.append(hd.sr.QualitativeEvaluation(
            name=hd.sr.CodedConcept("ABOVE-OP", "99MAMMONODE",
                                    "Exam score above the operating point"),
            value=hd.sr.CodedConcept(*(_YES if reading.above_operating_point else _NO))))
    return measurements, evals


def build_tid1500(sources: dict[str, Dataset], reading: ReadingSummary, study_uid: str,
                  version: int, replaces: Dataset | None = None) -> Dataset:
    """A Comprehensive SR (TID 1500 measurement report) with the per-breast reading."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("observer", 0, reading.model_sha256),
            name=reading.model_name, manufacturer_name=MANUFACTURER,
            model_name=f"{reading.model_name} {reading.model_version}"))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    scored = [lat for lat in ("L", "R") if reading.breasts.get(lat, _ABSENT).present
              and reading.breasts.get(lat, _ABSENT).birads]
    worst = max(scored, key=lambda lat: reading.breasts[lat].score or 0.0, default=None)
    for lat in ("L", "R"):
        b = reading.breasts.get(lat, _ABSENT)
        if not b.present or not b.birads:
            continue
        views = [s for s in sources if s.startswith(lat)]
        evals = [hd.sr.QualitativeEvaluation(
            name=hd.sr.CodedConcept("111037", "DCM", "Overall Assessment"),
            value=birads_code(b.birads))]
        if b.diagnosis:
            evals.append(hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("DIAGNOSIS", "99MAMMONODE", "AI diagnosis"),
                value=hd.sr.CodedConcept(b.diagnosis.upper(), "99MAMMONODE",
                                         b.diagnosis)))
        measurements = [
            hd.sr.Measurement(
                name=hd.sr.CodedConcept(f"P-{cls.replace(' ', '')}", "99MAMMONODE",
                                        f"Probability of {cls}"),
                value=float(p), unit=codes.UCUM.NoUnits)
            for cls, p in b.birads_probabilities.items()]
        for cls, p in b.diagnosis_probabilities.items():
            measurements.append(hd.sr.Measurement(
                name=hd.sr.CodedConcept(f"P-{cls.upper()}", "99MAMMONODE",
                                        f"Probability of {cls}"),
                value=float(p), unit=codes.UCUM.NoUnits))
        for slot, w in reading.fusion_weights.get(lat, {}).items():
            measurements.append(hd.sr.Measurement(
                name=hd.sr.CodedConcept(f"W-{slot}", "99MAMMONODE", f"Fusion weight {slot}"),
                value=float(w), unit=codes.UCUM.NoUnits))
        if b.score is not None:
            measurements.append(hd.sr.Measurement(
                name=hd.sr.CodedConcept("BREAST-SCORE", "99MAMMONODE",
                                        "AI breast malignancy score"),
                value=float(b.score), unit=hd.sr.CodedConcept(*SCORE_UNIT)))
        evals += [hd.sr.QualitativeEvaluation(
            name=hd.sr.CodedConcept(f"KIND-{v}", "99MAMMONODE", f"Image kind of {v}"),
            value=hd.sr.CodedConcept(reading.view_kinds.get(v, "conventional").upper(),
                                     "99MAMMONODE", kind_label(reading, v)))
            for v in sorted(views)]
        if reading.implant:
            evals.append(hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("IMPLANT", "99MAMMONODE", "Implant present"),
                value=hd.sr.CodedConcept(*_YES)))
        if reading.score is not None and lat == worst:
            exam_m, exam_e = _exam_score_items(reading)
            measurements += exam_m
            evals += exam_e
        tracking = hd.sr.TrackingIdentifier(
            uid=result_uid(study_uid, version, f"tracking-{lat}"),
            identifier=f"{'Left' if lat == 'L' else 'Right'} breast")
        sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.Breast,
                                   laterality=codes.SCT.Left if lat == "L" else codes.SCT.Right)]
        # Anchored on the view the fusion weighed most, at its hottest attention (TID 1410).
        weights = reading.fusion_weights.get(lat, {})
        anchored = [v for v in views if v in reading.attention_regions]
        if anchored:
            slot = max(anchored, key=lambda v: weights.get(v, 0.0))
            x0, y0, x1, y1 = reading.attention_regions[slot]
            box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box,
                    source_image=hd.sr.SourceImageForRegion.from_source_image(
                        sources[slot])),
                finding_type=codes.SCT.Breast, finding_sites=sites,
                measurements=measurements, qualitative_evaluations=evals))
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=codes.SCT.Breast, finding_sites=sites,
            measurements=measurements, qualitative_evaluations=evals,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
                sources[v]) for v in views]))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("71651007", "SCT", "Mammography"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport)
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


# --------------------------------------------------------------------------- TID 4000 SR
MAMMO_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
_PRIVATE = PRIVATE_SCHEME


class MammographyCADSR(highdicom_sr_base()):  # type: ignore[misc]  # none in highdicom
    """Mammography CAD SR document (SOP class 1.2.840.10008.5.1.4.1.1.88.50)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sop_class_uid=MAMMO_CAD_SR, **kwargs)


def _c(value: str, scheme: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, scheme, meaning)


def _rel(name: str) -> hd.sr.RelationshipTypeValues:
    return getattr(hd.sr.RelationshipTypeValues, name)


def _num(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept,
         rel: str = "CONTAINS") -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=round(float(value), 6), unit=unit,
                                relationship_type=_rel(rel))


def build_mammo_cad(sources: dict[str, Dataset], reading: ReadingSummary, study_uid: str,
                    version: int, replaces: Dataset | None = None) -> Dataset:
    """A Mammography CAD SR (TID 4000 structure) with the per-breast reading.

    Image Library of every source image (laterality and view as acquisition context);
    CAD Processing and Findings Summary with one Individual Impression/Recommendation per
    breast read (BI-RADS category and probabilities, probability of cancer when the model
    has a diagnosis head, view fusion weights, missing views); Summary of Detections (not
    attempted: this model classifies, it does not mark lesions) and Summary of Analyses with
    the algorithm identification (name, version, checkpoint SHA-256).
    """
    one = _c("1", "UCUM", "no units")
    library = hd.sr.ContainerContentItem(name=_c("111028", "DCM", "Image Library"),
                                         relationship_type=_rel("CONTAINS"))
    entries = []
    for slot, ds in sorted(sources.items()):
        img = hd.sr.ImageContentItem(
            name=_c("111040", "DCM", "Original Source"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=_rel("CONTAINS"))
        lat, view = slot.split("-")
        img.ContentSequence = hd.sr.ContentSequence([
            hd.sr.CodeContentItem(
                name=_c("111027", "DCM", "Image Laterality"),
                value=_c("7771000", "SCT", "Left") if lat == "L" else _c("24028007", "SCT",
                                                                          "Right"),
                relationship_type=_rel("HAS_ACQ_CONTEXT")),
            hd.sr.CodeContentItem(
                name=_c("111031", "DCM", "Image View"),
                value=_c("399162004", "SCT", "cranio-caudal") if view == "CC"
                else _c("399368009", "SCT", "medio-lateral oblique"),
                relationship_type=_rel("HAS_ACQ_CONTEXT")),
            hd.sr.TextContentItem(
                name=_c("IMAGE-KIND", _PRIVATE, "Image kind"), value=kind_label(reading, slot),
                relationship_type=_rel("HAS_ACQ_CONTEXT")),
        ])
        entries.append(img)
    library.ContentSequence = hd.sr.ContentSequence(entries)

    impressions = []
    findings = False
    for lat in ("L", "R"):
        b = reading.breasts.get(lat, _ABSENT)
        if not b.present or not b.birads:
            continue
        imp = hd.sr.ContainerContentItem(
            name=_c("111034", "DCM", "Individual Impression/Recommendation"),
            relationship_type=_rel("INFERRED_FROM"))
        items: list = [
            hd.sr.CodeContentItem(name=_c("111056", "DCM", "Rendering Intent"),
                                  value=_c("111150", "DCM", "Presentation Required: Rendering "
                                                            "device is expected to present"),
                                  relationship_type=_rel("HAS_CONCEPT_MOD")),
            hd.sr.CodeContentItem(name=_c("BREAST", _PRIVATE, "Breast"),
                                  value=_c("7771000", "SCT", "Left") if lat == "L"
                                  else _c("24028007", "SCT", "Right"),
                                  relationship_type=_rel("HAS_CONCEPT_MOD")),
            hd.sr.CodeContentItem(
                name=_c("AI-BIRADS", _PRIVATE, "AI BI-RADS category"),
                value=birads_code(b.birads),
                relationship_type=_rel("CONTAINS")),
        ]
        for cls, p in b.birads_probabilities.items():
            items.append(_num(_c(f"P-{cls.replace(' ', '')}", _PRIVATE,
                                 f"Probability of {cls}"), p, one))
        dprobs = b.diagnosis_probabilities
        if "malignant" in dprobs:
            items.append(_num(_c("111047", "DCM", "Probability of cancer"),
                              100.0 * dprobs["malignant"], _c("%", "UCUM", "percent")))
        for cls, p in dprobs.items():
            items.append(_num(_c(f"P-{cls.upper()}", _PRIVATE, f"Probability of {cls}"), p,
                              one))
        if b.diagnosis:
            items.append(hd.sr.CodeContentItem(
                name=_c("AI-DIAGNOSIS", _PRIVATE, "AI diagnosis"),
                value=_c(b.diagnosis.upper(), _PRIVATE, b.diagnosis),
                relationship_type=_rel("CONTAINS")))
        for slot, w in reading.fusion_weights.get(lat, {}).items():
            items.append(_num(_c(f"W-{slot}", _PRIVATE, f"Fusion weight of {slot}"), w, one))
        if b.score is not None:
            items.append(_num(_c("BREAST-SCORE", _PRIVATE, "AI breast malignancy score"),
                              b.score, _c(*SCORE_UNIT)))
        items.append(hd.sr.TextContentItem(
            name=_c("MISSING-VIEWS", _PRIVATE, "Missing views"),
            value=", ".join(reading.missing_views) or "none",
            relationship_type=_rel("CONTAINS")))
        if reading.not_for_clinical_use:
            items.append(hd.sr.TextContentItem(
                name=_c("DISCLAIMER", _PRIVATE, "Disclaimer"),
                value="Demo model trained on synthetic phantoms. NOT FOR CLINICAL USE.",
                relationship_type=_rel("CONTAINS")))
        imp.ContentSequence = hd.sr.ContentSequence(items)
        impressions.append(imp)
        findings = findings or b.birads not in ("BI-RADS 1",)
    summary = hd.sr.CodeContentItem(
        name=_c("111017", "DCM", "CAD Processing and Findings Summary"),
        value=_c("111242", "DCM", "All algorithms succeeded; with findings") if findings
        else _c("111241", "DCM", "All algorithms succeeded; without findings"),
        relationship_type=_rel("CONTAINS"))
    overall = hd.sr.TextContentItem(
        name=_c("121073", "DCM", "Impression"), value=overall_impression(reading),
        relationship_type=_rel("INFERRED_FROM"))
    exam_items: list = [hd.sr.TextContentItem(
        name=_c("VIEWS-READ", _PRIVATE, "Views read"), value=views_read(reading, sources),
        relationship_type=_rel("INFERRED_FROM"))]
    if reading.implant:
        exam_items.append(hd.sr.CodeContentItem(
            name=_c("IMPLANT", _PRIVATE, "Implant present"), value=_c(*_YES),
            relationship_type=_rel("INFERRED_FROM")))
    if reading.score is not None:
        exam_items.append(_num(_c("EXAM-SCORE", _PRIVATE, "AI exam malignancy score"),
                               reading.score, _c(*SCORE_UNIT), rel="INFERRED_FROM"))
        if reading.operating_point is not None:
            exam_items.append(_num(_c("OPERATING-POINT", _PRIVATE, "Operating point"),
                                   reading.operating_point, _c(*SCORE_UNIT),
                                   rel="INFERRED_FROM"))
            exam_items.append(hd.sr.CodeContentItem(
                name=_c("ABOVE-OP", _PRIVATE, "Exam score above the operating point"),
                value=_c(*(_YES if reading.above_operating_point else _NO)),
                relationship_type=_rel("INFERRED_FROM")))
    summary.ContentSequence = hd.sr.ContentSequence([overall, *exam_items, *impressions])

    detections = hd.sr.CodeContentItem(
        name=_c("111064", "DCM", "Summary of Detections"),
        value=_c("111225", "DCM", "Not Attempted"), relationship_type=_rel("CONTAINS"))
    analyses = hd.sr.CodeContentItem(
        name=_c("111065", "DCM", "Summary of Analyses"),
        value=_c("111222", "DCM", "Succeeded"), relationship_type=_rel("CONTAINS"))
    ok = hd.sr.ContainerContentItem(name=_c("111062", "DCM", "Successful Analyses"),
                                    relationship_type=_rel("INFERRED_FROM"))
    performed = hd.sr.CodeContentItem(
        name=_c("111004", "DCM", "Analysis Performed"),
        value=_c("FOUR-VIEW-BIRADS", _PRIVATE, "Four-view BI-RADS analysis"),
        relationship_type=_rel("CONTAINS"))
    performed.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=_c("111001", "DCM", "Algorithm Name"),
                              value=reading.model_name, relationship_type=_rel("HAS_PROPERTIES")),
        hd.sr.TextContentItem(name=_c("111003", "DCM", "Algorithm Version"),
                              value=reading.model_version,
                              relationship_type=_rel("HAS_PROPERTIES")),
        hd.sr.TextContentItem(name=_c("111002", "DCM", "Algorithm Parameters"),
                              value=f"checkpoint sha256 {reading.model_sha256}",
                              relationship_type=_rel("HAS_PROPERTIES")),
    ])
    ok.ContentSequence = hd.sr.ContentSequence([performed])
    analyses.ContentSequence = hd.sr.ContentSequence([ok])

    root = hd.sr.ContainerContentItem(name=_c("111036", "DCM", "Mammography CAD Report"),
                                      template_id="4000")
    root.ContentSequence = hd.sr.ContentSequence([
        *hd.sr.LanguageOfContentItemAndDescendants(language=_c("en-US", "RFC5646",
                                                               "English (United States)")),
        library, summary, detections, analyses])
    sr = MammographyCADSR(
        evidence=list(sources.values()), content=root,
        series_instance_uid=result_uid(study_uid, version, "srcad-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(study_uid, version,
                                                                      "sr-mammo-cad"),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        previous_versions=[replaces] if replaces is not None else None)
    sr.SeriesDescription = "AI reading (Mammography CAD SR)"
    sr.SoftwareVersions = SOFTWARE_VERSION
    return sr
