"""Marks (regions driving the malignancy output, with region scores) from the demo
checkpoint on phantoms whose lesion positions are known, and the three objects that carry
them: the Mammography CAD SR (TID 4006 findings), TID 1500 (a planar ROI per mark) and the
Grayscale Softcopy Presentation State, checked with dciodvfy and rendered by DCMTK's
dcmp2pgm (``test-artifacts/gsps-*.png``, or ``$MAMMO_NODE_ARTIFACTS``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from inference.synthetic import Lesion, lesion_boxes, make_mammogram, write
from node.results import (
    Mark,
    build_mammo_cad,
    build_presentation_state,
    build_tid1500,
)
from tests.gsps_render import render_png
from tests.helpers import dciodvfy_errors, reading_summary

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MAMMO_NODE_ARTIFACTS", ROOT / "test-artifacts"))
ROWS, COLS = 1280, 1024
STUDY = "1.2.826.0.1.3680043.10.1234.4242"


@pytest.fixture(scope="module")
def model():
    from inference.api import MammoModel

    return MammoModel(device="cpu")


def _exam(k: int):
    """A left breast with a malignant-looking lesion at a position drawn from ``k``, a right
    breast without; returns the views, the lesion and each left view's seed."""
    rng = np.random.default_rng(500 + k)
    les = [
        Lesion("spiculated", float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)), 0.06, 0.35)
    ]
    seeds = {
        f"{lat}-{v}": 600 + 4 * k + i
        for i, (lat, v) in enumerate((lat, v) for lat in "LR" for v in ("CC", "MLO"))
    }
    views = {
        slot: make_mammogram(
            slot[0],
            slot[2:],
            rows=ROWS,
            cols=COLS,
            seed=seed,
            lesions=les if slot[0] == "L" else [],
            study_uid=STUDY,
        )
        for slot, seed in seeds.items()
    }
    return views, les, seeds


@pytest.mark.parametrize("k", [0, 1, 2])
def test_marks_land_on_the_lesion(model, k):
    views, les, seeds = _exam(k)
    reading = model.predict_exam(views, map_side=1024)
    assert reading.breasts["L"].score is not None and reading.breasts["L"].score > 50
    left = [m for s in ("L-CC", "L-MLO") for m in reading.marks[s]]
    assert left, "no mark on the breast with the lesion"
    # The normal breast: no mark a workstation must show (none above the operating point);
    # a faint optional one may remain (the demo gives phantom 2's R-MLO one of region score
    # 1.0, its breast's whole score).
    right = reading.marks["R-CC"] + reading.marks["R-MLO"]
    assert not any(m.above_operating_point for m in right)
    assert all(m.score < 5 for m in right), right
    assert len(left) <= 3 and sorted(m.index for m in left) == list(range(1, len(left) + 1))
    top = max(left, key=lambda m: m.score)
    assert top.score == reading.breasts["L"].score and top.above_operating_point
    # The top mark of each view lies on the lesion: its centre inside the lesion's box (where
    # its profile exceeds 1/e), in the source image's pixels, and within 1.5 cells of the
    # model's feature grid (32 input pixels) of the lesion's centre (measured with the
    # density-trained demo: 0.20-1.15 of a cell over these three phantoms' four marked
    # views; 0.12-0.66 with the checkpoint before it).
    for slot in ("L-CC", "L-MLO"):
        if not reading.marks[slot]:
            continue
        m = reading.marks[slot][0]
        cx, cy, x0, y0, x1, y1 = lesion_boxes("L", ROWS, COLS, seeds[slot], les)[0]
        cell = 32 / reading.geometry[slot].scale
        assert x0 <= m.center[0] <= x1 and y0 <= m.center[1] <= y1, (slot, m.center, (cx, cy), cell)
        assert np.hypot(m.center[0] - cx, m.center[1] - cy) < 1.5 * cell
        xs, ys = zip(*m.outline)
        assert min(xs) <= m.center[0] <= max(xs) and min(ys) <= m.center[1] <= max(ys)
        assert 0 <= min(xs) and max(xs) <= COLS and 0 <= min(ys) and max(ys) <= ROWS


