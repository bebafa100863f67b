"""The aiohttp application: middlewares, health/ready/metrics, and the session routes.

The server starts before the model is loaded (so ``/health`` answers during a long load);
``attach_engine`` plugs the engine in once it runs, and ``/ready`` turns 200 when it is ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from livelm.daemon.config import Config
from livelm.daemon.http.anthropic_api import AnthropicRoutes
from livelm.daemon.http.compat import Served
from livelm.daemon.http.errors import CLIENT_CLOSED, Handler, error_middleware
from livelm.daemon.http.events import EventRoutes
from livelm.daemon.http.openai_api import OpenAIRoutes
from livelm.daemon.http.sessions import SessionRoutes, json_response
from livelm.daemon.metrics import CONTENT_TYPE, HttpMetrics, WireMetrics, render
from livelm.daemon.transports.auth import KeyCheck
from livelm.daemon.transports.websocket import WS_PATH, WebSocketRoute
from livelm.protocol.errors import Overloaded, Unauthorized

if TYPE_CHECKING:
    from livelm.daemon.engine.engine import Engine

LOADING_RETRY_AFTER = 5.0  # seconds a client is told to wait while the model loads
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # served without an API key
# the WebSocket authenticates its connection itself: by header, or with a hello's api_key
IN_BAND_AUTH_PATHS = frozenset({WS_PATH})


@dataclass
class ServerState:
    """What the routes need that arrives after the server starts, or changes at shutdown."""

    config: Config
    engine: Engine | None = None
    model: str = ""
    kernels: dict[str, str] = field(default_factory=dict)
    draining: bool = False
    http: HttpMetrics = field(default_factory=HttpMetrics)
    wire: WireMetrics = field(default_factory=WireMetrics)

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if self.engine is None or not self.engine.ready:
            return "loading"
        if self.engine.worker_failed:
            return "worker_failed"
        return None

    def engine_for(self) -> Engine:
        """The engine for a request, or ``Overloaded`` (503 + Retry-After) while there is none."""
        if self.draining:
            raise Overloaded("the server is shutting down", retry_after=LOADING_RETRY_AFTER)
        if self.engine is None or not self.engine.ready:
            raise Overloaded("the model is still loading", retry_after=LOADING_RETRY_AFTER)
        return self.engine


STATE = web.AppKey("livelm_state", ServerState)


def build_app(
    engine: Engine | None,
    config: Config,
    *,
    model: str = "",
    kernels: Mapping[str, str] | None = None,
) -> web.Application:
    """The application; ``engine`` may be ``None`` at first and attached later."""
    state = ServerState(config=config, engine=engine, model=model, kernels=dict(kernels or {}))
    app = web.Application(
        client_max_size=config.max_request_bytes,
        middlewares=[_metrics_middleware(state), error_middleware, _auth_middleware(config)],
    )
    app[STATE] = state
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_routes(SessionRoutes(state.engine_for).routes())
    served = Served(state.engine_for, lambda: state.model)
    app.router.add_routes(OpenAIRoutes(served).routes())
    app.router.add_routes(AnthropicRoutes(served).routes())
    app.router.add_routes(EventRoutes(state.engine_for, config.sse_keepalive_s).routes())
    WebSocketRoute(state).install(app)
    return app


def server_state(app: web.Application) -> ServerState:
    return app[STATE]


def attach_engine(
    app: web.Application, engine: Engine, *, model: str, kernels: Mapping[str, str]
) -> None:
    state = app[STATE]
    state.engine, state.model, state.kernels = engine, model, dict(kernels)


def start_draining(app: web.Application) -> None:
    """New session requests get 503 from now on; /ready turns 503 too."""
    app[STATE].draining = True


async def _health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    reason = state.not_ready_reason()
    if reason is not None:
        return json_response({"ready": False, "status": reason}, status=503)
    return json_response({"ready": True, "model": state.model, "kernels": state.kernels})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    text = render(
        state.http,
        engine.metrics() if engine is not None else {},
        ready=state.ready,
        wire=state.wire,
        histograms=engine.latency.histograms() if engine is not None else (),
    )
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _metrics_middleware(state: ServerState) -> Handler:
    @web.middleware
    async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # redirects; errors are answered by error_middleware
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            route = _route_label(request)
            state.http.observe(route, request.method, status, time.perf_counter() - start)

    return count_requests


def _auth_middleware(config: Config) -> Handler:
    keys = KeyCheck(config.api_keys)

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        exempt = request.path in OPEN_PATHS or request.path in IN_BAND_AUTH_PATHS
        if keys.required and not exempt and not keys.headers_match(request.headers):
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY)")
        return await handler(request)

    return check_key

