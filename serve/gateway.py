"""The gateway app: the only process clients reach. Builds app-wide state in its lifespan."""

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

from adapters.base_model import load_base_spec
from adapters.catalog import open_catalog
from adapters.registry import deployed_digests
from adapters.store import BlobStore, open_store

from . import api_admin, api_drift, api_openai, api_registry, api_rollouts
from .deps import Gateway
from .controller import RolloutController, new_gateway_id
from .drift_monitor import DriftMonitor
from .engine import Engine
from .errors import error_response, install_error_handlers
from .hardware import quantization_for
from .metrics import Metrics
from .settings import Settings

__all__ = ["create_app"]

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


def _build_gateway(settings: Settings) -> Gateway:
    if not settings.base:
        raise ValueError("no base model: pass --base (hub id or local path) or set LORAFLEET_BASE")
    _, sessions = open_catalog(settings.database_url)
    tmp_dir = settings.home / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    hardware, quantization = quantization_for(settings)
    metrics.engine.info({"base": settings.base, "quantization": quantization.label, "hardware": hardware.describe()})
    engine = Engine(settings, metrics, settings.home / "logs" / "engine.log", hardware, quantization)
    gateway = Gateway(settings=settings, sessions=sessions, store=open_store(settings.store_url),
                      spec=load_base_spec(settings.base), engine=engine, metrics=metrics, tmp_dir=tmp_dir,
                      validation_store=BlobStore(settings.home / "validation", ".jsonl"))
    gateway.controller = RolloutController(gateway, settings.gateway_id or new_gateway_id(), settings.rollout_tick_s,
                                           settings.rollout_lease_s)
    gateway.drift = DriftMonitor(gateway)
    engine.on_ready = lambda: _register_deployed(gateway)
    return gateway


async def _register_deployed(gateway: Gateway) -> None:
    """After every engine start: register every adapter some deployment serves."""
    def digests() -> set[str]:
        with gateway.sessions() as session:
            return deployed_digests(session)

    for digest in sorted(await run_in_threadpool(digests)):
        await gateway.engine.ensure_loaded(digest, gateway.store.local_path(digest))


def create_app(settings: Settings) -> FastAPI:
    """The gateway for these settings; the engine starts with the app and stops with it."""
    gateway = _build_gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.engine.start()
        tasks = [asyncio.create_task(gateway.controller.run()), asyncio.create_task(gateway.drift.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await run_in_threadpool(gateway.controller.release)
            await run_in_threadpool(gateway.drift.save_samples)
            await gateway.engine.stop()

    app = FastAPI(title="lorafleet", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)  # + multipart framing
    install_error_handlers(app)
    app.include_router(api_openai.router)
    app.include_router(api_registry.router)
    app.include_router(api_rollouts.router)
    app.include_router(api_drift.router)
    app.include_router(api_admin.router)

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
