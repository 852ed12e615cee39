"""Test helpers: the node as a real process on a free loopback port, DICOM senders, DCMTK
peers. Fixtures that use them live in ``conftest.py``; tests import helpers from here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parent.parent
DCMTK = Path("/usr/bin")


#: Listening ports come from below the kernel's ephemeral range (32768-60999 on Linux), so an
#: outgoing connection's source port cannot take one between the check and the listen; each
#: pytest-xdist worker draws from its own slice, from a start that differs per process.
_PORT_LO, _PORT_HI = 12000, 32000
_PORT_SLICES = 8
_port_next: int | None = None


def free_port() -> int:
    global _port_next
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % _PORT_SLICES if worker[2:].isdigit() else 0
    size = (_PORT_HI - _PORT_LO) // _PORT_SLICES
    lo = _PORT_LO + index * size
    if _port_next is None:
        _port_next = os.getpid() * 7919 % size
    for _ in range(size):
        port = lo + _port_next % size
        _port_next += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{lo + size - 1}")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def toml_document(sections: dict[str, dict], arrays: dict[str, list[dict]]) -> str:
    """A TOML file from tables and arrays of tables (dotted names allowed for both)."""
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    for name, items in arrays.items():
        for d in items:
            out.append(f"[[{name}]]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in d.items())
    return "\n".join(out) + "\n"


#: A peer that may do everything: what the query/retrieve tests connect as.
QR_PEER = {"ae_title": "QRSCU", "services": ["echo", "store", "find", "get", "move"]}


class NodeProcess:
    """A ``mammo-node start`` process with its own config and data directory."""

    def __init__(
        self,
        tmp: Path,
        settings: dict | None = None,
        data_dir: Path | None = None,
        worker: bool = False,
        env: dict | None = None,
        role: str | None = None,
    ):
        self.tmp = tmp
        self.worker = worker
        self.role = role  # --role; None: "all" (with --no-worker unless worker)
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.ae_title = "MAMMO_NODE"
        self.data_dir = data_dir or tmp / "data"
        sections: dict[str, dict] = {
            "node": {
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": self.port,
                "data_dir": str(self.data_dir),
            },
            # Synthetic studies carry fixed dates (2026-01-15 by default) so that date-range
            # queries stay the same any day: the prior age rule is off unless a test sets it.
            "grouping": {"stable_seconds": 3600, "prior_after_days": ""},
            # No emergency purge unless a test asks: a nearly full test machine must not
            # delete what a test is about to look at.
            "storage": {"min_free_mb": 0, "fsync": True, "purge_above_percent": ""},
            # Tests count result objects as 2 SRs + 4 SCs; the ones about Parametric Maps
            # and presentation states turn them on.
            "results": {"parametric_maps": False, "presentation_states": False},
            # The warm-up exam (issue 21) costs ~2 s at every start of an inference process;
            # tests/integration/test_metrics_health.py turns it on where it is the subject.
            "inference": {"warm_up_exam": False},
        }
        arrays: dict[str, list[dict]] = {}
        for section, values in (settings or {}).items():
            if isinstance(values, list):  # an array of tables: [[destinations]], [[peers]]
                arrays[section] = values
            else:
                for k, v in values.items():
                    if isinstance(v, list) and v and isinstance(v[0], dict):
                        arrays[f"{section}.{k}"] = v  # e.g. [[dicomweb.tokens]]
                    else:
                        sections.setdefault(section, {})[k] = v
        self.peers = arrays.get("peers", [])
        self.config = tmp / "config.toml"
        self.config.write_text(toml_document(sections, arrays))
        self.log = tmp / "node.log"
        self.proc: subprocess.Popen | None = None
        self._store = None  # the test's own read-only view of the node's database

    def launch(self) -> NodeProcess:
        """Start the daemon without waiting for it to answer."""
        self._logf = open(self.log, "ab")
        if self.role:
            mode = ["--role", self.role]
        else:
            mode = [] if self.worker else ["--no-worker"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "start", "--config", str(self.config), *mode],
            cwd=self.tmp,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        return self

    #: The log line that says a process without a DICOM listener is at work.
    READY_LOG = {
        "worker": "model loaded in the inference process",
        "exporter": "mammo-node exporter started",
    }

    def start(self, timeout: float = 30.0) -> NodeProcess:
        self.launch()
        assert self.proc is not None
        marker = self.READY_LOG.get(self.role or "")
        if marker:
            timeout = max(timeout, 180.0)  # a worker loads torch and the model first
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.log.read_text()}")
            if (marker in self.log.read_text(errors="replace")) if marker else self.probe():
                return self
            time.sleep(0.2)
        raise RuntimeError(
            f"node did not {'log ' + marker if marker else 'answer C-ECHO'}:"
            f"\n{self.log.read_text()}"
        )

    def probe(self) -> bool:
        """C-ECHO as a peer that may echo (the node's own start-up check)."""
        calling = "PROBE"
        for p in self.peers:
            if "echo" in p.get("services", ["echo", "store"]) and not p.get("hosts"):
                calling = p["ae_title"]
                break
        text = self.config.read_text()
        for line in text.splitlines():
            if line.startswith("allowed_calling_aets"):
                calling = json.loads(line.split("=", 1)[1].strip())[0]
        if "tls = true" in text.split("[node]", 1)[-1].split("\n[", 1)[0]:
            with socket.socket() as s:  # a TLS listener: an open port is enough here
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        return echo(self.port, self.ae_title, calling=calling)

    def close_store(self) -> None:
        if self._store is not None:
            self._store.db.close()
            self._store = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        self.close_store()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._logf.close()
        return rc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node", *args, "--config", str(self.config)],
            cwd=self.tmp,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def exams(self) -> list[dict]:
        """What ``mammo-node exams --json`` prints, read in this process (the same function
        the command runs; a subprocess per poll cost more CPU than the node under test).
        ``cli("exams", "--json")`` itself is tested where the command is the subject."""
        from node.cli import _open_reports, exams_json

        if self._store is None:
            from node.config import load_config

            self._store = _open_reports(load_config(str(self.config)))
            if self._store is None:
                return []
        return json.loads(json.dumps(exams_json(self._store)))

    def exam(self, study_uid: str) -> dict:
        for e in self.exams():
            if e["study_instance_uid"] == study_uid:
                return e
        raise KeyError(study_uid)

    def wait_exam(self, study_uid: str, state: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.exam(study_uid)
                if last["state"] == state:
                    return last
            except KeyError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"exam {study_uid} not {state} after {timeout}s: {last}")

    def stored_files(self) -> list[Path]:
        return sorted((self.data_dir / "instances").rglob("*.dcm"))

    def incoming_files(self) -> list[Path]:
        """Partial datasets (each daemon process receives into incoming/<host>-<pid>/)."""
        d = self.data_dir / "incoming"
        return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


def echo(port: int, called: str, calling: str = "PROBE") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        st = assoc.send_c_echo()
        return bool(st) and st.Status == 0
    finally:
        assoc.release()


def send(
    port: int,
    items: list,
    called: str = "MAMMO_NODE",
    calling: str = "PYNETDICOM",
    max_pdu: int = 0,
) -> list[int]:
    """C-STORE datasets (or file paths) over one pynetdicom association; the statuses."""
    from pydicom import dcmread

    contexts: dict[tuple[str, str], None] = {}
    for item in items:
        ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True)
        contexts[
            (str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        ] = None
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(a, [t]) for a, t in contexts]
    ae.maximum_pdu_size = max_pdu
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association rejected"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    statuses = []
    try:
        for item in items:
            st = assoc.send_c_store(item)
            statuses.append(int(st.Status) if st and "Status" in st else -1)
    finally:
        assoc.release()
    return statuses


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        raise RuntimeError(f"{path} missing: install the Debian package dcmtk")
    return str(path)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