def test_marks_are_deterministic_and_capped(model):
    views, _, _ = _exam(0)
    a = model.predict_exam(views, map_side=1024, max_marks=1)
    b = model.predict_exam(views, map_side=1024, max_marks=1)
    assert a.marks == b.marks
    assert sum(len(ms) for s, ms in a.marks.items() if s[0] == "L") == 1
    assert not any(model.predict_exam(views, max_marks=0).marks.values())


def test_marks_of_a_mirrored_breast_are_in_its_own_pixels(model):
    """A right breast faces left: the mark is mirrored back onto the source image."""
    les = [Lesion("spiculated", 0.45, 0.4, 0.06, 0.35)]
    views = {
        f"R-{v}": make_mammogram("R", v, rows=ROWS, cols=COLS, seed=700 + i, lesions=les)
        for i, v in enumerate(("CC", "MLO"))
    }
    reading = model.predict_exam(views, map_side=1024)
    ms = [m for s in views for m in reading.marks[s]]
    assert ms
    for slot in views:
        for m in reading.marks[slot][:1]:
            cx, cy, *_ = lesion_boxes("R", ROWS, COLS, 700 + (slot == "R-MLO"), les)[0]
            assert m.center[0] > COLS / 2 and abs(m.center[0] - cx) < 0.25 * COLS


# -- centres refined on the image ---------------------------------------------------------
# The model's evidence grid is one value per 32 input pixels and its peak may sit a cell off
# the finding; the centre is found on the image (inference.marks.refine_center). These feed
# find_marks an evidence map whose peak is deliberately off the lesion by about a cell, on the
# phantoms of inference.synthetic and on images of another generator, and ask for the centre
# inside the lesion's box.
IN_H, IN_W = 512, 256
GRID = (16, 8)


def _model_input(ds):
    from inference.display import to_display
    from inference.preprocess import preprocess_array

    x, g = preprocess_array(to_display(ds), (IN_H, IN_W), mean=0.0, std=1.0)
    return x[0].numpy(), g  # display units, as MammoModel hands them to find_marks


def _evidence_off(g, centre: tuple[float, float], off: tuple[float, float]) -> np.ndarray:
    """A (16, 8) evidence grid: a bump ``off`` cells away from ``centre`` (source pixels)."""
    from inference.preprocess import original_to_input

    cx, cy = original_to_input(np.array([centre]), g)[0]
    cell = IN_H / GRID[0]
    yy, xx = np.mgrid[0 : GRID[0], 0 : GRID[1]] + 0.5
    return np.exp(-((xx - cx / cell - off[0]) ** 2 + (yy - cy / cell - off[1]) ** 2) / 0.7)


def _other_generator(
    rows: int, cols: int, seed: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Not inference.synthetic: a half-disc breast with lognormal texture, bright vessels
    and a rotated elliptical lesion with a soft edge; chest wall at column 0, [0, 1]."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    r = np.hypot(xx / (0.8 * cols), (yy - rows / 2) / (0.46 * rows))
    breast = np.clip((1 - r) * 20, 0, 1)
    tex = np.exp(ndimage.gaussian_filter(rng.standard_normal((rows, cols)), 9) * 6)
    img = breast * (0.3 + 0.25 * np.sqrt(np.clip(1 - r, 0, 1)) + 0.12 * tex / tex.max())
    for _ in range(4):  # vessels: thin bright curves from the chest wall
        y0, k = rng.uniform(0.2, 0.8) * rows, rng.uniform(-0.4, 0.4)
        line = np.abs(yy - (y0 + k * xx + 15 * np.sin(xx / 40))) < 1.5
        img = img + 0.08 * line * breast
    cx, cy = centre
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / (1.3 * radius)
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / (0.8 * radius)
    img = img + 0.2 * np.exp(-((u**2 + v**2) ** 1.5)) * breast
    img = img + rng.normal(0, 0.008, img.shape) * breast
    return np.clip(img, 0, 1)


def _refined(view, box, off, images=True):
    from inference.marks import find_marks

    x, g = view
    ev = _evidence_off(g, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), off)
    slot = "L-CC"
    marks = find_marks({slot: ev}, {slot: g}, {"L": 80.0}, images={slot: x} if images else None)[
        slot
    ]
    assert marks, "no mark"
    return marks[0]


