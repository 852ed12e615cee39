"""Preprocessing from DICOM: every header and pixel variant gives the same model input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from inference.preprocess import guess_slot, map_to_original, preprocess, to_display
from inference.synthetic import Lesion, make_mammogram

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


@pytest.mark.parametrize("variant", [
    dict(photometric="MONOCHROME1"),
    dict(transfer_syntax=JPEGLSLossless),
    dict(transfer_syntax=JPEG2000Lossless),
    dict(transfer_syntax=RLELossless),
    dict(dialect="legacy"),
    dict(dialect="code-only"),
], ids=lambda v: str(list(v.values())[0]))
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
