"""Python API: one exam in, one reading out.

>>> from inference.api import MammoModel
>>> model = MammoModel()                     # the bundled demo checkpoint, device "auto"
>>> reading = model.predict_exam(["lcc.dcm", "lmlo.dcm", "rcc.dcm", "rmlo.dcm"])
>>> reading.breasts["L"].birads, reading.breasts["L"].birads_probabilities
>>> reading.fusion_weights["R"], reading.attention_maps["R-MLO"].shape
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from inference.checkpoint import load_checkpoint
from inference.device import resolve_device
from inference.marks import Mark, find_marks
from inference.model import BREASTS, DENSITY_CLASSES, DIAGNOSIS_CLASSES, VIEWS, algorithm_name
from inference.preprocess import (
    Geometry,
    decode,
    decode_reduced,
    guess_slot,
    load,
    map_to_original,
    preprocess_array,
    reduced,
    to_display,
)
from inference.scoring import breast_score, exam_score

#: Attention maps at most this many pixels a side: what the node's Secondary Captures draw and
#: its Parametric Maps store (node.results.PM_MAX_SIDE), and what evaluate reads with, so that
#: its localisation is measured on the node's own path.
MAP_SIDE = 1024


@dataclass
class BreastReading:
    present: bool  # the breast had at least one view
    birads: str | None  # predicted category, e.g. "BI-RADS 4-5"
    birads_probabilities: dict[str, float]
    diagnosis: str | None = None
    diagnosis_probabilities: dict[str, float] | None = None
    #: 0-100 suspicion of malignancy (inference.scoring), None when the breast is absent
    score: float | None = None
    #: BI-RADS density "A".."D" (a checkpoint with a density head; else None)
    density: str | None = None
    density_probabilities: dict[str, float] | None = None


@dataclass
class ExamReading:
    breasts: dict[str, BreastReading]
    #: per breast, the weight of each view in its fused representation (missing views: 0)
    fusion_weights: dict[str, dict[str, float]]
    #: per present view, the spatial attention map at the original image's resolution
    attention_maps: dict[str, np.ndarray]
    #: the same maps at the model's input resolution (chest wall left)
    attention_maps_model: dict[str, np.ndarray]
    missing_views: list[str]
    geometry: dict[str, Geometry]
    model: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: the windowed images in [0, 1] (original orientation), when asked for with keep_display
    displays: dict[str, np.ndarray] = field(default_factory=dict)
    #: per view, how many times smaller than the image its attention map is (``map_side``;
    #: with it, JPEG 2000 images are also decoded at a reduced resolution level, and then
    #: ``geometry`` and ``displays`` are of the decoded size)
    map_factors: dict[str, int] = field(default_factory=dict)
    #: the exam's 0-100 malignancy score (its most suspicious breast's)
    score: float | None = None
    #: the score above which the exam is called positive (checkpoint or override), if any
    operating_point: float | None = None
    above_operating_point: bool | None = None
    #: per view, the regions that drive its breast's malignancy output (``inference.marks``),
    #: at most ``max_marks`` per breast, in the source image's pixel coordinates
    marks: dict[str, list[Mark]] = field(default_factory=dict)
    #: the exam's density: its denser breast's (None without a density head)
    density: str | None = None


@dataclass
class PreparedExam:
    """An exam decoded and preprocessed for the model (:meth:`MammoModel.prepare_exam`)."""

    slots: list[str]  # the slots given (present views)
    images: torch.Tensor  # (1, 4, 1, H, W), zero where a view is missing
    mask: torch.Tensor  # (1, 4) bool: which views are present
    geometry: dict[str, Geometry]
    displays: dict[str, np.ndarray]  # per view, the windowed image in [0, 1] (if kept)
    decoded_factor: dict[str, int]  # per view, how much smaller it was decoded (JPEG 2000)
    map_side: int | None
    seconds: dict[str, float]  # "decode", "preprocess"


class MammoModel:
    """A loaded checkpoint on a device, ready to read exams."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        operating_point: float | None = None,
    ) -> None:
        """``operating_point``: the 0-100 exam score above which an exam is called positive,
        instead of the checkpoint's own."""
        self.device = resolve_device(device)
        self.model, self.info = load_checkpoint(checkpoint, device=self.device)
        self.operating_point = (
            operating_point if operating_point is not None else self.info.operating_point
        )

    @torch.no_grad()
    def warm_up(self) -> float:
        """One forward pass on a blank four-view exam; returns its seconds.

        The first call compiles (or loads from numba's cache) the CPU scan kernels and sets up
        the backend's kernels, so a daemon calls this at start rather than charging it to the
        first exam it reads."""
        t = time.perf_counter()
        H, W = self.info.input_size
        self.model(
            torch.zeros(1, 4, 1, H, W, device=self.device),
            torch.ones(1, 4, dtype=torch.bool, device=self.device),
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def _slots(
        self, views: Mapping[str, Dataset | str | Path] | Sequence[Dataset | str | Path]
    ) -> dict[str, Dataset | str | Path]:
        if isinstance(views, Mapping):
            bad = [k for k in views if k not in VIEWS]
            if bad:
                raise ValueError(f"unknown view slot(s) {bad}; use {list(VIEWS)}")
            return dict(views)
        slots: dict[str, Dataset | str | Path] = {}
        for item in views:
            ds = load(item)
            slot = guess_slot(ds)
            if slot is None:
                what = item if not isinstance(item, Dataset) else ds.get("SOPInstanceUID")
                raise ValueError(
                    f"cannot tell the view of {what}: "
                    "laterality or view missing; pass a mapping slot -> image"
                )
            if slot in slots:
                raise ValueError(f"two images for {slot}; pass a mapping slot -> image")
            slots[slot] = ds
        return slots

    @torch.no_grad()
    def predict_exam(
        self,
        views: Mapping[str, Dataset | str | Path] | Sequence[Dataset | str | Path],
        keep_display: bool = False,
        map_side: int | None = None,
        max_marks: int = 3,
    ) -> ExamReading:
        """Read one exam of up to four views (datasets or paths; a list or slot mapping).

        ``keep_display=True`` also returns each view's windowed image (for drawing maps on
        it without decoding the pixels twice). ``map_side``: attention maps at an integer
        fraction of the image, at most this many pixels a side (``map_factors`` says which);
        default: the image's own size. ``max_marks``: at most this many marks per breast.

        The same as :meth:`read_prepared` of :meth:`prepare_exam`: a caller that overlaps
        one exam's decoding with another's work (the node's inference process) calls the
        two apart."""
        if max_marks < 0:
            raise ValueError(f"max_marks must be 0 or more, got {max_marks}")
        return self.read_prepared(
            self.prepare_exam(views, map_side=map_side, keep_display=keep_display),
            keep_display=keep_display,
            max_marks=max_marks,
        )

    def prepare_exam(
        self,
        views: Mapping[str, Dataset | str | Path] | Sequence[Dataset | str | Path],
        map_side: int | None = None,
        threads: int = 4,
        keep_display: bool = True,
    ) -> PreparedExam:
        """Decode and preprocess an exam's views (no model): the first half of
        :meth:`predict_exam`, the views side by side in up to ``threads`` threads
        (``keep_display=False``: the windowed images are not kept for drawing). Safe to
        call in another thread while the model reads another exam (it touches neither the
        model nor torch's autograd state)."""
        t0 = time.perf_counter()
        slots = self._slots(views)
        if not slots:
            raise ValueError("an exam needs at least one view")
        H, W = self.info.input_size
        pp = self.info.preprocessing  # the normalisation the checkpoint was trained with
        images = torch.zeros(1, 4, 1, H, W)
        mask = torch.zeros(1, 4, dtype=torch.bool)
        geoms: dict[str, Geometry] = {}
        displays: dict[str, np.ndarray] = {}
        present = [slot for slot in VIEWS if slot in slots]
        # The views of an exam are decoded and prepared side by side (the decoders and numpy
        # release the GIL for the heavy parts).
        workers = max(1, min(threads, len(present), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as ex:
            datasets = list(ex.map(lambda s: load(slots[s]), present))
            if map_side:  # the node's path: JPEG 2000 decoded at a reduced resolution level
                reduced_px = list(ex.map(lambda d: decode_reduced(d, map_side), datasets))
                pixels = [p for p, _ in reduced_px]
                decoded_f = [f for _, f in reduced_px]
            else:
                pixels = list(ex.map(decode, datasets))
                decoded_f = [1] * len(datasets)
            t_dec = time.perf_counter()

            def prepare(i: int) -> tuple[np.ndarray, torch.Tensor, Geometry]:
                disp = to_display(datasets[i], pixels[i])
                x, g = preprocess_array(
                    disp,
                    (H, W),
                    segment=bool(pp["segment"]),
                    mean=float(pp["mean"]),
                    std=float(pp["std"]),
                )
                return disp, x, g

            prepared = list(ex.map(prepare, range(len(present))))
        pixels.clear()  # the decoded arrays are not needed any more
        for slot, (disp, x, g) in zip(present, prepared):
            k = VIEWS.index(slot)
            images[0, k], geoms[slot] = x, g
            mask[0, k] = True
            if keep_display:
                displays[slot] = disp
        t1 = time.perf_counter()
        return PreparedExam(
            slots=list(slots),
            images=images,
            mask=mask,
            geometry=geoms,
            displays=displays,
            decoded_factor=dict(zip(present, decoded_f)),
            map_side=map_side,
            seconds={"decode": t_dec - t0, "preprocess": t1 - t_dec},
        )

    @torch.no_grad()
    def read_prepared(
        self, prepared: PreparedExam, keep_display: bool = False, max_marks: int = 3
    ) -> ExamReading:
        """The model's reading of an exam :meth:`prepare_exam` decoded (the second half of
        :meth:`predict_exam`)."""
        if max_marks < 0:
            raise ValueError(f"max_marks must be 0 or more, got {max_marks}")
        H, W = self.info.input_size
        pp = self.info.preprocessing
        slots, images, mask = prepared.slots, prepared.images, prepared.mask
        geoms, map_side = prepared.geometry, prepared.map_side
        decoded_factor = prepared.decoded_factor
        displays = prepared.displays if keep_display else {}
        t1 = time.perf_counter()
        out = self.model(images.to(self.device), mask.to(self.device), evidence=max_marks > 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        cfg = self.info.config
        bp = torch.softmax(out["birads_logits"][0].float(), -1).cpu().numpy()
        dp = (
            torch.softmax(out["diagnosis_logits"][0].float(), -1).cpu().numpy()
            if "diagnosis_logits" in out
            else None
        )
        densp = (
            torch.softmax(out["density_logits"][0].float(), -1).cpu().numpy()
            if "density_logits" in out
            else None
        )
        present = out["breast_present"][0].cpu().numpy()
        weights = out["fusion_weights"][0].float().cpu().numpy()
        breasts = {}
        for j, b in enumerate(BREASTS):
            probs = {c: float(p) for c, p in zip(cfg.birads_classes, bp[j])}
            r = BreastReading(
                present=bool(present[j]),
                birads=cfg.birads_classes[int(bp[j].argmax())] if present[j] else None,
                birads_probabilities=probs,
            )
            if dp is not None:
                r.diagnosis_probabilities = {c: float(p) for c, p in zip(DIAGNOSIS_CLASSES, dp[j])}
                r.diagnosis = DIAGNOSIS_CLASSES[int(dp[j].argmax())] if present[j] else None
            if densp is not None:
                r.density_probabilities = {c: float(p) for c, p in zip(DENSITY_CLASSES, densp[j])}
                r.density = DENSITY_CLASSES[int(densp[j].argmax())] if present[j] else None
            if present[j]:
                r.score = breast_score(r.birads_probabilities, r.diagnosis_probabilities)
            breasts[b] = r
        t3 = time.perf_counter()
        attn = out["attention"][0].float().cpu().numpy()
        maps_model, maps = {}, {}
        factors: dict[str, int] = {}
        for k, slot in enumerate(VIEWS):
            if slot in geoms:
                a = attn[k] / max(float(attn[k].max()), 1e-12)
                t = torch.from_numpy(a)[None, None]
                mm = torch.nn.functional.interpolate(
                    t, size=(H, W), mode="bilinear", align_corners=False
                )[0, 0].numpy()
                g = geoms[slot]
                if g.input_mask is not None:  # bounded by the breast, as the original-size map
                    mm = mm * g.input_mask
                maps_model[slot] = mm / max(float(mm.max()), 1e-12)
                f = 1
                if map_side:
                    f = max(1, math.ceil(max(g.original_shape) / map_side))
                # Pixels of the image per map pixel (the image may have been decoded smaller).
                factors[slot] = f * decoded_factor.get(slot, 1)
                full = map_to_original(a, reduced(g, f))
                maps[slot] = full / max(float(full.max()), 1e-12)
        score = exam_score({b: r.score for b, r in breasts.items()})
        op = self.operating_point
        marks: dict[str, list[Mark]] = {}
        if "evidence" in out:
            ev = out["evidence"][0].float().cpu().numpy()
            marks = find_marks(
                {slot: ev[k] for k, slot in enumerate(VIEWS) if slot in geoms},
                geoms,
                {b: r.score for b, r in breasts.items()},
                max_marks=max_marks,
                operating_point=op,
                source_factor=decoded_factor,
                images={
                    slot: images[0, VIEWS.index(slot), 0].numpy() * float(pp["std"])
                    + float(pp["mean"])
                    for slot in geoms
                },
            )
        return ExamReading(
            breasts=breasts,
            fusion_weights={
                b: {v: float(weights[j, k]) for k, v in enumerate(VIEWS)}
                for j, b in enumerate(BREASTS)
            },
            attention_maps=maps,
            attention_maps_model=maps_model,
            missing_views=[v for v in VIEWS if v not in slots],
            geometry=geoms,
            model={
                "sha256": self.info.sha256,
                "name": algorithm_name(cfg.arch),
                "arch": cfg.arch,
                "task": cfg.task,
                "version": self.info.metadata.get("version"),
                "intended_use": self.info.metadata.get("intended_use"),
            },
            seconds={
                "decode": prepared.seconds["decode"],
                "preprocess": prepared.seconds["preprocess"],
                "inference": t2 - t1,
                "maps": time.perf_counter() - t3,
                "total": sum(prepared.seconds.values()) + time.perf_counter() - t1,
            },
            displays=displays,
            map_factors=factors,
            score=score,
            operating_point=op,
            above_operating_point=None if op is None or score is None else score >= op,
            marks=marks,
            density=max((r.density for r in breasts.values() if r.density), default=None),
        )
