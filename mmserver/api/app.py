"""The application factory: routes, error mapping, and the lifespan that starts and stops models."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp
from prometheus_client import CONTENT_TYPE_LATEST

from ..codec import encode_json
from ..errors import MethodNotAllowed, MMServerError, RouteNotFound
from ..manager import ModelManager
from ..metrics import Metrics
from ..runtime import RuntimeRegistry
from ..settings import Settings
from ..watcher import RepositoryWatcher
from . import embeddings, generate, openai, openapi, v2
from .http import JSON, error_parts_for
from .infer import InferenceRoute
from .security import BearerAuth, JSONErrorCORS

log = logging.getLogger(__name__)


def error_response(request: Request, error: MMServerError) -> Response:
    """The error in the body shape of the API the request went to (V2 or OpenAI)."""
    status, headers, body = error_parts_for(request.url.path, error)
    return Response(body, status_code=status, headers=headers)


async def _on_server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, MMServerError):
        return error_response(request, exc)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, MMServerError(f"internal server error: {type(exc).__name__}: {exc}"))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(request, RouteNotFound(f"no route for {request.method} {request.url.path}"))
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return error_response(request, MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}; use {allow or 'another method'}", allow))
    return Response(encode_json({"error": exc.detail}), status_code=exc.status_code, media_type=JSON)


async def _on_mmserver_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MMServerError)
    return error_response(request, exc)


def create_app(settings: Settings, registry: RuntimeRegistry | None = None) -> ASGIApp:
    """Build the ASGI application serving ``settings.model_repository``."""
    registry = registry or RuntimeRegistry.discover()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(settings.infer_threads, thread_name_prefix="mmserver-worker")
        )
        manager = ModelManager(settings, registry, metrics)
        app.state.manager = manager
        starting = asyncio.create_task(_start(manager, settings), name="load startup models")
        starting.add_done_callback(_report_startup_failure)
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            await manager.stop()

    metrics = Metrics(enabled=settings.metrics, triton_aliases=settings.triton_metrics)
    if settings.metrics:  # engines' own metrics (vLLM's), kept per model by their runtime
        metrics.registry.register(_RuntimeMetrics(registry))

    async def serve_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    spec = encode_json(openapi.document(metrics=settings.metrics))

    async def serve_openapi(request: Request) -> Response:
        return Response(spec, media_type=JSON)

    routes = [*v2.routes(), *generate.routes(), *openai.routes(), *embeddings.routes(),
              Route("/openapi.json", serve_openapi, methods=["GET"])]
    if settings.metrics:
        routes.append(Route("/metrics", serve_metrics, methods=["GET"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            MMServerError: _on_mmserver_error,
            HTTPException: _on_http_exception,
            Exception: _on_server_error,
        },
    )
    # No redirect from "/path/" to "/path": a 307 built from the request's Host header is an
    # open redirect, and a hostile name in a URL must get its 404, not a hop elsewhere.
    app.router.redirect_slashes = False
    app.state.settings = settings
    return _protected(InferenceRoute(app, app.state), settings)


class _RuntimeMetrics:
    """A scrape-time collector of every runtime's ``collect_metrics``."""

    def __init__(self, registry: RuntimeRegistry) -> None:
        self.registry = registry

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        for runtime in list(self.registry.runtimes.values()):
            yield from runtime.collect_metrics()


def _protected(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Wrap the application in the bearer-token check and, outside it (browsers send preflight
    requests without credentials), CORS when origins are configured."""
    token = settings.bearer_token
    if token is not None:
        app = BearerAuth(app, token, settings.auth_metrics)
    if settings.cors_origins:
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app = JSONErrorCORS(app, allow_origins=origins, allow_methods=["GET", "POST"],
                            allow_headers=["*"], expose_headers=["Inference-Header-Content-Length"])
    return app


async def _start(manager: ModelManager, settings: Settings) -> None:
    """Load the startup models, then (in watch mode) follow the repository folder for good."""
    await manager.start()
    if settings.model_control_mode == "watch":
        watcher = RepositoryWatcher(
            settings.model_repository, manager.rescan, settings.repository_settle_s, settings.repository_poll
        )
        await watcher.run()


def _report_startup_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading the repository failed: %s", task.exception())
