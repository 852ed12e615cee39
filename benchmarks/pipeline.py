#!/usr/bin/env python3
"""Does loading keep the model busy? Exams/s of loading per CPU core beside the model step's.

Loading, in one process with one thread (= one core): an exam's four views decoded,
segmented and resized (cold: what ``mammo-node prepare`` or the first epoch does) and read
back from the preprocessing cache (warm: every later epoch). The model step: forward,
backward and AdamW step of the model at the input size on ``--device`` (all its threads or
the GPU). The ratio is how many loader cores (``--workers``) keep one model process busy.

    python benchmarks/pipeline.py [--image-size 1024x512] [--source-size 2816x2304]
        [--exams 4] [--batch-size 2] [--steps 2] [--arch hybrid] [--device auto]
        [--precision auto]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.datasets import read_dataset  # noqa: E402
from inference.datasets.cache import ExamDataset  # noqa: E402
from inference.device import resolve_device  # noqa: E402
from inference.model import HybridCnnVssm, ModelConfig  # noqa: E402
from inference.synthetic_dataset import write_synthetic_dataset  # noqa: E402
from inference.train import resolve_precision  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def loading_rate(data: Path, size: tuple[int, int], cache: Path) -> tuple[float, float]:
    """(cold, warm) exams/s in this process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recs = read_dataset(data, "vindr")
        ds = ExamDataset(recs, size, "birads-5class", cache_dir=cache)
        rates = []
        for _ in ("cold", "warm"):
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            rates.append(len(ds) / (time.perf_counter() - t))
        return rates[0], rates[1]
    finally:
        torch.set_num_threads(threads)


def model_rate(
    size: tuple[int, int], arch: str, batch: int, steps: int, device: torch.device, precision: str
) -> float:
    """Training exams/s of the model step (after one warm-up step)."""
    torch.manual_seed(0)
    model = HybridCnnVssm(ModelConfig(arch=arch, image_size=size)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = resolve_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(batch, 4, 1, *size, device=device)
    mask = torch.ones(batch, 4, dtype=torch.bool, device=device)
    y = torch.randint(0, 5, (batch, 2), device=device)
    d = torch.randint(0, 3, (batch, 2), device=device)
    t = 0.0
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = model.loss(model(x, mask), y, d)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            t += time.perf_counter() - t0
    return batch * steps / t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=_size, default=(1024, 512))
    ap.add_argument(
        "--source-size",
        type=_size,
        default=(2816, 2304),
        help="synthetic DICOM size (a real FFDM view is ~3328x2560 to 4096x3328)",
    )
    ap.add_argument("--exams", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--arch", default="hybrid")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        data = Path(tmp) / "data"
        rows, cols = args.source_size
        write_synthetic_dataset(data, args.exams, seed=1, rows=rows, cols=cols, progress=False)
        cold, warm = loading_rate(data, args.image_size, Path(tmp) / "cache")
    step = model_rate(
        args.image_size, args.arch, args.batch_size, args.steps, device, args.precision
    )
    h, w = args.image_size
    print(
        f"input {h}x{w}, source {rows}x{cols}, {args.exams} exams, model {args.arch} on "
        f"{device} ({args.precision}), batch {args.batch_size}"
    )
    print(f"loading per core, cold (decode + segment + resize): {cold:8.3f} exams/s")
    print(f"loading per core, warm (preprocessing cache):       {warm:8.3f} exams/s")
    print(f"model training step:                                {step:8.3f} exams/s")
    print(
        f"cores to keep the model busy: {step / cold:.2f} cold, {step / warm:.2f} warm "
        f"(model exams/s / loading exams/s per core)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
