"""Training and evaluation loops (``mammo-node train`` / ``mammo-node evaluate``).

Training runs in one process, or data-parallel under torchrun (:mod:`inference.distributed`):
``--batch-size`` is per process, the global batch is batch x processes x ``--accumulate``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from inference.checkpoint import load_checkpoint, save_checkpoint
from inference.datasets import read_dataset, select_split
from inference.datasets.cache import ExamDataset
from inference.datasets.records import ExamRecord
from inference.device import resolve_device
from inference.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_object,
    gather_predictions,
    init_distributed,
    shutdown,
    sync_batchnorm,
)
from inference.metrics import evaluate_predictions, roc_auc
from inference.model import HybridCnnVssm, ModelConfig

log = logging.getLogger("mammo_node.train")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_cache_dir(data: str, cache_dir: str | None) -> str:
    """The preprocessing cache train, prepare, evaluate and calibrate share: ``cache_dir``,
    else DATA/.mammo-cache."""
    return cache_dir or str(Path(data) / ".mammo-cache")


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
    batch_size: int = 4  # per process
    lr: float = 1e-3
    weight_decay: float = 0.05
    device: str = "auto"
    seed: int = 0
    #: DataLoader worker processes per training process; -1: as many as the cores allow.
    workers: int = -1
    #: Batches each worker loads ahead (with workers > 0).
    prefetch: int = 2
    resume: bool = False
    birads_weight: float = 1.0
    diagnosis_weight: float = 1.0
    cache_dir: str | None = None
    training_data: str | None = None
    intended_use: str = "research"
    progress: bool = True
    stop_after_epoch: int | None = None  # stop early (time-boxed runs); --resume continues
    #: Share of the training exams held out for validation and the operating point (0: none).
    val_fraction: float = 0.1
    #: The specificity the operating point is chosen at, on the held-out exams.
    specificity: float = 0.9
    dropout: float = 0.1
    #: Micro-batches whose gradients are summed before one optimizer step.
    accumulate: int = 1
    #: Gradient norm clipping (0: off).
    clip_grad: float = 5.0
    #: Linear warmup, in epochs of optimizer steps, then a cosine decay to 0.
    warmup_epochs: float = 1.0
    #: auto: bf16 autocast on a CUDA device that has it, else fp16 + GradScaler; fp32 on CPU.
    precision: str = "auto"
    #: Early stopping: epochs without a better validation score before stopping (0: off).
    patience: int = 0


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32) for ``--precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return None  # CPU: fp32 unless asked (bf16 autocast is slower on most CPUs)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this CUDA device has no bfloat16; use fp16")
        return torch.bfloat16
    if not cuda:
        raise ValueError("--precision fp16 needs a CUDA device (on CPU use bf16 or fp32)")
    return torch.float16


def default_workers() -> int:
    """Loader workers per training process: the cores a process has, less its own."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local) - 1))


def _loader(
    ds: ExamDataset,
    batch: int,
    sampler: Sampler,
    workers: int,
    device: torch.device,
    prefetch: int = 2,
    seed: int = 0,
) -> DataLoader:
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = {"prefetch_factor": max(1, prefetch), "persistent_workers": True}
    # The loader's own generator: creating an iterator draws the workers' base seed from it,
    # not from the global stream dropout uses (with persistent workers only the first epoch
    # creates one, so a resumed run would otherwise draw once more than an uninterrupted one).
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init,
        drop_last=False,
        pin_memory=device.type == "cuda",
        generator=g,
        **kw,
    )


