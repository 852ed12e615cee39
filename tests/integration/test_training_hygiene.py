"""Training hygiene, in process: gradient accumulation, early stopping, bf16 autocast on the
CPU, gradient clipping, the warmup + cosine schedule, and evaluate / calibrate reading the
preprocessing cache train and prepare write.

Cheap by design: ``inference.train.train`` called directly with ``workers=0``, 32x32 inputs,
10 synthetic exams of 128x96 pixels, 1-2 epochs.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from inference.train import TrainArgs, train

SIZE = (32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 exams (8 training) whose diagnosis labels are missing for a third of the breasts, as
    in data sets labelled only in part: micro-batches then hold unequal label counts."""
    from inference.synthetic_dataset import write_synthetic_dataset

    d = tmp_path_factory.mktemp("hygiene")
    write_synthetic_dataset(d, 10, seed=3, rows=128, cols=96, progress=False)
    path = d / "breast-level_annotations.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    studies = sorted({r["study_id"] for r in rows})
    for r in rows:
        if (studies.index(r["study_id"]) + (r["laterality"] == "R")) % 3 == 0:
            r["breast_diagnosis"] = ""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from inference.datasets.cache import prepare_cache

    prepare_cache(d, "vindr", SIZE, cache_dir=d / ".cache", workers=1, progress=False)
    return d


def _args(data: Path, out: Path, **kw) -> TrainArgs:
    base = {
        "data": str(data),
        "out": str(out),
        "arch": "cnn",
        "epochs": 1,
        "image_size": SIZE,
        "batch_size": 4,
        "workers": 0,
        "progress": False,
        "val_fraction": 0.0,
        "seed": 5,
        "cache_dir": str(data / ".cache"),
    }
    base.update(kw)
    return TrainArgs(**base)


#: The reference run: 8 exams / batch 2 = 4 optimizer steps, warmup half an epoch, fp32,
#: dropout 0, clipping at 5 (the default; it logs each step's norm before clipping).
REF = {"batch_size": 2, "lr": 2e-3, "warmup_epochs": 0.5, "precision": "fp32", "dropout": 0.0}


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    train(_args(data, out, **REF))
    return out


def _lines(ckpt: Path, kind: str) -> list[dict]:
    lines = Path(f"{ckpt}.metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


@pytest.mark.unit
def test_accumulate_k_micro_batches_equal_one_batch_of_k_times_b(data, tmp_path):
    """``--accumulate 2`` with batch 2 steps as batch 4 does: the same per-step losses (rel
    1e-5) and final weights (abs 1e-5; the difference is float summation order), although
    the diagnosis labels are uneven across the micro-batches (each step's loss is divided by
    the labelled breasts of the whole step, not averaged over micro-batch means). The model is
    ``vssm`` (LayerNorm only) and dropout 0: BatchNorm normalises each micro-batch over its own
    b exams, which no accumulation can make equal to K x b."""
    common = {"arch": "vssm", "dropout": 0.0, "epochs": 1}
    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    train(_args(data, big, batch_size=4, **common))
    train(_args(data, small, batch_size=2, accumulate=2, **common))
    a, b = _lines(big, "step"), _lines(small, "step")
    assert len(a) == len(b) == 2  # 8 exams / 4 per step
    assert [e["batch"] for e in b] == [2, 4]  # one line per optimizer step
    torch.testing.assert_close(
        torch.tensor([e["loss"] for e in b]),
        torch.tensor([e["loss"] for e in a]),
        rtol=1e-5,
        atol=1e-6,
    )
    wa, wb = load_file(str(big)), load_file(str(small))
    # A bias added to every score of a softmax (the attention pooling's, the view fusion's)
    # has a true gradient of 0: its AdamW steps (each up to ~lr) follow the rounding of the
    # float sums, so it only stays within the lr's reach.
    shift_invariant = {"encoders.all.attn.bias", "fusion.w.bias"}
    for k in wa:
        # Measured: 4e-5 and 3e-7 on one machine; up to 3.4e-6 (fusion.w.weight) on another
        # CPU of the same kind, whose kernels sum in another order.
        atol = 2 * 1e-3 if k in shift_invariant else 1e-5
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=k)
    assert _lines(small, "epoch")[0]["global_batch"] == 4


