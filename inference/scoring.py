"""The clinical exam score (0-100), the operating point, and the statistics ``evaluate``
reports on them.

Score: how suspicious the exam is for cancer, the way commercial readers report one. Per
breast, 100 x the probability of malignancy when the checkpoint has a diagnosis head, else 100
x the probability of the suspicious BI-RADS classes (4 and 5, "4-5", or "5" for the 1-vs-5
task); the exam's score is its most suspicious breast's.

Operating point: the score above which an exam is called positive (recalled). ``train``
chooses it on validation exams at a target specificity (90 % by default) and stores it in the
checkpoint; ``[inference] operating_point`` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.metrics import roc_auc

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

SUSPICIOUS = {"BI-RADS 4", "BI-RADS 5", "BI-RADS 4-5"}


def breast_score(
    birads_probabilities: Mapping[str, float],
    diagnosis_probabilities: Mapping[str, float] | None = None,
) -> float:
    """0-100 suspicion of one breast (see the module docstring)."""
    if diagnosis_probabilities and "malignant" in diagnosis_probabilities:
        p = float(diagnosis_probabilities["malignant"])
    else:
        p = float(sum(v for k, v in birads_probabilities.items() if k in SUSPICIOUS))
    return round(100.0 * min(1.0, max(0.0, p)), 1)


def exam_score(breast_scores: Mapping[str, float | None]) -> float | None:
    scores = [s for s in breast_scores.values() if s is not None]
    return max(scores) if scores else None


# -- statistics -------------------------------------------------------------------------------
def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold): "positive" means score >= it."""
    y = np.asarray(y, bool)
    s = np.asarray(s, float)
    thresholds = np.r_[np.inf, np.unique(s)[::-1]]
    pos, neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    tpr = np.array([(s[y] >= t).sum() / pos for t in thresholds])
    fpr = np.array([(s[~y] >= t).sum() / neg for t in thresholds])
    return fpr, tpr, thresholds


def sensitivity_at_specificity(
    y: np.ndarray, s: np.ndarray, specificity: float
) -> tuple[float, float] | None:
    """(sensitivity, threshold) at the lowest threshold whose specificity is at least
    ``specificity``; None without both classes."""
    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, thr = roc_curve(y, s)
    ok = np.flatnonzero(1.0 - fpr >= specificity - 1e-12)
    k = ok[-1]  # thresholds fall along the curve: the last one that keeps the specificity
    # No exam score keeps it (a negative scored above every positive): nothing but a
    # perfect 100 is called positive.
    return float(tpr[k]), float(min(thr[k], 100.0))


def confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y, bool)
    p = np.asarray(s, float) >= threshold
    return {
        "tp": int((p & y).sum()),
        "fp": int((p & ~y).sum()),
        "tn": int((~p & ~y).sum()),
        "fn": int((~p & y).sum()),
    }