def split_validation(train_recs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) by a hash of the exam id and the seed: the same exams on every
    rank and on every run with that seed."""
    if fraction <= 0 or len(train_recs) < 4:
        return train_recs, []
    import hashlib

    def held_out(r: ExamRecord) -> bool:
        h = hashlib.sha1(f"{seed}|{r.exam_id}".encode()).hexdigest()[:8]
        return int(h, 16) / 0xFFFFFFFF < fraction

    return ([r for r in train_recs if not held_out(r)], [r for r in train_recs if held_out(r)])


def paths_of(out: Path) -> dict[str, Path]:
    """The files a training run writes beside its checkpoint."""
    return {
        "state": out.with_suffix(out.suffix + ".resume.pt"),
        "best": out.with_name(f"{out.stem}.best{out.suffix}"),
        "metrics": out.with_suffix(out.suffix + ".metrics.jsonl"),
        "tensorboard": out.with_suffix(out.suffix + ".tensorboard"),
    }


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
        raise pickle.UnpicklingError(
            f"--resume: {path} holds something other than training "
            f"state, refused: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(st, dict):
        raise ValueError(f"--resume: {path} is not a training state")
    return st


def accumulation_groups(
    labelled: np.ndarray,
    sampler: DistributedSampler,
    ctx: DistContext,
    batch: int,
    accumulate: int,
    epoch: int,
    batches: int,
) -> list[tuple[dict[str, float], int, int, list[int]]]:
    """Per optimizer step of an epoch: (the loss's denominators: labelled breasts per task
    over every micro-batch of the step on every rank, / world size; the exams in the step on
    every rank; the index of its last micro-batch; this rank's labelled BI-RADS breasts per
    micro-batch, to check the loader against).

    From the records alone: every rank's share of the epoch is the DistributedSampler's
    (deterministic in seed and epoch), so no rank needs the others' labels, and no collective
    is spent on it."""
    world = ctx.world_size
    shares = []
    for r in range(world):
        s = (
            sampler
            if r == ctx.rank
            else DistributedSampler(
                sampler.dataset,
                num_replicas=world,
                rank=r,
                shuffle=sampler.shuffle,
                seed=sampler.seed,
                drop_last=sampler.drop_last,
            )
        )
        s.set_epoch(epoch)
        shares.append(list(s))
    out = []
    for g0 in range(0, batches, accumulate):
        micro = range(g0, min(g0 + accumulate, batches))
        idx = [j for share in shares for i in micro for j in share[i * batch : (i + 1) * batch]]
        c = labelled[idx].sum(0) if idx else np.zeros(3, np.int64)
        local = [
            int(labelled[shares[ctx.rank][i * batch : (i + 1) * batch], 0].sum()) for i in micro
        ]
        out.append(
            (
                {
                    "birads": float(c[0]) / world,
                    "diagnosis": float(c[1]) / world,
                    "density": float(c[2]) / world,
                },
                len(idx),
                micro[-1],
                local,
            )
        )
    return out


def train(a: TrainArgs) -> dict[str, Any]:
    """Train a model; writes the checkpoint (each epoch), the best one by validation, a
    resume state and metrics (JSON lines) beside it. Under torchrun every rank calls this;
    rank 0 writes."""
    if a.accumulate < 1:
        raise ValueError("--accumulate must be >= 1")
    device = resolve_device(a.device)
    ctx = init_distributed(device)
    try:
        return _train(a, ctx)
    finally:
        shutdown(ctx)


def _train(a: TrainArgs, ctx: DistContext) -> dict[str, Any]:
    seed_everything(a.seed)
    device = ctx.device
    amp_dtype = resolve_precision(a.precision, device)
    records = read_dataset(a.data, a.fmt)
    train_recs = select_split(records, "training") or records
    if not train_recs:
        raise ValueError(f"no exams found in {a.data}")
    train_recs, val_recs = split_validation(train_recs, a.val_fraction, a.seed)
    if a.density not in ("auto", "on", "off"):
        raise ValueError(f"density must be auto, on or off, got {a.density!r}")
    density = a.density == "on" or (a.density == "auto" and any(r.density for r in train_recs))
    cfg = ModelConfig(
        arch=a.arch,
        weights=a.weights,
        task=a.task,
        diagnosis=a.diagnosis,
        density=density,
        image_size=(int(a.image_size[0]), int(a.image_size[1])),
        dropout=a.dropout,
        loss_weights={"birads": a.birads_weight, "diagnosis": a.diagnosis_weight, "density": 1.0},
    )
    model = HybridCnnVssm(cfg)  # same seed: the same initial weights on every rank
    sync_batchnorm(model, ctx)  # in place: the model's own BatchNorm2d children replaced
    model.to(device)
    if ctx.distributed:
        # Dropout draws its own masks per rank (one process with the whole batch would draw
        # different ones too); rank 0 keeps the stream of a one-process run.
        torch.manual_seed(a.seed + 7919 * ctx.rank)
        model.run_every_encoder = True
    net: Any = model
    if ctx.distributed:
        import warnings

        # The 1x1 attention conv's gradient comes back in another memory layout than DDP's
        # bucket; DDP copies it (correct; a copy of 192 floats per step), and warns each run.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    cache = default_cache_dir(a.data, a.cache_dir)
    ds = ExamDataset(train_recs, cfg.image_size, cfg.task, cache_dir=cache)
    sampler: DistributedSampler = DistributedSampler(
        ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=a.seed, drop_last=False
    )
    labelled = ds.labelled_counts()
    workers = default_workers() if a.workers < 0 else a.workers
    loader = _loader(
        ds, a.batch_size, sampler, workers, device, a.prefetch, seed=a.seed + 7919 * ctx.rank
    )
    per_epoch = max(1, math.ceil(len(loader) / a.accumulate))  # optimizer steps
    steps_total = max(1, a.epochs * per_epoch)
    warmup = max(0, round(a.warmup_epochs * per_epoch))

    def lr_factor(s: int) -> float:
        w = min(1.0, (s + 1) / warmup) if warmup else 1.0
        return w * 0.5 * (1 + math.cos(math.pi * min(s, steps_total) / steps_total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    out = Path(a.out)
    files = paths_of(out)
    start_epoch, best, best_epoch, bad_epochs = 0, -math.inf, 0, 0
    history: list[dict[str, Any]] = []
    if a.resume:
        st = _load_state(files["state"], cfg, ctx)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        rngs = st["rng"]
        if len(rngs) == ctx.world_size:
            torch.set_rng_state(rngs[ctx.rank])
        else:
            log.warning(
                "--resume: the state was saved by %d process(es), this run has %d: "
                "dropout streams start afresh",
                len(rngs),
                ctx.world_size,
            )
        start_epoch = int(st["epoch"])
        best, best_epoch = float(st["best"]), int(st["best_epoch"])
        bad_epochs = int(st["bad_epochs"])
        history = list(json.loads(st["history"]))
        if ctx.is_main:
            log.info("resumed from %s at epoch %d", files["state"], start_epoch)
    training_data = a.training_data or (
        f"{len(train_recs)} exams from {a.data} (format {a.fmt}, split training)"
    )
    writer = _metrics_writer(files, ctx, append=a.resume)
    show = a.progress and ctx.is_main
    step = start_epoch * per_epoch
    try:
        for epoch in range(start_epoch, a.epochs):
            sampler.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            loss_sum, n_sum = 0.0, 0.0
            bar = tqdm(
                loader,
                desc=f"epoch {epoch + 1}/{a.epochs}",
                unit="batch",
                disable=not show,
                leave=False,
            )
            opt.zero_grad(set_to_none=True)
            groups = accumulation_groups(
                labelled, sampler, ctx, a.batch_size, a.accumulate, epoch, len(loader)
            )
            group_loss = torch.zeros((), device=device)
            for i, batch in enumerate(bar):
                counts, group_exams, last_i, local = groups[i // a.accumulate]
                last_micro = i == last_i
                if int((batch["birads"] >= 0).sum()) != local[i % a.accumulate]:
                    raise RuntimeError(
                        "the loader's batches are not the sampler's: the "
                        "loss denominators would be wrong"
                    )
                images = batch["images"].to(device, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                birads = batch["birads"].to(device, non_blocking=True)
                diag = batch["diagnosis"].to(device, non_blocking=True)
                dens = batch["density"].to(device, non_blocking=True)
                sync = (
                    net.no_sync()
                    if ctx.distributed and not last_micro
                    else contextlib.nullcontext()
                )
                with sync:
                    with torch.autocast(
                        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ):
                        outp = net(images, mask)
                        # Divided by the labelled breasts of the whole optimizer step (every
                        # micro-batch, every rank; / world size, as DDP averages): the summed
                        # gradients are those of one batch of batch x ranks x accumulate.
                        loss, _ = model.loss(outp, birads, diag, dens, counts=counts)
                    scaler.scale(loss).backward()
                group_loss += loss.detach().float()
                if not last_micro:
                    continue
                # One all-reduce per optimizer step: the step's mean loss over every rank.
                gl = float(all_reduce_sum(group_loss.reshape(1), ctx)[0]) / ctx.world_size
                group_loss = torch.zeros((), device=device)
                loss_sum += gl * group_exams
                n_sum += group_exams
                lr_now = sched.get_last_lr()[0]
                step_entry: dict[str, Any] = {
                    "kind": "step",
                    "epoch": epoch + 1,
                    "step": step + 1,
                    "batch": i + 1,
                    "loss": round(gl, 7),
                    "lr": lr_now,
                }
                if a.clip_grad > 0:
                    scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
                    step_entry["grad_norm"] = round(float(norm), 6)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                writer.write(step_entry)
                bar.set_postfix(loss=f"{loss_sum / max(n_sum, 1):.4f}")
            entry: dict[str, Any] = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "loss": loss_sum / max(n_sum, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "world_size": ctx.world_size,
                "global_batch": a.batch_size * ctx.world_size * a.accumulate,
                "exams_per_s": round(n_sum / max(time.perf_counter() - t0, 1e-9), 3),
            }
            extra = {
                "epochs": str(epoch + 1),
                "seed": str(a.seed),
                "world_size": str(ctx.world_size),
            }
            improved = False
            if val_recs:
                val = _validate(model, val_recs, ctx, a, cache, cfg)
                entry["validation"] = val["metrics"]
                score = val["score"]
                entry["monitor"] = score
                if val["operating_point"] is not None:
                    extra["operating_point"] = json.dumps(val["operating_point"])
                if score is not None and score > best:
                    best, best_epoch, bad_epochs, improved = score, epoch + 1, 0, True
                else:
                    bad_epochs += 1
            history.append(entry)
            if ctx.is_main:
                log.info(
                    "epoch %d/%d: loss %.4f (%.0f s)%s",
                    epoch + 1,
                    a.epochs,
                    entry["loss"],
                    entry["seconds"],
                    f", validation {entry['monitor']:.4f}"
                    if entry.get("monitor") is not None
                    else "",
                )
                if a.progress:
                    print(
                        f"epoch {epoch + 1}/{a.epochs}: loss {entry['loss']:.4f} "
                        f"({entry['seconds']:.0f} s)",
                        flush=True,
                    )
                writer.write(entry)
                save_checkpoint(
                    model,
                    out,
                    training_data=training_data,
                    intended_use=a.intended_use,
                    extra=extra,
                )
                if improved:
                    save_checkpoint(
                        model,
                        files["best"],
                        training_data=training_data,
                        intended_use=a.intended_use,
                        extra={**extra, "best_of": "validation"},
                    )
            stop = a.patience > 0 and bad_epochs >= a.patience and best_epoch > 0
            rngs = gather_object(torch.get_rng_state(), ctx)
            if ctx.is_main:
                _save_state(
                    files["state"],
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch + 1,
                        "rng": rngs,
                        "config": json.dumps(cfg.to_dict()),
                        "best": best,
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "history": json.dumps(history),
                        "world_size": ctx.world_size,
                    },
                )
            barrier(ctx)
            if stop:
                if ctx.is_main:
                    log.info(
                        "early stopping after epoch %d: no better validation score "
                        "for %d epoch(s) (best %.4f at epoch %d)",
                        epoch + 1,
                        a.patience,
                        best,
                        best_epoch,
                    )
                break
            if a.stop_after_epoch is not None and epoch + 1 >= a.stop_after_epoch:
                if ctx.is_main:
                    log.info("stopping after epoch %d as asked; --resume continues", epoch + 1)
                break
    finally:
        writer.close()
    return {
        "checkpoint": str(out),
        "history": history,
        "best": str(files["best"]) if best_epoch else None,
        "best_epoch": best_epoch,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
    }


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path, cfg: ModelConfig, ctx: DistContext) -> dict[str, Any]:
    """Rank 0 reads the resume state (:func:`load_resume_state`: ``weights_only=True``,
    tensors and plain values; :data:`RESUME_SAFE_GLOBALS` is empty) and hands it to the other
    ranks."""
    st: Any = None
    err = ""
    if ctx.is_main:
        if not path.exists():
            err = f"--resume: no saved state at {path}"
        else:
            try:
                st = load_resume_state(path)
            except Exception as exc:  # an old (pickled) state or a damaged file
                err = f"--resume: {path} cannot be loaded as a resume state ({exc})"
            if st is not None and json.loads(st.get("config", "{}")) != cfg.to_dict():
                err = (
                    "--resume: the saved state was trained with another model config; "
                    "use the same --arch/--task/--image-size/--weights/--dropout"
                )
    err = broadcast_object(err, ctx)
    if err:
        raise (FileNotFoundError if "no saved state" in err else ValueError)(err)
    return broadcast_object(st, ctx)


class _Metrics:
    """JSON lines beside the checkpoint (rank 0), and TensorBoard scalars when installed."""

    def __init__(self, files: dict[str, Path] | None, append: bool) -> None:
        self.f = None
        self.tb = None
        if files is None:
            return
        self.f = open(files["metrics"], "a" if append else "w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(files["tensorboard"]))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def write(self, entry: dict[str, Any]) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(entry) + "\n")
        if self.tb is not None:
            if entry["kind"] == "step":
                self.tb.add_scalar("train/loss", entry["loss"], entry["step"])
                self.tb.add_scalar("train/lr", entry["lr"], entry["step"])
            else:
                self.tb.add_scalar("epoch/loss", entry["loss"], entry["epoch"])
                for task, m in (entry.get("validation") or {}).items():
                    for k in ("auc", "f1"):
                        if isinstance(m, dict) and m.get(k) is not None:
                            self.tb.add_scalar(f"validation/{task}/{k}", m[k], entry["epoch"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _metrics_writer(files: dict[str, Path], ctx: DistContext, append: bool) -> _Metrics:
    return _Metrics(files if ctx.is_main else None, append)


def _validate(
    model: HybridCnnVssm,
    records: list[ExamRecord],
    ctx: DistContext,
    a: TrainArgs,
    cache: str,
    cfg: ModelConfig,
) -> dict[str, Any]:
    """Validation over every rank's share of the held-out exams: per-task AUC / F1, the
    exam score's AUC (the monitored score; the task's F1 without one) and the operating
    point at ``a.specificity``. The same on every rank."""
    from inference.scoring import choose_operating_point

    # The held-out pass must not move the random streams training goes on with (a run
    # stopped after this epoch and resumed equals one that never stopped).
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        preds = predict_sharded(model, records, ctx, a.batch_size, cache)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    model.train()
    metrics: dict[str, Any] = dict(evaluate_predictions(preds, cfg.task))
    y, s = exam_level(preds, cfg.birads_classes)
    exam_auc = roc_auc(y, s) if len(y) else None
    metrics["exam"] = {"auc": exam_auc, "n": int(len(y)), "positives": int(np.sum(y))}
    score = exam_auc if exam_auc is not None else (metrics.get(cfg.task) or {}).get("f1")
    op = choose_operating_point(y, s, a.specificity) if len(y) else None
    if op is None:
        if ctx.is_main:
            log.warning(
                "no operating point: the %d held-out exams need positives and negatives",
                len(records),
            )
    else:
        op["chosen_on"] = f"{len(y)} held-out training exams"
    return {"metrics": metrics, "score": score, "operating_point": op}


def predict_sharded(
    model: HybridCnnVssm,
    records: list[ExamRecord],
    ctx: DistContext,
    batch_size: int,
    cache_dir: str | None,
) -> dict[str, np.ndarray]:
    """:func:`predict_records` with each rank predicting every world_size-th exam, gathered
    back in the records' order on every rank."""
    share = list(range(ctx.rank, len(records), ctx.world_size))
    preds = predict_records(
        model,
        [records[i] for i in share],
        ctx.device,
        batch_size,
        0,
        cache_dir=cache_dir,
        progress=False,
    )
    return gather_predictions(preds, share, len(records), ctx)


