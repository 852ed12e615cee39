"""Breast segmentation: burned-in labels, lead markers, rulers, film edges and collimator
shadows are blanked, the breast (pectoral muscle included) is kept, on either side of the image
and in both photometric interpretations; attention maps lie on the breast."""

from __future__ import annotations

import numpy as np
import pytest

from inference.preprocess import preprocess_array, to_display
from inference.segment import decimate, segment_breast
from inference.synthetic import ARTIFACTS, Lesion, make_exam, make_mammogram, phantom

pytestmark = pytest.mark.unit

ROWS, COLS = 640, 512


def _truth(lat: str, view: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's own breast (tissue above the faint skin edge) and its image, in the
    orientation make_mammogram stores (right breasts mirrored)."""
    img = phantom(ROWS, COLS, view, np.random.default_rng(seed))
    if lat == "R":
        img = img[:, ::-1]
    return img > 0.02, img


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("lat, view", [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")])
@pytest.mark.parametrize("artifacts", [(a,) for a in ARTIFACTS] + [ARTIFACTS])
def test_artifacts_are_blanked_and_the_breast_kept(artifacts, lat, view, photometric):
    seed = 7 + len(artifacts) + ARTIFACTS.index(artifacts[0])
    ds = make_mammogram(
        lat, view, rows=ROWS, cols=COLS, seed=seed, artifacts=artifacts, photometric=photometric
    )
    truth, clean = _truth(lat, view, seed)
    display = to_display(ds)
    plain = to_display(
        make_mammogram(lat, view, rows=ROWS, cols=COLS, seed=seed, photometric=photometric)
    )
    changed = np.abs(display - plain) > 0.01  # the same phantom: only the artifacts differ
    burned = changed & ~truth  # the artifacts' own pixels
    assert burned.sum() > 50, "the phantom carries the artifact"
    truth = truth & ~changed  # breast under a collimator band was not imaged
    mask = segment_breast(display)
    full = mask.full()
    assert mask.chest_wall_left == (lat == "L")
    assert not (full & burned).any(), f"{int((full & burned).sum())} artifact px kept"
    iou = (full & truth).sum() / (full | truth).sum()
    assert iou > 0.88, iou
    if view == "MLO":  # the pectoral muscle stays
        pectoral = truth & (clean >= 0.75)
        assert pectoral.sum() > 500 and (full & pectoral).mean() / pectoral.mean() > 0.99


def test_the_model_input_holds_no_artifact():
    ds = make_mammogram("R", "MLO", rows=ROWS, cols=COLS, seed=3, artifacts=ARTIFACTS)
    display = to_display(ds)
    x, geom = preprocess_array(display, (512, 256))
    assert geom.flipped and geom.input_mask is not None
    # Outside the breast (beyond the resampling's blur of its edge) the input is the
    # background value, nothing else.
    from scipy import ndimage

    outside = ~ndimage.binary_dilation(geom.input_mask, iterations=2)
    assert outside.sum() > 10_000 and np.allclose(x[0].numpy()[outside], -1.0)
    # The crop is the breast's: release 0.1.0's threshold crop kept the film edges, so the
    # image filled the input less.
    _, old = preprocess_array(display, (512, 256), segment=False)
    assert geom.crop != old.crop


def test_decimation_keeps_the_statistics_cheap():
    img = np.random.default_rng(0).random((4700, 2900), dtype=np.float32)
    small = decimate(img)
    assert max(small.shape) <= 512 and abs(float(small.mean()) - float(img.mean())) < 1e-3


def test_the_hottest_attention_lies_on_the_breast():
    """The demo model on an exam that carries every artifact: the hottest 1 % of each view's
    attention map lies on the breast (the mask bounds the map)."""
    from inference.api import MammoModel

    exam = make_exam(
        seed=5,
        rows=ROWS,
        cols=COLS,
        artifacts=ARTIFACTS,
        lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]},
    )
    reading = MammoModel(device="cpu").predict_exam(exam)
    for slot, amap in sorted(reading.attention_maps.items()):
        lat, view = slot.split("-")
        ds = next(d for d in exam if f"{d.ImageLaterality}-{d.ViewPosition}" == slot)
        truth, _ = _truth(lat, view, int(ds.InstanceNumber) - 1 + 50)
        hot = amap >= np.quantile(amap, 0.99)
        assert amap.max() == pytest.approx(1.0)
        assert (hot & truth).sum() / hot.sum() > 0.95, slot
