"""The ``mammo-node start`` daemon: a foreground process, systemd-friendly.

Logs go to stderr. SIGTERM / SIGINT stop it cleanly: the listener closes at once, in-flight
associations get ``SHUTDOWN_GRACE_SECONDS`` to finish, and only then are the rest aborted
(an aborted dataset leaves nothing behind; everything acknowledged is on disk).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import __version__
from node import audit as A
from node.compat import (
    handshake_in_connection_thread,
    listener_alive,
    received_file_meta_names,
    stream_incoming_datasets,
)
from node.config import Config
from node.health import Health
from node.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.ingest import Ingest
from node.metrics import NodeMetrics
from node.scp import IncomingFile, StorageSCP, make_ae
from node.security import AccessControl
from storage.retention import Retention

if TYPE_CHECKING:
    from types import FrameType

    from pynetdicom.transport import ThreadedAssociationServer

    from node.dicomweb import DicomWebServer
    from node.monitoring import MonitoringServer
    from storage.wakeup import Listener
from storage.db import Database
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.reports import Reports
from storage.schema import SchemaOutdated

log = logging.getLogger("mammo_node")

SHUTDOWN_GRACE_SECONDS = 30.0
#: How long the stop waits for each background thread to end.
THREAD_STOP_SECONDS = 15.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (``[logging] format = "json"``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # pynetdicom logs every PDU at DEBUG and each association at INFO; keep it quieter.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def pidfile_path(cfg: Config) -> Path:
    return cfg.data_dir / "mammo-node.pid"


def read_pidfile(cfg: Config) -> dict | None:
    """The running node's pid file contents, or None when no live node owns it."""
    p = pidfile_path(cfg)
    try:
        info = json.loads(p.read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (FileNotFoundError, ValueError, KeyError, TypeError, ProcessLookupError):
        return None
    except PermissionError:
        return info  # alive, owned by another user


def _accept_with_deadline(server: Any, timeout: float) -> None:
    """Accepted sockets get TCP_NODELAY (responses and C-GET/C-FIND PDUs go out at once)
    and ``timeout`` seconds for each read and write.

    Why the deadline: pynetdicom gives its listening socket a timeout, but a socket returned
    by ``accept`` is blocking, and its DUL reads a PDU with blocking ``recv`` calls until the
    whole PDU is in. A peer that vanishes mid-PDU without closing its connection (a cable
    pulled, a NAT or VPN that drops the flow, a modality powered off) held the association
    forever: the network timeout's A-ABORT waits for that read, so its thread, its socket,
    its partly received dataset and its place among ``max_associations`` were never given
    back. With a deadline the read fails, pynetdicom treats it as the connection closing
    (Evt17) and everything is released. Idle associations are not affected: the DUL reads
    only once ``select`` says data is there."""
    accept = server.get_request

    def get_request() -> tuple[socket.socket, Any]:
        sock, addr = accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
        except OSError:
            pass
        return sock, addr

    server.get_request = get_request


#: What each ``--role`` runs. ``all``: everything in one process (the default).
ROLES = {
    "all": {"listener", "worker", "exporter"},
    "listener": {"listener"},
    "worker": {"worker"},
    "exporter": {"exporter"},
}


class Node:
    """The running node: storage, the DICOM listener and the grouping timer, the worker and
    the exporter, or the part of them its role names (several processes, on one host or many,
    share one database and one ``data_dir``)."""

    def __init__(self, cfg: Config, run_worker: bool = True, role: str = "all") -> None:
        self.cfg = cfg
        self.role = role
        self.parts = set(ROLES[role])
        if not run_worker:
            self.parts -= {"worker", "exporter"}
        self.run_worker = "worker" in self.parts
        self.stop_event = threading.Event()
        self.files = FileStore(cfg.data_dir, fsync=cfg.storage.fsync, per_process=True)
        os.chmod(cfg.data_dir, 0o700)
        self.db = Database(cfg.database_url)
        # The three services on the one database: exams (and their transitions, claims and
        # leases), the delivery queue, and the read models.
        self.exams = Exams(
            self.db,
            prior_after_days=cfg.grouping.prior_after_days,
            prior_gap_days=cfg.grouping.prior_gap_days,
        )
        self.deliveries = Deliveries(self.db)
        self.reports = Reports(self.db)
        self.audit = A.AuditLog(
            cfg.audit_path, cfg.node.ae_title, cfg.audit.syslog, fail_closed=cfg.audit.fail_closed
        )
        self.health = Health()
        self.metrics = NodeMetrics(self.parts)
        self.metrics.watch_state(self.state_snapshot)
        # The worker and the exporter are woken by the commits themselves (storage.wakeup,
        # self.wakes): assembly or the stable timer making an exam ready, results queued.
        self.ingest = Ingest(cfg, self.files, self.exams, audit=self.audit, metrics=self.metrics)
        self.scp = StorageSCP(
            cfg, self.files, audit=self.audit, metrics=self.metrics, ingest=self.ingest
        )
        self.access: AccessControl = self.scp.access
        self.retention = Retention(self.db, self.files)
        self._retention_lock = threading.Lock()
        self._room_wanted = threading.Event()  # wakes the retention thread (make_room)
        self.scp.make_room = self.make_room
        self.server: ThreadedAssociationServer | None = None
        self.web: DicomWebServer | None = None
        self.monitoring: MonitoringServer | None = None
        #: What wakes this process's worker / exporter (storage.wakeup), made at start.
        self.wakes: list[Listener] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        cfg = self.cfg
        if self.role == "all":  # one process owns data_dir; split roles share it
            running = read_pidfile(cfg)
            if running and running.get("pid") != os.getpid():
                raise RuntimeError(
                    f"another mammo-node (pid {running['pid']}) is running on "
                    f"data_dir {cfg.data_dir}"
                )
        if "worker" in self.parts or "exporter" in self.parts:
            recovered = self.exams.recover()
            self.deliveries.recover()
            if recovered:
                log.warning("%d exam(s) interrupted during processing queued again", recovered)
        self._start_monitoring()
        if "listener" in self.parts:
            self._start_listener()
        else:
            self._start_background()
            log.info(
                "mammo-node %s started (pid %d); data in %s; database %s",
                self.role,
                os.getpid(),
                cfg.data_dir,
                self.db.engine.url.render_as_string(hide_password=True),
            )
            self._activity(action="start", version=__version__, pid=os.getpid(), role=self.role)

    def _start_monitoring(self) -> None:
        """A role process's own /healthz, /readyz and /metrics ([roles] <role>_metrics_port)."""
        port = self.cfg.roles.metrics_port(self.role)
        if port is None:
            return
        from node.monitoring import MonitoringServer

        host = self.cfg.roles.metrics_host
        server = MonitoringServer(self.role, host, port, self.metrics, self.readiness)
        if not server.start_and_wait():
            raise RuntimeError(
                f"[roles] {self.role}_metrics_port = {port}: cannot listen "
                f"on {host}:{port}: {server.failed or 'no answer'}"
            )
        self.monitoring = server
        log.info("%s: /healthz, /readyz and /metrics on http://%s:%d", self.role, host, port)

    def _start_background(self) -> None:
        """The worker and / or the exporter of this process, each woken by new work
        (storage.wakeup: NOTIFY on PostgreSQL) or after [roles] poll_seconds."""
        cfg = self.cfg
        from node.export import Exporter
        from node.worker import Worker
        from storage.wakeup import DELIVERIES_DUE, EXAMS_READY, Listener

        poll = cfg.roles.poll_seconds
        deliveries = Listener(self.db, DELIVERIES_DUE) if "exporter" in self.parts else None
        if "worker" in self.parts:
            exams = Listener(self.db, EXAMS_READY)
            self.wakes.append(exams)
            t: threading.Thread = Worker(
                cfg,
                self.files,
                self.exams,
                self.stop_event,
                wake=exams,
                on_results=deliveries,
                health=self.health,
                metrics=self.metrics,
                poll_seconds=poll,
            )
            t.start()
            self._threads.append(t)
        if deliveries is not None:
            self.wakes.append(deliveries)
            t = Exporter(
                cfg,
                self.files,
                self.deliveries,
                self.reports,
                self.stop_event,
                wake=deliveries,
                audit=self.audit,
                metrics=self.metrics,
                poll_seconds=poll,
            )
            t.start()
            self._threads.append(t)

    def _start_listener(self) -> None:
        cfg = self.cfg
        removed = self.files.clean_incoming()
        if removed:
            log.warning("removed %d partial dataset(s) left by an earlier run", removed)
        finished = self.retention.finish_journal()
        if finished:
            log.warning("finished deleting %d file(s) of a purge cut short by a crash", finished)

        # Stream incoming datasets to data_dir/incoming (same file system as the store, so
        # that placing a file is a rename, never a copy).
        stream_incoming_datasets(
            IncomingFile.factory(
                str(self.files.incoming),
                int(cfg.node.max_dataset_mb * 1024 * 1024),
                self.scp.disk_ok,
            )
        )
        received_file_meta_names(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)

        ae = make_ae(cfg)
        from node.qr import QueryRetrieveSCP

        qr = QueryRetrieveSCP(cfg, self.files, self.reports, access=self.access, audit=self.audit)
        ssl_context = None
        if cfg.node.tls:
            from node.security import server_context

            ssl_context = server_context(cfg)
        from node.handlers import guard

        server = ae.start_server(
            (cfg.node.host, cfg.node.port),
            block=False,
            evt_handlers=guard(self.scp.handlers() + qr.handlers(), self.audit),
            ssl_context=ssl_context,
        )
        assert server is not None  # block=False returns the server
        self.server = server
        _accept_with_deadline(server, cfg.node.network_timeout_seconds)
        from node.compat import fast_context_copies

        fast_context_copies(server)
        if ssl_context is not None:
            handshake_in_connection_thread(
                server, cfg.node.network_timeout_seconds, self._handshake_failed
            )
        port = server.server_address[1]
        if self.role == "all":
            pidfile_path(cfg).write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "ae_title": cfg.node.ae_title,
                        "host": cfg.node.host,
                        "port": port,
                        "started": time.time(),
                    }
                )
            )
        t = threading.Thread(target=self._grouping_loop, name="stable-timer", daemon=True)
        t.start()
        self._threads.append(t)
        t = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        t.start()
        self._threads.append(t)
        self._start_background()
        if cfg.dicomweb.enabled:
            from node.dicomweb import DicomWeb, DicomWebServer

            web = DicomWeb(
                cfg,
                self.files,
                self.scp,
                exams=self.exams,
                deliveries=self.deliveries,
                reports=self.reports,
                audit=self.audit,
                metrics=self.metrics,
                readiness=self.readiness,
                health=self.health,
            )
            self.web = DicomWebServer(web, cfg)
            self.web.start()
            w = cfg.dicomweb
            log.info(
                "DICOMweb on %s://%s:%d%s (%s)",
                "https" if w.tls else "http",
                w.host,
                w.port,
                w.root,
                "bearer token required" if web.tokens.required else "no token: loopback only",
            )
            if web.tokens.required and not w.tls and not w.is_loopback:
                log.warning(
                    "DICOMweb bearer tokens and patient data travel in clear on %s: "
                    "set [dicomweb] tls = true",
                    w.host,
                )
        log.info(
            "mammo-node%s listening as %s on %s:%d%s; data in %s; %d destination(s); %s",
            "" if self.role == "all" else f" {self.role}",
            cfg.node.ae_title,
            cfg.node.host,
            port,
            " (TLS)" if cfg.node.tls else "",
            cfg.data_dir,
            len(cfg.destinations),
            f"{len(cfg.peers)} peer(s)"
            if cfg.peers
            else "no [[peers]]: echo/store from anyone, query/retrieve refused",
        )
        self._activity(
            action="start", version=__version__, pid=os.getpid(), port=port, tls=cfg.node.tls
        )

    def _handshake_failed(self, address: tuple, exc: Exception) -> None:
        log.warning("TLS handshake with %s:%s failed or timed out: %s", address[0], address[1], exc)
        self.audit.event(
            A.SECURITY_ALERT,
            A.MINOR_FAILURE,
            alert="TLS handshake failed",
            peer={"address": address[0]},
            reason=str(exc)[:200],
        )

    def state_snapshot(self) -> dict:
        """Stored state for the scrape-time gauges of /metrics."""
        queue = self.reports.queue_depths() if self.parts & {"listener", "exporter"} else []
        return {
            "exams": self.reports.counts_by_state().to_json(),
            "queue": queue,
            "free_bytes": self.files.free_bytes(),
            "model": 1 if self.health.model_loaded else 0,
            "uptime": time.time() - self.health.started_at,
        }

    def _activity(self, **fields: Any) -> None:
        """The node's own start / stop event: never the reason it cannot start or stop (with
        ``[audit] fail_closed`` an unwritable trail refuses the operations instead, and
        ``/readyz`` says so)."""
        try:
            self.audit.event(A.APPLICATION_ACTIVITY, A.SUCCESS, **fields)
        except A.AuditUnavailable:
            pass

    def readiness(self) -> tuple[bool, dict]:
        """``/readyz``: database reachable, model loaded (when this node reads exams), disk
        above the reserve, DICOM listener accepting, every background thread alive. (ready,
        checks with reasons)."""
        checks: dict[str, dict] = {}
        checks["database"] = {"ok": self.db.ping()}
        if self.run_worker:
            h = self.health
            checks["model"] = {
                "ok": bool(h.model_loaded),
                **({"error": h.model_error} if h.model_error else {}),
                **({"loading": True} if h.model_loaded is None else {}),
            }
        free = self.files.free_bytes()
        checks["disk"] = {
            "ok": self.scp.disk_ok(),
            "free_bytes": free,
            "reserve_bytes": self.scp.min_free,
        }
        if "listener" in self.parts:
            checks["listener"] = {"ok": self.server is not None and listener_alive(self.server)}
        if self.cfg.audit.fail_closed:
            checks["audit"] = {
                "ok": not self.audit.failing,
                **(
                    {
                        "error": (
                            "the audit trail cannot be written: operations are refused "
                            "([audit] fail_closed)"
                        )
                    }
                    if self.audit.failing
                    else {}
                ),
            }
        # Every background thread of this process (worker, exporter, retention, the
        # grouping's stable timer): one that ended would otherwise fail silently.
        for t in self._threads:
            alive = t.is_alive()
            checks[f"thread {t.name}"] = {
                "ok": alive,
                **(
                    {}
                    if alive
                    else {"error": "the thread stopped; the log says why; restart the node"}
                ),
            }
        return all(c["ok"] for c in checks.values()), checks

    def apply_retention(self, for_reserve: bool = False) -> None:
        """The retention rules once; ``for_reserve``: also purge the oldest purgeable studies
        until free space is above ``[storage] min_free_mb`` (data is about to be refused)."""
        r, s = self.cfg.retention, self.cfg.storage
        # One retention pass at a time across every listener sharing the database.
        with self._retention_lock, self.db.exclusive("retention") as mine:
            if not mine:
                log.info("retention: another process is applying the rules now")
                return
            if for_reserve:
                report = self.retention.run(
                    r.keep_images_days,
                    r.keep_results_days,
                    50.0,
                    disk_use=lambda: 100.0 if self.files.free_bytes() < self.scp.min_free else 0.0,
                )
            else:
                report = self.retention.run(
                    r.keep_images_days, r.keep_results_days, s.purge_above_percent
                )
        if report.studies or report.results:
            log.info(
                "retention: %d study(ies) purged (%d image(s), %.1f MB), %d result object(s)",
                len(report.studies),
                report.instances,
                report.bytes / 1e6,
                report.results,
            )
            self.audit.event(
                A.STUDY_DELETED,
                A.SUCCESS,
                studies=report.studies,
                instances=report.instances,
                results=report.results,
            )

    def make_room(self) -> None:
        """Called before data would be refused for want of space (an association being
        accepted, a STOW request): wakes the retention thread to purge what may go, and
        returns at once (a purge never runs while a peer waits for its answer)."""
        self._room_wanted.set()

    def _retention_loop(self) -> None:
        while not self.stop_event.is_set():
            for_reserve = self._room_wanted.wait(self.cfg.retention.check_seconds)
            if self.stop_event.is_set():
                break
            self._room_wanted.clear()
            try:
                self.apply_retention(for_reserve=for_reserve)
            except Exception:
                log.exception("retention failed; retrying at the next check")

    def _grouping_loop(self) -> None:
        interval = max(0.2, min(2.0, self.cfg.grouping.stable_seconds / 4))
        while not self.stop_event.wait(interval):
            try:  # the commit making them ready wakes the workers (storage.wakeup)
                for uid in self.exams.promote_stable(self.cfg.grouping.stable_seconds):
                    log.info(
                        "exam %s ready (stable for %g s)", uid, self.cfg.grouping.stable_seconds
                    )
            except Exception:
                log.exception("grouping timer failed; retrying")

    def stop(self) -> None:
        """Close the listener, let associations finish, then release everything."""
        self.stop_event.set()
        self._room_wanted.set()  # the retention thread sees the stop at once
        for wake in self.wakes:  # the worker and the exporter see the stop at once
            wake.set()
        if self.web is not None:
            self.web.stop()
        if self.server is not None:
            ae = self.server.ae
            self.server.shutdown()
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
            for assoc in ae.active_associations:
                log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
            self.server = None
        for t in self._threads:
            t.join(timeout=THREAD_STOP_SECONDS)
        running = [t.name for t in self._threads if t.is_alive()]
        if running:
            # A listener's owner reads its pipe and its connection, and a commit of any
            # thread sets it: closed under a running thread, its descriptors' numbers may be
            # another file's by the time they are used. Left open, the exit frees them.
            log.warning(
                "thread(s) %s still running %g s after the stop: wake-up listeners left open",
                ", ".join(running),
                THREAD_STOP_SECONDS,
            )
        else:
            for wake in self.wakes:
                wake.close()
        if self.monitoring is not None:
            self.monitoring.stop()
        self.db.close()
        self._activity(action="stop", pid=os.getpid())
        self.audit.close()
        try:
            info = json.loads(pidfile_path(self.cfg).read_text())
            if info.get("pid") == os.getpid():
                pidfile_path(self.cfg).unlink()
        except (FileNotFoundError, ValueError):
            pass
        log.info("mammo-node stopped")


