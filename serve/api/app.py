"""The gateway app: the only process clients reach. Its parts are built once (`build_gateway`), its engine and
background loops start in the lifespan, and every route and error handler is installed here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from lorafleet.serve.api import admin, chat, drift, registry, rollouts
from lorafleet.serve.api.errors import error_response, install_error_handlers
from lorafleet.serve.gateway import build_gateway
from lorafleet.serve.settings import Settings

__all__ = ["create_app", "UploadLimit"]

log = logging.getLogger("lorafleet.gateway")


class UploadLimit:
    """Refuse a body over the upload limit from its Content-Length, before reading any of it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                response = error_response(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                                          "invalid_request_error", "payload_too_large")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """The gateway for these settings; the engine starts with the app and stops with it."""
    gateway = build_gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.supervisor.start()
        tasks = [asyncio.create_task(gateway.controller.run(), name="rollout-controller"),
                 asyncio.create_task(gateway.drift.run(), name="drift-monitor")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gateway.controller.stop()
            await run_in_threadpool(gateway.drift.save_samples)
            await gateway.supervisor.stop()

    app = FastAPI(title="lorafleet", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)  # + multipart framing
    install_error_handlers(app)
    for routes in (chat, registry, rollouts, drift, admin):
        app.include_router(routes.router)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        up = request.app.state.gateway.engine.up
        return JSONResponse({"status": "ready" if up else "engine starting", "engine_up": up},
                            status_code=200 if up else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