@pytest.mark.unit
def test_patience_stops_at_the_right_epoch_and_keeps_the_best(data, tmp_path, monkeypatch):
    """Early stopping on the validation score: real validation runs each epoch; its score is
    replaced by a script (0.6, 0.8, 0.7, 0.8, 0.9, ...) so that the stopping epoch is known:
    with patience 2 the best is epoch 2, epochs 3 and 4 are not better (a tie is not), the run
    stops after epoch 4 of 6 and the best checkpoint holds epoch 2's weights."""
    import inference.train as tr

    scores = iter([0.6, 0.8, 0.7, 0.8, 0.9, 0.95])
    weights: list[dict[str, torch.Tensor]] = []
    real = tr._validate

    def scripted(model, *args, **kw):
        res = real(model, *args, **kw)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {**res, "score": next(scores)}

    monkeypatch.setattr(tr, "_validate", scripted)
    out = tmp_path / "p.safetensors"
    res = train(_args(data, out, epochs=6, patience=2, val_fraction=0.4))
    epochs = _lines(out, "epoch")
    assert [e["monitor"] for e in epochs] == [0.6, 0.8, 0.7, 0.8]
    assert len(weights) == 4 and res["best_epoch"] == 2
    best = load_file(res["best"])
    from inference.checkpoint import read_info

    assert read_info(res["best"]).metadata["epochs"] == "2"
    for k, v in best.items():
        assert torch.equal(v, weights[1][k].to(v.dtype)), k
    assert any(not torch.equal(v, weights[3][k].to(v.dtype)) for k, v in best.items())
    final = load_file(str(out))  # the last epoch's checkpoint is written too
    assert all(torch.equal(v, weights[3][k].to(v.dtype)) for k, v in final.items())


@pytest.mark.unit
def test_bf16_autocast_on_cpu_trains_and_its_checkpoint_loads(data, tmp_path):
    """``--precision bf16`` on the CPU: autocast is on (the loss differs from an fp32 run's
    from the same weights on the same batch by bfloat16's rounding, within 5 %), the loss is
    finite, and the checkpoint loads and reads an exam. Two exams (a generic CSV over the
    fixture's files): bfloat16 on a CPU without native support is ~5x slower than fp32."""
    from inference.checkpoint import load_checkpoint
    from inference.datasets import read_dataset
    from inference.datasets.cache import ExamDataset

    lines = ["path,exam_id,laterality,view,birads,split"]
    recs = [r for r in read_dataset(str(data)) if r.split == "training"][:2]
    for r in recs:
        for slot, path in r.paths.items():
            lat, view = slot.split("-")
            lines.append(f"{path},{r.exam_id},{lat},{view},{r.birads[lat]},training")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    kw = {**REF, "fmt": "csv", "density": "off", "cache_dir": str(data / ".cache")}
    f32, b16 = tmp_path / "f32.safetensors", tmp_path / "b16.safetensors"
    train(_args(tmp_path, f32, **kw))
    train(_args(tmp_path, b16, **{**kw, "precision": "bf16"}))
    (la,), (lb,) = ([e["loss"] for e in _lines(x, "step")] for x in (f32, b16))
    assert math.isfinite(lb) and lb != la  # bf16 rounding: autocast really ran
    assert lb == pytest.approx(la, rel=5e-2)  # measured: 3 %
    model, info = load_checkpoint(str(b16), device="cpu")
    assert info.config.image_size == SIZE
    item = ExamDataset(recs[:1], SIZE, info.config.task, cache_dir=data / ".cache")[0]
    with torch.no_grad():
        out = model(item["images"][None], item["mask"][None])
    assert torch.isfinite(out["birads_logits"]).all()