def run(cfg: Config, run_worker: bool = True, role: str = "all") -> int:
    """Run the node (or the part its ``role`` names) in the foreground until SIGTERM or
    SIGINT."""
    from node import preflight

    # Everything the node writes (images, database, audit log) is for the service account
    # only: 0700 folders, 0600 files (set before the checks create anything).
    os.umask(0o077)
    parts = set(ROLES[role]) - (set() if run_worker else {"worker", "exporter"})
    try:
        cfg.check_startable()
        preflight.check(cfg, parts)
        port = cfg.roles.metrics_port(role)
        if port is not None:
            preflight.check_port(cfg.roles.metrics_host, port, f"[roles] {role}_metrics_port")
    except Exception as exc:
        log.error("refusing to start: %s", exc)
        return 2
    try:
        node = Node(cfg, run_worker=run_worker, role=role)
    except SchemaOutdated as exc:
        log.error("refusing to start: %s", exc)
        return 2
    except Exception as exc:  # what the checks could not foresee: one line, the trace at DEBUG
        log.debug("start-up failed", exc_info=True)
        log.error("refusing to start: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return 2

    def _signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        node.start()
    except OSError as exc:
        log.error("refusing to start: %s", preflight.listen_error(cfg, exc))
        node.db.close()
        return 2
    except RuntimeError as exc:
        log.error("%s", exc)
        node.db.close()
        node.audit.close()
        return 1
    except Exception:
        log.exception("start-up failed")
        node.stop()
        return 1
    while not node.stop_event.wait(1.0):
        pass
    node.stop()
    return 0