def bootstrap_auc(
    y: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """ROC AUC and its percentile bootstrap confidence interval (exams resampled)."""
    y = np.asarray(y, bool)
    s = np.asarray(s, float)
    auc = roc_auc(y, s)
    if auc is None:
        return None, None, None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        a = roc_auc(y[i], s[i])
        if a is not None:
            aucs.append(a)
    if not aucs:  # n = 0 (no interval asked for), or no resample had both classes
        return auc, None, None
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return auc, float(lo), float(hi)


def calibration(y: np.ndarray, s: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Reliability table: per score decile, the mean predicted probability and the observed
    fraction of positives."""
    y = np.asarray(y, bool)
    p = np.asarray(s, float) / 100.0
    out = []
    edges = np.linspace(0, 1, bins + 1)
    for k in range(bins):
        m = (p >= edges[k]) & ((p < edges[k + 1]) if k < bins - 1 else (p <= 1.0))
        if m.any():
            out.append(
                {
                    "bin": f"{edges[k]:.1f}-{edges[k + 1]:.1f}",
                    "n": int(m.sum()),
                    "predicted": float(p[m].mean()),
                    "observed": float(y[m].mean()),
                }
            )
    return out


def choose_operating_point(
    y: np.ndarray, s: np.ndarray, specificity: float = 0.9
) -> dict[str, Any] | None:
    """The score threshold at ``specificity`` on these exams, with what it achieves."""
    r = sensitivity_at_specificity(y, s, specificity)
    if r is None:
        return None
    sens, thr = r
    c = confusion(y, s, thr)
    return {
        "score": round(thr, 2),
        "target_specificity": specificity,
        "specificity": round(c["tn"] / max(1, c["tn"] + c["fp"]), 4),
        "sensitivity": round(sens, 4),
        "n": int(len(y)),
        "positives": int(np.sum(y)),
    }


def exam_statistics(
    y: np.ndarray, s: np.ndarray, operating_point: float | None, bootstrap: int = 1000
) -> dict:
    """Everything ``evaluate`` reports at the exam level."""
    auc, lo, hi = bootstrap_auc(y, s, n=bootstrap)
    out: dict = {
        "n": int(len(y)),
        "positives": int(np.sum(y)),
        "auc": auc,
        "auc_ci95": [lo, hi] if lo is not None else None,
    }
    for spec in (0.90, 0.95):
        r = sensitivity_at_specificity(y, s, spec)
        out[f"sensitivity_at_{int(spec * 100)}_specificity"] = (
            {"sensitivity": r[0], "threshold": r[1]} if r else None
        )
    if operating_point is not None:
        c = confusion(y, s, operating_point)
        out["operating_point"] = {
            "score": operating_point,
            **c,
            "sensitivity": c["tp"] / max(1, c["tp"] + c["fn"]),
            "specificity": c["tn"] / max(1, c["tn"] + c["fp"]),
        }
    out["calibration"] = calibration(y, s)
    return out


# -- plots (PNG, drawn with Pillow: no plotting library) ------------------------------------
def _canvas(
    title: str,
) -> tuple[Image.Image, ImageDraw.ImageDraw, Callable[[float, float], tuple[float, float]]]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (520, 520), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 8), title, fill="black")
    x0, y0, x1, y1 = 60, 40, 500, 480
    d.rectangle((x0, y0, x1, y1), outline="black")
    for k in range(0, 11, 2):
        t = k / 10
        x, y = x0 + t * (x1 - x0), y1 - t * (y1 - y0)
        d.line((x, y1, x, y1 + 4), fill="black")
        d.text((x - 8, y1 + 6), f"{t:.1f}", fill="black")
        d.line((x0 - 4, y, x0, y), fill="black")
        d.text((x0 - 30, y - 6), f"{t:.1f}", fill="black")
    d.line((x0, y1, x1, y0), fill=(180, 180, 180))  # chance / perfect calibration

    def xy(u: float, v: float) -> tuple[float, float]:
        return x0 + u * (x1 - x0), y1 - v * (y1 - y0)

    return img, d, xy


def plot_roc(
    path: Path, y: np.ndarray, s: np.ndarray, operating_point: float | None, auc: float | None
) -> Path:
    fpr, tpr, thr = roc_curve(y, s)
    img, d, xy = _canvas(f"ROC (exam score), AUC {auc:.3f}" if auc is not None else "ROC")
    d.line([xy(float(a), float(b)) for a, b in zip(fpr, tpr)], fill=(200, 30, 30), width=3)
    d.text(xy(0.55, 0.05), "1 - specificity", fill="black")
    d.text(xy(0.02, 0.95), "sensitivity", fill="black")
    if operating_point is not None:
        c = confusion(y, s, operating_point)
        u = c["fp"] / max(1, c["fp"] + c["tn"])
        v = c["tp"] / max(1, c["tp"] + c["fn"])
        px, py = xy(u, v)
        d.ellipse((px - 6, py - 6, px + 6, py + 6), outline=(30, 30, 200), width=3)
        d.text((px + 8, py + 4), f"operating point {operating_point:g}", fill=(30, 30, 200))
    img.save(path)
    return path


def plot_calibration(path: Path, table: list[dict[str, Any]]) -> Path:
    img, d, xy = _canvas("Calibration (exam score / 100 vs observed cancer rate)")
    d.text(xy(0.55, 0.05), "predicted (score / 100)", fill="black")
    d.text(xy(0.02, 0.95), "observed", fill="black")
    pts = [xy(r["predicted"], r["observed"]) for r in table]
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=2)
    for (px, py), r in zip(pts, table):
        rad = 3 + min(8, int(np.sqrt(r["n"])))
        d.ellipse((px - rad, py - rad, px + rad, py + rad), outline=(200, 30, 30), width=2)
    img.save(path)
    return path


def plot_froc(path: Path, froc: dict[str, Any], max_fp: float = 3.0) -> Path:
    """The FROC curve: lesion sensitivity against false marks per image (x scaled to
    ``max_fp``), the reported points circled."""
    img, d, xy = _canvas(f"FROC ({froc.get('lesions', 0)} lesions, {froc.get('images', 0)} images)")
    pts = [xy(min(f, max_fp) / max_fp, s) for f, s in froc.get("curve", [])]
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=3)
    for rate, sens in (froc.get("points") or {}).items():
        px, py = xy(min(float(rate), max_fp) / max_fp, sens)
        d.ellipse((px - 5, py - 5, px + 5, py + 5), outline=(30, 30, 200), width=2)
        d.text((px + 7, py + 3), f"{sens:.2f} at {rate}", fill=(30, 30, 200))
    d.text(xy(0.45, 0.05), f"false marks per image (0-{max_fp:g})", fill="black")
    d.text(xy(0.02, 0.95), "lesions hit", fill="black")
    img.save(path)
    return path