def _inside(c, box) -> bool:
    return box[0] <= c[0] <= box[2] and box[1] <= c[1] <= box[3]


PHANTOM_CASES = [
    ("mass", "L", "CC", 0.45, 0.4, 0.04, (1.0, 1.0)),
    ("spiculated", "R", "MLO", 0.6, 0.6, 0.035, (-1.0, 0.8)),
    ("calcifications", "L", "MLO", 0.35, 0.7, 0.05, (0.9, -1.0)),
    ("spiculated", "R", "CC", 0.7, 0.3, 0.06, (-0.8, -0.9)),
    ("mass", "L", "CC", 0.3, 0.55, 0.035, (1.1, 0.0)),
]


@pytest.mark.unit
@pytest.mark.parametrize("kind,lat,view,x,y,radius,off", PHANTOM_CASES)
def test_refined_centre_lies_in_the_phantom_lesion(kind, lat, view, x, y, radius, off):
    les = [Lesion(kind, x, y, radius, 0.3)]
    seed = 900 + PHANTOM_CASES.index((kind, lat, view, x, y, radius, off))
    ds = make_mammogram(lat, view, rows=640, cols=512, seed=seed, lesions=les)
    box = lesion_boxes(lat, 640, 512, seed, les)[0][2:]
    view = _model_input(ds)
    coarse = _refined(view, box, off, images=False)
    fine = _refined(view, box, off)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert _inside(fine.center, box), (fine.center, box, coarse.center)
    # closer than the evidence alone put it, and within a third of the box's half-height
    assert np.hypot(fine.center[0] - cx, fine.center[1] - cy) < np.hypot(
        coarse.center[0] - cx, coarse.center[1] - cy
    )
    assert abs(fine.center[1] - cy) < (box[3] - box[1]) / 2
    xs, ys = zip(*fine.outline)  # the outline holds the refined centre
    assert min(xs) <= fine.center[0] <= max(xs) and min(ys) <= fine.center[1] <= max(ys)
    assert fine == _refined(view, box, off)  # deterministic


@pytest.mark.unit
@pytest.mark.parametrize(
    "seed,lat,centre,off",
    [
        (1, "L", (180, 260), (1.0, 1.0)),
        (2, "R", (150, 380), (-1.0, -0.7)),
        (3, "L", (240, 200), (0.0, 1.1)),
    ],
)
def test_refined_centre_on_another_generator(seed, lat, centre, off):
    rows, cols, radius = 640, 512, 24.0
    px = _other_generator(rows, cols, seed, centre, radius)
    ds = make_mammogram(lat, "CC", pixels=px, seed=seed)
    cx = cols - centre[0] if lat == "R" else centre[0]  # make_mammogram mirrors R
    # the lesion's centre pixel (cx, cy) spans [cx, cx + 1): its centre point is + 0.5
    box = (cx + 0.5 - radius, centre[1] + 0.5 - radius, cx + 0.5 + radius, centre[1] + 0.5 + radius)
    view = _model_input(ds)
    coarse = _refined(view, box, off, images=False)
    fine = _refined(view, box, off)
    assert not _inside(coarse.center, box)  # the offset evidence alone misses it
    assert _inside(fine.center, box), (fine.center, box, coarse.center)


