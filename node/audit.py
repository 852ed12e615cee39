"""Audit trail: one JSON line per security-relevant event, named after PS3.15 A.5.

Every association (accepted or rejected), query, retrieve, export, store, authentication
failure, start and stop of the node is written to ``[audit] path`` (default
``<data_dir>/audit.jsonl``, mode 0600) and, when ``[audit] syslog`` is set, forwarded to a
collector as RFC 5424 messages (UDP, or TCP with octet-counting framing, RFC 6587).

The event names are DICOM's audit message names (PS3.15 A.5.3): ``Application Activity``,
``User Authentication`` (associations and DICOMweb logins), ``Query``, ``Begin Transferring
DICOM Instances``, ``DICOM Instances Transferred``, ``Security Alert``. Each line carries the
outcome indicator of the DICOM audit schema: 0 success, 4 minor failure, 8 serious failure.

Lines hold UIDs, accession numbers, AE titles and addresses; patient names never.
Forwarding runs on its own thread and never blocks a DICOM or HTTP handler: a collector that
is down loses messages (counted in the log), never the local file's lines.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("mammo_node.audit")

APPLICATION_ACTIVITY = "Application Activity"
USER_AUTHENTICATION = "User Authentication"
QUERY = "Query"
BEGIN_TRANSFER = "Begin Transferring DICOM Instances"
INSTANCES_TRANSFERRED = "DICOM Instances Transferred"
SECURITY_ALERT = "Security Alert"
STUDY_DELETED = "DICOM Study Deleted"
AUDIT_LOG_USED = "Audit Log Used"
PATIENT_RECORD = "Patient Record"

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

#: RFC 5424 facility 13 (log audit); severities: 6 informational, 4 warning.
_FACILITY = 13


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _SyslogForwarder(threading.Thread):
    def __init__(self, url: str, app: str = "mammo-node") -> None:
        super().__init__(name="audit-syslog", daemon=True)
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rpartition(":")
        self.tcp = scheme == "tcp"
        self.address = (host, int(port))
        self.app = app
        self.hostname = socket.gethostname()[:255] or "-"
        self.queue: queue.Queue[tuple[int, str, str] | None] = queue.Queue(maxsize=10000)
        self.dropped = 0
        self._sock: socket.socket | None = None

    def submit(self, severity: int, msgid: str, text: str) -> None:
        try:
            self.queue.put_nowait((severity, msgid, text))
        except queue.Full:
            self.dropped += 1

    def _frame(self, severity: int, msgid: str, text: str) -> bytes:
        pri = _FACILITY * 8 + severity
        msgid = "".join(c for c in msgid if c.isalnum())[:32] or "-"
        line = f"<{pri}>1 {_now()} {self.hostname} {self.app} {os.getpid()} {msgid} - {text}"
        data = line.encode("utf-8")
        return f"{len(data)} ".encode() + data if self.tcp else data

    def _send(self, data: bytes) -> None:
        if not self.tcp:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.sendto(data, self.address)
            return
        if self._sock is None:
            self._sock = socket.create_connection(self.address, timeout=5)
        try:
            self._sock.sendall(data)
        except OSError:
            self._sock.close()
            self._sock = socket.create_connection(self.address, timeout=5)
            self._sock.sendall(data)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            try:
                self._send(self._frame(*item))
            except OSError as exc:
                self.dropped += 1
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                log.warning(
                    "audit: syslog collector %s:%d unreachable (%s); message dropped",
                    *self.address,
                    exc,
                )
        if self._sock is not None:
            self._sock.close()

    def close(self) -> None:
        try:
            self.queue.put(None, timeout=1)
        except queue.Full:
            pass
        self.join(timeout=5)


class AuditUnavailable(RuntimeError):
    """An audit line could not be written and ``[audit] fail_closed`` is set: the operation
    it records is refused."""


class AuditLog:
    """Append-only JSON-lines audit log (thread-safe), with optional syslog forwarding.

    Each line is one ``os.write`` on an ``O_APPEND`` descriptor (several processes may share
    the file). A line that cannot be written (disk full) is logged as an error; with
    ``fail_closed`` it raises :class:`AuditUnavailable` instead, so that the operation is
    refused, and :attr:`failing` stays true until a line is written again."""

    def __init__(
        self, path: Path, node_ae: str, syslog: str = "", fail_closed: bool = False
    ) -> None:
        self.path = Path(path)
        self.node_ae = node_ae
        self.fail_closed = fail_closed
        self.failing = False
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._syslog = _SyslogForwarder(syslog) if syslog else None
        if self._syslog is not None:
            self._syslog.start()

    def event(self, name: str, outcome: int = SUCCESS, **fields: Any) -> dict[str, Any]:
        """Record one event; ``fields`` are JSON-serialisable details (no patient names)."""
        rec: dict[str, Any] = {
            "time": _now(),
            "event": name,
            "outcome": outcome,
            "node": self.node_ae,
        }
        rec.update({k: v for k, v in fields.items() if v is not None})
        text = json.dumps(rec, separators=(",", ":"), default=str)
        data = (text + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._fd is None:
                    raise ValueError("the audit log is closed")
                if os.write(self._fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                self.failing = False
            except (OSError, ValueError) as exc:  # disk full or closed
                self.failing = True
                log.error("audit: cannot write %s: %s", self.path, exc)
                if self.fail_closed:
                    raise AuditUnavailable(
                        f"audit trail not writable ({exc}); "
                        f"[audit] fail_closed refuses the operation"
                    ) from exc
        if self._syslog is not None:
            self._syslog.submit(6 if outcome == SUCCESS else 4, name, text)
        return rec

    def close(self) -> None:
        if self._syslog is not None:
            self._syslog.close()
        with self._lock:
            try:
                if self._fd is not None:
                    os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class NullAudit:
    """Where no audit log is wanted (tools, tests of single components)."""

    def event(self, name: str, outcome: int = SUCCESS, **fields: Any) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def read_events(
    path: Path, since: dt.datetime | None = None, study: str | None = None, event: str | None = None
) -> Iterator[dict[str, Any]]:
    """Events of an audit file, oldest first, filtered (``mammo-node audit``)."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if since is not None:
                try:
                    t = dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
                except (KeyError, ValueError):
                    continue
                if t < since:
                    continue
            if event and rec.get("event", "").lower() != event.lower():
                continue
            if study and study not in _studies(rec):
                continue
            yield rec


def _studies(rec: dict[str, Any]) -> Iterable[str]:
    out = list(rec.get("studies") or [])
    if rec.get("study"):
        out.append(rec["study"])
    return out
