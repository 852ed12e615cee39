"""Preprocessing from DICOM: every header and pixel variant gives the same model input."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from inference.preprocess import guess_slot, map_to_original, preprocess, to_display
from inference.synthetic import Lesion, make_mammogram, write

pytestmark = pytest.mark.unit  # fast: the unit layer (python -m pytest -m unit)

SIZE = (256, 128)
LESION = [Lesion("spiculated", 0.5, 0.4, 0.08, 0.4)]


def _img(lat="L", **kw):
    return make_mammogram(lat, "CC", rows=400, cols=320, seed=3, lesions=LESION, **kw)


def test_reference_geometry_and_range():
    t, g = preprocess(_img(), SIZE)
    assert t.shape == (1, *SIZE) and float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert not g.flipped
    assert g.crop[1] - g.crop[0] < 400  # cropped to the breast vertically
    # The chest wall is on the left: the left columns hold more tissue than the right ones.
    assert float(t[0, :, :32].mean()) > float(t[0, :, -32:].mean())


@pytest.mark.parametrize(
    "variant",
    [
        dict(photometric="MONOCHROME1"),
        dict(transfer_syntax=JPEGLSLossless),
        dict(transfer_syntax=JPEG2000Lossless),
        dict(transfer_syntax=RLELossless),
        dict(dialect="legacy"),
        dict(dialect="code-only"),
    ],
    ids=lambda v: str(list(v.values())[0]),
)
def test_variants_equal_reference(variant):
    ref, _ = preprocess(_img(), SIZE)
    t, _ = preprocess(_img(**variant), SIZE)
    # Identical up to rounding (MONOCHROME1 windows differ by half a grey level, which may
    # move the breast's bounding box by a pixel).
    assert float((t - ref).abs().mean()) < 0.01


def test_right_breast_is_mirrored_to_the_same_orientation():
    left, gl = preprocess(_img("L"), SIZE)
    right, gr = preprocess(_img("R"), SIZE)
    assert gr.flipped and not gl.flipped
    assert float((left - right).abs().max()) < 1e-3


def test_window_functions_and_no_window():
    base = _img()
    lin = to_display(base)
    sig = _img()
    sig.VOILUTFunction = "SIGMOID"
    s = to_display(sig)
    assert s.shape == lin.shape and 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    assert not np.allclose(s, lin)
    nowin = _img()
    del nowin.WindowCenter, nowin.WindowWidth
    n = to_display(nowin)
    assert float(n.min()) == 0.0 and float(n.max()) == 1.0  # percentile stretch
    assert np.corrcoef(n.ravel(), lin.ravel())[0, 1] > 0.99


def test_map_back_to_original_lands_on_the_lesion():
    ds = _img("R")
    t, g = preprocess(ds, SIZE)
    # A map that is hot where the model input is brightest.
    hot = (t[0] >= torch.quantile(t[0], 0.999)).float().numpy()
    back = map_to_original(hot, g)
    assert back.shape == (400, 320)
    orig = to_display(ds)
    r, c = np.unravel_index(np.argmax(back), back.shape)
    assert orig[r, c] > np.percentile(orig, 95)


def test_guess_slot():
    assert guess_slot(_img("R", dialect="code-only")) == "R-CC"
    assert guess_slot(make_mammogram("L", "MLO", rows=64, cols=64, dialect="srt")) == "L-MLO"
    assert guess_slot(make_mammogram("", "MLO", rows=64, cols=64)) is None


def _dcmtk_encoded(ds, tool: str, args: list[str], tmp_path):
    """``ds`` compressed by a DCMTK encoder (a second, independent implementation)."""
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    write(ds, src)
    subprocess.run([f"/usr/bin/{tool}", *args, str(src), str(dst)], check=True, capture_output=True)
    return dcmread(dst)


@pytest.mark.parametrize(
    "tool,args,syntax",
    [
        ("dcmcjpeg", [], "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),  # JPEG Lossless, any predictor
        ("dcmcjpeg", ["+ee"], "1.2.840.10008.1.2.4.51"),  # JPEG Extended 12-bit (lossy)
        ("dcmcjpls", [], "1.2.840.10008.1.2.4.80"),  # JPEG-LS Lossless
        ("dcmcjpls", ["+en"], "1.2.840.10008.1.2.4.81"),  # JPEG-LS Near-Lossless
        ("dcmcrle", [], "1.2.840.10008.1.2.5"),  # RLE Lossless
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("1.") else None,
)
def test_dcmtk_compressed_variants_equal_reference(tool, args, syntax, tmp_path):
    ref, _ = preprocess(_img(), SIZE)
    ds = _dcmtk_encoded(_img(), tool, args, tmp_path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    t, _ = preprocess(ds, SIZE)
    assert float((t - ref).abs().mean()) < 0.01


def _as_voi_lut(ds, entry_bits: int = 16):
    """Replace the window by the equivalent VOI LUT Sequence (12-bit entries, but declared
    ``entry_bits`` wide, as some vendors do)."""
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    first = int(c - w / 2)
    n = int(w)
    entries = np.clip(
        np.round((np.arange(first, first + n) - (c - 0.5)) / (w - 1) * 4095 + 2047.5), 0, 4095
    ).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [n, first, entry_bits]
    item.LUTData = entries.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction
    return ds


@pytest.mark.parametrize("entry_bits", [12, 16])
def test_voi_lut_sequence_equals_window(entry_bits):
    ref = to_display(_img())
    out = to_display(_as_voi_lut(_img(), entry_bits))
    assert float(np.abs(out - ref).mean()) < 0.01


def test_8_bit_and_signed_pixels_equal_reference():
    ref, _ = preprocess(_img(), SIZE)
    ds8 = _img()
    ds8.PixelData = (ds8.pixel_array >> 4).astype(np.uint8).tobytes()
    ds8.BitsAllocated = ds8.BitsStored = 8
    ds8.HighBit = 7
    ds8.WindowCenter, ds8.WindowWidth = int(ds8.WindowCenter) // 16, int(ds8.WindowWidth) // 16
    t8, _ = preprocess(ds8, SIZE)
    assert float((t8 - ref).abs().mean()) < 0.02
    signed = _img()
    signed.PixelData = (signed.pixel_array.astype(np.int32) - 2048).astype(np.int16).tobytes()
    signed.PixelRepresentation = 1
    signed.RescaleIntercept = 2048  # same stored-to-modality mapping as the reference
    ts, _ = preprocess(signed, SIZE)
    assert float((ts - ref).abs().mean()) < 0.01


@pytest.mark.parametrize(
    "setup, slot",
    [
        (dict(ViewPosition="LCC"), "L-CC"),
        (dict(ViewPosition="R MLO"), "R-MLO"),
        (dict(Laterality="L", ViewPosition="MLO"), "L-MLO"),
        (dict(ViewPosition="RCCID"), None),
        (dict(ImageLaterality="R", ViewPosition="XCCL"), None),
        (dict(ViewPosition="CC"), None),
    ],
)
def test_one_view_classifier_for_node_api_and_readers(setup, slot):
    """The Python API and the data readers classify a header as the node does."""
    from inference.datasets import parse_view
    from node.assembly import classify

    ds = make_mammogram("", "", rows=64, cols=64)
    for k, v in setup.items():
        setattr(ds, k, v)
    assert guess_slot(ds) == slot == classify(ds).slot
    if "Laterality" not in setup and "ImageLaterality" not in setup:
        lat, view = parse_view(setup["ViewPosition"])
        assert (f"{lat}-{view}" if lat and view else None) == slot


def test_the_api_reads_an_exam_labelled_only_in_view_position():
    """ViewPosition "LCC" / "RMLO" without laterality attributes: release 0.1.0's API refused
    what the node accepted."""
    from inference.api import MammoModel

    exam = []
    for lat, view in (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")):
        ds = make_mammogram("", "", rows=128, cols=96, seed=len(exam))
        ds.ViewPosition = f"{lat}{view}"
        exam.append(ds)
    reading = MammoModel(device="cpu").predict_exam(exam)
    assert reading.missing_views == [] and set(reading.attention_maps) == {
        "L-CC",
        "L-MLO",
        "R-CC",
        "R-MLO",
    }


def test_reduced_attention_maps_land_where_the_full_size_ones_do():
    """``map_side``: maps at an integer fraction of the image (what the node draws and
    stores), the hot spot where the full-resolution map has it, within a few pixels."""
    from inference.api import MammoModel
    from inference.synthetic import Lesion, make_exam
    from node.inference_process import hottest_region

    exam = make_exam(
        seed=11, rows=1200, cols=950, lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}
    )
    model = MammoModel(device="cpu")
    full, small = model.predict_exam(exam), model.predict_exam(exam, map_side=512)
    for slot, amap in full.attention_maps.items():
        f = small.map_factors[slot]
        assert f == 3 and small.attention_maps[slot].shape == (400, 316)
        a = hottest_region(amap)
        b = hottest_region(small.attention_maps[slot], f)
        assert a is not None and b is not None
        assert max(abs(x - y) for x, y in zip(a, b)) <= 2 * f, (slot, a, b)


def test_jpeg2000_decoded_at_a_reduced_resolution_level():
    """JPEG 2000 keeps halved resolutions: a large view is decoded 2^k times smaller (what the
    model needs), with the values of the full decode averaged over the same blocks."""
    from inference.preprocess import decode, decode_reduced

    ds = make_mammogram(
        "L", "CC", rows=1200, cols=960, seed=2, transfer_syntax="1.2.840.10008.1.2.4.90"
    )
    small, f = decode_reduced(ds, 256)
    assert f == 4 and small.shape == (300, 240) and small.dtype == np.uint16
    full = decode(ds).astype(np.float64)
    blocks = full.reshape(300, 4, 240, 4).mean(axis=(1, 3))
    assert np.abs(small - blocks).mean() < 0.01 * full.max()
    same, f1 = decode_reduced(make_mammogram("L", "CC", rows=1200, cols=960, seed=2), 256)
    assert f1 == 1 and same.shape == (1200, 960)  # uncompressed: no levels to use


def test_jpeg_ls_through_charls_gives_the_stored_values():
    from inference.preprocess import decode

    ds = make_mammogram(
        "R", "MLO", rows=256, cols=200, seed=3, transfer_syntax="1.2.840.10008.1.2.4.80"
    )
    plain = make_mammogram("R", "MLO", rows=256, cols=200, seed=3)
    assert np.array_equal(decode(ds), plain.pixel_array)


def test_a_jpeg2000_exam_reads_like_the_uncompressed_one():
    from inference.api import MammoModel
    from inference.synthetic import Lesion, make_exam
    from node.inference_process import hottest_region

    kw = dict(
        seed=11, rows=2400, cols=1900, lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}
    )
    plain = make_exam(**kw)
    j2k = make_exam(**kw, transfer_syntax="1.2.840.10008.1.2.4.90")
    for a, b in zip(plain, j2k):
        b.StudyInstanceUID = a.StudyInstanceUID
    model = MammoModel(device="cpu")
    r1, r2 = (model.predict_exam(e, map_side=512) for e in (plain, j2k))
    # 2400 rows: maps 5x smaller; decoded 4x smaller (2 levels), maps 2x smaller again
    assert r1.map_factors["L-CC"] == 5 and r2.map_factors["L-CC"] == 8
    assert r1.breasts["L"].birads == r2.breasts["L"].birads
    assert abs(r1.score - r2.score) < 5
    for slot in ("L-CC", "L-MLO"):  # the lesion's views (a normal breast's map is diffuse)
        a = hottest_region(r1.attention_maps[slot], r1.map_factors[slot])
        b = hottest_region(r2.attention_maps[slot], r2.map_factors[slot])
        assert max(abs(x - y) for x, y in zip(a, b)) <= 40, (slot, a, b)