@pytest.mark.unit
def test_no_blob_keeps_the_evidence_centre_and_two_regions_on_one_blob_are_one_mark():
    from inference.marks import find_marks

    ds = make_mammogram(
        "L",
        "CC",
        rows=640,
        cols=512,
        seed=5,
        pixels=np.where(np.mgrid[0:640, 0:512][1] < 380, 0.5, 0.0),
    )
    x, g = _model_input(ds)
    ev = np.zeros(GRID)
    ev[8, 3] = 1.0
    flat = find_marks({"L-CC": ev}, {"L-CC": g}, {"L": 60.0}, images={"L-CC": x})["L-CC"]
    plain = find_marks({"L-CC": ev}, {"L-CC": g}, {"L": 60.0})["L-CC"]
    assert [m.center for m in flat] == [m.center for m in plain]  # flat breast: no blob
    les = [Lesion("mass", 0.5, 0.5, 0.04, 0.3)]
    ds = make_mammogram("L", "CC", rows=640, cols=512, seed=6, lesions=les)
    x, g = _model_input(ds)
    box = lesion_boxes("L", 640, 512, 6, les)[0][2:]
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    two = _evidence_off(g, centre, (1.2, 0.0)) + 0.9 * _evidence_off(g, centre, (-1.2, 0.0))
    ms = find_marks({"L-CC": two}, {"L-CC": g}, {"L": 60.0}, images={"L-CC": x})["L-CC"]
    assert len(ms) == 1 and _inside(ms[0].center, box)


# -- the objects that carry them --------------------------------------------------------
@pytest.fixture(scope="module")
def exam_files(tmp_path_factory):
    views, les, seeds = _exam(0)
    d = tmp_path_factory.mktemp("exam")
    paths = {slot: write(ds, d / f"{slot}.dcm") for slot, ds in views.items()}
    return views, paths, les, seeds


def _marks(les, seeds) -> dict[str, list[Mark]]:
    cx, cy, x0, y0, x1, y1 = lesion_boxes("L", ROWS, COLS, seeds["L-CC"], les)[0]
    octagon = [
        (cx + r * np.cos(t), cy + 0.6 * r * np.sin(t))
        for t, r in zip(np.linspace(0, 2 * np.pi, 8, endpoint=False), [(x1 - x0) / 2] * 8)
    ]
    return {
        "L-CC": [
            Mark("L-CC", 1, 85.0, (cx, cy), [(round(x, 2), round(y, 2)) for x, y in octagon], True),
            Mark(
                "L-CC",
                2,
                20.0,
                (100.0, 200.0),
                [(80.0, 180.0), (120.0, 180.0), (120.0, 220.0)],
                False,
            ),
        ],
        "L-MLO": [],
        "R-CC": [],
        "R-MLO": [],
    }


