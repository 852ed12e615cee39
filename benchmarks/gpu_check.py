#!/usr/bin/env python3
"""GPU checks for a session lent a device machine (one short run).

1. mamba-ssm's CUDA selective scan against our PyTorch chunked scan on the GPU (float32,
   target max |difference| <= 1e-3), forward and gradients;
2. four-view exam latency on the GPU for hybrid and cnn (default input size), and one AMP
   training step (batch of 4 exams).

Prepare mamba-ssm first (it only builds where CUDA is):
    MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-build-isolation mamba-ssm -d .sdist
    # on the device machine:
    MAMBA_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
        pip install --no-build-isolation .sdist/mamba_ssm-*.tar.gz
    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.model import create_model  # noqa: E402
from inference.scan import mamba_available, selective_scan  # noqa: E402


def scan_check() -> None:
    if not mamba_available():
        print("mamba-ssm not importable: scan comparison skipped")
        return
    torch.manual_seed(0)
    b, d, n = 4, 512, 16
    for L in (1024, 4096):
        dev = "cuda"
        u = torch.randn(b, d, L, device=dev, requires_grad=True)
        delta = (torch.randn(b, d, L, device=dev) * 0.5).requires_grad_()
        A = (-torch.rand(d, n, device=dev) * 8 - 0.1).requires_grad_()
        B = torch.randn(b, 4, n, L, device=dev, requires_grad=True)
        C = torch.randn(b, 4, n, L, device=dev, requires_grad=True)
        D = torch.randn(d, device=dev, requires_grad=True)
        bias = (torch.randn(d, device=dev) * 0.1).requires_grad_()
        leaves = (u, delta, A, B, C, D, bias)
        outs = {}
        for backend in ("mamba", "chunked"):
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = selective_scan(u, delta, A, B, C, D, None, bias, True, backend=backend)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            (y * torch.cos(y)).sum().backward()
            outs[backend] = (y.detach(), [t.grad.detach().clone() for t in leaves], ms)
        ydiff = float((outs["mamba"][0] - outs["chunked"][0]).abs().max())
        gdiff = max(
            float((a - c).abs().max() / max(1.0, float(c.abs().max())))
            for a, c in zip(outs["mamba"][1], outs["chunked"][1])
        )
        print(
            f"L={L}: max|y_mamba - y_chunked| = {ydiff:.2e} (target <= 1e-3), "
            f"max relative grad diff {gdiff:.2e}; forward mamba {outs['mamba'][2]:.1f} ms, "
            f"chunked {outs['chunked'][2]:.1f} ms"
        )


def latency_check() -> None:
    size = (512, 256)
    for arch in ("hybrid", "cnn"):
        m = create_model(arch, image_size=size).cuda().eval()
        x = torch.randn(1, 4, 1, *size, device="cuda")
        mask = torch.ones(1, 4, dtype=torch.bool, device="cuda")
        times = []
        with torch.no_grad():
            for _ in range(12):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x, mask)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        print(f"{arch}: four-view exam on the GPU {statistics.median(times[2:]) * 1e3:.1f} ms")
    m = create_model("hybrid", image_size=size).cuda().train()
    opt = torch.optim.AdamW(m.parameters())
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(4, 4, 1, *size, device="cuda")
    mask = torch.ones(4, 4, dtype=torch.bool, device="cuda")
    y = torch.zeros(4, 2, dtype=torch.long, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _ = m.loss(m(x, mask), y, y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    print(
        f"AMP training step ok, loss {float(loss):.4f}, "
        f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    print(torch.cuda.get_device_name(0))
    scan_check()
    latency_check()
