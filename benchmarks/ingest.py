#!/usr/bin/env python3
"""Ingest benchmark: DCMTK storescu -> mammo-node vs. DCMTK storescp, one association each.

Generates 24 full-size synthetic mammograms (3328 x 2560, 16-bit: 6 exams x 4 views), sends
them with /usr/bin/storescu to a freshly started node and, in the same run, to
/usr/bin/storescp, and prints MB/s of both, their ratio (target: node >= 0.8x storescp) and
the node's peak resident memory during the run (target: < 300 MB).

    python benchmarks/ingest.py [--images 24] [--repeats 3] [--no-fsync] [--stow] [--tls]

``--tls`` adds the same transfer over DICOM TLS (storescu +tls with a client certificate) to
the node (``[node] tls = true``) and to ``storescp +tls``, and prints TLS / plain and
node-TLS / storescp-TLS ratios. Certificates are made with openssl for the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, wait_port  # noqa: E402
from inference.synthetic import UID_ROOT, make_mammogram, phantom, write  # noqa: E402


def make_images(folder: Path, n: int, rows: int, cols: int) -> list[Path]:
    rng = np.random.default_rng(0)
    bases = {v: phantom(rows, cols, v, rng) for v in ("CC", "MLO")}
    files = []
    for i in range(n):
        if i % 4 == 0:
            study = generate_uid(prefix=UID_ROOT)
        lat, view = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")][i % 4]
        ds = make_mammogram(
            lat,
            view,
            pixels=bases[view],
            study_uid=study,
            accession=f"BENCH{i // 4:04d}",
            bits_stored=14,
        )
        files.append(write(ds, folder / f"img{i:03d}.dcm"))
    return files


class PeakRSS(threading.Thread):
    """Samples a process's resident memory every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)


def _tls_args(tls) -> list[str]:
    """storescu / storescp TLS options for a (key, certificate, CA) triple."""
    if tls is None:
        return []
    key, crt, ca = tls
    return ["+tls", str(key), str(crt), "+cf", str(ca)]


def send(files: list[Path], aec: str, port: int, tls=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            "/usr/bin/storescu",
            "-aec",
            aec,
            "-pdu",
            "131072",
            *_tls_args(tls),
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr}")
    return dt


def run_storescp(files: list[Path], work: Path, tls=None, client_tls=None) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            "/usr/bin/storescp",
            "-aet",
            "STORESCP",
            "-pdu",
            "131072",
            *_tls_args(tls),
            "-od",
            str(out),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        dt = send(files, "STORESCP", port, tls=client_tls)
        assert len(list(out.iterdir())) == len(files), "storescp did not store every file"
        return dt
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out)


