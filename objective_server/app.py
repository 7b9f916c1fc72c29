"""The FastAPI app: `create_app(settings)` builds one; `app_from_env()` is uvicorn's factory.

The lifespan opens the state store and the corpus, starts the generation pool and registers the
configured runs; routes get them through dependencies (`routes/deps.py`), never from globals. Errors
of the store and the service layer map to HTTP statuses here, in one place.
"""

from __future__ import annotations

import logging
import logging.config
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import objective_server
from objective_server.metrics import Metrics
from objective_server.routes import PROTECTED, PUBLIC
from objective_server.routes.deps import require_token
from objective_server.service.errors import InvalidRequest, NotAcceptable, RequestTooLarge, RunConflict
from objective_server.service.services import Services
from objective_server.settings import Settings
from objective_server.store import (
    ConflictError,
    LockNotAcquired,
    RunExists,
    StoreUnavailable,
    UnknownMixtureVersion,
    UnknownRun,
)

log = logging.getLogger("objective_server")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(settings, metrics)
        app.state.services = services
        corpus = services.corpus
        log.info("store: %s", settings.store_description)
        log.info(
            "corpus: %s (vocab %d; %d train / %d validation tokens)", corpus.path, corpus.vocab_size,
            corpus.split("train").n_tokens, corpus.split("validation").n_tokens,
        )
        log.info(
            "generation: %s, prefetch %d steps per rank, cache %d batches; limits %d tokens per batch, "
            "%d bytes per body; auth %s", services.pool.describe(), settings.prefetch_depth,
            settings.cache_size, settings.max_request_tokens, settings.max_body_bytes,
            "on (bearer token)" if settings.api_token else "off",
        )
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(
        title="Birdie objective server",
        version=getattr(objective_server, "__version__", "0.1.0"),
        description="Addressed, replay-deterministic batches of Birdie objective mixtures; loss posts "
        "drive the mixture policy. Batches are Arrow by default (`format=json` for curl).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by routes/docs.py, behind auth
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for router in PUBLIC:
        app.include_router(router)
    for router in PROTECTED:
        app.include_router(router, dependencies=[Depends(require_token)])
    _add_error_handlers(app, settings, metrics)
    return app


def app_from_env() -> FastAPI:
    """The app for `uvicorn --factory`: settings from the BIRDIE_* environment."""
    return create_app(Settings())


def serve(settings: Settings) -> None:
    """Run the server with uvicorn until interrupted: `settings.workers` processes, each building
    the app from the environment (so every worker gets identical settings)."""
    import copy
    import os
    import shutil
    import tempfile

    import uvicorn

    from objective_server.metrics import MULTIPROC_ENV
    from objective_server.service.registry import check_servable, split_tokens
    from objective_server.service.services import configured_runs, open_corpus

    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["objective_server"] = {
        "handlers": ["default"], "level": settings.log_level.upper(), "propagate": False,
    }
    logging.config.dictConfig(log_config)
    configs = configured_runs(settings)  # a bad run file fails here, once, not in every worker
    # Prepare (or open) the corpus once, before the workers start: they then only open it.
    corpus = open_corpus(settings)
    tokens = split_tokens(corpus)
    for config in configs:  # and so does a run this corpus cannot serve
        check_servable(config, tokens, settings.max_request_tokens)
    settings = settings.model_copy(update={"corpus": corpus.path})
    os.environ.update(settings.environment())
    metrics_dir = None
    if settings.workers > 1 and MULTIPROC_ENV not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="birdie-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    log.info(
        "serving on http://%s:%d with %d worker(s); OpenAPI at /docs; store: %s; corpus: %s",
        settings.host, settings.port, settings.workers, settings.store_description, corpus.path,
    )
    try:
        uvicorn.run(
            "objective_server.app:app_from_env", factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_config=log_config, log_level=settings.log_level,
            access_log=settings.access_log, timeout_graceful_shutdown=10,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _add_error_handlers(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "?")
        metrics.store_errors.labels(route).inc()
        return error(503, f"state store unavailable, retry later: {exc}", retry)

    @app.exception_handler(LockNotAcquired)
    async def lock_busy(request: Request, exc: LockNotAcquired) -> JSONResponse:
        return error(503, f"run is busy, retry later: {exc}", retry)

    @app.exception_handler(UnknownRun)
    async def unknown_run(request: Request, exc: UnknownRun) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(UnknownMixtureVersion)
    async def unknown_version(request: Request, exc: UnknownMixtureVersion) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(RunConflict)
    async def run_conflict(request: Request, exc: RunConflict) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(RunExists)
    async def run_exists(request: Request, exc: RunExists) -> JSONResponse:
        return error(409, f"run {exc} exists")

    @app.exception_handler(ConflictError)
    async def conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return error(413, str(exc))

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(NotAcceptable)
    async def not_acceptable(request: Request, exc: NotAcceptable) -> JSONResponse:
        return error(406, str(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, which fails to render when it is
        # NaN or infinity (a 500 instead of the 422 the client deserves).
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats written as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class BodySizeLimit:
    """Answers 413 to a request body above `max_bytes` before any route parses it.

    The body (at most `max_bytes`) is read here and handed on, so a chunked upload without a
    Content-Length is limited as well as one that declares its size. (Recent FastAPI releases have
    a `max_body_size` of their own; this project supports older ones too.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body above this server's limit of {self.max_bytes} bytes (BIRDIE_MAX_BODY_BYTES)"},
            status_code=413,
        )
        await response(scope, receive, send)
