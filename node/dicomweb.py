"""DICOMweb in the daemon (Starlette on uvicorn): STOW-RS, QIDO-RS, WADO-RS.

STOW-RS goes through the same :class:`node.ingest.Ingest` as C-STORE (streaming validation,
file store, exam assembly); QIDO-RS runs :mod:`node.query`, as C-FIND does; WADO-RS serves the
stored files (received images and produced results alike), their metadata, and rendered PNG
or JPEG images of single-frame objects (the attention maps) for browsers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import ssl
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

import uvicorn
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node import audit as A
from node import wado
from node.config import Config
from node.dashboard import COOKIE, Dashboard
from node.ingest import (
    _DISK_ERRNOS,
    Ingest,
    StoreError,
    part_identity,
    part_to_file,
    public_message,
    stream_validated,
)
from node.monitoring import Readiness, health_routes
from node.query import Query, QueryError, QueryService, QueryUnavailable, from_params
from node.scp import StorageSCP
from node.security import TokenAuth, server_context
from node.status import DATASET_MISMATCH, OUT_OF_RESOURCES, PROCESSING_FAILURE
from node.validate import StreamCheck
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.models import Instance
from storage.reports import Reports

if TYPE_CHECKING:
    from node.health import Health
    from node.metrics import NodeMetrics

log = logging.getLogger("mammo_node.dicomweb")

DICOM_JSON = "application/dicom+json"
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
#: A STOW body is written (and free space checked again) in blocks of this many bytes.
_STOW_CHECK_EVERY = 4 * 1024 * 1024


async def _audit_unavailable(request: Request, exc: Exception) -> Response:
    """``[audit] fail_closed`` and the trail cannot be written: the request is refused."""
    return JSONResponse(
        {"error": "the audit trail cannot be written; retry later"},
        status_code=503,
        headers={"Retry-After": "30"},
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


_SCAN_BLOCK = 4 << 20


def _positions(f: BinaryIO, needle: bytes, size: int) -> list[int]:
    """Every offset of ``needle`` in the open file, read in blocks: the GIL is released
    between blocks (a search of a whole 400 MB mmap holds it, stalling every thread)."""
    found: set[int] = set()
    pos, overlap = 0, len(needle) - 1
    while pos < size:
        f.seek(pos)
        block = f.read(_SCAN_BLOCK)
        i = block.find(needle)
        while i >= 0:
            found.add(pos + i)
            i = block.find(needle, i + 1)
        if len(block) < _SCAN_BLOCK:
            break
        pos += len(block) - overlap
    return sorted(found)


def split_multipart(path: Path, content_type: str) -> list[tuple[str, int, int]]:
    """Parts of a multipart/related body spooled to ``path``: (content type, offset, length).

    Reads the file in blocks, so a 400 MB STOW request is never held in memory (and, in a
    worker thread, never holds the GIL for long).
    """
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("multipart/related without a boundary parameter")
    # Header values arrive as latin-1 (ASGI): the boundary's bytes are those.
    boundary = b"--" + m.group(1).encode("latin-1")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty body")
    with open(path, "rb") as f:
        every = _positions(f, boundary, size)
        if not every:
            raise ValueError("the boundary of the Content-Type never appears in the body")
        delimiters = _positions(f, b"\r\n" + boundary, size)  # CRLF + boundary

        def at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        parts = []
        pos = every[0]
        while True:
            start = pos + len(boundary)
            if at(start, 2) == b"--":
                break  # closing delimiter
            if at(start, 2) == b"\r\n":
                start += 2
            head = at(start, 16384)
            if head.startswith(b"\r\n"):
                head_end, data = 0, start + 2  # a part without headers (RFC 2046 allows it)
            else:
                head_end = head.find(b"\r\n\r\n")
                if head_end < 0:
                    raise ValueError(
                        "a part without the blank line that ends its headers (within 16 KB)"
                    )
                data = start + head_end + 4
            ctype = "application/octet-stream"
            for line in head[:head_end].decode("latin-1").split("\r\n"):
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-type":
                    ctype = v.strip().lower()
            nxt = next((d for d in delimiters if d >= data), -1)
            if nxt < 0:
                raise ValueError("a part without a closing boundary (truncated body?)")
            parts.append((ctype, data, nxt - data))
            pos = nxt + 2
        return parts


class Audited(Response):
    """An answer whose end is audited: ``done(outcome, reason)`` once it has been sent,
    :data:`node.audit.SUCCESS` when its last byte was handed to the server before the client
    went away, :data:`node.audit.SERIOUS_FAILURE` with the reason when the client went away
    first (a WADO-RS study stream stopped halfway) or the answer failed while it was sent.
    Plain ASGI around the response; nothing is buffered."""

    def __init__(self, response: Response, done: Callable[[int, str | None], None]) -> None:
        self.response, self.done = response, done
        self.status_code = response.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = gone = False

        async def receiving() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not finished:
                gone = True
            return message

        async def sending(message: Message) -> None:
            nonlocal finished
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True

        reason = None
        try:
            await self.response(scope, receiving, sending)
        except BaseException as exc:
            reason = (
                "the client went away before the end of the answer"
                if isinstance(exc, OSError | ClientDisconnect | asyncio.CancelledError)
                else f"{type(exc).__name__} while the answer was sent"
            )
            raise
        finally:
            if finished and not gone and reason is None:
                self.done(A.SUCCESS, None)
            else:
                self.done(
                    A.SERIOUS_FAILURE, reason or "the client went away before the end of the answer"
                )


class Front:
    """The node's front door, plain ASGI: every HTTP request's Host, Origin and token are
    checked (:meth:`DicomWeb.refusal`) before anything else, and every answer says it may
    not be framed (``X-Frame-Options``, ``frame-ancestors``)."""

    def __init__(self, app: ASGIApp, web: DicomWeb) -> None:
        self.app, self.web = app, web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def framed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"x-frame-options" not in names:
                    headers.append((b"x-frame-options", b"DENY"))
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", b"frame-ancestors 'none'"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            refused = await self.web.refusal(Request(scope, receive))
        except A.AuditUnavailable as exc:
            refused = await _audit_unavailable(Request(scope, receive), exc)
        if refused is not None:
            await refused(scope, receive, framed)
            return
        try:
            await self.app(scope, receive, framed)
        except ClientDisconnect:
            # The client went away while its request body was read (an upload cut short, a
            # form never finished): nobody to answer, nothing to report as a server error.
            log.info(
                "HTTP %s %s: the client went away before the end of its request",
                scope.get("method"),
                scope.get("path", "")[:200],
            )


class ConcurrencyLimit:
    """At most ``limit`` requests at once, plain ASGI; one more is answered 503 with
    ``Retry-After: 1``. A request holds its slot for the whole call of the application: until
    the last byte of its body has been handed to the server (a streamed WADO answer counts for
    as long as it streams), the client went away, or the application failed. Nothing is left
    to a body generator that might never start. ``exempt(path, method)``: requests outside
    the bound (the probes)."""

    def __init__(
        self, app: ASGIApp, limit: int, exempt: Callable[[str, str], bool] | None = None
    ) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt
        #: Requests holding a slot now (the event loop's thread alone changes it).
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self.exempt is not None and self.exempt(scope["path"], scope["method"])
        ):
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            busy = JSONResponse(
                {"error": "too many concurrent requests; retry shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
            await busy(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class DicomWeb:
    """The DICOMweb application bound to the node's store."""

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        scp: StorageSCP,
        *,
        exams: Exams,
        deliveries: Deliveries,
        reports: Reports,
        audit: A.AuditLog | A.NullAudit,
        metrics: NodeMetrics | None = None,
        readiness: Readiness | None = None,
        health: Health | None = None,
    ) -> None:
        self.cfg, self.files, self.scp = cfg, files, scp
        self.reports = reports
        self.ingest: Ingest = scp.ingest  # STOW-RS stores as C-STORE does, not through it
        self.audit = audit
        self.queries = QueryService(reports)
        self.tokens = TokenAuth(cfg)
        self.metrics = metrics  # node.metrics.NodeMetrics or None
        self.readiness = readiness  # () -> (ready, checks) or None
        self.root = cfg.dicomweb.root.rstrip("/")
        #: Decoded images of rendered, thumbnail and WADO-URI requests (node.wado).
        self.decoded = wado.DecodedImages(int(cfg.dicomweb.render_cache_mb * 1024 * 1024))
        self._hosts = cfg.dicomweb.host_names()
        self.dashboard = Dashboard(
            cfg,
            files,
            self.root,
            exams=exams,
            deliveries=deliveries,
            reports=reports,
            health=health,
            readiness=readiness,
            audit=self.audit,
        )
        r = self.root
        self.viewer = None
        viewer_routes = []
        if cfg.dicomweb.viewer_dir:
            from node.viewer import Viewer

            self.viewer = Viewer(cfg.dicomweb.viewer_dir, self.root)
            viewer_routes = [
                Route("/viewer", self.viewer.page, methods=["GET"]),
                Route("/viewer/{path:path}", self.viewer.page, methods=["GET"]),
                Route("/app-config.js", self.viewer.page, methods=["GET"]),
            ]
        # Plain ASGI middleware (no BaseHTTPMiddleware: it relays every body through a
        # memory stream and cannot tell a finished answer from a client that went away):
        # Host / Origin / token first, then the bound on requests at once.
        self.limit: ConcurrencyLimit | None = None

        def limited(app: ASGIApp) -> ConcurrencyLimit:
            self.limit = ConcurrencyLimit(
                app, cfg.dicomweb.max_concurrent_requests, exempt=self.open_path
            )
            return self.limit

        middleware = [Middleware(Front, web=self), Middleware(limited)]
        if cfg.dicomweb.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            # Outermost: a preflight carries no token and must be answered before the
            # authentication.
            middleware.insert(
                0,
                Middleware(
                    CORSMiddleware,
                    allow_origins=cfg.dicomweb.cors_origins,
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["Authorization", "Accept", "Content-Type"],
                    expose_headers=["Warning", "Content-Type", "Content-Length"],
                    allow_credentials="*" not in cfg.dicomweb.cors_origins,
                    max_age=600,
                ),
            )
        self.app = Starlette(
            middleware=middleware,
            exception_handlers={A.AuditUnavailable: _audit_unavailable},
            routes=[
                *viewer_routes,
                *self.dashboard.routes(),
                *health_routes(metrics, readiness),
                Route(f"{r}/studies", self.stow, methods=["POST"]),
                Route(f"{r}/studies/{{study}}", self.stow, methods=["POST"]),
                Route(f"{r}/studies", self.qido, methods=["GET"]),
                Route(f"{r}/series", self.qido, methods=["GET"]),
                Route(f"{r}/instances", self.qido, methods=["GET"]),
                Route(f"{r}/studies/{{study}}/thumbnail", self.thumbnail, methods=["GET"]),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/thumbnail",
                    self.thumbnail,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/thumbnail",
                    self.thumbnail,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/frames/"
                    f"{{frames}}",
                    self.frames,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/frames/"
                    f"{{frames}}/rendered",
                    self.rendered,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/bulkdata/"
                    f"{{tag}}",
                    self.bulkdata,
                    methods=["GET"],
                ),
                Route("/wado", self.wado_uri, methods=["GET"]),
                Route(f"{r}/wado", self.wado_uri, methods=["GET"]),
                Route(f"{r}/studies/{{study}}/series", self.qido, methods=["GET"]),
                Route(f"{r}/studies/{{study}}/instances", self.qido, methods=["GET"]),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances", self.qido, methods=["GET"]
                ),
                Route(f"{r}/studies/{{study}}", self.wado, methods=["GET"]),
                Route(f"{r}/studies/{{study}}/metadata", self.metadata, methods=["GET"]),
                Route(f"{r}/studies/{{study}}/series/{{series}}", self.wado, methods=["GET"]),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/metadata",
                    self.metadata,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}",
                    self.wado,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/metadata",
                    self.metadata,
                    methods=["GET"],
                ),
                Route(
                    f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/rendered",
                    self.rendered,
                    methods=["GET"],
                ),
                *(
                    [Route("/{path:path}", self.viewer.page, methods=["GET"])]
                    if self.viewer
                    else []
                ),
            ],
        )

    @staticmethod
    def service_of(request: Request) -> str:
        """The service a request uses: ``stow``, ``qido``, ``wado`` (DICOMweb) or ``admin``
        (/metrics: a token with ``qido``)."""
        if request.url.path == "/metrics":
            return "admin"
        if request.url.path.startswith("/ui"):
            return (
                "ui-action"
                if request.method == "POST" and not request.url.path.endswith("/logout")
                else "ui"
            )
        if request.method == "POST":
            return "stow"
        path = request.url.path.rstrip("/")
        if path.endswith(("/studies", "/series", "/instances")):
            return "qido"
        return "wado"

    def _who(self, request: Request, token: str | None = None) -> dict:
        return {
            "address": request.client.host if request.client else None,
            "token": token,
            "tls": self.cfg.dicomweb.tls,
        }

    def _host_ok(self, request: Request) -> bool:
        """The Host header names one of ``[dicomweb] allowed_hosts`` (DNS rebinding: a page
        of another site whose name resolves to this node reads nothing)."""
        host = request.headers.get("host", "")
        if host.startswith("["):  # [IPv6]:port
            name = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            name = host.split(":")[0]
        else:
            name = host
        return name.lower() in self._hosts

    def _origin_ok(self, request: Request) -> bool:
        """A state-changing request from a browser comes from this node's own pages or a
        configured CORS origin (a page on another site cannot pause a destination)."""
        origin = request.headers.get("origin")
        if origin is None:
            # No Origin: not a browser's cross-site request, unless Fetch Metadata says so.
            return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        if origin in self.cfg.dicomweb.cors_origins or "*" in self.cfg.dicomweb.cors_origins:
            return True
        from urllib.parse import urlsplit

        u = urlsplit(origin)
        return (u.hostname or "").lower() in self._hosts and origin.rstrip("/") == self.origin(
            request
        ).rstrip("/")

    def open_path(self, path: str, method: str) -> bool:
        """Probes, the sign-in form and the viewer's files: no token, and outside the
        concurrency bound (a busy node still answers /healthz)."""
        return path in ("/healthz", "/readyz", "/ui/login") or (
            self.viewer is not None and method == "GET" and self.viewer.serves(path)
        )

    async def refusal(self, request: Request) -> Response | None:
        """The answer to a request refused for its Host, Origin or token (None: it may go
        on; ``request.state.who`` then says who it is)."""
        path = request.url.path
        if path not in ("/healthz", "/readyz") and not self._host_ok(request):
            log.warning(
                "HTTP %s %s refused: Host %r is not in [dicomweb] allowed_hosts",
                request.method,
                path,
                request.headers.get("host", "")[:100],
            )
            return _error(
                400,
                "Host header not accepted: not a name this node is served "
                "under ([dicomweb] allowed_hosts)",
            )
        if request.method not in ("GET", "HEAD", "OPTIONS") and not self._origin_ok(request):
            who = self._who(request)
            self.audit.event(
                A.SECURITY_ALERT,
                A.MINOR_FAILURE,
                alert="cross-origin request",
                peer=who,
                origin=request.headers.get("origin", "")[:200],
                action=path,
            )
            return _error(
                403,
                "cross-origin request refused (Origin "
                f"{request.headers.get('origin', '?')[:100]!r})",
            )
        if self.open_path(path, request.method):
            return None  # probes, sign-in form, viewer files: no token
        service = self.service_of(request)
        name = None
        if self.tokens.required:
            header = request.headers.get("authorization", "")
            found = None
            # The dashboard and the images it shows authenticate with the session cookie
            # (a random id, HttpOnly, SameSite=Strict); uploads never do.
            if (
                not header
                and COOKIE in request.cookies
                and (path.startswith("/ui") or request.method == "GET")
            ):
                session = self.dashboard.sessions.get(request.cookies[COOKIE])
                if session is not None:
                    found = (session["name"], session["services"])
            else:
                found = self.tokens.authenticate(header)
            if found is None and path.startswith("/ui") and request.method == "GET":
                return RedirectResponse("/ui/login", status_code=303)
            if found is None:
                who = self._who(request)
                log.warning(
                    "DICOMweb %s %s from %s: missing or wrong bearer token",
                    request.method,
                    request.url.path,
                    who["address"],
                )
                self.audit.event(
                    A.USER_AUTHENTICATION,
                    A.MINOR_FAILURE,
                    action="dicomweb",
                    peer=who,
                    reason="missing or wrong bearer token",
                )
                self.audit.event(
                    A.SECURITY_ALERT,
                    A.MINOR_FAILURE,
                    alert="authentication failure",
                    peer=who,
                    service=service,
                )
                return JSONResponse(
                    {"error": "missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="mammo-node"'},
                )
            name, services = found
            if service == "ui" and not {"qido", "wado"} <= services:
                return _error(
                    403, f"token {name!r} needs the qido and wado services for the dashboard"
                )
            if service == "ui-action" and services != {"stow", "qido", "wado"}:
                return _error(403, f"token {name!r} needs every service for dashboard actions")
            if service == "admin" and "qido" not in services:
                # /metrics counts studies and peers: not for a modality's stow-only token.
                return _error(403, f"token {name!r} is not granted 'qido' (needed for /metrics)")
            if service not in ("admin", "ui", "ui-action") and service not in services:
                who = self._who(request, name)
                self.audit.event(
                    A.SECURITY_ALERT,
                    A.MINOR_FAILURE,
                    alert="unauthorized request",
                    peer=who,
                    service=service,
                )
                return _error(403, f"token {name!r} is not granted {service!r}")
        request.state.who = self._who(request, name)
        return None

    # -- STOW-RS ---------------------------------------------------------------------------
    async def stow(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/related") or (
            "application/dicom" not in ctype.lower()
        ):
            return _error(
                415,
                'STOW-RS takes multipart/related; type="application/dicom", '
                f"got {ctype or 'no Content-Type'}",
            )
        limit = int(self.cfg.dicomweb.max_request_mb * 1024 * 1024)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(
                413,
                f"request larger than [dicomweb] max_request_mb "
                f"({self.cfg.dicomweb.max_request_mb:g} MB)",
            )
        if not await run_in_threadpool(self.scp.room_for_data):
            return JSONResponse(
                {"error": "disk below the free-space reserve; retry later"},
                status_code=503,
                headers={"Retry-After": "60"},
            )
        spool = tempfile.NamedTemporaryFile(
            dir=self.files.incoming, prefix="stow-", suffix=".body", delete=False
        )
        try:
            # The body is gathered into blocks on the event loop and written, checked and
            # scanned in worker threads: a large upload never stalls other requests.
            total, buf = 0, bytearray()
            try:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        return _error(
                            413,
                            f"request larger than [dicomweb] max_request_mb "
                            f"({self.cfg.dicomweb.max_request_mb:g} MB)",
                        )
                    buf += chunk
                    if len(buf) >= _STOW_CHECK_EVERY:
                        refused = await run_in_threadpool(self._spool, spool, bytes(buf))
                        buf.clear()
                        if refused is not None:
                            return refused
            except ClientDisconnect:
                who = getattr(request.state, "who", None)
                log.warning(
                    "STOW-RS from %s: the client went away after %d bytes of its "
                    "body; nothing stored",
                    (who or {}).get("address"),
                    total,
                )
                self.audit.event(
                    A.INSTANCES_TRANSFERRED,
                    A.MINOR_FAILURE,
                    action="store",
                    service="STOW-RS",
                    peer=who,
                    received_bytes=total,
                    reason="the client went away before the end of its body",
                )
                raise
            refused = await run_in_threadpool(self._spool, spool, bytes(buf))
            if refused is not None:
                return refused
            spool.close()
            try:
                parts = await run_in_threadpool(split_multipart, Path(spool.name), ctype)
            except ValueError as exc:
                return _error(400, f"malformed multipart body: {exc}")
            if not parts:
                return _error(400, "multipart body without any part")
            # Storing fsyncs and writes the database: off the event loop.
            return await run_in_threadpool(self._store_parts, request, Path(spool.name), parts)
        finally:
            spool.close()
            Path(spool.name).unlink(missing_ok=True)

    def _spool(self, spool: IO[bytes], block: bytes) -> Response | None:
        """Write one block of a STOW body (worker thread); a refusal when the disk is below
        the reserve or full."""
        if block and not self.scp.disk_ok():
            return JSONResponse(
                {"error": "disk below the free-space reserve; retry later"},
                status_code=503,
                headers={"Retry-After": "60"},
            )
        try:
            spool.write(block)
        except OSError:
            return JSONResponse(
                {"error": "disk full; retry later"}, status_code=503, headers={"Retry-After": "60"}
            )
        return None

    def _store_parts(
        self, request: Request, body: Path, parts: list[tuple[str, int, int]]
    ) -> Response:
        """Each part through :class:`node.ingest.Ingest` (the same streaming validation as
        C-STORE: nothing is parsed whole before it)."""
        study_in_url = request.path_params.get("study")
        calling = f"STOW:{request.client.host if request.client else '?'}"[:16]
        who = dict(getattr(request.state, "who", {}) or {}, ae_title=calling)
        ok, failed = [], []
        for ptype, offset, length in parts:
            item = Dataset()
            if not ptype.startswith("application/dicom"):
                out = self.ingest.refuse(
                    DATASET_MISMATCH, f"part of type {ptype} is not application/dicom", calling, who
                )
            else:
                check = StreamCheck(self.ingest.max_bytes)
                try:
                    path = part_to_file(
                        body, offset, length, self.files.incoming, self.ingest.max_bytes, check
                    )
                except StoreError as exc:
                    sop_class, sop_instance = part_identity(body, offset, length)
                    out = self.ingest.refuse(
                        exc.status, str(exc), calling, who, sop_class, sop_instance
                    )
                except OSError as exc:  # the copy of the part: a full disk, an I/O error
                    full = exc.errno in _DISK_ERRNOS
                    if not full:
                        log.error("STOW part copy failed: %s", exc)
                    out = self.ingest.refuse(
                        OUT_OF_RESOURCES if full else PROCESSING_FAILURE,
                        "disk full" if full else "I/O error",
                        calling,
                        who,
                    )
                else:
                    out = self.ingest.store(
                        path,
                        calling,
                        peer=who,
                        study=study_in_url,
                        validated=stream_validated(check),
                    )
            if out.sop_class_uid:
                item.ReferencedSOPClassUID = out.sop_class_uid
            if out.sop_instance_uid:
                item.ReferencedSOPInstanceUID = out.sop_instance_uid
            if out.ok:
                item.RetrieveURL = (
                    f"{self.origin(request)}{self.root}/studies/"
                    f"{out.study_instance_uid}/series/"
                    f"{out.series_instance_uid}/instances/"
                    f"{out.sop_instance_uid}"
                )
                ok.append(item)
            else:
                item.FailureReason = out.status
                failed.append((item, out.message))
        resp = Dataset()
        if ok:
            resp.ReferencedSOPSequence = ok
        if failed:
            resp.FailedSOPSequence = [i for i, _ in failed]
        js = resp.to_json_dict()
        headers = {}
        if failed:
            for _, m in failed:
                log.warning("STOW-RS part refused: %s", m)
            # Why, in words: the Warning header DICOMweb uses (the body stays standard).
            headers["Warning"] = ", ".join(
                f'299 mammo-node: "{public_message(m).replace(chr(34), chr(39))[:200]}"'
                for _, m in failed
            )
        code = 200 if not failed else (202 if ok else 409)
        if failed and not ok and all(i.FailureReason == OUT_OF_RESOURCES for i, _ in failed):
            code = 503
        return JSONResponse(js, status_code=code, media_type=DICOM_JSON, headers=headers)

    # -- QIDO-RS ---------------------------------------------------------------------------
    async def qido(self, request: Request) -> Response:
        # Matching and building the answers in a worker thread, never on the event loop.
        return await run_in_threadpool(self._qido, request)

    def _qido(self, request: Request) -> Response:
        p = request.path_params
        path = request.url.path
        level = (
            "IMAGE"
            if path.endswith("/instances")
            else "SERIES"
            if path.endswith("/series")
            else "STUDY"
        )
        params: list[tuple[str, str]] = []
        includes: list[str] = []
        cap = self.cfg.dicomweb.max_results
        limit, offset = cap, 0
        for name, value in request.query_params.multi_items():
            if name in ("limit", "offset"):
                if not value.strip().isdigit() or (name == "offset" and len(value.strip()) > 9):
                    return _error(
                        400,
                        f"{name} must be an integer from 0"
                        f"{' to 999999999' if name == 'offset' else ''}, got "
                        f"{value[:20]!r}",
                    )
                if name == "limit":
                    limit = min(int(value), cap) if int(value) > 0 else cap
                else:
                    offset = int(value)
            elif name == "includefield":
                includes.append(value)
            elif name == "fuzzymatching":
                continue
            else:
                params.append((name, value))
        if "study" in p:
            params.append(("StudyInstanceUID", p["study"]))
        if "series" in p:
            params.append(("SeriesInstanceUID", p["series"]))
        try:
            query = from_params(level, params, includes)
        except QueryError as exc:
            return _error(400, str(exc))
        base = f"{self.origin(request)}{self.root}"
        try:
            body, studies, more = self._qido_answers(query, limit, offset, base)
        except QueryUnavailable as exc:
            log.error("QIDO-RS failed: %s", exc.__cause__ or exc)
            self.audit.event(
                A.QUERY,
                A.SERIOUS_FAILURE,
                peer=getattr(request.state, "who", None),
                service="QIDO-RS",
                reason=str(exc),
            )
            return JSONResponse(
                {"error": f"{exc}; retry later"}, status_code=503, headers={"Retry-After": "5"}
            )
        self.audit.event(
            A.QUERY,
            A.SUCCESS,
            peer=getattr(request.state, "who", None),
            service="QIDO-RS",
            level=level,
            matched_studies=studies,
            capped=more or None,
        )
        headers = {}
        if more:
            # PS3.18 8.3.4.2: tell the client that more results exist.
            headers["Warning"] = (
                '299 mammo-node: "The number of results exceeded the maximum '
                "supported by the server. Additional results can be "
                'requested."'
            )
        return JSONResponse(body, media_type=DICOM_JSON, headers=headers)

    def _qido_answers(
        self, query: Query, limit: int, offset: int, base: str
    ) -> tuple[list[dict], int, bool]:
        """The DICOM JSON answers of a QIDO query, their number of studies and whether more
        matched (in a worker thread: the database and the encoding are not the loop's)."""
        found = self.queries.find(query, limit, offset)
        body = []
        for a in self.queries.answers(query, found):
            del a.QueryRetrieveLevel
            js = a.to_json_dict()
            url = f"{base}/studies/{a.StudyInstanceUID}"
            if query.level in ("SERIES", "IMAGE"):
                url += f"/series/{a.SeriesInstanceUID}"
            if query.level == "IMAGE":
                url += f"/instances/{a.SOPInstanceUID}"
            js["00081190"] = {"vr": "UR", "Value": [url]}  # RetrieveURL (PS3.18 6.7.1.2)
            body.append(js)
        return body, len({r.study_instance_uid for r in found.rows}), found.more

    # -- WADO-RS ---------------------------------------------------------------------------
    def _rows(self, p: dict[str, str]) -> list[Instance]:
        return self.reports.find_instances(
            study_uids=[p["study"]],
            series_uids=[p["series"]] if "series" in p else None,
            sop_uids=[p["instance"]] if "instance" in p else None,
        )

    @staticmethod
    def origin(request: Request) -> str:
        """scheme://host:port the client reached us at. Some clients (dicomweb-client) send a
        Host header without the port: the listening port is added back then."""
        url = request.base_url
        origin = f"{url.scheme}://{url.netloc}"
        server = request.scope.get("server")
        if url.port is None and server and server[1] not in (80, 443):
            origin = f"{url.scheme}://{url.hostname}:{server[1]}"
        return origin

    def _instance_url(self, request: Request, r: Instance) -> str:
        return (
            f"{self.origin(request)}{self.root}/studies/"
            f"{r.study_instance_uid}/series/{r.series_instance_uid}/instances/"
            f"{r.sop_instance_uid}"
        )

    def _audit_retrieve(self, request: Request, rows: list[Instance], service: str) -> None:
        self.audit.event(
            A.BEGIN_TRANSFER,
            A.SUCCESS,
            service=service,
            peer=getattr(request.state, "who", None),
            studies=sorted({r.study_instance_uid for r in rows}),
            instances=len(rows),
        )

    def _audit_done(
        self,
        request: Request,
        rows: list[Instance],
        service: str,
        outcome: int = A.SUCCESS,
        reason: str | None = None,
    ) -> None:
        """PS3.15 A.5.3.4 DICOM Instances Transferred: the retrieve ended (0: its answer
        was sent whole; 8: cut short)."""
        try:
            self.audit.event(
                A.INSTANCES_TRANSFERRED,
                outcome,
                service=service,
                action="retrieve",
                peer=getattr(request.state, "who", None),
                studies=sorted({r.study_instance_uid for r in rows}),
                instances=len(rows),
                reason=reason,
            )
        except A.AuditUnavailable:
            pass  # the answer is sent; the audit module logged the failure

    def _transfer(
        self, request: Request, rows: list[Instance], service: str, response: Response
    ) -> Response:
        """``response``, with the completion event written once it has been sent whole or
        cut short (:class:`Audited`)."""
        return Audited(
            response,
            lambda outcome, reason: self._audit_done(request, rows, service, outcome, reason),
        )

    async def wado(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._rows, request.path_params)
        if not rows:
            return _error(404, "no such study, series or instance")
        accept = request.headers.get("accept", "")
        if accept and not any(
            i.media in ("multipart/related", "*/*", "multipart/*")
            and (i.part in (None, "application/dicom"))
            for i in wado.parse_accept(accept)
        ):
            return _error(406, 'retrieve answers multipart/related; type="application/dicom"')
        self._audit_retrieve(request, rows, "WADO-RS")
        boundary = uuid.uuid4().hex
        paths = [self.files.abspath(r.path) for r in rows]
        # A sync generator: Starlette reads the files block by block in a worker thread.
        return self._transfer(
            request,
            rows,
            "WADO-RS",
            StreamingResponse(
                wado.stream_files(paths, boundary),
                media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
            ),
        )

    async def metadata(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._rows, request.path_params)
        if not rows:
            return _error(404, "no such study, series or instance")

        def build() -> list[dict]:
            return [
                wado.metadata_json(self.files.abspath(r.path), self._instance_url(request, r))
                for r in rows
            ]

        # Full headers (names, birth dates): a retrieve as the audit trail counts them.
        self._audit_retrieve(request, rows, "WADO-RS metadata")
        try:
            body = await run_in_threadpool(build)
        except Exception as exc:
            self._audit_done(
                request,
                rows,
                "WADO-RS metadata",
                A.SERIOUS_FAILURE,
                f"{type(exc).__name__}: internal error",
            )
            raise
        return self._transfer(
            request, rows, "WADO-RS metadata", JSONResponse(body, media_type=DICOM_JSON)
        )

    async def frames(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._rows, request.path_params)
        if not rows:
            return _error(404, "no such instance")
        r = rows[0]
        n_frames = r.number_of_frames or 1
        try:
            numbers = wado.parse_frame_list(request.path_params["frames"], n_frames)
            choice = wado.choose_frames(
                request.headers.get("accept", ""), r.transfer_syntax_uid, len(numbers)
            )
        except ValueError as exc:
            return _error(400, str(exc))
        except wado.NotAcceptable as exc:
            return _error(406, str(exc))
        gen = wado.iter_frames(self.files.abspath(r.path), numbers, choice.passthrough)
        try:
            first = await run_in_threadpool(next, gen)
        except ValueError as exc:
            return _error(400, str(exc))
        self._audit_retrieve(request, rows, "WADO-RS frames")
        if not choice.multipart:
            return self._transfer(
                request, rows, "WADO-RS frames", Response(first, media_type=choice.content_type)
            )
        boundary = uuid.uuid4().hex
        # Streamed: one frame in memory at a time, however many the list names.
        return self._transfer(
            request,
            rows,
            "WADO-RS frames",
            StreamingResponse(
                wado.stream_parts(itertools.chain([first], gen), choice.content_type, boundary),
                media_type=wado.multipart_content_type(choice.content_type, boundary),
            ),
        )

    async def bulkdata(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._rows, request.path_params)
        tag = request.path_params["tag"]
        if not rows or not _TAG_RE.match(tag):
            return _error(404, "no such instance or bulk data element")
        path = self.files.abspath(rows[0].path)
        accept = request.headers.get("accept", "")
        multipart = "multipart/related" in accept or not accept or "*/*" in accept
        if int(tag, 16) == 0x7FE00010:
            # Native pixel data (a volume's: gigabytes) streams from the file.
            span = await run_in_threadpool(wado.pixel_data_range, path)
            if span is not None:
                self._audit_retrieve(request, rows, "WADO-RS bulkdata")
                boundary = uuid.uuid4().hex if multipart else None
                octets = "application/octet-stream"
                return self._transfer(
                    request,
                    rows,
                    "WADO-RS bulkdata",
                    StreamingResponse(
                        wado.stream_range(path, span[0], span[1], octets, boundary),
                        media_type=(
                            wado.multipart_content_type(octets, boundary) if boundary else octets
                        ),
                    ),
                )
        try:
            value = await run_in_threadpool(wado.bulkdata, path, int(tag, 16))
        except KeyError:
            return _error(404, f"no binary element {tag} in this instance")
        self._audit_retrieve(request, rows, "WADO-RS bulkdata")
        if multipart:
            body, ctype = wado.multipart_bytes([value], "application/octet-stream")
            return self._transfer(
                request, rows, "WADO-RS bulkdata", Response(body, media_type=ctype)
            )
        return self._transfer(
            request,
            rows,
            "WADO-RS bulkdata",
            Response(value, media_type="application/octet-stream"),
        )

    async def rendered(self, request: Request) -> Response:
        return await self._render(request, thumbnail=False)

    async def thumbnail(self, request: Request) -> Response:
        return await self._render(request, thumbnail=True)

    async def _render(self, request: Request, thumbnail: bool) -> Response:
        rows = await run_in_threadpool(self._rows, request.path_params)
        images = [r for r in rows if r.rows]  # a study's or series' first image
        images.sort(
            key=lambda r: (r.role == "result", r.series_number or 0, r.instance_number or 0, r.id)
        )
        if not images:
            return _error(404, "no such image")
        q = request.query_params
        frame = 1
        if "frames" in request.path_params:
            try:
                frame = int(request.path_params["frames"].split(",")[0])
            except ValueError:
                return _error(400, "frame numbers must be integers")
        try:
            body, media = await run_in_threadpool(
                wado.render,
                self.files.abspath(images[0].path),
                request.headers.get("accept", "image/png" if not thumbnail else "image/jpeg"),
                q.get("viewport"),
                q.get("quality"),
                q.get("window"),
                frame,
                thumbnail,
                self.decoded,
            )
        except ValueError as exc:
            return _error(400, str(exc))
        self._audit_retrieve(request, images[:1], "WADO-RS rendered")
        return self._transfer(
            request, images[:1], "WADO-RS rendered", Response(body, media_type=media)
        )

    async def wado_uri(self, request: Request) -> Response:
        """WADO-URI (``?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=``): the
        links RIS and EHR systems embed."""
        q = request.query_params
        if q.get("requestType", "").upper() != "WADO":
            return _error(400, "requestType=WADO is required")
        try:
            p = {
                "study": wado.check_uid(q.get("studyUID", "")),
                "series": wado.check_uid(q.get("seriesUID", "")),
                "instance": wado.check_uid(q.get("objectUID", "")),
            }
        except ValueError as exc:
            return _error(400, str(exc))
        rows = await run_in_threadpool(self._rows, p)
        if not rows:
            return _error(404, "no such object")
        ctype = (q.get("contentType") or "image/jpeg").split(",")[0].strip()
        if ctype == "application/dicom":
            self._audit_retrieve(request, rows, "WADO-URI")
            path = self.files.abspath(rows[0].path)
            return self._transfer(
                request,
                rows[:1],
                "WADO-URI",
                StreamingResponse(wado.stream_file(path), media_type="application/dicom"),
            )
        if ctype not in ("image/jpeg", "image/png", "image/gif"):
            return _error(
                406,
                f"contentType {ctype} is not offered (application/dicom, "
                "image/jpeg, image/png, image/gif)",
            )
        viewport = None
        if q.get("rows") or q.get("columns"):
            viewport = f"{q.get('columns') or q.get('rows')},{q.get('rows') or q.get('columns')}"
        window = (
            f"{q['windowCenter']},{q['windowWidth']}"
            if q.get("windowCenter") and q.get("windowWidth")
            else None
        )
        try:
            frame = int(q.get("frameNumber", "1"))
            body, media = await run_in_threadpool(
                wado.render,
                self.files.abspath(rows[0].path),
                ctype,
                viewport,
                q.get("imageQuality"),
                window,
                frame,
                False,
                self.decoded,
            )
        except ValueError as exc:
            return _error(400, str(exc))
        self._audit_retrieve(request, rows[:1], "WADO-URI")
        return self._transfer(request, rows[:1], "WADO-URI", Response(body, media_type=media))


class _Config(uvicorn.Config):
    """uvicorn's Config with the node's SSL context in place of the one it builds."""

    node_ssl: ssl.SSLContext | None = None

    def load(self) -> None:
        super().load()
        if self.node_ssl is not None:
            self.ssl = self.node_ssl


class DicomWebServer(threading.Thread):
    """uvicorn serving :class:`DicomWeb` in a thread of the daemon (HTTPS with ``tls``)."""

    def __init__(self, web: DicomWeb, cfg: Config) -> None:
        super().__init__(name="dicomweb", daemon=True)
        w = cfg.dicomweb
        kwargs: dict = {}
        if w.tls:
            # uvicorn's own context (its defaults changed between the versions the dependency
            # range allows) is replaced by ours: TLS 1.2+, the BCP 195 cipher suites, client
            # certificates as configured (node.security.server_context).
            t = cfg.tls
            kwargs = {"ssl_certfile": t.certificate, "ssl_keyfile": t.private_key}
        config = _Config(
            web.app,
            host=w.host,
            port=w.port,
            log_level="warning",
            lifespan="off",
            limit_concurrency=max(64, w.max_concurrent_requests * 4),
            timeout_graceful_shutdown=3,
            **kwargs,
        )
        config.node_ssl = server_context(cfg) if w.tls else None
        self.server = uvicorn.Server(config)
        # The daemon owns the signals (uvicorn would install its own in Server.run).
        self.server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)
