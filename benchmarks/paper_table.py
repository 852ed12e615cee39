#!/usr/bin/env python3
"""The paper's comparison table: cnn / vssm / hybrid x shared / separate x single / multi-task.

Trains each configuration on the training split of a data folder, evaluates on its test split
and prints, per configuration, BI-RADS 1 vs 5 AUC and F1, 3-class F1 and 5-class F1 (derived
from the 5-class head), next to the figures the paper reports for its shared hybrid.

    python benchmarks/paper_table.py --data DIR [--format vindr] [--epochs 10]
        [--image-size 512x256] [--archs hybrid cnn vssm] [--out results.json]

On these 2-core machines use a small synthetic set and input size to see the table's shape
(e.g. ``mammo-node synth --out /tmp/s --exams 200 --size 512x416`` then
``--image-size 256x128 --epochs 4``); the real comparison needs a GPU and real data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.train import TrainArgs, evaluate, train  # noqa: E402

PAPER = {"birads-1v5 AUC": 0.9967, "birads-1v5 F1": 0.9830, "birads-3class F1": 0.7790,
         "birads-5class F1": 0.4904}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="vindr", choices=["vindr", "csv"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", default="512x256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--archs", nargs="+", default=["cnn", "vssm", "hybrid"])
    ap.add_argument("--weights", nargs="+", default=["shared", "separate"])
    ap.add_argument("--tasks", nargs="+", default=["single", "multi"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write all results as JSON here")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="paper-table-") as tmp:
        for arch in args.archs:
            for weights in args.weights:
                for mode in args.tasks:
                    name = f"{arch}/{weights}/{mode}"
                    ckpt = Path(tmp) / f"{arch}-{weights}-{mode}.safetensors"
                    t0 = time.perf_counter()
                    train(TrainArgs(data=args.data, out=str(ckpt), fmt=args.format,
                                    task="birads-5class", arch=arch, weights=weights,
                                    diagnosis=(mode == "multi"), epochs=args.epochs,
                                    image_size=size, batch_size=args.batch_size,
                                    device=args.device, seed=args.seed, progress=False))
                    res = evaluate(args.data, str(ckpt), fmt=args.format, split="test",
                                   device=args.device, progress=False)
                    g = lambda t, k: res.get(t, {}).get(k)  # noqa: E731, B023
                    row = {"config": name, "birads-1v5 AUC": g("birads-1v5", "auc"),
                           "birads-1v5 F1": g("birads-1v5", "f1"),
                           "birads-3class F1": g("birads-3class", "f1"),
                           "birads-5class F1": g("birads-5class", "f1"),
                           "diagnosis AUC": g("diagnosis", "auc"),
                           "n": g("birads-5class", "n"),
                           "train_s": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    print(f"done {name} in {row['train_s']:.0f} s", file=sys.stderr, flush=True)
    cols = ["birads-1v5 AUC", "birads-1v5 F1", "birads-3class F1", "birads-5class F1",
            "diagnosis AUC"]
    fmt = lambda v: "   -   " if v is None else f"{v:7.4f}"  # noqa: E731
    print(f"{'configuration':<26}" + "".join(f"{c:>18}" for c in cols) + f"{'n':>6}")
    for r in rows:
        print(f"{r['config']:<26}" + "".join(f"{fmt(r[c]):>18}" for c in cols) + f"{r['n']:>6}")
    print(f"{'paper (hybrid/shared)':<26}" + "".join(f"{fmt(PAPER.get(c)):>18}" for c in cols))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