def test_mammo_cad_sr_has_a_single_image_finding_per_mark(exam_files, tmp_path):
    views, _, les, seeds = exam_files
    sr = build_mammo_cad(views, reading_summary(marks=_marks(les, seeds)), STUDY, 1)
    text = json.dumps(sr.to_json_dict(), default=str)
    assert text.count('"111059"') == 2  # Single Image Finding x 2
    assert text.count("Presentation Optional") == 1  # the mark below the OP
    assert "Certainty of Finding" in text and '"POINT"' in text and '"POLYLINE"' in text
    assert "Successful Detections" in text and "Not Attempted" not in text
    f = tmp_path / "cad.dcm"
    sr.save_as(f, enforce_file_format=True)
    assert dciodvfy_errors(f) == []
    # DCMTK checks the Mammography CAD SR IOD's relationship constraints while it reads.
    import subprocess

    dump = subprocess.run(["/usr/bin/dsrdump", str(f)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.count('<contains CODE:(,,"Single Image Finding")') == 2
    assert 'SCOORD:(,,"Center")=(POINT' in dump.stdout
    t = build_tid1500(views, reading_summary(marks=_marks(les, seeds)), STUDY, 1)
    tt = json.dumps(t.to_json_dict(), default=str)
    assert tt.count("AI mark L-CC #") == 2 and "AI region score" in tt
    f = tmp_path / "t.dcm"
    t.save_as(f, enforce_file_format=True)
    assert dciodvfy_errors(f) == []


def test_presentation_state_rendered_by_dcmtk(exam_files, tmp_path):
    views, paths, les, seeds = exam_files
    marks = _marks(les, seeds)
    pr = build_presentation_state(views, reading_summary(marks=marks), STUDY, 1)
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and pr.Modality == "PR"
    f = tmp_path / "gsps.dcm"
    pr.save_as(f, enforce_file_format=True)
    assert dciodvfy_errors(f) == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / "gsps-L-CC.png"
    parsed = render_png(f, paths["L-CC"], png)
    assert parsed.layers == ["AI MARKS", "AI EXAM SCORE"]
    assert len(parsed.polylines) == 2  # both marks, on L-CC only
    first = np.asarray(parsed.polylines[0])
    assert np.allclose(first[:-1], np.asarray(marks["L-CC"][0].outline), atol=0.01)
    assert np.allclose(first[0], first[-1])  # closed
    texts = [t for t, _ in parsed.texts]
    assert "85 (above op)" in texts and "20" in texts
    assert any("Exam score 85/100, above the operating point (40)" in t for t in texts)
    # An image without marks gets the exam score only.
    other = render_png(f, paths["R-CC"], tmp_path / "r.png")
    assert other.polylines == [] and len(other.texts) == 1
    from PIL import Image

    assert Image.open(png).size == (COLS, ROWS)


def test_reading_inputs_are_checked_with_the_attribute_named(exam_files):
    views, _, les, seeds = exam_files
    bad = _marks(les, seeds)
    bad["L-CC"][0] = dataclasses.replace(bad["L-CC"][0], score=140.0)
    with pytest.raises(ValueError, match=r"reading.marks\['L-CC'\]\[0\].score"):
        build_presentation_state(views, reading_summary(marks=bad), STUDY, 1)
    with pytest.raises(ValueError, match="sources: no image"):
        build_mammo_cad({}, reading_summary(), STUDY, 1)


# -- density ------------------------------------------------------------------------------
def test_both_srs_carry_density_as_cid_6000(exam_files, tmp_path):
    views, _, les, seeds = exam_files
    r = reading_summary()
    r.breasts["L"].density, r.breasts["R"].density, r.density = "B", "C", "C"
    for build in (build_mammo_cad, build_tid1500):
        sr = build(views, r, STUDY, 1)
        text = json.dumps(sr.to_json_dict(), default=str)
        assert "129715009" in text  # Breast composition
        assert "129717001" in text and text.count("129718006") == 2  # L: B; R and exam: C
        f = tmp_path / "d.dcm"
        sr.save_as(f, enforce_file_format=True)
        assert dciodvfy_errors(f) == []
    r.breasts["L"].density = "E"
    with pytest.raises(ValueError, match=r"reading.breasts\['L'\].density"):
        build_tid1500(views, r, STUDY, 1)


@pytest.mark.parametrize(
    "raw,want",
    [
        ("DENSITY A", 0),
        ("B", 1),
        ("3", 2),
        (4, 3),
        ("ACR 2", 1),
        ("4.0", 3),
        ("", None),
        ("0", None),
        ("nan", None),
        ("heterogeneously dense", 2),
    ],
)
def test_density_labels_of_each_data_set(raw, want):
    from inference.datasets import parse_density

    assert parse_density(raw) == want


def test_density_metrics():
    from inference.metrics import density_metrics

    perfect = density_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]))
    assert perfect["accuracy"] == 1.0 and perfect["quadratic_weighted_kappa"] == 1.0
    m = density_metrics(np.array([0, 0, 1, 3]), np.array([0, 1, 1, 0]))
    assert m["confusion"][3][0] == 1 and m["accuracy"] == 0.5
    assert m["quadratic_weighted_kappa"] < 0.5


