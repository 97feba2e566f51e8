"""The gateway app: the only process clients reach. Its parts are built once (`build_gateway`),
its engine and background loops start in the lifespan, and every route and error handler is
installed here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from lorafleet import __version__
from lorafleet.adapters.tenants import touch_keys
from lorafleet.serve.api import (
    adapters,
    admin,
    batches,
    captures,
    chat,
    drift,
    feedback,
    files,
    models,
    responses,
    rollouts,
    usage,
)
from lorafleet.serve.api.batch_runner import BatchRunner
from lorafleet.serve.api.errors import install_error_handlers
from lorafleet.serve.api.guard import Authenticate, BodyLimit, JsonBodies
from lorafleet.serve.api.openapi import gateway_openapi
from lorafleet.serve.console import install_console
from lorafleet.serve.gateway import Gateway, build_gateway
from lorafleet.serve.route_cache import ROUTE_NEUTRAL
from lorafleet.serve.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("lorafleet.gateway")


# keys' last_used_at is this coarse: one catalog write per minute, not one per request
KEY_USE_FLUSH_S = 60.0


def _save_key_use(gateway: Gateway) -> None:
    used, gateway.route_cache.used = gateway.route_cache.used, {}
    if used:
        with gateway.sessions() as session:
            session.info[ROUTE_NEUTRAL] = True
            touch_keys(session, used)


async def _record_key_use(gateway: Gateway) -> None:
    while True:
        await asyncio.sleep(KEY_USE_FLUSH_S)
        try:
            await run_in_threadpool(_save_key_use, gateway)
        except Exception:  # the catalog may be briefly unavailable; the next round writes it
            log.exception("recording when keys were last used failed")


def _metrics_listener(gateway: Gateway):
    """`/metrics` on its own loopback listener (no key: reachable only from where it listens),
    when configured."""
    settings = gateway.settings
    if not settings.metrics_port:
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(
        settings.metrics_port, settings.metrics_host, registry=gateway.metrics.registry
    )
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return server


def create_app(settings: Settings) -> FastAPI:
    """The gateway for these settings; the engine starts with the app and stops with it."""
    gateway = build_gateway(settings)
    batch_runner = BatchRunner(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.fleet.start()
        tasks = [
            asyncio.create_task(gateway.controller.run(), name="rollout-controller"),
            asyncio.create_task(gateway.drift.run(), name="drift-monitor"),
            asyncio.create_task(gateway.gc.run(), name="garbage-collector"),
            asyncio.create_task(_record_key_use(gateway), name="key-use"),
            asyncio.create_task(gateway.request_log.run(), name="request-log"),
            asyncio.create_task(gateway.usage.run(), name="usage"),
            asyncio.create_task(batch_runner.run(), name="batch-runner"),
        ]
        metrics_server = _metrics_listener(gateway)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await batch_runner.stop()
            await gateway.controller.stop()
            await gateway.request_log.stop()
            await gateway.usage.stop()
            await run_in_threadpool(gateway.drift.save_samples)
            await run_in_threadpool(_save_key_use, gateway)
            await gateway.limiter.aclose()
            if gateway.remote_images is not None:
                await gateway.remote_images.aclose()
            await gateway.fleet.stop()
            if metrics_server is not None:
                metrics_server.shutdown()

    app = FastAPI(title="lorafleet", version=__version__, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.batches = batch_runner
    app.openapi = lambda: gateway_openapi(app)  # type: ignore[method-assign]  # what the routes really take
    # the inner one: after authentication
    app.add_middleware(JsonBodies)  # innermost: routes see JSON bodies as JSON
    app.add_middleware(
        BodyLimit,
        max_upload_bytes=gateway.max_upload_bytes,
        max_request_bytes=settings.max_request_bytes,
        max_file_bytes=settings.max_file_bytes,
    )
    app.add_middleware(Authenticate, gateway=gateway)
    install_error_handlers(app)
    for routes in (
        chat,
        responses,
        models,
        adapters,
        rollouts,
        drift,
        feedback,
        captures,
        files,
        batches,
        usage,
        admin,
    ):
        app.include_router(routes.router)
    app.include_router(usage.admin_router)
    install_console(app)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        fleet = request.app.state.gateway.fleet
        up, state = fleet.up, fleet.state
        return JSONResponse(
            {
                "status": "ready" if up else "engine starting",
                "engine_up": up,
                "engine_state": state,
            },
            status_code=200 if up else 503,
        )

    @app.get("/health")
    def health(request: Request) -> JSONResponse:
        """vLLM's probe, which OpenAI-compatible tools ask (guidellm, load balancers): the
        readiness."""
        return readyz(request)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
