"""Attention-map Secondary Capture, one per view: the mammogram with the attention map blended
in, the marks outlined, a legend and the reading burned in (highdicom ``sc``)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.results.identity import MANUFACTURER, SC_SERIES_NUMBER, result_uid, stamp
from node.results.reading import ABSENT, ReadingSummary, check_reading, kind_label, score_line

SC_MAX_ROWS = 1536  # attention-map images are for review, not diagnosis: keep them light


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


def render_overlay(
    display: np.ndarray,
    attention: np.ndarray,
    lines: list[str],
    max_rows: int = SC_MAX_ROWS,
    outlines: list[tuple[list[tuple[float, float]], str]] | None = None,
) -> np.ndarray:
    """Mammogram (in [0, 1]) with the attention map blended in, a legend and text burned in.
    ``outlines``: (polygon in the display's pixel coordinates, label) per mark, drawn over."""
    rows, cols = display.shape
    scale = min(1.0, max_rows / rows)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    step = max(1, int(1 / scale))  # decimate first: resizing 8 Mpx images is slow
    gray = Image.fromarray((np.clip(display[::step, ::step], 0, 1) * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )
    if attention.shape == display.shape:
        attention = attention[::step, ::step]  # else a reduced map: resized as it is
    amap = Image.fromarray((np.clip(attention, 0, 1) * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )
    a8 = np.asarray(amap)
    alpha = ((a8.astype(np.uint16) * 140) >> 8)[..., None]  # 0 .. 0.55 * 255
    g = np.asarray(gray).astype(np.uint16)[..., None]
    rgb = ((g * (255 - alpha) + _HEAT_LUT[a8].astype(np.uint16) * alpha) // 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    fs = max(12, size[1] // 60)
    font = _font(fs)
    sx, sy = size[0] / cols, size[1] / rows
    for polygon, label in outlines or []:
        pts = [(x * sx, y * sy) for x, y in polygon]
        if len(pts) >= 2:
            draw.line([*pts, pts[0]], fill=(255, 255, 255), width=max(2, fs // 6))
            tx, ty = min(p[0] for p in pts), max(0.0, min(p[1] for p in pts) - fs * 1.3)
            draw.text((tx + 1, ty + 1), label, fill=(0, 0, 0), font=font)
            draw.text((tx, ty), label, fill=(255, 255, 0), font=font)
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


def caption_lines(slot: str, reading: ReadingSummary) -> list[str]:
    """The text burned into a view's Secondary Capture."""
    lat = slot[0]
    b = reading.breasts.get(lat, ABSENT)
    line2 = (
        f"{lat} breast: {b.birads or 'n/a'}"
        + (f" (p={b.birads_probabilities[b.birads]:.2f})" if b.birads else "")
        + f"   weight of this view: {reading.fusion_weights.get(lat, {}).get(slot, 0.0):.2f}"
    )
    if b.density:
        line2 += f"   density {b.density}"
    lines = [
        f"{slot}  {reading.model_name} {reading.model_version}  -  NOT FOR DIAGNOSIS",
        line2,
        score_line(reading),
        f"read from: {kind_label(reading, slot)}"
        + ("   implant present" if reading.implant else ""),
    ]
    if reading.not_for_clinical_use:
        lines.append("Demo model trained on synthetic phantoms: NOT FOR CLINICAL USE")
    return lines


def build_sc(
    source: Dataset,
    slot: str,
    display: np.ndarray,
    attention: np.ndarray,
    reading: ReadingSummary,
    study_uid: str,
    version: int,
    instance_number: int,
) -> Dataset:
    """One attention-map Secondary Capture for one view, in the source study."""
    check_reading(reading)
    if slot[:1] not in ("L", "R"):
        raise ValueError(f"slot: {slot!r} is not a view slot such as 'L-CC'")
    if np.ndim(display) != 2:
        raise ValueError(f"display: expected a 2-D image, got shape {np.shape(display)}")
    lat = slot[0]
    lines = caption_lines(slot, reading)
    # Marks on this view, scaled from the source image to the display (same geometry or
    # a decoded fraction of it).
    outlines = []
    rows, cols = int(source.Rows), int(source.Columns)
    fy, fx = display.shape[0] / rows, display.shape[1] / cols
    for mark in getattr(reading, "marks", {}).get(slot, []):
        outlines.append(([(x * fx, y * fy) for x, y in mark.outline], f"{mark.score:.0f}"))
    rgb = render_overlay(display, attention, lines, outlines=outlines)
    orientation = source.get("PatientOrientation", None)
    # highdicom takes one direction letter per axis: "FR" (foot-right) becomes "F".
    po: tuple[str, str] = (
        (str(orientation[0])[:1], str(orientation[1])[:1])
        if orientation
        and len(orientation) == 2
        and all(str(v)[:1] in "APLRHF" and str(v) for v in orientation)
        else ("A", "R")
        if lat == "L"
        else ("P", "L")
    )
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
    sc.ImageComments = (
        f"Attention map of {reading.model_name} {reading.model_version} "
        f"(sha256 {reading.model_sha256[:16]}); not for diagnosis"
    )[:10240]
    sc.DerivationDescription = "Attention map overlay of the source mammogram"
    src = Dataset()
    src.ReferencedSOPClassUID = source.SOPClassUID
    src.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [src]
    stamp(sc)
    return sc