def test_synthetic_density_follows_the_label():
    means = []
    for d in "ABCD":
        a = make_mammogram("L", "CC", rows=256, cols=208, seed=3, density=d).pixel_array
        means.append(float(a[a > 300].mean()))
    assert means == sorted(means) and means[-1] - means[0] > 200


def test_density_head_trains_only_where_labels_exist(tmp_path):
    import torch

    from inference.model import create_model

    m = create_model("cnn", density=True, image_size=(64, 32), dims=(8, 8, 8, 8))
    out = m(torch.zeros(1, 4, 1, 64, 32), torch.ones(1, 4, dtype=torch.bool))
    assert out["density_logits"].shape == (1, 2, 4)
    _, parts = m.loss(out, torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), torch.tensor([[-1, -1]]))
    assert "density" not in parts
    _, parts = m.loss(out, torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), torch.tensor([[2, -1]]))
    assert parts["density"] > 0
    # Checkpoints without the key (every one made before this head) build without it.
    from safetensors.torch import load_file, save_file

    from inference.checkpoint import load_checkpoint, save_checkpoint

    old = create_model("cnn", image_size=(64, 32), dims=(8, 8, 8, 8))
    f = tmp_path / "old.safetensors"
    save_checkpoint(old, f, training_data="test")
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata())
    config = json.loads(meta["model_config"])
    config.pop("density")
    meta["model_config"] = json.dumps(config, sort_keys=True)
    meta.pop("density_classes", None)
    save_file(load_file(str(f)), str(f), metadata=meta)
    model, info = load_checkpoint(str(f))
    assert info.config.density is False and model.density_head is None
    # The bundled demo has the head (retrained with density phantoms).
    demo, dinfo = load_checkpoint(None)
    assert dinfo.config.density is True and demo.density_head is not None


def test_presentation_state_of_a_real_reading(model, exam_files, tmp_path):
    """The node's path (node.inference_process._read): the demo checkpoint's marks in the
    presentation state, rendered by DCMTK (test-artifacts/gsps-model-*.png), each on the
    lesion's view."""
    from node.inference_process import ExamJob, _read

    views, paths, les, seeds = exam_files
    root = next(iter(paths.values())).parent
    job = ExamJob(
        data_dir=str(root),
        study_uid=STUDY,
        version=1,
        paths={slot: p.name for slot, p in paths.items()},
    )
    sources, _, summary = _read(model, job)
    assert any(summary.marks.values())
    pr = build_presentation_state(sources, summary, STUDY, 1)
    f = tmp_path / "gsps.dcm"
    pr.save_as(f, enforce_file_format=True)
    assert dciodvfy_errors(f) == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for slot in ("L-CC", "L-MLO", "R-CC"):
        parsed = render_png(f, paths[slot], ARTIFACTS / f"gsps-model-{slot}.png")
        assert len(parsed.polylines) == len(summary.marks.get(slot, []))
        for poly, mark in zip(parsed.polylines, summary.marks.get(slot, [])):
            assert np.allclose(np.asarray(poly)[:-1], np.asarray(mark.outline), atol=0.01)


def test_froc_points():
    from inference.metrics import froc

    # 2 lesions on 4 images: marks by falling score: hit lesion 0, miss, hit 1, miss, miss.
    r = froc(
        [
            (90, True, 0),
            (80, False, -1),
            (70, True, 1),
            (60, False, -1),
            (50, False, -1),
            (40, True, 0),
        ],
        lesions=2,
        images=4,
    )
    assert r["points"] == {"0.5": 1.0, "1.0": 1.0, "2.0": 1.0}
    r = froc([(90, False, -1), (80, False, -1), (70, True, 0)], lesions=2, images=2)
    assert r["points"]["0.5"] == 0.0 and r["points"]["1.0"] == 0.5
    # One mark inside two overlapping lesions (a mass and its calcifications) finds both.
    r = froc([(90, True, [0, 1]), (50, False, [])], lesions=3, images=2)
    assert r["points"]["0.5"] == pytest.approx(2 / 3)


