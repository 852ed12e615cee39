#!/usr/bin/env python3
"""Selective scan on the CPU: sequential reference vs. chunked PyTorch vs. numba-compiled.

Shapes as in ARCHITECTURE.md: batch 4, 128 channels, state 16, float32, one direction; the
sequence lengths 1,024 and 4,096. Prints the median time of each and the ratio to the
sequential reference measured in the same run (target: >= 10x).

    python benchmarks/scan.py [--lengths 1024 4096] [--repeats 5] [--backward]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.scan import (  # noqa: E402
    numba_available,
    selective_scan_chunked,
    selective_scan_numba,
    selective_scan_ref,
)


def timeit(fn, repeats: int, backward: bool) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        y = fn()
        if backward:
            y.sum().backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first call compiles / warms up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    torch.manual_seed(0)
    b, d, n = args.batch, args.channels, args.state
    print(
        f"batch {b}, channels {d}, state {n}, float32, {torch.get_num_threads()} threads, "
        f"{'forward+backward' if args.backward else 'forward'}"
    )
    print(
        f"{'tokens':>7} {'reference':>10} {'chunked':>10} {'ratio':>7} {'numba':>10} "
        f"{'ratio':>7} {'max|diff|':>10}"
    )
    for L in args.lengths:
        req = args.backward
        u = torch.randn(b, d, L, requires_grad=req)
        delta = (torch.rand(b, d, L) * 0.1).requires_grad_(req)
        A = (-torch.rand(d, n) * 8 - 0.1).requires_grad_(req)
        B = torch.randn(b, n, L, requires_grad=req)
        C = torch.randn(b, n, L, requires_grad=req)
        D = torch.randn(d)
        args_ = (u, delta, A, B, C, D)
        ctx = torch.enable_grad() if req else torch.no_grad()
        with ctx:
            t_ref = timeit(
                lambda: selective_scan_ref(*args_),  # noqa: B023
                max(1, args.repeats // 2),
                req,
            )
            t_chk = timeit(lambda: selective_scan_chunked(*args_), args.repeats, req)  # noqa: B023
            y_ref = selective_scan_ref(*args_)
            diff = float((selective_scan_chunked(*args_) - y_ref).abs().max())
            if numba_available():
                t_nb = timeit(lambda: selective_scan_numba(*args_), args.repeats, req)  # noqa: B023
                diff = max(diff, float((selective_scan_numba(*args_) - y_ref).abs().max()))
                nb = f"{t_nb * 1e3:8.1f}ms {t_ref / t_nb:6.1f}x"
            else:
                nb = f"{'n/a':>10} {'':>7}"
        print(
            f"{L:>7} {t_ref * 1e3:8.1f}ms {t_chk * 1e3:8.1f}ms {t_ref / t_chk:6.1f}x {nb} "
            f"{diff:10.2e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