@torch.no_grad()
def predict_records(
    model: HybridCnnVssm,
    records: list[ExamRecord],
    device: torch.device,
    batch_size: int = 4,
    workers: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Probabilities for every breast of every exam, with the raw labels."""
    cfg = model.cfg
    res: dict[str, np.ndarray]
    if not records:
        res = {
            "birads_probs": np.zeros((0, len(cfg.birads_classes)), np.float32),
            "birads_raw": np.zeros(0, np.int64),
            "diagnosis": np.zeros(0, np.int64),
            "present": np.zeros(0, bool),
            "density": np.zeros(0, np.int64),
        }
        if cfg.diagnosis:
            res["diagnosis_probs"] = np.zeros((0, 3), np.float32)
        if cfg.density:
            res["density_probs"] = np.zeros((0, 4), np.float32)
        return res
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
    res = {
        "birads_probs": torch.cat(probs).reshape(-1, probs[0].shape[-1]).numpy(),
        "birads_raw": torch.cat(braw).reshape(-1).numpy(),
        "diagnosis": torch.cat(diag).reshape(-1).numpy(),
        "present": torch.cat(present).reshape(-1).numpy(),
    }
    if dprobs:
        res["diagnosis_probs"] = torch.cat(dprobs).reshape(-1, 3).numpy()
    res["density"] = torch.cat(dens).reshape(-1).numpy()
    if densp:
        res["density_probs"] = torch.cat(densp).reshape(-1, 4).numpy()
    return res


def exam_level(
    preds: dict[str, np.ndarray], birads_classes: list[str]
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


def evaluate(
    data: str,
    checkpoint: str | None,
    fmt: str = "vindr",
    split: str = "test",
    device: str = "auto",
    batch_size: int = 4,
    workers: int = 0,
    progress: bool = True,
    operating_point: float | None = None,
    bootstrap: int = 1000,
    plots: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics per task on one split (see :func:`inference.metrics.evaluate_predictions`)
    and, under ``"exam"``, the exam score's statistics (:func:`inference.scoring
    .exam_statistics`) at the checkpoint's operating point (or ``operating_point``);
    ``plots``: a folder for roc.png and calibration.png; ``cache_dir``: the preprocessing
    cache (train's and prepare's, same keys; default DATA/.mammo-cache)."""
    from inference.scoring import exam_statistics, plot_calibration, plot_roc

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=dev)
    records = select_split(read_dataset(data, fmt), split)
    if not records:
        raise ValueError(f"no exams in split {split!r} of {data}")
    preds = predict_records(
        model,
        records,
        dev,
        batch_size,
        workers,
        cache_dir=default_cache_dir(data, cache_dir),
        progress=progress,
    )
    results: dict[str, Any] = dict(evaluate_predictions(preds, info.config.task))
    if "density_probs" in preds:
        from inference.metrics import density_metrics

        keep = preds["present"].astype(bool) & (preds["density"] >= 0)
        results["density"] = density_metrics(
            preds["density"][keep], preds["density_probs"][keep].argmax(1)
        )
    if any(r.lesions for r in records):
        results["localisation"] = localisation(records, checkpoint, device, progress=progress)
    y, s = exam_level(preds, info.config.birads_classes)
    op = operating_point if operating_point is not None else info.operating_point
    stats = exam_statistics(y, s, op, bootstrap=bootstrap)
    results["exam"] = stats
    if plots:
        folder = Path(plots)
        folder.mkdir(parents=True, exist_ok=True)
        stats["plots"] = [
            str(plot_roc(folder / "roc.png", y, s, op, stats["auc"])),
            str(plot_calibration(folder / "calibration.png", stats["calibration"])),
        ]
        if "localisation" in results:
            from inference.scoring import plot_froc

            stats["plots"].append(str(plot_froc(folder / "froc.png", results["localisation"])))
    return results


