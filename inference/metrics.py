"""Metrics in the paper's form: AUC (one-vs-rest macro beyond two classes), macro F1,
accuracy and n, per task. Coarser BI-RADS tasks are derived from a finer head's
probabilities (5-class -> 3-class -> 1 vs 5), so one checkpoint fills the whole table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.model import BIRADS_TASKS, birads_to_class


def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Binary ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from labels and predictions
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """AUC / macro F1 / accuracy / n for labels y (n,) and probabilities (n, classes)."""
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    if n_classes == 2:
        auc = roc_auc(y == 1, probs[:, 1])
    else:
        aucs = [roc_auc(y == c, probs[:, c]) for c in range(n_classes)]
        known = [a for a in aucs if a is not None]
        auc = float(np.mean(known)) if known else None
    return {
        "auc": auc,
        "f1": macro_f1(y, pred, n_classes),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "n": int(len(y)),
    }


def _derive(probs: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return probs
    if src == "birads-5class" and dst == "birads-3class":
        return np.stack([probs[:, 0], probs[:, 1] + probs[:, 2], probs[:, 3] + probs[:, 4]], 1)
    if dst == "birads-1v5":
        lo, hi = probs[:, 0], probs[:, -1]
        s = np.clip(lo + hi, 1e-12, None)
        return np.stack([lo / s, hi / s], 1)
    raise ValueError(f"cannot derive {dst} from {src}")


def evaluate_predictions(preds: dict[str, np.ndarray], task: str) -> dict[str, dict]:
    """Per-task metrics from :func:`inference.train.predict_records` output."""
    order = ["birads-1v5", "birads-3class", "birads-5class"]
    derivable = order[: order.index(task) + 1] if task != "birads-1v5" else ["birads-1v5"]
    if task == "birads-3class":
        derivable = ["birads-1v5", "birads-3class"]
    results: dict[str, dict] = {}
    present = preds["present"].astype(bool)
    raw = preds["birads_raw"]
    for t in derivable:
        y = np.array([birads_to_class(t, int(b)) if b else -1 for b in raw])
        keep = present & (y >= 0)
        if keep.sum() == 0:
            continue
        probs = _derive(preds["birads_probs"][keep], task, t)
        assert probs.shape[1] == len(BIRADS_TASKS[t])
        results[t] = classification_metrics(y[keep], probs)
    if "diagnosis_probs" in preds:
        y = preds["diagnosis"]
        keep = present & (y >= 0)
        if keep.sum():
            results["diagnosis"] = classification_metrics(y[keep], preds["diagnosis_probs"][keep])
    return results


def bootstrap_task_metrics(
    preds: dict[str, np.ndarray], task: str, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, list[float] | None]]:
    """95 % bootstrap intervals of each task's AUC and F1 (:func:`evaluate_predictions`),
    resampling exams (both breasts' rows together) with replacement."""
    n = len(preds["present"]) // 2
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(resamples if n else 0):
        ex = rng.integers(0, n, n)
        rows = np.stack([2 * ex, 2 * ex + 1], 1).reshape(-1)
        res = evaluate_predictions({k: v[rows] for k, v in preds.items()}, task)
        for t, m in res.items():
            for k in ("auc", "f1"):
                if m[k] is not None:
                    samples.setdefault(t, {}).setdefault(k, []).append(m[k])
    out: dict[str, dict[str, list[float] | None]] = {}
    for t, ms in samples.items():
        out[t] = {
            f"{k}_ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            if len(v) >= max(10, resamples // 2)
            else None
            for k, v in ms.items()
        }
    return out


def density_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """BI-RADS density A-D (class indices 0-3): accuracy, the confusion matrix (rows: label,
    columns: prediction) and Cohen's quadratic-weighted kappa (agreement that counts a
    two-class miss four times a one-class miss, as density reader studies report it)."""
    from inference.tasks import DENSITY_CLASSES

    k = len(DENSITY_CLASSES)
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    conf = np.zeros((k, k), dtype=int)
    for t, p in zip(y_true, y_pred):
        conf[t, p] += 1
    n = int(conf.sum())
    out: dict[str, Any] = {"classes": DENSITY_CLASSES, "n": n, "confusion": conf.tolist()}
    if n == 0:
        out.update(accuracy=None, quadratic_weighted_kappa=None)
        return out
    w = np.array([[(i - j) ** 2 for j in range(k)] for i in range(k)], float) / (k - 1) ** 2
    expected = np.outer(conf.sum(1), conf.sum(0)) / n
    denom = float((w * expected).sum())
    kappa = 1.0 - float((w * conf).sum()) / denom if denom > 0 else 1.0
    out.update(
        accuracy=round(float(np.trace(conf)) / n, 4), quadratic_weighted_kappa=round(kappa, 4)
    )
    return out


def froc(
    marks: Sequence[tuple[float, bool, int | Sequence[int]]],
    lesions: int,
    images: int,
    fp_rates: tuple[float, ...] = (0.5, 1.0, 2.0),
) -> dict[str, Any]:
    """Localisation, FROC style. ``marks``: (region score, hits a malignant lesion, the id of
    the lesion it hits, -1 for none, or the ids of all it hits) for every mark of every image;
    ``lesions``: malignant lesions; ``images``: images read. At each threshold on the region
    score, sensitivity = lesions hit by at least one mark / lesions and false marks per image
    = marks hitting none / images; reported at the given false-mark rates (the best
    sensitivity with at most that many). A mark inside two overlapping lesions (a mass and its
    calcifications, annotated apart) finds both, as in the usual FROC scoring."""
    out: dict[str, Any] = {"lesions": lesions, "images": images, "curve": [], "points": {}}
    if lesions == 0 or images == 0:
        return out
    order = sorted(marks, key=lambda m: -m[0])
    hit: set[int] = set()
    fp = 0
    curve = [(0.0, 0.0, float("inf"))]
    for score, is_hit, lesion in order:
        if is_hit:
            hit.update([lesion] if isinstance(lesion, int) else lesion)
        else:
            fp += 1
        curve.append((fp / images, len(hit) / lesions, score))
    out["curve"] = [(round(f, 4), round(s, 4)) for f, s, _ in curve]
    for rate in fp_rates:
        out["points"][str(rate)] = max(s for f, s, _ in curve if f <= rate)
    return out