@pytest.mark.unit
def test_gradient_clipping_bounds_what_the_optimizer_steps_with(data, checkpoint, tmp_path):
    """``--clip-grad 0.05``: every optimizer step sees a gradient of norm <= 0.05 (checked in
    an optimizer step hook), while the logged pre-clip norms are larger (so the clip acted);
    the first step's pre-clip norm is the reference run's (same weights, same batch)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen: list[float] = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
            )
        )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        clipped = tmp_path / "c.safetensors"
        train(_args(data, clipped, **{**REF, "clip_grad": 0.05}))
    finally:
        handle.remove()
    logged = [e["grad_norm"] for e in _lines(clipped, "step")]
    assert len(seen) == len(logged) == 4
    assert all(n <= 0.05 * (1 + 1e-4) for n in seen), seen
    assert all(n > 0.05 for n in logged), logged
    ref = [e["grad_norm"] for e in _lines(checkpoint, "step")]
    assert logged[0] == pytest.approx(ref[0], rel=1e-5)
    assert logged[1:] != ref[1:]  # after one clipped step the runs part


@pytest.mark.unit
def test_learning_rate_follows_linear_warmup_then_cosine(checkpoint):
    """The lr each step of the reference run was taken with (metrics JSON lines): 8 exams /
    batch 2 = 4 steps, warmup half an epoch (2 steps): lr x (s+1)/2 for s < 2, times
    0.5 (1 + cos(pi s / 4)); it rises, then decays."""
    got = [e["lr"] for e in _lines(checkpoint, "step")]
    lr = REF["lr"]
    want = [lr * min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[0] < got[1] > got[2] > got[3] > 0


def _spy_inputs(monkeypatch) -> list[torch.Tensor]:
    """The images the loaded model is called with (a forward pre-hook on the model that
    ``load_checkpoint`` returns to evaluate / calibrate)."""
    import inference.train as tr

    seen: list[torch.Tensor] = []
    real = tr.load_checkpoint

    def load(*a, **kw):
        model, info = real(*a, **kw)
        model.register_forward_pre_hook(
            lambda m, args: seen.append(args[0][args[1]].detach().clone())
        )
        return model, info

    monkeypatch.setattr(tr, "load_checkpoint", load)
    return seen


@pytest.mark.unit
def test_evaluate_and_calibrate_read_the_cache_dir_train_and_prepare_write(
    data, checkpoint, tmp_path, monkeypatch
):
    """``--cache-dir``: in a cache that prepare built (train's keys), what evaluate and
    calibrate feed the model comes from them: a marker written into every entry is what the
    model sees; without ``--cache-dir`` they read DATA/.mammo-cache, not the marker."""
    from inference.datasets import read_dataset
    from inference.datasets.cache import cache_file, prepare_cache
    from inference.train import calibrate, evaluate
    from node.cli import main

    # A copy of the fixture's cache (prepare built it, the training runs read it): prepare
    # finds every view already there.
    cache = tmp_path / "cache"
    shutil.copytree(data / ".cache", cache)
    res = prepare_cache(data, "vindr", SIZE, cache_dir=cache, workers=1, progress=False)
    views = sorted({p for r in read_dataset(str(data)) for p in r.paths.values()})
    assert res["failed"] == 0 and res["views"] == res["cached"] == len(views), res
    marker = np.full((1, *SIZE), 0.25, np.float16)
    for p in views:
        entry = cache_file(cache, p, SIZE)
        assert entry.exists()
        np.save(entry, marker)
    seen = _spy_inputs(monkeypatch)
    evaluate(
        str(data),
        str(checkpoint),
        split="all",
        device="cpu",
        progress=False,
        bootstrap=10,
        cache_dir=str(cache),
    )
    assert seen and all(bool((x == 0.25).all()) for x in seen)
    assert sum(len(x) for x in seen) == len(views)
    seen.clear()
    calibrate(
        str(data),
        str(checkpoint),
        str(tmp_path / "cal.safetensors"),
        split="all",
        device="cpu",
        progress=False,
        cache_dir=str(cache),
    )
    assert sum(len(x) for x in seen) == len(views) and all(bool((x == 0.25).all()) for x in seen)
    seen.clear()
    # The CLI passes --cache-dir through; and without it the default cache is read.
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--checkpoint",
                str(checkpoint),
                "--split",
                "all",
                "--device",
                "cpu",
                "--bootstrap",
                "10",
                "--json",
                "--cache-dir",
                str(cache),
            ]
        )
        == 0
    )
    assert seen and all(bool((x == 0.25).all()) for x in seen)
    seen.clear()
    shutil.rmtree(data / ".mammo-cache", ignore_errors=True)
    evaluate(str(data), str(checkpoint), split="all", device="cpu", progress=False, bootstrap=10)
    assert not any(bool((x == 0.25).all()) for x in seen)
    assert len(list((data / ".mammo-cache").glob("*.npy"))) == len(views)
