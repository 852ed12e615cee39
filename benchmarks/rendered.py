#!/usr/bin/env python3
"""Rendered images, thumbnails and windowed images per second, cold (every request decodes
the file: ``[dicomweb] render_cache_mb = 0``) against warm (the decode cache holds the image,
node.wado.DecodedImages), in the same run and the same server.

DICOMweb is served in this process (tests.helpers.WebInProcess: the daemon's own
application on uvicorn, real HTTP on loopback); the images are stored through STOW-RS. Each
kind of request is timed --requests times, sequentially, over the stored views in turn, cold
then warm, --rounds times (alternating, so that a machine shared with other work weighs on
both alike); the medians are printed.

    python benchmarks/rendered.py [--rows 3328] [--cols 2560] [--views 2] [--requests 12]
                                  [--rounds 3] [--syntax 1.2.840.10008.1.2.4.90]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from inference.synthetic import make_mammogram  # noqa: E402
from node import wado  # noqa: E402
from tests.helpers import WebInProcess  # noqa: E402
from tests.integration.test_dicomweb_security import _part10, _stow  # noqa: E402

KINDS = {
    "thumbnail": ("/thumbnail", {}, "image/jpeg"),
    "rendered 1024 jpeg": ("/rendered", {"viewport": "1024,1024"}, "image/jpeg"),
    "windowed 1024 jpeg": (
        "/rendered",
        {"viewport": "1024,1024", "window": "1800,2600"},
        "image/jpeg",
    ),
}


def rate(urls: list[str], n: int, params: dict, accept: str) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        r = requests.get(
            urls[i % len(urls)], params=params, headers={"Accept": accept}, timeout=120
        )
        r.raise_for_status()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3328)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--syntax", default="", help="transfer syntax of the stored images (default uncompressed)"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        w = WebInProcess(Path(tmp), render_cache_mb=0)
        try:
            urls = []
            for i, (lat, view) in enumerate(
                (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))[: a.views]
            ):
                kw = {"transfer_syntax": a.syntax} if a.syntax else {}
                ds = make_mammogram(lat, view, rows=a.rows, cols=a.cols, seed=i, **kw)
                r = _stow(w.base, [_part10(ds)])
                assert r.status_code == 200, r.text
                urls.append(
                    f"{w.base}/studies/{ds.StudyInstanceUID}/series/"
                    f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
                )
            print(
                f"{a.views} view(s) of {a.rows} x {a.cols}"
                f"{', ' + a.syntax if a.syntax else ', uncompressed'}; "
                f"{a.requests} requests per figure"
            )
            print(f"{'request':<22}{'cold req/s':>12}{'warm req/s':>12}{'warm/cold':>11}")
            for name, (suffix, params, accept) in KINDS.items():
                kind_urls = [u + suffix for u in urls]
                colds, warms = [], []
                for _ in range(a.rounds):
                    w.web.decoded = wado.DecodedImages(0)
                    colds.append(rate(kind_urls, a.requests, params, accept))
                    assert w.web.decoded.decodes == a.requests
                    w.web.decoded = wado.DecodedImages(512 << 20)
                    rate(kind_urls, len(urls), params, accept)  # one decode per view
                    warms.append(rate(kind_urls, a.requests, params, accept))
                    assert w.web.decoded.decodes == len(urls)
                cold, warm = statistics.median(colds), statistics.median(warms)
                print(f"{name:<22}{cold:>12.2f}{warm:>12.2f}{warm / cold:>10.1f}x")
        finally:
            w.close()


if __name__ == "__main__":
    main()
