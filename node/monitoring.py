"""The HTTP server of a role process (``--role listener|worker|exporter``): ``/healthz``,
``/readyz`` and ``/metrics`` of that process on ``[roles] <role>_metrics_port``.

The same handlers as the DICOMweb server's (:func:`health_routes`): ``/healthz`` while the process
lives, ``/readyz`` 200 or 503 with the process's checks (``Node.readiness``), ``/metrics`` the
process's own instruments (``NodeMetrics(parts)``). Nothing here names a patient or a study:
no token, bound to ``[roles] metrics_host`` (loopback by default)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from node.metrics import CONTENT_TYPE, NodeMetrics

log = logging.getLogger("mammo_node.monitoring")

Readiness = Callable[[], tuple[bool, dict]]


def health_routes(
    metrics: NodeMetrics | None, readiness: Readiness | None, role: str | None = None
) -> list[Route]:
    """``/healthz``, ``/readyz`` and ``/metrics``: the one implementation, mounted by the
    DICOMweb server (node.dicomweb) and by a role process's :func:`monitoring_app`.
    ``role``: named in the answers (a role process's); no ``readiness``: always ready; no
    ``metrics``: ``/metrics`` answers 404."""
    named = {} if role is None else {"role": role}

    async def healthz(_request: Request) -> Response:
        """The process is alive and its HTTP server answers."""
        return JSONResponse({"status": "alive", **named})

    async def readyz(_request: Request) -> Response:
        if readiness is None:
            return JSONResponse({"ready": True, **named, "checks": {}})
        ready, checks = await run_in_threadpool(readiness)
        return JSONResponse(
            {"ready": ready, **named, "checks": checks}, status_code=200 if ready else 503
        )

    async def metrics_page(_request: Request) -> Response:
        if metrics is None:
            return JSONResponse({"error": "metrics are not enabled"}, status_code=404)
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]


def monitoring_app(role: str, metrics: NodeMetrics, readiness: Readiness) -> Starlette:
    async def not_found(_request: Request, _exc: Exception) -> Response:
        return PlainTextResponse("only /healthz, /readyz and /metrics here", status_code=404)

    return Starlette(
        routes=health_routes(metrics, readiness, role), exception_handlers={404: not_found}
    )


class MonitoringServer(threading.Thread):
    """uvicorn serving :func:`monitoring_app` in a thread of the role process."""

    def __init__(
        self, role: str, host: str, port: int, metrics: NodeMetrics, readiness: Readiness
    ) -> None:
        super().__init__(name="monitoring", daemon=True)
        self.host, self.port = host, port
        config = uvicorn.Config(
            monitoring_app(role, metrics, readiness),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            limit_concurrency=32,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.failed: BaseException | None = None
        self._settled = threading.Event()

    def run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot bind
            self.failed = exc
        finally:
            self._settled.set()

    def start_and_wait(self, timeout: float = 15.0) -> bool:
        """Start serving; whether it listens (False: it could not bind, the log says why)."""
        self.start()
        waited = 0.0
        while not self.server.started and not self._settled.is_set() and waited < timeout:
            self._settled.wait(0.02)
            waited += 0.02
        return bool(self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)
