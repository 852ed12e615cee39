#!/usr/bin/env python3
"""The paper's comparison table: cnn / vssm / hybrid x shared / separate x single / multi-task,
each configuration trained under torchrun, evaluated on the test split with bootstrap CIs.

Every configuration is ``torchrun --standalone --nproc_per_node=N -m node train ...`` on the
training split of a data set in any reader's layout (``--format``: vindr, rsna, cbis-ddsm,
cmmd, inbreast, csv), then predicted on its test split. One table: per configuration, AUC and
macro F1 of BI-RADS 1 vs 5, 3-class and 5-class (the coarser tasks derived from the 5-class
head) and the diagnosis head, each with a 95 % bootstrap interval over exams, and the paper's
figures for its shared hybrid beside them (binary BI-RADS 1 vs 5 AUC 0.9967 / F1 0.9830,
ternary F1 0.7790, 5-class F1 0.4904).

    python benchmarks/paper_table.py --data DIR --format vindr --nproc 8 --epochs 30 \\
        --image-size 1024x512 --batch-size 8 --out paper-table.md [--json results.json]

Multi-node: pass ``--torchrun-args "--nnodes=2 --node_rank=0 --rdzv_backend=c10d
--rdzv_endpoint=HOST:29400"`` (and the same on the other node, its own --node_rank) instead of
the default ``--standalone``. ``--cache-dir`` puts the preprocessing cache the trainings and
the evaluations share elsewhere than DATA/.mammo-cache (a read-only data set, a faster disk),
as train's and evaluate's own ``--cache-dir`` do. On these 2-core machines only a smoke run
fits (a tiny synthetic set, e.g. ``--image-size 64x64 --epochs 1 --archs cnn``); the real
comparison needs GPUs and the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inference.checkpoint import load_checkpoint  # noqa: E402
from inference.datasets import FORMATS, read_dataset, select_split  # noqa: E402
from inference.metrics import bootstrap_task_metrics, evaluate_predictions  # noqa: E402
from inference.train import default_cache_dir, predict_records  # noqa: E402

PAPER = {
    ("birads-1v5", "auc"): 0.9967,
    ("birads-1v5", "f1"): 0.9830,
    ("birads-3class", "f1"): 0.7790,
    ("birads-5class", "f1"): 0.4904,
}
TASKS = ["birads-1v5", "birads-3class", "birads-5class", "diagnosis"]


def train_under_torchrun(
    args: argparse.Namespace, arch: str, weights: str, mode: str, ckpt: Path
) -> float:
    launch = shlex.split(args.torchrun_args) if args.torchrun_args else ["--standalone"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        f"--nproc_per_node={args.nproc}",
        "-m",
        "node",
        "train",
        "--data",
        args.data,
        "--format",
        args.format,
        "--out",
        str(ckpt),
        "--task",
        "birads-5class",
        "--arch",
        arch,
        "--weights",
        weights,
        "--epochs",
        str(args.epochs),
        "--image-size",
        args.image_size,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
        "--quiet",
        *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
        *(["--no-diagnosis"] if mode == "single" else []),
        *shlex.split(args.train_args),
    ]
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(
            f"training {arch}/{weights}/{mode} failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
        )
    return time.perf_counter() - t0


def evaluate_with_ci(args: argparse.Namespace, ckpt: Path) -> dict[str, dict]:
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, info = load_checkpoint(str(ckpt), device=device)
    records = select_split(read_dataset(args.data, args.format), "test")
    if not records:
        raise ValueError(f"no test split in {args.data}")
    preds = predict_records(
        model,
        records,
        device,
        args.batch_size,
        0,
        cache_dir=default_cache_dir(args.data, args.cache_dir),
        progress=False,
    )
    res = evaluate_predictions(preds, info.config.task)
    ci = bootstrap_task_metrics(preds, info.config.task, args.bootstrap, args.seed)
    return {t: {**m, **ci.get(t, {})} for t, m in res.items()}


def cell(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "-"
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[key]:.4f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        ["configuration"]
        + [f"{t} {k.upper()}" for t in TASKS for k in ("auc", "f1")]
        + ["n test exams", "train s"]
    )
    lines = [
        f"Paper table on {args.data} (format {args.format}): {args.nproc} process(es) "
        f"per node, {args.epochs} epoch(s), input {args.image_size}, batch "
        f"{args.batch_size} per process, seed {args.seed}; 95 % bootstrap intervals "
        f"({args.bootstrap} resamples of exams).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [cell(r["metrics"].get(t), k) for t in TASKS for k in ("auc", "f1")]
        lines.append(
            f"| {r['config']} | " + " | ".join(cells) + f" | {r['n_exams']} | {r['train_s']:.0f} |"
        )
    paper = [
        f"{PAPER[(t, k)]:.4f}" if (t, k) in PAPER else "-" for t in TASKS for k in ("auc", "f1")
    ]
    lines.append(
        "| paper (hybrid/shared/multi, arXiv 2507.16955) | " + " | ".join(paper) + " | - | - |"
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="vindr", choices=FORMATS)
    ap.add_argument("--nproc", type=int, default=1, help="torchrun processes per node")
    ap.add_argument(
        "--torchrun-args",
        default="",
        help="rendezvous arguments for a multi-node run (default --standalone)",
    )
    ap.add_argument(
        "--train-args",
        default="",
        help="more mammo-node train arguments, e.g. '--accumulate 4 --patience 5'",
    )
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", default="512x256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache, passed to each training and used by the "
        "evaluation (default: DATA/.mammo-cache)",
    )
    ap.add_argument("--archs", nargs="+", default=["cnn", "vssm", "hybrid"])
    ap.add_argument("--weights", nargs="+", default=["shared", "separate"])
    ap.add_argument("--tasks", nargs="+", default=["single", "multi"], choices=["single", "multi"])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="paper-table.md", help="the table (Markdown)")
    ap.add_argument("--json", help="all results as JSON too")
    ap.add_argument("--keep", help="keep the checkpoints in this folder")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="paper-table-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            for weights in args.weights:
                for mode in args.tasks:
                    name = f"{arch}/{weights}/{mode}"
                    ckpt = folder / f"{arch}-{weights}-{mode}.safetensors"
                    secs = train_under_torchrun(args, arch, weights, mode, ckpt)
                    metrics = evaluate_with_ci(args, ckpt)
                    n = len(select_split(read_dataset(args.data, args.format), "test"))
                    rows.append({"config": name, "metrics": metrics, "train_s": secs, "n_exams": n})
                    print(f"done {name} in {secs:.0f} s", file=sys.stderr, flush=True)
    text = table(rows, args)
    Path(args.out).write_text(text)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"paper": {f"{t} {k}": v for (t, k), v in PAPER.items()}, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
