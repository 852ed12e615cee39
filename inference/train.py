"""Training and evaluation loops (``mammo-node train`` / ``mammo-node evaluate``)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from inference.checkpoint import load_checkpoint, save_checkpoint
from inference.data import ExamDataset, read_dataset, select_split
from inference.device import resolve_device
from inference.metrics import evaluate_predictions
from inference.model import HybridCnnVssm, ModelConfig

log = logging.getLogger("mammo_node.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % (1 << 32)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class TrainArgs:
    data: str
    out: str
    fmt: str = "vindr"
    task: str = "birads-5class"
    arch: str = "hybrid"
    weights: str = "shared"
    diagnosis: bool = True
    #: A BI-RADS density head: "auto" = where the training exams carry density labels.
    density: str = "auto"
    epochs: int = 10
    image_size: tuple[int, int] = (512, 256)
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    resume: bool = False
    birads_weight: float = 1.0
    diagnosis_weight: float = 1.0
    cache_dir: str | None = None
    training_data: str | None = None
    intended_use: str = "research"
    progress: bool = True
    stop_after_epoch: int | None = None  # stop early (time-boxed runs); --resume continues
    #: Share of the training exams held out to choose the operating point on (0: none).
    val_fraction: float = 0.1
    #: The specificity the operating point is chosen at, on the held-out exams.
    specificity: float = 0.9


def _loader(ds: ExamDataset, batch: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                      generator=g, worker_init_fn=_worker_init, drop_last=False,
                      persistent_workers=workers > 0)


#: What a resume state may hold beyond tensors, dicts, lists and numbers (torch's
#: weights_only unpickler refuses everything else: a resume file is not trusted code).
RESUME_SAFE_GLOBALS: list = []


def load_resume_state(path: Path) -> dict:
    """The state ``train`` saved for ``--resume``, loaded with ``torch.load(weights_only=True)``
    (no arbitrary objects: a pickle that names any other global is refused with
    ``pickle.UnpicklingError``)."""
    import pickle

    try:
        with torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
            st = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"--resume: {path} holds something other than training "
                                     f"state, refused: {str(exc).splitlines()[0]}") from None
    if not isinstance(st, dict):
        raise ValueError(f"--resume: {path} is not a training state")
    return st


def train(a: TrainArgs) -> dict[str, Any]:
    """Train a model; writes the checkpoint (each epoch) and a resume state beside it."""
    seed_everything(a.seed)
    device = resolve_device(a.device)
    records = read_dataset(a.data, a.fmt)
    train_recs = select_split(records, "training") or records
    if not train_recs:
        raise ValueError(f"no exams found in {a.data}")
    val_recs: list = []
    if a.val_fraction > 0 and len(train_recs) >= 4:
        # A fixed share of the exams (by a hash of the exam id and the seed) is held out:
        # the operating point is chosen on exams the model did not learn from.
        import hashlib

        def held_out(r) -> bool:
            h = hashlib.sha1(f"{a.seed}|{r.exam_id}".encode()).hexdigest()[:8]
            return int(h, 16) / 0xFFFFFFFF < a.val_fraction

        val_recs = [r for r in train_recs if held_out(r)]
        train_recs = [r for r in train_recs if not held_out(r)]
    if a.density not in ("auto", "on", "off"):
        raise ValueError(f"density must be auto, on or off, got {a.density!r}")
    density = a.density == "on" or (a.density == "auto"
                                    and any(r.density for r in train_recs))
    cfg = ModelConfig(arch=a.arch, weights=a.weights, task=a.task, diagnosis=a.diagnosis,
                      density=density,
                      image_size=(int(a.image_size[0]), int(a.image_size[1])),
                      loss_weights={"birads": a.birads_weight, "diagnosis": a.diagnosis_weight,
                                    "density": 1.0})
    model = HybridCnnVssm(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    cache = a.cache_dir or str(Path(a.data) / ".mammo-cache")
    ds = ExamDataset(train_recs, cfg.image_size, cfg.task, cache_dir=cache)
    loader = _loader(ds, a.batch_size, True, a.workers, a.seed)
    steps_total = max(1, a.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, len(loader))) * 0.5 *
        (1 + math.cos(math.pi * min(s, steps_total) / steps_total)))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    out = Path(a.out)
    state_path = out.with_suffix(out.suffix + ".resume.pt")
    start_epoch = 0
    if a.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no saved state at {state_path}")
        st = load_resume_state(state_path)
        if st["config"] != cfg.to_dict():
            raise ValueError("--resume: the saved state was trained with another model "
                             "config; use the same --arch/--task/--image-size/--weights")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        loader.generator.set_state(st["loader_rng"])
        start_epoch = st["epoch"]
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    training_data = a.training_data or (
        f"{len(train_recs)} exams from {a.data} (format {a.fmt}, split training)")
    history = []
    for epoch in range(start_epoch, a.epochs):
        model.train()
        t0 = time.perf_counter()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{a.epochs}", unit="batch",
                   disable=not a.progress, leave=False)
        for batch in bar:
            images = batch["images"].to(device, non_blocking=True)
            mask = batch["mask"].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                outp = model(images, mask)
                loss, parts = model.loss(outp, batch["birads"].to(device),
                                         batch["diagnosis"].to(device),
                                         batch["density"].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach()) * images.shape[0]
            n += images.shape[0]
            bar.set_postfix(loss=f"{total / n:.4f}")
        history.append({"epoch": epoch + 1, "loss": total / max(n, 1),
                        "seconds": round(time.perf_counter() - t0, 1)})
        log.info("epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, a.epochs, total / max(n, 1),
                 history[-1]["seconds"])
        if a.progress:
            print(f"epoch {epoch + 1}/{a.epochs}: loss {total / max(n, 1):.4f} "
                  f"({history[-1]['seconds']:.0f} s)", flush=True)
        extra = {"epochs": str(epoch + 1), "seed": str(a.seed)}
        last = epoch + 1 == a.epochs or (a.stop_after_epoch is not None
                                         and epoch + 1 >= a.stop_after_epoch)
        if last and val_recs:
            op = _operating_point(model, val_recs, device, a, cache, cfg.birads_classes)
            if op is not None:
                extra["operating_point"] = json.dumps(op)
                log.info("operating point: exam score %.1f (specificity %.3f, sensitivity "
                         "%.3f on %d held-out exams)", op["score"], op["specificity"],
                         op["sensitivity"], op["n"])
        save_checkpoint(model, out, training_data=training_data,
                        intended_use=a.intended_use, extra=extra)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1,
                    "rng": torch.get_rng_state(), "loader_rng": loader.generator.get_state(),
                    "config": cfg.to_dict()}, state_path)
        if a.stop_after_epoch is not None and epoch + 1 >= a.stop_after_epoch:
            log.info("stopping after epoch %d as asked; --resume continues", epoch + 1)
            break
    return {"checkpoint": str(out), "history": history}


def _operating_point(model: HybridCnnVssm, records, device: torch.device, a: TrainArgs,
                     cache: str, classes: list[str]) -> dict[str, Any] | None:
    from inference.scoring import choose_operating_point

    # The held-out pass must not move the random streams training goes on with (a run
    # stopped after this epoch and resumed equals one that never stopped).
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        preds = predict_records(model, records, device, a.batch_size, 0, cache_dir=cache,
                                progress=False)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    model.train()
    y, s = exam_level(preds, classes)
    op = choose_operating_point(y, s, a.specificity)
    if op is None:
        log.warning("no operating point: the %d held-out exams need positives and "
                    "negatives", len(records))
        return None
    op["chosen_on"] = f"{len(y)} held-out training exams"
    return op


@torch.no_grad()
def predict_records(model: HybridCnnVssm, records, device: torch.device, batch_size: int = 4,
                    workers: int = 0, cache_dir: str | None = None,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Probabilities for every breast of every exam, with the raw labels."""
    cfg = model.cfg
    ds = ExamDataset(records, cfg.image_size, cfg.task, cache_dir=cache_dir)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs, dprobs, braw, diag, present = [], [], [], [], []
    densp, dens = [], []
    model.eval()
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        out = model(batch["images"].to(device), batch["mask"].to(device))
        probs.append(torch.softmax(out["birads_logits"].float(), -1).cpu())
        if "diagnosis_logits" in out:
            dprobs.append(torch.softmax(out["diagnosis_logits"].float(), -1).cpu())
        if "density_logits" in out:
            densp.append(torch.softmax(out["density_logits"].float(), -1).cpu())
        dens.append(batch["density"])
        braw.append(batch["birads_raw"])
        diag.append(batch["diagnosis"])
        present.append(out["breast_present"].cpu())
    res = {"birads_probs": torch.cat(probs).reshape(-1, probs[0].shape[-1]).numpy(),
           "birads_raw": torch.cat(braw).reshape(-1).numpy(),
           "diagnosis": torch.cat(diag).reshape(-1).numpy(),
           "present": torch.cat(present).reshape(-1).numpy()}
    if dprobs:
        res["diagnosis_probs"] = torch.cat(dprobs).reshape(-1, 3).numpy()
    res["density"] = torch.cat(dens).reshape(-1).numpy()
    if densp:
        res["density_probs"] = torch.cat(densp).reshape(-1, 4).numpy()
    return res


