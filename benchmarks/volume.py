#!/usr/bin/env python3
"""Large-volume benchmark: one Breast Tomosynthesis volume (2 GB by default) by DCMTK storescu
to mammo-node, next to DCMTK storescp receiving the same file.

Writes the volume to disk frame by frame (:func:`inference.synthetic.write_tomo_volume`,
2457 x 1890 16-bit frames, the size of a vendor's DBT slices), sends it with
``/usr/bin/storescu -R`` (one association, the file's own SOP Class) to /usr/bin/storescp and
to a freshly started node (listener only, fsync on), and prints MB/s of both, their ratio
and the node's peak resident memory (sampled every 10 ms) and its growth over the node's
size before the transfer. The node's time includes its validation pass over the file and the
fsync before it answers.

    python benchmarks/volume.py [--size-mb 2000] [--repeats 1] [--stow] [--json]

``--stow`` also sends the volume by STOW-RS (one request, the body streamed from disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, wait_port  # noqa: E402
from benchmarks.ingest import PeakRSS, stow  # noqa: E402
from inference.synthetic import write_tomo_volume  # noqa: E402

ROWS, COLS = 2457, 1890


def storescu(path: Path, aec: str, port: int) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            "/usr/bin/storescu",
            "-R",
            "-aec",
            aec,
            "-pdu",
            "131072",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr}")
    return dt


def run_storescp(path: Path, work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "STORESCP", "-pdu", "131072", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        dt = storescu(path, "STORESCP", port)
        assert len(list(out.iterdir())) == 1, "storescp did not store the volume"
        return dt
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out)


def run_node(path: Path, work: Path, web: bool) -> tuple[float, int, int]:
    """(seconds, peak RSS, RSS before the transfer) of the node receiving ``path``."""
    data = work / "node-data"
    port, web_port = free_port(), free_port()
    cfg = work / "config.toml"
    cfg.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
        f"max_pdu_size = {4 * 1024 * 1024}\n"
        f'[storage]\nfsync = true\nmin_free_mb = 0\npurge_above_percent = ""\n'
        + (f'[dicomweb]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n' if web else "")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "start",
            "--config",
            str(cfg),
            "--log-level",
            "WARNING",
            "--no-worker",
        ],
        cwd=ROOT,
    )
    try:
        wait_port(port)
        if web:
            wait_port(web_port)
        time.sleep(0.5)
        before = psutil.Process(proc.pid).memory_info().rss
        sampler = PeakRSS(proc.pid)
        sampler.start()
        dt = stow([path], web_port) if web else storescu(path, "MAMMO_NODE", port)
        sampler.stop.set()
        sampler.join()
        stored = list((data / "instances").rglob("*.dcm"))
        assert len(stored) == 1, f"node stored {len(stored)} files"
        assert abs(stored[0].stat().st_size - path.stat().st_size) < 4096  # file meta differs
        return dt, sampler.peak, before
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument(
        "--size-mb",
        type=float,
        default=2000.0,
        help="pixel data size in MiB (default 2000: under [node] max_dataset_mb "
        "2048 with the header)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each")
    ap.add_argument("--stow", action="store_true", help="also by STOW-RS")
    ap.add_argument("--dir", default=None, help="where to write the volume (default: /tmp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("/usr/bin/storescu", "/usr/bin/storescp"):
        if not Path(tool).exists():
            sys.exit(f"{tool} missing: apt-get install dcmtk")
    frames = max(1, round(args.size_mb * 2**20 / (ROWS * COLS * 2)))
    need = frames * ROWS * COLS * 2 * (4 if args.stow else 3)
    with tempfile.TemporaryDirectory(prefix="mammo-volume-", dir=args.dir) as tmp:
        work = Path(tmp)
        free = shutil.disk_usage(work).free
        if free < need:
            sys.exit(
                f"needs {need / 1e9:.1f} GB free in {work}, {free / 1e9:.1f} GB there: "
                "use --size-mb or --dir"
            )
        t0 = time.perf_counter()
        path = write_tomo_volume(
            work / "volume.dcm", "L", "CC", frames=frames, rows=ROWS, cols=COLS
        )
        mb = path.stat().st_size / 1e6
        print(
            f"volume: {frames} frames of {ROWS} x {COLS}, {mb:.0f} MB, written in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        scp_t, node_t, peaks, growth, stow_t, stow_peaks = [], [], [], [], [], []
        for i in range(args.repeats):
            scp_t.append(run_storescp(path, work))
            t, peak, before = run_node(path, work, web=False)
            node_t.append(t)
            peaks.append(peak)
            growth.append(peak - before)
            print(
                f"run {i + 1}: storescp {mb / scp_t[-1]:7.1f} MB/s   mammo-node "
                f"{mb / t:7.1f} MB/s   node peak RSS {peak / 2**20:5.0f} MB "
                f"(+{(peak - before) / 2**20:.0f} MB during the transfer)",
                flush=True,
            )
            if args.stow:
                t, peak, before = run_node(path, work, web=True)
                stow_t.append(t)
                stow_peaks.append(peak)
                print(
                    f"       STOW-RS {mb / t:7.1f} MB/s   node peak RSS {peak / 2**20:5.0f} MB"
                    f" (+{(peak - before) / 2**20:.0f} MB)",
                    flush=True,
                )
    scp = mb / statistics.median(scp_t)
    node = mb / statistics.median(node_t)
    result = {
        "megabytes": round(mb, 1),
        "frames": frames,
        "storescp_mb_s": round(scp, 1),
        "node_mb_s": round(node, 1),
        "ratio": round(node / scp, 3),
        "node_peak_rss_mb": round(max(peaks) / 2**20, 1),
        "node_rss_growth_mb": round(max(growth) / 2**20, 1),
    }
    print(f"\none {mb:.0f} MB volume, median of {args.repeats}:")
    print(f"  DCMTK storescp : {scp:7.1f} MB/s")
    print(f"  mammo-node     : {node:7.1f} MB/s  (validated, fsync on)")
    print(f"  ratio          : {node / scp:.2f}x")
    print(
        f"  node peak RSS  : {result['node_peak_rss_mb']:.0f} MB "
        f"(+{result['node_rss_growth_mb']:.0f} MB over its size before the transfer)"
    )
    if stow_t:
        sw = mb / statistics.median(stow_t)
        result.update(stow_mb_s=round(sw, 1), stow_peak_rss_mb=round(max(stow_peaks) / 2**20, 1))
        print(f"  STOW-RS        : {sw:7.1f} MB/s   (peak RSS {result['stow_peak_rss_mb']:.0f} MB)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