# File paths given to send() go out as they are on disk (raw, not re-encoded): this is how
# the bad-input tests deliver truncated or garbage datasets.
_config.STORE_SEND_CHUNKED_DATASET = True


class StoreSCP:
    """DCMTK storescp as the PACS peer: stores what it receives in a folder."""

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        ae_title: str = "PACS",
        extra: list[str] | None = None,
    ):
        self.extra = extra or []
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None
        self.log = folder.parent / f"storescp-{self.port}.log"

    def start(self) -> StoreSCP:
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                dcmtk("storescp"),
                "-aet",
                self.ae_title,
                "-od",
                str(self.folder),
                "-v",
                *self.extra,
                str(self.port),
            ],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self._logf.close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def received(self) -> int:
        """How many C-STORE requests it has answered (duplicates count twice)."""
        return (
            self.log.read_text(errors="replace").count("Received Store Request")
            if self.log.exists()
            else 0
        )


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


#: The five BI-RADS classes of a reading made by :func:`reading_summary`.
BIRADS_CLASSES = ["BI-RADS 1", "BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"]


def reading_summary(demo: bool = True, marks: dict | None = None):
    """A plain reading for the result builders: left breast BI-RADS 5 malignant (score 85),
    right BI-RADS 1 normal, exam score 85 above an operating point of 40; ``demo``: the demo
    checkpoint's (NOT FOR CLINICAL USE); ``marks``: slot -> node.results.Mark list."""
    from node.results import BreastSummary, ReadingSummary

    def probs(top: int) -> dict[str, float]:
        return {c: (0.8 if i == top else 0.05) for i, c in enumerate(BIRADS_CLASSES)}

    return ReadingSummary(
        breasts={
            "L": BreastSummary(
                True,
                "BI-RADS 5",
                probs(4),
                "malignant",
                {"normal": 0.05, "benign": 0.1, "malignant": 0.85},
                85.0,
            ),
            "R": BreastSummary(
                True,
                "BI-RADS 1",
                probs(0),
                "normal",
                {"normal": 0.9, "benign": 0.05, "malignant": 0.05},
                5.0,
            ),
        },
        fusion_weights={"L": {"L-CC": 0.6, "L-MLO": 0.4}, "R": {"R-CC": 0.5, "R-MLO": 0.5}},
        missing_views=[],
        model_name="HybridCnnVssm",
        model_version="1.0",
        model_sha256="ab" * 32,
        not_for_clinical_use=demo,
        score=85.0,
        operating_point=40.0,
        above_operating_point=True,
        marks=marks if marks is not None else {},
    )


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def asgi_request(
    app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to an ASGI application in this process (no server, no socket; the
    venv has no httpx for starlette's TestClient): (status, headers, body)."""
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(path)
    hdrs = {"host": "127.0.0.1", **{k.lower(): v for k, v in (headers or {}).items()}}
    if body:
        hdrs.setdefault("content-type", "application/x-www-form-urlencoded")
        hdrs["content-length"] = str(len(body))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": url.path,
        "raw_path": url.path.encode(),
        "query_string": url.query.encode(),
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    out: dict = {"status": 0, "headers": {}, "body": b""}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out["status"], out["headers"], out["body"]


class WebInProcess:
    """The node's DICOMweb application, built as the daemon builds it (``node.daemon.Node``
    and ``node.dicomweb.DicomWeb``) and served by uvicorn in a thread of the test process:
    real HTTP on a loopback port, no DICOM listener, no worker, no process to start. For
    tests whose subject is HTTP; ``web`` and ``node`` are there to be inspected."""

    def __init__(self, tmp: Path, settings: dict | None = None, **dicomweb) -> None:
        from node.config import load_config
        from node.daemon import Node
        from node.dicomweb import DicomWeb, DicomWebServer

        self.port = free_port()
        sections = dict(settings or {})
        sections["dicomweb"] = {
            "enabled": True,
            "host": "127.0.0.1",
            "port": self.port,
            "root": "/dicomweb",
            **dicomweb,
        }
        self.spec = NodeProcess(tmp, sections)
        self.cfg = load_config(self.spec.config)
        self.node = Node(self.cfg, run_worker=False)
        self.web = DicomWeb(
            self.cfg,
            self.node.files,
            self.node.scp,
            exams=self.node.exams,
            deliveries=self.node.deliveries,
            reports=self.node.reports,
            audit=self.node.audit,
            metrics=self.node.metrics,
            readiness=self.node.readiness,
            health=self.node.health,
        )
        self.server = DicomWebServer(self.web, self.cfg)
        self.server.start()
        wait_for(lambda: self.server.server.started, 15, interval=0.01, what="uvicorn up")
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/dicomweb"

    def events(self) -> list[dict]:
        """The audit trail so far."""
        text = self.cfg.audit_path.read_text() if self.cfg.audit_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        self.server.stop()
        self.node.audit.close()
        self.node.db.engine.dispose()