def exam_level(preds: dict[str, np.ndarray], birads_classes: list[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(exam is positive, exam score 0-100) from per-breast predictions (two rows per exam).

    Positive: a breast whose diagnosis is malignant; where a data set has no diagnosis
    labels, a breast of BI-RADS 4 or 5. The score is the most suspicious present breast's
    (inference.scoring)."""
    from inference.model import DIAGNOSIS_CLASSES
    from inference.scoring import SUSPICIOUS

    present = preds["present"].astype(bool)
    if "diagnosis_probs" in preds:
        breast = 100.0 * preds["diagnosis_probs"][:, DIAGNOSIS_CLASSES.index("malignant")]
    else:
        cols = [i for i, c in enumerate(birads_classes) if c in SUSPICIOUS]
        breast = 100.0 * preds["birads_probs"][:, cols].sum(1)
    breast = np.where(present, breast, -1.0)
    diag = preds["diagnosis"]
    malignant = diag == DIAGNOSIS_CLASSES.index("malignant")
    suspicious = preds["birads_raw"] >= 4
    positive = np.where(diag >= 0, malignant, suspicious) & present
    labelled = ((diag >= 0) | (preds["birads_raw"] > 0)) & present
    score = breast.reshape(-1, 2).max(1)
    keep = labelled.reshape(-1, 2).any(1) & (score >= 0)
    return positive.reshape(-1, 2).any(1)[keep], np.round(score[keep], 1)


def evaluate(data: str, checkpoint: str | None, fmt: str = "vindr", split: str = "test",
             device: str = "auto", batch_size: int = 4, workers: int = 0,
             progress: bool = True, operating_point: float | None = None,
             bootstrap: int = 1000, plots: str | None = None) -> dict[str, Any]:
    """Metrics per task on one split (see :func:`inference.metrics.evaluate_predictions`)
    and, under ``"exam"``, the exam score's statistics (:func:`inference.scoring
    .exam_statistics`) at the checkpoint's operating point (or ``operating_point``);
    ``plots``: a folder for roc.png and calibration.png."""
    from inference.scoring import exam_statistics, plot_calibration, plot_roc

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=dev)
    records = select_split(read_dataset(data, fmt), split)
    if not records:
        raise ValueError(f"no exams in split {split!r} of {data}")
    preds = predict_records(model, records, dev, batch_size, workers,
                            cache_dir=str(Path(data) / ".mammo-cache"), progress=progress)
    results: dict[str, Any] = dict(evaluate_predictions(preds, info.config.task))
    if "density_probs" in preds:
        from inference.metrics import density_metrics

        keep = preds["present"].astype(bool) & (preds["density"] >= 0)
        results["density"] = density_metrics(preds["density"][keep],
                                             preds["density_probs"][keep].argmax(1))
    if any(r.lesions for r in records):
        results["localisation"] = localisation(records, checkpoint, device,
                                               progress=progress)
    y, s = exam_level(preds, info.config.birads_classes)
    op = operating_point if operating_point is not None else info.operating_point
    stats = exam_statistics(y, s, op, bootstrap=bootstrap)
    results["exam"] = stats
    if plots:
        folder = Path(plots)
        folder.mkdir(parents=True, exist_ok=True)
        stats["plots"] = [str(plot_roc(folder / "roc.png", y, s, op, stats["auc"])),
                          str(plot_calibration(folder / "calibration.png",
                                               stats["calibration"]))]
        if "localisation" in results:
            from inference.scoring import plot_froc

            stats["plots"].append(str(plot_froc(folder / "froc.png",
                                                results["localisation"])))
    return results


def localisation(records: list, checkpoint: str | None, device: str = "auto",
                 max_marks: int = 3, progress: bool = True) -> dict[str, Any]:
    """FROC of the marks (:func:`inference.metrics.froc`) on exams whose lesions are known:
    every exam read as the node reads it (``MammoModel.predict_exam``, marks in the source
    image's pixels); a mark hits a lesion when its centre lies in the lesion's box."""
    from inference.api import MammoModel
    from inference.metrics import froc

    model = MammoModel(checkpoint, device=device)
    marks: list[tuple[float, bool, int]] = []
    n_lesions = n_images = 0
    for rec in tqdm(records, desc="localisation", unit="exam", disable=not progress,
                    leave=False):
        if not rec.paths:
            continue
        reading = model.predict_exam({s: str(p) for s, p in rec.paths.items()},
                                     max_marks=max_marks)
        for slot in rec.paths:
            n_images += 1
            boxes = rec.lesions.get(slot, [])
            ids = list(range(n_lesions, n_lesions + len(boxes)))
            n_lesions += len(boxes)
            for mk in reading.marks.get(slot, []):
                x, y = mk.center
                hit = [i for i, (x0, y0, x1, y1) in zip(ids, boxes)
                       if x0 <= x <= x1 and y0 <= y <= y1]
                marks.append((mk.score, bool(hit), hit[0] if hit else -1))
    return froc(marks, n_lesions, n_images)


def calibrate(data: str, checkpoint: str | None, out: str, fmt: str = "vindr",
              split: str = "training", specificity: float = 0.9, device: str = "auto",
              batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Choose the operating point on ``split`` of ``data`` at ``specificity`` and write the
    checkpoint again with it (the weights unchanged)."""
    from safetensors.torch import load_file, save_file

    from inference.checkpoint import DEMO_CHECKPOINT, read_info
    from inference.scoring import choose_operating_point

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=dev)
    records = select_split(read_dataset(data, fmt), split)
    if not records:
        raise ValueError(f"no exams in split {split!r} of {data}")
    preds = predict_records(model, records, dev, batch_size, 0,
                            cache_dir=str(Path(data) / ".mammo-cache"), progress=progress)
    y, s = exam_level(preds, info.config.birads_classes)
    op = choose_operating_point(y, s, specificity)
    if op is None:
        raise ValueError(f"split {split!r} of {data} needs positive and negative exams")
    op["chosen_on"] = f"{len(y)} exams, split {split} of {data}"
    src = Path(checkpoint or DEMO_CHECKPOINT)
    meta = dict(read_info(src).metadata)
    meta["operating_point"] = json.dumps(op)
    tensors = load_file(str(src))
    dst = Path(out)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dst)
    return op


def format_table(results: dict[str, Any], title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'Task':<16} {'AUC':>7} {'F1':>7} {'Acc':>7} {'n':>6}")
    lines.append("-" * 47)
    for task, m in results.items():
        if task in ("exam", "density", "localisation"):
            continue
        auc = "   n/a" if m["auc"] is None else f"{m['auc']:.4f}"
        lines.append(f"{task:<16} {auc:>7} {m['f1']:>7.4f} {m['accuracy']:>7.4f} {m['n']:>6d}")
    e = results.get("exam")
    if e:
        lines.append("")
        lines.append(f"Exam score (0-100): {e['n']} exams, {e['positives']} positive")
        if e["auc"] is not None:
            lo, hi = e["auc_ci95"]
            lines.append(f"  ROC AUC {e['auc']:.4f}  (95 % bootstrap CI {lo:.4f}-{hi:.4f})")
        for spec in (90, 95):
            r = e.get(f"sensitivity_at_{spec}_specificity")
            if r:
                lines.append(f"  sensitivity at {spec} % specificity: {r['sensitivity']:.3f} "
                             f"(score >= {r['threshold']:g})")
        op = e.get("operating_point")
        if op:
            lines.append(f"  at the operating point {op['score']:g}: sensitivity "
                         f"{op['sensitivity']:.3f}, specificity {op['specificity']:.3f}; "
                         f"TP {op['tp']} FP {op['fp']} TN {op['tn']} FN {op['fn']}")
        else:
            lines.append("  no operating point (the checkpoint has none: mammo-node "
                         "calibrate)")
        lines.append("  calibration (score/100 vs observed): " + "; ".join(
            f"{c['bin']}: {c['predicted']:.2f}/{c['observed']:.2f} (n={c['n']})"
            for c in e["calibration"]))
        for p in e.get("plots") or []:
            lines.append(f"  plot: {p}")
    d = results.get("density")
    if d:
        lines.append("")
        kappa = d["quadratic_weighted_kappa"]
        lines.append(f"Breast density (A-D): {d['n']} breasts, accuracy "
                     f"{d['accuracy'] if d['accuracy'] is not None else 'n/a'}, quadratic-"
                     f"weighted kappa {kappa if kappa is not None else 'n/a'}")
        lines.append("  confusion (rows label A-D, columns prediction): "
                     + " | ".join(" ".join(str(n) for n in row) for row in d["confusion"]))
    loc = results.get("localisation")
    if loc:
        lines.append("")
        lines.append(f"Localisation: {loc['lesions']} malignant lesions on {loc['images']} "
                     "images; lesions hit by a mark at "
                     + ", ".join(f"{r} false marks/image: {s:.3f}"
                                 for r, s in loc["points"].items()))
    return "\n".join(lines)


def dumps(results: dict) -> str:
    return json.dumps(results, indent=2)
