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


def _loader(ds: ExamDataset, batch: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                      generator=g, worker_init_fn=_worker_init, drop_last=False,
                      persistent_workers=workers > 0)


def train(a: TrainArgs) -> dict[str, Any]:
    """Train a model; writes the checkpoint (each epoch) and a resume state beside it."""
    seed_everything(a.seed)
    device = resolve_device(a.device)
    records = read_dataset(a.data, a.fmt)
    train_recs = select_split(records, "training") or records
    if not train_recs:
        raise ValueError(f"no exams found in {a.data}")
    cfg = ModelConfig(arch=a.arch, weights=a.weights, task=a.task, diagnosis=a.diagnosis,
                      image_size=(int(a.image_size[0]), int(a.image_size[1])),
                      loss_weights={"birads": a.birads_weight, "diagnosis": a.diagnosis_weight})
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
        st = torch.load(state_path, map_location="cpu", weights_only=False)
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
                                         batch["diagnosis"].to(device))
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
        save_checkpoint(model, out, training_data=training_data,
                        intended_use=a.intended_use,
                        extra={"epochs": str(epoch + 1), "seed": str(a.seed)})
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1,
                    "rng": torch.get_rng_state(), "loader_rng": loader.generator.get_state(),
                    "config": cfg.to_dict()}, state_path)
        if a.stop_after_epoch is not None and epoch + 1 >= a.stop_after_epoch:
            log.info("stopping after epoch %d as asked; --resume continues", epoch + 1)
            break
    return {"checkpoint": str(out), "history": history}


@torch.no_grad()
def predict_records(model: HybridCnnVssm, records, device: torch.device, batch_size: int = 4,
                    workers: int = 0, cache_dir: str | None = None,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Probabilities for every breast of every exam, with the raw labels."""
    cfg = model.cfg
    ds = ExamDataset(records, cfg.image_size, cfg.task, cache_dir=cache_dir)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs, dprobs, braw, diag, present = [], [], [], [], []
    model.eval()
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        out = model(batch["images"].to(device), batch["mask"].to(device))
        probs.append(torch.softmax(out["birads_logits"].float(), -1).cpu())
        if "diagnosis_logits" in out:
            dprobs.append(torch.softmax(out["diagnosis_logits"].float(), -1).cpu())
        braw.append(batch["birads_raw"])
        diag.append(batch["diagnosis"])
        present.append(out["breast_present"].cpu())
    res = {"birads_probs": torch.cat(probs).reshape(-1, probs[0].shape[-1]).numpy(),
           "birads_raw": torch.cat(braw).reshape(-1).numpy(),
           "diagnosis": torch.cat(diag).reshape(-1).numpy(),
           "present": torch.cat(present).reshape(-1).numpy()}
    if dprobs:
        res["diagnosis_probs"] = torch.cat(dprobs).reshape(-1, 3).numpy()
    return res


def evaluate(data: str, checkpoint: str | None, fmt: str = "vindr", split: str = "test",
             device: str = "auto", batch_size: int = 4, workers: int = 0,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Metrics per task on one split (see :func:`inference.metrics.evaluate_predictions`)."""
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=dev)
    records = select_split(read_dataset(data, fmt), split)
    if not records:
        raise ValueError(f"no exams in split {split!r} of {data}")
    preds = predict_records(model, records, dev, batch_size, workers,
                            cache_dir=str(Path(data) / ".mammo-cache"), progress=progress)
    return evaluate_predictions(preds, info.config.task)


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'Task':<16} {'AUC':>7} {'F1':>7} {'Acc':>7} {'n':>6}")
    lines.append("-" * 47)
    for task, m in results.items():
        auc = "   n/a" if m["auc"] is None else f"{m['auc']:.4f}"
        lines.append(f"{task:<16} {auc:>7} {m['f1']:>7.4f} {m['accuracy']:>7.4f} {m['n']:>6d}")
    return "\n".join(lines)


def dumps(results: dict) -> str:
    return json.dumps(results, indent=2)