def stow(files: list[Path], port: int) -> float:
    """One STOW-RS request with every file, the body streamed from disk."""
    import requests

    boundary = "mammo-node-bench-boundary"

    def body():
        for f in files:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with open(f, "rb") as fh:
                while block := fh.read(4 << 20):
                    yield block
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    t0 = time.perf_counter()
    r = requests.post(
        f"http://127.0.0.1:{port}/dicomweb/studies",
        data=body(),
        timeout=600,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
    return dt


def run_node(
    files: list[Path],
    work: Path,
    fsync: bool,
    max_pdu: int,
    web_port: int | None = None,
    tls=None,
    client_tls=None,
) -> tuple[float, int]:
    data = work / "node-data"
    port = free_port()
    cfg = work / "config.toml"
    web = f'[dicomweb]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n' if web_port else ""
    tls_cfg = ""
    if tls is not None:
        key, crt, ca = tls
        tls_cfg = (
            f'[tls]\ncertificate = "{crt}"\nprivate_key = "{key}"\n'
            f'ca_certificates = "{ca}"\nrequire_client_certificate = true\n'
        )
    cfg.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
        f"max_pdu_size = {max_pdu}\ntls = {'true' if tls else 'false'}\n"
        f"[storage]\nfsync = {'true' if fsync else 'false'}\nmin_free_mb = 0\n" + web + tls_cfg
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
        time.sleep(0.5)
        if web_port:
            wait_port(web_port)
        sampler = PeakRSS(proc.pid)
        sampler.start()
        dt = stow(files, web_port) if web_port else send(files, "MAMMO_NODE", port, tls=client_tls)
        sampler.stop.set()
        sampler.join()
        stored = list((data / "instances").rglob("*.dcm"))
        assert len(stored) == len(files), f"node stored {len(stored)} of {len(files)}"
        return dt, sampler.peak
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rows", type=int, default=3328)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    ap.add_argument("--no-fsync", action="store_true", help="node with [storage] fsync=false")
    ap.add_argument(
        "--node-max-pdu",
        type=int,
        default=4 * 1024 * 1024,
        help="the node's [node] max_pdu_size (storescp runs with 131072, its maximum)",
    )
    ap.add_argument(
        "--stow", action="store_true", help="also send the same images with one STOW-RS request"
    )
    ap.add_argument(
        "--tls", action="store_true", help="also over DICOM TLS: node and storescp, each with TLS"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("/usr/bin/storescu", "/usr/bin/storescp"):
        if not Path(tool).exists():
            sys.exit(f"{tool} missing: apt-get install dcmtk")

    with tempfile.TemporaryDirectory(prefix="mammo-ingest-") as tmp:
        work = Path(tmp)
        print(f"generating {args.images} images {args.rows}x{args.cols} ...", flush=True)
        files = make_images(work / "images", args.images, args.rows, args.cols)
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        scp_times, node_times, peaks, stow_times, stow_peaks = [], [], [], [], []
        tls_scp_times, tls_node_times = [], []
        server = client = None
        if args.tls:
            from tests.pki import make_pki

            pki = make_pki(work / "pki")
            server = (*pki.pair("node"), pki.ca)
            client = (*pki.pair("client"), pki.ca)
        for i in range(args.repeats):
            if args.tls:
                tls_scp_times.append(run_storescp(files, work, tls=server, client_tls=client))
                t, _ = run_node(
                    files,
                    work,
                    fsync=not args.no_fsync,
                    max_pdu=args.node_max_pdu,
                    tls=server,
                    client_tls=client,
                )
                tls_node_times.append(t)
                print(
                    f"run {i + 1}: storescp +tls {total_mb / tls_scp_times[-1]:7.1f} MB/s   "
                    f"mammo-node TLS {total_mb / t:7.1f} MB/s",
                    flush=True,
                )
            if args.stow:
                t, peak = run_node(
                    files,
                    work,
                    fsync=not args.no_fsync,
                    max_pdu=args.node_max_pdu,
                    web_port=free_port(),
                )
                stow_times.append(t)
                stow_peaks.append(peak)
            scp_times.append(run_storescp(files, work))
            t, peak = run_node(files, work, fsync=not args.no_fsync, max_pdu=args.node_max_pdu)
            node_times.append(t)
            peaks.append(peak)
            print(
                f"run {i + 1}: storescp {total_mb / scp_times[-1]:7.1f} MB/s   "
                f"mammo-node {total_mb / node_times[-1]:7.1f} MB/s   "
                f"node peak RSS {peak / 2**20:5.0f} MB",
                flush=True,
            )
    scp = total_mb / statistics.median(scp_times)
    node = total_mb / statistics.median(node_times)
    result = {
        "images": args.images,
        "megabytes": round(total_mb, 1),
        "storescp_mb_s": round(scp, 1),
        "node_mb_s": round(node, 1),
        "ratio": round(node / scp, 3),
        "node_peak_rss_mb": round(max(peaks) / 2**20, 1),
        "fsync": not args.no_fsync,
    }
    print(f"\n{args.images} images, {total_mb:.0f} MB, median of {args.repeats}:")
    print(f"  DCMTK storescp : {scp:7.1f} MB/s")
    print(f"  mammo-node     : {node:7.1f} MB/s  (fsync {'on' if result['fsync'] else 'off'})")
    print(f"  ratio          : {result['ratio']:.2f}x   (target >= 0.80x)")
    print(f"  node peak RSS  : {result['node_peak_rss_mb']:.0f} MB   (target < 300 MB)")
    if stow_times:
        sw = total_mb / statistics.median(stow_times)
        result.update(stow_mb_s=round(sw, 1), stow_peak_rss_mb=round(max(stow_peaks) / 2**20, 1))
        print(
            f"  STOW-RS        : {sw:7.1f} MB/s   ({sw / node:.2f}x the node's C-STORE, "
            f"peak RSS {result['stow_peak_rss_mb']:.0f} MB)"
        )
    if tls_node_times:
        tscp = total_mb / statistics.median(tls_scp_times)
        tnode = total_mb / statistics.median(tls_node_times)
        result.update(
            tls_storescp_mb_s=round(tscp, 1),
            tls_node_mb_s=round(tnode, 1),
            tls_over_plain=round(tnode / node, 3),
            tls_node_over_storescp=round(tnode / tscp, 3),
        )
        print(f"  storescp +tls  : {tscp:7.1f} MB/s   ({tscp / scp:.2f}x storescp plain)")
        print(
            f"  mammo-node TLS : {tnode:7.1f} MB/s   ({result['tls_over_plain']:.2f}x the "
            f"node plain, {result['tls_node_over_storescp']:.2f}x storescp +tls)"
        )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