def localisation(
    records: list,
    checkpoint: str | None,
    device: str = "auto",
    max_marks: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """FROC of the marks (:func:`inference.metrics.froc`) on exams whose lesions are known:
    every exam read as the node reads it (``MammoModel.predict_exam``, marks in the source
    image's pixels); a mark hits a lesion when its centre lies in the lesion's box."""
    from inference.api import MAP_SIDE, MammoModel
    from inference.metrics import froc

    model = MammoModel(checkpoint, device=device)
    marks: list[tuple[float, bool, int | Sequence[int]]] = []
    n_lesions = n_images = 0
    for rec in tqdm(records, desc="localisation", unit="exam", disable=not progress, leave=False):
        if not rec.paths:
            continue
        reading = model.predict_exam(
            {s: str(p) for s, p in rec.paths.items()}, max_marks=max_marks, map_side=MAP_SIDE
        )
        for slot in rec.paths:
            n_images += 1
            boxes = rec.lesions.get(slot, [])
            ids = list(range(n_lesions, n_lesions + len(boxes)))
            n_lesions += len(boxes)
            for mk in reading.marks.get(slot, []):
                x, y = mk.center
                hit = [
                    i for i, (x0, y0, x1, y1) in zip(ids, boxes) if x0 <= x <= x1 and y0 <= y <= y1
                ]
                marks.append((mk.score, bool(hit), hit))
    return froc(marks, n_lesions, n_images)


def calibrate(
    data: str,
    checkpoint: str | None,
    out: str,
    fmt: str = "vindr",
    split: str = "training",
    specificity: float = 0.9,
    device: str = "auto",
    batch_size: int = 4,
    progress: bool = True,
    cache_dir: str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Choose the operating point on ``split`` of ``data`` at ``specificity`` and write the
    checkpoint again with it (the weights unchanged). ``cache_dir``: as :func:`evaluate`."""
    from safetensors.torch import load_file, save_file

    from inference.checkpoint import DEMO_CHECKPOINT, read_info
    from inference.scoring import choose_operating_point

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, device=dev)
    records = select_split(read_dataset(data, fmt), split)
    if not records:
        raise ValueError(f"no exams in split {split!r} of {data}")
    preds = predict_records(
        model,
        records,
        dev,
        batch_size,
        workers,
        cache_dir=default_cache_dir(data, cache_dir),
        progress=progress,
    )
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
                lines.append(
                    f"  sensitivity at {spec} % specificity: {r['sensitivity']:.3f} "
                    f"(score >= {r['threshold']:g})"
                )
        op = e.get("operating_point")
        if op:
            lines.append(
                f"  at the operating point {op['score']:g}: sensitivity "
                f"{op['sensitivity']:.3f}, specificity {op['specificity']:.3f}; "
                f"TP {op['tp']} FP {op['fp']} TN {op['tn']} FN {op['fn']}"
            )
        else:
            lines.append("  no operating point (the checkpoint has none: mammo-node calibrate)")
        lines.append(
            "  calibration (score/100 vs observed): "
            + "; ".join(
                f"{c['bin']}: {c['predicted']:.2f}/{c['observed']:.2f} (n={c['n']})"
                for c in e["calibration"]
            )
        )
        for p in e.get("plots") or []:
            lines.append(f"  plot: {p}")
    d = results.get("density")
    if d:
        lines.append("")
        kappa = d["quadratic_weighted_kappa"]
        lines.append(
            f"Breast density (A-D): {d['n']} breasts, accuracy "
            f"{d['accuracy'] if d['accuracy'] is not None else 'n/a'}, quadratic-"
            f"weighted kappa {kappa if kappa is not None else 'n/a'}"
        )
        lines.append(
            "  confusion (rows label A-D, columns prediction): "
            + " | ".join(" ".join(str(n) for n in row) for row in d["confusion"])
        )
    loc = results.get("localisation")
    if loc:
        lines.append("")
        lines.append(
            f"Localisation: {loc['lesions']} malignant lesions on {loc['images']} "
            "images; lesions hit by a mark at "
            + ", ".join(f"{r} false marks/image: {s:.3f}" for r, s in loc["points"].items())
        )
    return "\n".join(lines)


def dumps(results: dict) -> str:
    return json.dumps(results, indent=2)
