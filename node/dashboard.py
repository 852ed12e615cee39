"""The administrator's dashboard at ``/ui``: server-rendered HTML (Jinja2), no JavaScript.

Pages: the exams list (state, accession, views, delivery, last image -> results, filters;
refreshes itself), one exam (its attention maps over the mammograms, the AI reading per
breast, fusion weights, the timeline of every event, actions: resend, reprocess, complete
now), the destinations (queue, last error, C-ECHO test, pause / resume) and the system (disk
and the retention forecast, model identity, readiness, version, uptime).

Authentication is DICOMweb's: without tokens the page is open (the HTTP server is then on
loopback only); with tokens, ``/ui/login`` takes one and keeps it in an HttpOnly, SameSite
Strict cookie (Secure under TLS) that the browser sends with the page and its images. Reading
needs a token with ``qido`` and ``wado``; actions one with every service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from node import __version__
from node import audit as A
from node.config import Config
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.models import SLOTS
from storage.reports import Reports
from storage.transitions import ExamNotFound, ExamState

if TYPE_CHECKING:
    from node.health import Health

log = logging.getLogger("mammo_node.dashboard")

COOKIE = "mammo_node_token"
UI = "/ui"
_TEMPLATES = Path(__file__).resolve().parent / "templates"


#: The most bytes a dashboard form may send (the sign-in form is read before any
#: authentication: a bigger body is refused while it streams, 413).
MAX_FORM_BYTES = 4096


class BodyTooLarge(Exception):
    """A request body over its cap (answered 413)."""


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refused (:class:`BodyTooLarge`) as soon as it passes ``cap`` bytes,
    declared or streamed: never held whole past the cap."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge(f"request body over {cap} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise BodyTooLarge(f"request body over {cap} bytes")
    return bytes(buf)


class Sessions:
    """Dashboard sessions: random server-side ids (the cookie never holds the token), each
    with the token's name and services, a CSRF token for the forms, and an expiry; revoked
    on sign-out. In memory: a restart signs everyone out."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self._by_id: dict[str, dict] = {}
        self._lock = threading.Lock()
        #: The forms' CSRF token when no token is configured (no sessions then).
        self.anonymous_csrf = secrets.token_urlsafe(32)

    def new(self, name: str, services: frozenset[str]) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            for k in [k for k, v in self._by_id.items() if v["expires"] <= now]:
                del self._by_id[k]
            self._by_id[sid] = {
                "name": name,
                "services": services,
                "csrf": secrets.token_urlsafe(32),
                "expires": now + self.seconds,
            }
        return sid

    def get(self, sid: str | None) -> dict | None:
        if not sid:
            return None
        with self._lock:
            s = self._by_id.get(sid)
            if s is None or s["expires"] <= time.monotonic():
                self._by_id.pop(sid, None)
                return None
            return s

    def revoke(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class SignInThrottle:
    """Repeated sign-in failures from one address are answered ever more slowly (0.5 s,
    1 s, 2 s ... up to 8 s), within a 15-minute window."""

    WINDOW = 900.0
    MAX_DELAY = 8.0

    def __init__(self) -> None:
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def failed(self, address: str) -> float:
        """Record a failure; the delay to answer it with."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._fails.get(address, []) if now - t < self.WINDOW]
            recent.append(now)
            self._fails[address] = recent[-64:]
            if len(self._fails) > 10000:  # bounded: forget the oldest addresses
                for k in list(self._fails)[:5000]:
                    del self._fails[k]
            n = len(recent)
        return 0.0 if n < 2 else min(self.MAX_DELAY, 0.25 * 2 ** (n - 1))

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._fails.pop(address, None)


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _when(value: str | dt.datetime | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("T", " ").rstrip("Z")[:19]
    return value.strftime("%Y-%m-%d %H:%M:%S")


#: What each view of an exam was read from, in words (node.assembly's image kinds, and the
#: two ways a view is not read).
VIEW_SOURCES = {
    "conventional": "conventional 2D",
    "synthesized": "synthesized 2D",
    "for_processing": "For Processing 2D",
    "computed": "computed from the tomosynthesis volume",
    "volume_only": "volume only: read with this view missing",
    "missing": "missing",
}
#: The same in a word (the exams list; the full text is the tooltip).
VIEW_SOURCES_SHORT = {
    "conventional": "conventional",
    "synthesized": "synthesized",
    "for_processing": "For Processing",
    "computed": "computed",
    "volume_only": "volume only",
    "missing": "missing",
}


def view_rows(exam: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per slot of an exam (``Reports.exam_view`` / ``exam_page``): the instance
    read and its image kind, or why nothing is read ("volume_only", "missing")."""
    rows = []
    volume_only = set(exam.get("volume_only") or [])
    for slot in SLOTS:
        uid = exam["views"].get(slot)
        kind = (
            ((exam.get("view_kinds") or {}).get(slot) or "conventional")
            if uid
            else ("volume_only" if slot in volume_only else "missing")
        )
        rows.append(
            {
                "slot": slot,
                "uid": uid,
                "kind": kind,
                "label": VIEW_SOURCES.get(kind, kind),
                "short": VIEW_SOURCES_SHORT.get(kind, kind),
            }
        )
    return rows


def _day(value: str | None) -> str:
    """A DICOM DA as YYYY-MM-DD (as it is when malformed, "?" when empty)."""
    v = (value or "").strip()
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else (v or "?")


class Dashboard:
    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        dicomweb_root: str,
        *,
        exams: Exams,
        deliveries: Deliveries,
        reports: Reports,
        health: Health | None = None,
        readiness: Callable[[], tuple[bool, dict]] | None = None,
        audit: A.AuditLog | A.NullAudit | None = None,
    ) -> None:
        self.cfg, self.files = cfg, files
        self.exams, self.deliveries, self.reports = exams, deliveries, reports
        self.root = dicomweb_root
        self.health = health
        self.readiness = readiness
        self.audit = audit
        self.env = Environment(
            loader=FileSystemLoader(str(_TEMPLATES)), autoescape=select_autoescape(["html"])
        )
        self.sessions = Sessions(cfg.dicomweb.session_minutes)
        self.throttle = SignInThrottle()
        w = cfg.dicomweb
        self.secure_cookies = w.tls if w.secure_cookies is None else w.secure_cookies

    def csrf_for(self, request: Request) -> str:
        """The CSRF token the forms of this request's page carry."""
        session = self.sessions.get(request.cookies.get(COOKIE))
        return session["csrf"] if session else self.sessions.anonymous_csrf

    async def check_form(self, request: Request) -> Response | None:
        """A dashboard form POST: body capped while it streams (413) and the CSRF token of
        the session (or of the node, without tokens) present (403 otherwise)."""
        try:
            body = await read_capped(request, MAX_FORM_BYTES)
        except BodyTooLarge as exc:
            return HTMLResponse(f"Not done: {exc}.", status_code=413)
        sent = parse_qs(body.decode("utf-8", "replace")).get("csrf", [""])[0]
        if not secrets.compare_digest(sent.encode(), self.csrf_for(request).encode()):
            log.warning(
                "dashboard %s from %s refused: missing or wrong CSRF token",
                request.url.path,
                request.client.host if request.client else "?",
            )
            if self.audit is not None:
                self.audit.event(
                    A.SECURITY_ALERT,
                    A.MINOR_FAILURE,
                    alert="CSRF token missing or wrong",
                    peer=getattr(request.state, "who", None),
                    action=request.url.path,
                )
            return HTMLResponse(
                "Not done: the form's CSRF token is missing or wrong; reload the page.",
                status_code=403,
            )
        return None

    def _audit_action(self, request: Request, action: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.event(
                A.APPLICATION_ACTIVITY,
                A.SUCCESS,
                action=f"dashboard {action}",
                peer=getattr(request.state, "who", None),
                **fields,
            )

    def routes(self) -> list[Route]:
        return [
            Route(UI, self.exams_page, methods=["GET"]),
            Route(f"{UI}/login", self.login_page, methods=["GET"]),
            Route(f"{UI}/login", self.login, methods=["POST"]),
            Route(f"{UI}/logout", self.logout, methods=["POST"]),
            Route(f"{UI}/exams/{{study}}", self.exam_page, methods=["GET"]),
            Route(f"{UI}/exams/{{study}}/{{action}}", self.exam_action, methods=["POST"]),
            Route(f"{UI}/destinations", self.destinations_page, methods=["GET"]),
            Route(
                f"{UI}/destinations/{{name}}/{{action}}", self.destination_action, methods=["POST"]
            ),
            Route(f"{UI}/system", self.system_page, methods=["GET"]),
        ]

    # -- rendering -----------------------------------------------------------------------------
    def _render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        h = self.health
        demo = bool(h and h.model_identity.get("demo"))
        base = {
            "ui": UI,
            "msg": request.query_params.get("msg", ""),
            "logged_in": COOKIE in request.cookies,
            "not_for_clinical_use": demo,
            "refresh": None,
            "csrf": self.csrf_for(request),
        }
        html = self.env.get_template(template).render(**{**base, **ctx})
        return HTMLResponse(
            html,
            status_code=status,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'self'; "
                "style-src 'unsafe-inline'; img-src 'self'; "
                "frame-ancestors 'none'",
            },
        )

    def _back(self, where: str, msg: str) -> RedirectResponse:
        return RedirectResponse(f"{where}?{urlencode({'msg': msg})}", status_code=303)

    # -- sign in ---------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        return self._render(request, "login.html", title="Sign in", page="")

    async def login(self, request: Request) -> Response:
        try:  # one urlencoded field: no form library
            body = await read_capped(request, MAX_FORM_BYTES)
        except BodyTooLarge as exc:
            return self._render(
                request,
                "login.html",
                status=413,
                title="Sign in",
                page="",
                msg=f"Not signed in: {exc}.",
            )
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        from node.security import TokenAuth

        address = request.client.host if request.client else "?"
        found = TokenAuth(self.cfg).authenticate(f"Bearer {token}")
        if found is None:
            delay = self.throttle.failed(address)
            log.warning("dashboard sign-in from %s failed: wrong token", address)
            if self.audit is not None:
                self.audit.event(
                    A.USER_AUTHENTICATION,
                    A.MINOR_FAILURE,
                    action="sign-in",
                    peer={"address": address, "tls": self.cfg.dicomweb.tls},
                    reason="wrong token",
                )
            await asyncio.sleep(delay)  # repeated failures answered ever more slowly
            return self._render(
                request,
                "login.html",
                status=401,
                title="Sign in",
                page="",
                msg="That token is not valid.",
            )
        self.throttle.succeeded(address)
        name, services = found
        if self.audit is not None:
            self.audit.event(
                A.USER_AUTHENTICATION,
                A.SUCCESS,
                action="sign-in",
                peer={"address": address, "token": name, "tls": self.cfg.dicomweb.tls},
            )
        resp = RedirectResponse(UI, status_code=303)
        resp.set_cookie(
            COOKIE,
            self.sessions.new(name, services),
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies,
            path="/",
            max_age=int(self.sessions.seconds),
        )
        return resp

    async def logout(self, request: Request) -> Response:
        refused = await self.check_form(request)
        if refused is not None:
            return refused
        self.sessions.revoke(request.cookies.get(COOKIE))  # the server forgets it too
        self._audit_action(request, "sign-out")
        resp = RedirectResponse(f"{UI}/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # -- exams ---------------------------------------------------------------------------------
    async def exams_page(self, request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state and state not in {s.value for s in ExamState}:
            state = None
        accession = (q.get("accession") or "").strip() or None
        day = None
        if q.get("date"):
            try:
                day = dt.date.fromisoformat(q["date"])
            except ValueError:
                day = None
        try:
            offset = max(0, int(q.get("offset", "0")))
        except ValueError:
            offset = 0
        limit = 100
        sort = "score" if q.get("sort") == "score" else "received"
        # Triage (sort=score): the most suspicious first, over every exam matching the filter
        # (the database sorts by the indexed exam score).
        page = await run_in_threadpool(
            self.reports.exam_page, state, accession, day, offset, limit, sort == "score"
        )
        total = page.total
        priors = await run_in_threadpool(
            self.exams.priors_by_study, [r.study_instance_uid for r in page.rows]
        )
        rows = [r.to_json() for r in page.rows]
        for r in rows:
            r["present"] = [s for s in SLOTS if r["views"].get(s)]
            r["view_rows"] = view_rows(r)
            r["priors"] = [
                {"study": uid, "date": _day(date)}
                for uid, date in priors.get(r["study_instance_uid"], [])
            ]
            r["latency"] = (
                f"{r['latency_seconds']:.1f} s" if r.get("latency_seconds") is not None else ""
            )
            r["last_received"] = _when(r["last_received_at"])
        params = {
            k: v
            for k, v in (
                ("state", state or ""),
                ("date", q.get("date", "")),
                ("accession", accession or ""),
                ("sort", "score" if sort == "score" else ""),
            )
            if v
        }
        return self._render(
            request,
            "exams.html",
            title="Exams",
            page="exams",
            exams=rows,
            total=total,
            count=len(rows),
            offset=offset,
            states=[s.value for s in ExamState],
            f_state=state or "",
            f_date=q.get("date", ""),
            f_accession=accession or "",
            f_sort=sort,
            refresh=15,
            prev_link=f"{UI}?{urlencode({**params, 'offset': max(0, offset - limit)})}",
            next_link=f"{UI}?{urlencode({**params, 'offset': offset + limit})}",
        )

    def _exam_context(self, study: str) -> dict | None:
        try:
            exam = self.reports.exam_view(study).to_json()
        except ExamNotFound:
            return None
        maps = []
        for res in self.exams.results_of(study):
            if res.kind == "sc" and res.version == exam["version"] and res.path:
                maps.append(
                    {
                        "label": res.sop_instance_uid,
                        "src": f"{self.root}/studies/{study}/series/"
                        f"{res.series_instance_uid}/instances/"
                        f"{res.sop_instance_uid}/rendered",
                    }
                )
        # The worker writes one SC per view in slot order (L-CC, L-MLO, R-CC, R-MLO).
        for m, slot in zip(maps, [s for s in SLOTS if exam["views"].get(s)]):
            m["label"] = slot
        events = [
            {"at": _when(ev.at), "kind": ev.kind, "detail": ev.detail}
            for ev in self.reports.events(study)
        ]
        reading = json.loads(exam["reading_json"]) if exam.get("reading_json") else None
        others = self.exams.patient_studies(study)
        return {
            "e": exam,
            "maps": maps,
            "events": events,
            "reading": reading,
            "present": [s for s in SLOTS if exam["views"].get(s)],
            "view_rows": view_rows(exam),
            "delivery": self.reports.delivery_of(study).to_json(),
            "priors": sorted(
                (
                    {"study": o.study, "date": _day(o.date)}
                    for o in others
                    if o.state == ExamState.PRIOR
                ),
                key=lambda p: p["date"],
            ),
            "other_studies": [
                {"study": o.study, "date": _day(o.date), "state": o.state}
                for o in others
                if o.state != ExamState.PRIOR
            ],
            "last_received": _when(exam["last_received_at"]),
        }

    async def exam_page(self, request: Request) -> Response:
        study = request.path_params["study"]
        ctx = await run_in_threadpool(self._exam_context, study)
        if ctx is None:
            return self._render(
                request,
                "exams.html",
                status=404,
                title="Not found",
                page="exams",
                exams=[],
                total=0,
                count=0,
                offset=0,
                states=[],
                f_state="",
                f_date="",
                f_accession="",
                msg=f"No exam for study {study}.",
            )
        return self._render(request, "exam.html", title="Exam", page="exams", **ctx)

    async def exam_action(self, request: Request) -> Response:
        refused = await self.check_form(request)
        if refused is not None:
            return refused
        study, action = request.path_params["study"], request.path_params["action"]
        where = f"{UI}/exams/{study}"

        def run() -> str:
            if action == "resend":
                n = self.deliveries.requeue_study(study)
                return f"{n} delivery(ies) queued again" if n else "nothing to resend"
            if action == "reprocess":
                version, state = self.exams.reprocess(study)
                return f"version {version} is {state}: it will be read again"
            if action == "complete":
                missing, state = self.exams.complete_now(study)
                return f"processing now{' without ' + ', '.join(missing) if missing else ''}"
            raise ValueError(f"unknown action {action!r}")

        try:
            msg = await run_in_threadpool(run)
        except ExamNotFound:
            return self._back(UI, f"No exam for study {study}.")
        except ValueError as exc:
            return self._back(where, f"Not done: {exc}")
        await run_in_threadpool(
            self.exams.add_event, study, "action", f"{action} from the dashboard: {msg}"
        )
        log.info("dashboard: %s of study %s: %s", action, study, msg)
        self._audit_action(request, action, study=study, result=msg)
        return self._back(where, msg)

    # -- destinations --------------------------------------------------------------------------
    def _destinations(self) -> list[dict]:
        depth = self.reports.queue_depths()
        totals = self.reports.delivery_totals()
        errors = self.reports.last_errors()
        paused = self.deliveries.paused_destinations()
        out = []
        for d in self.cfg.destinations:
            out.append(
                {
                    "name": d.name,
                    "ae_title": d.ae_title,
                    "host": d.host,
                    "port": d.port,
                    "tls": d.tls,
                    "queue": sum(q.waiting for q in depth if q.destination == d.name),
                    "sent": totals.count(d.name, "sent"),
                    "gave_up": totals.count(d.name, "gave_up"),
                    "last_error": errors[d.name].error if d.name in errors else "",
                    "paused": d.name in paused,
                }
            )
        return out

    async def destinations_page(self, request: Request) -> Response:
        dests = await run_in_threadpool(self._destinations)
        return self._render(
            request, "destinations.html", title="Destinations", page="destinations", dests=dests
        )

    def _echo(self, name: str) -> str:
        from node.scu import AssociationFailed, destination_tls, echo

        dest = next(d for d in self.cfg.destinations if d.name == name)
        t0 = time.perf_counter()
        try:
            ok = echo(
                self.cfg.node.ae_title,
                dest.host,
                dest.port,
                dest.ae_title,
                10,
                destination_tls(self.cfg, dest),
            )
        except AssociationFailed as exc:
            return f"C-ECHO to {name} failed: {exc}"
        ms = (time.perf_counter() - t0) * 1000
        return f"C-ECHO to {name}: {'success' if ok else 'failed'} in {ms:.0f} ms"

    async def destination_action(self, request: Request) -> Response:
        refused = await self.check_form(request)
        if refused is not None:
            return refused
        name, action = request.path_params["name"], request.path_params["action"]
        where = f"{UI}/destinations"
        if name not in {d.name for d in self.cfg.destinations}:
            return self._back(where, f"No destination {name!r}.")
        if action == "echo":
            msg = await run_in_threadpool(self._echo, name)
        elif action in ("pause", "resume"):
            await run_in_threadpool(self.deliveries.set_paused, name, action == "pause")
            msg = (
                f"{name} paused: results wait in its queue"
                if action == "pause"
                else f"{name} resumed"
            )
            log.info("dashboard: destination %s %sd", name, action)
        else:
            return self._back(where, f"Unknown action {action!r}.")
        self._audit_action(request, f"destination {action}", destination=name, result=msg)
        return self._back(where, msg)

    # -- system --------------------------------------------------------------------------------
    def _system(self) -> dict:
        from storage.retention import Retention

        usage = shutil.disk_usage(self.files.root)
        ready, checks = self.readiness() if self.readiness else (True, {})
        h = self.health
        rate = self.reports.received_bytes_since(
            dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=1)
        )
        cands = Retention(self.reports.db, self.files).candidates()
        purgeable = sum(c.bytes for c in cands)
        r, s = self.cfg.retention, self.cfg.storage
        reserve = s.min_free_mb * 1024 * 1024
        if rate > 0:
            days = max(0.0, (usage.free - reserve) / rate)
            forecast = (
                f"at the last 24 h's rate ({rate / 1e6:.0f} MB/day) the disk reaches "
                f"the reserve in {days:.0f} days"
                + (
                    f"; retention frees images {r.keep_images_days:g} days after "
                    "delivery, so use levels off"
                    if r.keep_images_days is not None
                    else "; nothing is ever deleted ([retention] keep_images_days is off)"
                )
            )
        else:
            forecast = "nothing received in the last 24 h"
        started = h.started_at if h else time.time()
        return {
            "version": __version__,
            "started": dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "uptime": _ago(time.time() - started),
            "ae_title": self.cfg.node.ae_title,
            "port": self.cfg.node.port,
            "tls": self.cfg.node.tls,
            "ready": ready,
            "checks": checks,
            "model": h.model_identity if h and h.model_loaded else None,
            "model_error": h.model_error if h else None,
            "restarts": h.inference_restarts if h else 0,
            "counts": self.reports.counts_by_state().to_json(),
            "data_dir": str(self.files.root),
            "used_gb": f"{usage.used / 1e9:.1f}",
            "total_gb": f"{(usage.used + usage.free) / 1e9:.1f}",
            "free_gb": f"{usage.free / 1e9:.1f}",
            "use_percent": 100.0 * usage.used / max(1, usage.used + usage.free),
            "reserve_mb": f"{s.min_free_mb:g}",
            "rate_mb": f"{rate / 1e6:.1f}",
            "purgeable_studies": len(cands),
            "purgeable_mb": f"{purgeable / 1e6:.1f}",
            "keep_images": (
                f"{r.keep_images_days:g} days after done and delivered"
                if r.keep_images_days is not None
                else "kept forever"
            ),
            "keep_results": (
                f"{r.keep_results_days:g} days after delivery"
                if r.keep_results_days is not None
                else "kept forever"
            ),
            "purge_above": (
                f"{s.purge_above_percent:g} % disk use"
                if s.purge_above_percent is not None
                else "never"
            ),
            "forecast": forecast,
        }

    async def system_page(self, request: Request) -> Response:
        ctx = await run_in_threadpool(self._system)
        return self._render(request, "system.html", title="System", page="system", **ctx)
