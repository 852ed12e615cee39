"""The clinical exam score, the operating point, and evaluate's statistics and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference.scoring import (
    bootstrap_auc,
    breast_score,
    calibration,
    choose_operating_point,
    confusion,
    exam_score,
    plot_calibration,
    plot_roc,
    sensitivity_at_specificity,
)

pytestmark = pytest.mark.unit


def test_scores():
    assert (
        breast_score(
            {"BI-RADS 1": 0.2, "BI-RADS 5": 0.8}, {"normal": 0.1, "benign": 0.2, "malignant": 0.7}
        )
        == 70.0
    )
    assert breast_score({"BI-RADS 1": 0.2, "BI-RADS 4": 0.3, "BI-RADS 5": 0.5}) == 80.0
    assert breast_score({"BI-RADS 1": 0.6, "BI-RADS 2-3": 0.1, "BI-RADS 4-5": 0.3}) == 30.0
    assert exam_score({"L": 12.0, "R": None}) == 12.0 and exam_score({"L": None}) is None


def test_statistics_on_a_known_example():
    # 10 negatives scored 0..9, 5 positives scored 5.5, 8.5, 20, 30, 40.
    neg, pos = np.arange(10.0), np.array([5.5, 8.5, 20.0, 30.0, 40.0])
    y = np.r_[np.zeros(10, bool), np.ones(5, bool)]
    s = np.r_[neg, pos]
    sens, thr = sensitivity_at_specificity(y, s, 0.9)
    assert thr == 8.5 and sens == 0.8  # scores >= 8.5: 1 negative (9) and 4 positives
    assert confusion(y, s, thr) == {"tp": 4, "fp": 1, "tn": 9, "fn": 1}
    auc, lo, hi = bootstrap_auc(y, s, n=300)
    assert auc == pytest.approx(1 - (4 + 1) / 50)  # 5 of 50 pairs ranked wrongly
    assert lo <= auc <= hi and hi - lo > 0.01
    assert bootstrap_auc(y, s, n=0) == (auc, None, None)  # no interval asked for
    op = choose_operating_point(y, s, 0.9)
    assert op["score"] == 8.5 and op["specificity"] == 0.9 and op["sensitivity"] == 0.8
    assert choose_operating_point(np.zeros(4, bool), np.arange(4.0)) is None
    cal = calibration(y, s * 2.5)
    assert sum(c["n"] for c in cal) == 15
    assert all(0 <= c["observed"] <= 1 for c in cal)


def test_plots_are_png(tmp_path):
    from PIL import Image

    y = np.r_[np.zeros(20, bool), np.ones(10, bool)]
    s = np.r_[np.linspace(0, 50, 20), np.linspace(30, 95, 10)]
    roc = plot_roc(tmp_path / "roc.png", y, s, 40.0, 0.9)
    cal = plot_calibration(tmp_path / "cal.png", calibration(y, s))
    for p in (roc, cal):
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape == (520, 520, 3)
        red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
        assert red.sum() > 200  # the curve is drawn
    assert json.dumps(calibration(y, s))  # plain data for --json


def test_the_reading_carries_the_score_and_the_operating_point(tmp_path):
    from inference.api import MammoModel
    from inference.synthetic import Lesion, make_exam

    exam = make_exam(
        seed=11, rows=640, cols=512, lesions={"L": [Lesion("spiculated", 0.5, 0.5, 0.07, 0.35)]}
    )
    r = MammoModel(device="cpu", operating_point=50).predict_exam(exam)
    assert r.score == max(b.score for b in r.breasts.values())
    assert r.breasts["L"].score > r.breasts["R"].score
    assert r.operating_point == 50 and r.above_operating_point == (r.score >= 50)