def test_synth_writes_lesion_boxes_and_evaluate_reports_froc_and_density(tmp_path):
    from inference.datasets import read_dataset
    from inference.synthetic_dataset import write_synthetic_dataset
    from inference.train import evaluate, format_table

    write_synthetic_dataset(
        tmp_path / "s", exams=6, seed=3, rows=320, cols=256, test_fraction=1.0, progress=False
    )
    recs = read_dataset(tmp_path / "s", "vindr")
    assert all(set(r.density) == {"L", "R"} for r in recs)  # DENSITY X per breast
    with_lesions = [r for r in recs if r.lesions]
    assert with_lesions  # BI-RADS 4-5 boxes
    for r in with_lesions:
        for slot, boxes in r.lesions.items():
            assert r.birads[slot[0]] >= 4
            assert all(0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 320 for x0, y0, x1, y1 in boxes)
    res = evaluate(
        str(tmp_path / "s"),
        None,
        split="test",
        device="cpu",
        progress=False,
        bootstrap=10,
        plots=str(tmp_path / "plots"),
    )
    loc = res["localisation"]
    assert loc["lesions"] == sum(len(b) for r in with_lesions for b in r.lesions.values())
    assert set(loc["points"]) == {"0.5", "1.0", "2.0"}
    assert (tmp_path / "plots" / "froc.png").exists()
    dens = res["density"]  # the demo checkpoint's density head
    assert dens["n"] == 12 and 0 <= dens["accuracy"] <= 1 and len(dens["confusion"]) == 4
    assert "Localisation:" in format_table(res)


def test_a_view_read_from_a_kind_the_checkpoint_was_not_trained_on_is_said(model, exam_files):
    """A checkpoint that states the image kinds it was trained on (metadata ``image_kinds``):
    the reading says when a view was read from another kind, and not when every view is
    one of them (issue 19 item 2)."""
    from node.inference_process import ExamJob, _read

    _, paths, _, _ = exam_files
    root = next(iter(paths.values())).parent
    metadata = model.info.metadata
    saved = metadata.get("image_kinds")
    try:
        metadata["image_kinds"] = ["conventional"]
        kinds = {slot: "conventional" for slot in paths}
        kinds["L-CC"] = "synthesized"
        job = ExamJob(
            data_dir=str(root),
            study_uid=STUDY,
            version=1,
            paths={slot: p.name for slot, p in paths.items()},
            kinds=kinds,
        )
        _, _, summary = _read(model, job)
        said = [n for n in summary.notes if "the model was trained on" in n]
        assert len(said) == 1 and "synthesized" in said[0] and "conventional" in said[0], (
            summary.notes
        )
        assert summary.view_kinds["L-CC"] == "synthesized"
        job = ExamJob(
            data_dir=str(root),
            study_uid=STUDY,
            version=1,
            paths={slot: p.name for slot, p in paths.items()},
            kinds={slot: "conventional" for slot in paths},
        )
        _, _, summary = _read(model, job)
        assert not [n for n in summary.notes if "the model was trained on" in n]
    finally:
        if saved is None:
            metadata.pop("image_kinds", None)
        else:
            metadata["image_kinds"] = saved


@pytest.mark.parametrize("density", ["A", "D"])
def test_the_demo_reads_the_density_a_phantom_was_made_with(model, density):
    """The bundled checkpoint's density head on density phantoms (issue 20 item 4): the
    breast composition of the phantom's fibroglandular share, per breast and for the exam."""
    from inference.synthetic import make_exam

    exam = make_exam(seed=77, rows=640, cols=512, density=density)
    r = model.predict_exam({f"{d.ImageLaterality}-{d.ViewPosition}": d for d in exam})
    assert r.breasts["L"].density == r.breasts["R"].density == density
    assert r.density == density
    probs = r.breasts["L"].density_probabilities
    assert set(probs) == {"A", "B", "C", "D"} and max(probs, key=probs.get) == density
