#!/usr/bin/env python3
"""Model cost on this machine: hybrid vs. the cnn variant of the same widths.

For one four-view exam at the default input size (512x256 per view): median inference time of
``hybrid`` and ``cnn``, their ratio (target: hybrid <= 2x cnn) and each one's peak resident
memory; then one training step (forward + backward) on a batch of 4 exams and its peak memory
(target: < 8 GB). Each measurement runs in its own process so peak memory is its own.

    python benchmarks/inference.py [--size 512x256] [--repeats 5] [--device cpu] [--d-state N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(
    arch: str,
    mode: str,
    size: tuple[int, int],
    repeats: int,
    device: str,
    d_state: int | None = None,
) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from inference.model import create_model

    torch.manual_seed(0)
    dev = torch.device(device)
    batch = 1 if mode == "infer" else 4
    extra = {"d_state": d_state} if d_state else {}
    model = create_model(arch, image_size=size, **extra).to(dev)
    x = torch.randn(batch, 4, 1, *size, device=dev)
    mask = torch.ones(batch, 4, dtype=torch.bool, device=dev)
    times = []
    if mode == "infer":
        model.eval()
        with torch.no_grad():
            for _ in range(repeats + 1):
                t = time.perf_counter()
                model(x, mask)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        labels = torch.zeros(batch, 2, dtype=torch.long, device=dev)
        for _ in range(max(2, repeats // 2) + 1):
            t = time.perf_counter()
            out = model(x, mask)
            loss, _ = model.loss(out, labels, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return {
        "arch": arch,
        "mode": mode,
        "seconds": statistics.median(times[1:]),
        "peak_rss_mb": peak_mb,
        "gpu_peak_mb": gpu_mb,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run(
    arch: str, mode: str, size: str, repeats: int, device: str, d_state: int | None = None
) -> dict:
    extra = ["--d-state", str(d_state)] if d_state else []
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            arch,
            mode,
            "--size",
            size,
            "--repeats",
            str(repeats),
            "--device",
            device,
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512x256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--d-state", type=int, default=None, help="SSM state size (default: the model's default)"
    )
    ap.add_argument("--child", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        print(
            json.dumps(
                child(args.child[0], args.child[1], size, args.repeats, args.device, args.d_state)
            )
        )
        return 0
    print(
        f"one four-view exam, {args.size} per view, device {args.device}"
        f"{f', d_state {args.d_state}' if args.d_state else ''}"
    )
    res = {
        a: run(a, "infer", args.size, args.repeats, args.device, args.d_state)
        for a in ("hybrid", "cnn", "vssm")
    }
    for a, r in res.items():
        gpu = f", GPU peak {r['gpu_peak_mb']:.0f} MB" if r["gpu_peak_mb"] else ""
        print(
            f"  {a:<7} {r['seconds'] * 1e3:8.1f} ms   peak RSS {r['peak_rss_mb']:6.0f} MB"
            f"{gpu}   {r['params'] / 1e6:.2f} M params"
        )
    ratio = res["hybrid"]["seconds"] / res["cnn"]["seconds"]
    print(f"  hybrid / cnn = {ratio:.2f}x   (target <= 2x)")
    tr = run("hybrid", "train", args.size, args.repeats, args.device, args.d_state)
    print(
        f"training step, batch of 4 exams (16 views), hybrid: {tr['seconds']:.2f} s, "
        f"peak RSS {tr['peak_rss_mb']:.0f} MB (target < 8192 MB)"
    )
    print(
        json.dumps(
            {
                "hybrid_ms": res["hybrid"]["seconds"] * 1e3,
                "cnn_ms": res["cnn"]["seconds"] * 1e3,
                "ratio": ratio,
                "train_step_s": tr["seconds"],
                "train_peak_rss_mb": tr["peak_rss_mb"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
